#!/bin/sh
# relayspike.sh: the relay engine spike's measurement (bench/README.md,
# "Relay engine spike"). It builds the two benchmark binaries
# (internal/evloop: the goroutine relay and evloop; bench/gnetspike: gnet v2)
# and runs them interleaved, REPS rounds of every (clients, loops, engine),
# then the system calls under strace and the idle cost, and prints the
# median and the range (min–max) of each figure over the rounds.
#
#   sh bench/relayspike.sh                 # from the repository root
#   REPS=5 CLIENTS="1 64" TX=50000 sh bench/relayspike.sh
#
# Raw benchmark lines go to $OUT/raw.txt (OUT defaults to a temporary
# directory, printed at the start).
set -eu

REPS=${REPS:-3}
CLIENTS=${CLIENTS:-"1 8 64 1000"}
LOOPS=${LOOPS:-"1 2"}
ENGINES=${ENGINES:-"goroutine evloop-level evloop-edge gnet-level gnet-edge"}
TX=${TX:-30000}
STRACE_TX=${STRACE_TX:-10000}
OUT=${OUT:-$(mktemp -d /tmp/relayspike.XXXXXX)}
GO=${GO:-go}

root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
echo "relayspike: results in $OUT" >&2
(cd "$root" && $GO test -c -o "$OUT/evloop.test" ./internal/evloop)
(cd "$root/bench/gnetspike" && $GO test -c -o "$OUT/gnet.test" .)
raw=$OUT/raw.txt
: >"$raw"

# bench ROUND BINARY REGEX BENCHTIME [ENV...]: one benchmark run, its result
# lines prefixed with the round.
bench() {
	round=$1 bin=$2 re=$3 bt=$4
	shift 4
	(cd "$OUT" && env "$@" "./$bin" -test.run '^$' -test.bench "$re" -test.benchtime "$bt") |
		awk -v r="$round" '/^Benchmark/ { print r, $0 }' | tee -a "$raw" >&2
}

binary() {
	case $1 in gnet-*) echo gnet.test ;; *) echo evloop.test ;; esac
}

for round in $(seq "$REPS"); do
	for k in $CLIENTS; do
		for n in $LOOPS; do
			for e in $ENGINES; do
				bench "$round" "$(binary "$e")" "^BenchmarkRelay\$/^$e\$/^loops=$n\$/^clients=$k\$" "${TX}x" RELAYBENCH_STRACE=0
			done
		done
	done
	# System calls at 64 clients, one loop, counted by strace -c -f (its
	# times are not the relay's: strace slows it several times over).
	for e in $ENGINES; do
		bench "$round" "$(binary "$e")" "^BenchmarkRelay\$/^$e\$/^loops=1\$/^clients=64\$" "${STRACE_TX}x" RELAYBENCH_STRACE=1
	done
	bench "$round" evloop.test '^BenchmarkIdle$' 1x RELAYBENCH_STRACE=0
	bench "$round" gnet.test '^BenchmarkIdle$' 1x RELAYBENCH_STRACE=0
done

# The summary: per benchmark (strace rounds apart) and figure, the median
# and the range over the rounds.
awk '
function sortv(a, n,   i, j, t) {
	for (i = 2; i <= n; i++) {
		t = a[i]
		for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]
		a[j + 1] = t
	}
}
{
	name = $2
	sub(/-[0-9]+$/, "", name)
	sub(/^Benchmark/, "", name)
	strace = 0
	for (i = 4; i < NF; i += 2) if ($(i + 1) == "strace-calls/tx") strace = 1
	if (strace) name = name " (strace)"
	if (!(name in seen)) { seen[name] = 1; order[++names] = name }
	for (i = 4; i < NF; i += 2) {
		key = name SUBSEP $(i + 1)
		if (!(key in cnt)) { units[name] = units[name] " " $(i + 1) }
		vals[key, ++cnt[key]] = $i
	}
}
END {
	for (o = 1; o <= names; o++) {
		name = order[o]
		line = name ":"
		nu = split(units[name], us, " ")
		for (u = 1; u <= nu; u++) {
			key = name SUBSEP us[u]
			n = cnt[key]
			for (i = 1; i <= n; i++) v[i] = vals[key, i] + 0
			sortv(v, n)
			med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
			line = line sprintf("  %s %.4g [%.4g–%.4g]", us[u], med, v[1], v[n])
		}
		print line
	}
}' "$raw"
