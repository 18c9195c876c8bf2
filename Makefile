# pggovernor — the two commands a newcomer runs are `make run` and `make test`.
# Everything the tests and the benchmark need from outside Go (PostgreSQL
# server binaries, psql, pgbench, Debian's PgBouncer exporter, PgBouncer for
# the benchmark) is checked here and installed with apt-get when possible,
# or named precisely. The tests themselves install nothing.
#
# Four Go modules: the product (.), deploy/ (the Helm chart's tests, the
# image builder: Helm, Kubernetes and go-containerregistry stay out of the
# product's go.mod), bench/ (the benchmark harness and its plotting) and
# bench/gnetspike (the relay engine spike's gnet side; vetted, no tests).

GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
BIN      := bin/pggovernor
MODULES  := . deploy bench bench/gnetspike

# Build with the toolchain go.mod names (its toolchain line: the newest
# patch release), fetched through the module proxy when the local go is
# older — also where the environment says GOTOOLCHAIN=local, which would
# build with whatever go is installed. `make GOTOOLCHAIN=local …` does that
# on purpose.
GOTOOLCHAIN := auto
export GOTOOLCHAIN

# govulncheck, run by version so that it stays out of go.mod.
GOVULNCHECK ?= golang.org/x/vuln/cmd/govulncheck@v1.9.0

# image: the OCI image as a docker-archive tarball (`docker load`, `podman
# load`, `skopeo copy docker-archive:...`), built without a Docker engine.
# Same commit, same bytes: the binary is built with -trimpath and no build
# id, and every timestamp in the image is SOURCE_DATE_EPOCH (the commit's).
GOARCH   ?= $(shell $(GO) env GOARCH)
IMAGE    := bin/pggovernor-image.tar
IMAGEBIN := bin/pggovernor-linux-$(GOARCH)
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)

.PHONY: all build image run test test-short vet vulncheck fmt fuzz faults faults-switchover bench bench-quick soak deps deps-bench clean

all: build

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/pggovernor

image:
	CGO_ENABLED=0 GOOS=linux GOARCH=$(GOARCH) $(GO) build -trimpath -ldflags "$(LDFLAGS) -buildid=" -o $(IMAGEBIN) ./cmd/pggovernor
	cd deploy && $(GO) run ./cmd/mkimage -binary ../$(IMAGEBIN) -arch $(GOARCH) -version $(VERSION) \
	  -revision "$$(git rev-parse HEAD 2>/dev/null)" -created $(SOURCE_DATE_EPOCH) -out ../$(IMAGE)

## run: build, start an ephemeral Postgres and pggovernor in front of it, print the psql line.
run: deps build
	@$(GO) build -o bin/devrun ./internal/devrun
	@bin/devrun -bin $(BIN)

## test: go vet, govulncheck, then every test of the product with the race
## detector against real Postgres, each fuzz target for a few seconds, then
## the deploy module's (the chart rendered and decoded into the Kubernetes
## API types, the Coder values files, the image built and run) and the bench
## module's (the short fault suite, bench/faults, among them).
test: deps vet vulncheck
	$(GO) test -race -count=1 -timeout 20m ./...
	@$(MAKE) --no-print-directory fuzz FUZZTIME=3s
	cd deploy && $(GO) test -count=1 -timeout 10m ./...
	cd bench && $(GO) test -race -count=1 -timeout 10m ./...

test-short: deps
	$(GO) test -short -count=1 ./...
	cd deploy && $(GO) test -short -count=1 ./...
	cd bench && $(GO) test -short -count=1 ./...

## fuzz: every fuzz target for FUZZTIME (go test -fuzz takes one target per
## package at a time). Seeds are in each package's testdata/fuzz; what the
## fuzzer finds goes to the build cache, a failing input to testdata/fuzz.
FUZZTIME ?= 60s
FUZZ_TARGETS := ./wire:FuzzReader ./auth:FuzzParseHBA ./proxy:FuzzScanSQL ./proxy:FuzzParseOptions ./proxy:FuzzStartup ./proxy:FuzzSession
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; name=$${t##*:}; \
	  echo "fuzz $$name ($$pkg, $(FUZZTIME))"; \
	  $(GO) test -run='^$$' -fuzz="^$$name\$$" -fuzztime=$(FUZZTIME) $$pkg; done

## faults: the full fault suite (bench/faults): a writer workload through the
## binary under each fault three times; prints the table of fault,
## acknowledged, missing, unknown, errors by SQLSTATE and recovery, and fails
## on any violation. FAULTSFLAGS passes flags (-only, -rounds, -keep, -v).
## Then the switchover suite (faults-switchover).
faults: deps
	cd bench && $(GO) run ./faults $(FAULTSFLAGS)
	@$(MAKE) --no-print-directory faults-switchover

## faults-switchover: the switchover suite in full (cmd/pggovernor's
## TestSwitchover with PGGOVERNOR_FAULTS=full): a primary and a synchronous
## replica, 32 writers through pggovernor, the primary's role moved (aurora,
## multi-az, dns, cluster) three times each; prints the table of case,
## acknowledged, missing, errors per client, time to writes resumed and
## connections to the old host after 2 s, and fails on a missing commit,
## more than one error per client or a bound of 2 s not held. make test runs
## the short version (8 writers, once, the times only reported).
faults-switchover: deps
	PGGOVERNOR_FAULTS=full $(GO) test -count=1 -timeout 30m -run '^TestSwitchover$$' -v ./cmd/pggovernor

vet:
	@set -e; for m in $(MODULES); do echo "go vet ($$m)"; (cd $$m && $(GO) vet ./...); done
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	 if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

# vulncheck: the known vulnerabilities of the code's call graph, the Go
# standard library's included. Exit code 3 (vulnerabilities found) fails;
# where the vulnerability database (vuln.go.dev) or govulncheck itself
# cannot be fetched, it is skipped with a message.
vulncheck:
	@out=$$($(GO) run $(GOVULNCHECK) ./... 2>&1); rc=$$?; \
	 if [ $$rc -eq 0 ]; then printf '%s\n' "$$out"; \
	 elif [ $$rc -ne 3 ] && printf '%s' "$$out" | grep -qE 'fetching vulnerabilities|golang\.org/x/vuln@|dial tcp|no such host'; then \
	   echo "govulncheck: SKIPPED, the vulnerability database or govulncheck cannot be reached from here:"; \
	   printf '%s\n' "$$out" | tail -n 3; \
	 else printf '%s\n' "$$out"; exit $$rc; fi

fmt:
	gofmt -w $$(git ls-files '*.go')

## bench: the interleaved benchmark against direct Postgres, PgBouncer and pggovernor.
# The full matrix with 7 s runs (3 repetitions, interleaved), the
# diagnostics, then 10,000 idle clients: under 20 minutes on 2 cores.
BENCHFLAGS ?= -duration 7s -idle 10000 -cases select-simple,select-extended,select-prepared,tpcb,storm
bench: deps deps-bench
	cd bench && $(GO) run . $(BENCHFLAGS)

bench-quick: deps deps-bench
	cd bench && $(GO) run . -quick

## soak: the cluster budget under faults for 5 minutes (bench/clustersoak).
soak: deps
	cd bench && $(GO) run ./clustersoak $(SOAKFLAGS)

# deps: PostgreSQL server binaries (initdb, postgres), psql and pgbench, and
# Debian's prometheus-pgbouncer-exporter (a test scrapes the admin console
# with it). The tests fail, naming `make deps`, when one is missing.
deps:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || [ -n "$$PG_BINDIR" ]; then :; \
	 elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	   echo "installing PostgreSQL server binaries (apt-get install postgresql)"; \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql postgresql-client >/dev/null || \
	   { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql postgresql-client >/dev/null; }; \
	 else echo "missing: PostgreSQL server binaries (initdb, postgres). Install them: sudo apt-get install postgresql postgresql-client (Debian/Ubuntu), or set PG_BINDIR to their directory."; exit 1; fi
	@command -v psql >/dev/null && command -v pgbench >/dev/null || \
	 { echo "missing: psql and pgbench. Install them: sudo apt-get install postgresql-client postgresql-contrib"; exit 1; }
	@if [ -x /usr/bin/prometheus-pgbouncer-exporter ]; then :; \
	 elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	   echo "installing prometheus-pgbouncer-exporter (apt-get install prometheus-pgbouncer-exporter)"; \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus-pgbouncer-exporter >/dev/null || \
	   { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus-pgbouncer-exporter >/dev/null; }; \
	 else echo "missing: /usr/bin/prometheus-pgbouncer-exporter. Install it: sudo apt-get install prometheus-pgbouncer-exporter"; exit 1; fi

# deps-bench: PgBouncer for the side-by-side benchmark (and strace for its
# system call counts; bench/ installs it too when missing).
deps-bench:
	@command -v pgbouncer >/dev/null || ls /usr/sbin/pgbouncer >/dev/null 2>&1 || \
	 if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	   echo "installing PgBouncer (apt-get install pgbouncer)"; \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null || \
	   { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null; }; \
	 else echo "missing: pgbouncer. Install it: sudo apt-get install pgbouncer"; exit 1; fi

clean:
	rm -rf bin
