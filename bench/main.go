// Command bench compares pggovernor with PgBouncer and with Postgres itself,
// side by side, in one interleaved session on the same ephemeral Postgres
// cluster, using pgbench as the client.
//
// It is a Go module of its own (github.com/pggovernor/pggovernor/bench);
// run it from bench/ (or `make bench` from the root):
//
//	go run .                     # the full matrix (about 30 minutes)
//	go run . -quick              # a ~3 minute subset
//	go run . -cases select-simple -clients 1,64 -duration 5s
//	go run . -idle 10000         # RSS per idle client of each pooler
//
// Every run of every case is repeated -reps times with the targets
// interleaved (direct, pgbouncer, pggovernor, direct, ...), so that drift of
// the machine hits all targets alike. The results are printed as a markdown
// table and written to <out>/<timestamp>.md and <out>/latest.md, with a PNG
// chart of TPS against clients at <out>/tps.png. See bench/README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pggovernor/pggovernor/bench/internal/harness"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// options is the parsed command line.
type options struct {
	duration    time.Duration
	reps        int
	cases       []string
	clients     []int // nil: each case's own client counts
	targets     []string
	quick       bool
	idle        int
	out         string
	scale       int
	budget      int
	pgMaxConns  int
	governorBin string
	logLevel    string
	noInstall   bool
	keep        bool
	diagnose    bool
	relay       bool   // the relay scaling run (internal/evloop's BenchmarkRelay)
	runCases    bool   // run the pgbench cases (false for an idle-only run)
	root        string // the repository root
	argv        []string
}

// parseOptions parses the command line. -quick sets defaults that explicit
// flags still override.
func parseOptions(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	var cases, clients, targets string
	fs.DurationVar(&o.duration, "duration", 15*time.Second, "pgbench -T of each run")
	fs.IntVar(&o.reps, "reps", 3, "repetitions of each (case, clients) over all targets, interleaved")
	fs.StringVar(&cases, "cases", strings.Join(caseNames(), ","), "comma list of cases to run")
	fs.StringVar(&clients, "clients", "", "comma list of client counts replacing each case's own (the storm case keeps its own)")
	fs.StringVar(&targets, "targets", "direct,pgbouncer,pggovernor", "comma list of targets, in run order")
	fs.BoolVar(&o.quick, "quick", false, "a ~3 minute subset: select-simple and select-extended at 1 and 64 clients, 5s, 3 reps")
	fs.IntVar(&o.idle, "idle", 0, "open N idle logged-in clients through each pooler and report RSS per client (skips the pgbench cases unless -cases is given)")
	fs.StringVar(&o.out, "out", "", "directory for the results (default bench/results in the repository)")
	fs.IntVar(&o.scale, "scale", 10, "pgbench -i scale factor")
	fs.IntVar(&o.budget, "budget", 20, "server connections of each pooler (pggovernor --budget.max, PgBouncer default_pool_size and max_db_connections)")
	fs.IntVar(&o.pgMaxConns, "pg-max-connections", 130, "Postgres max_connections (direct runs need clients + both poolers' budgets + slack)")
	fs.StringVar(&o.governorBin, "governor", "", "pggovernor binary to use (default: build ./cmd/pggovernor into the run's temporary directory)")
	fs.StringVar(&o.logLevel, "governor-log-level", "warn", "pggovernor --log.level (its log is shown when a run fails)")
	fs.BoolVar(&o.keep, "keep", false, "keep the temporary directory (pooler configurations and logs) instead of removing it")
	fs.BoolVar(&o.diagnose, "diagnose", true, "after the cases: a CPU profile of pggovernor and each pooler's system calls per transaction (strace -c), in the report")
	fs.BoolVar(&o.relay, "relay-scaling", true, "after the cases: the relay alone (internal/evloop's BenchmarkRelay against scripted servers, no Postgres) at 1 and 2 event loops, -reps times, for the targets table")
	fs.BoolVar(&o.noInstall, "no-install", false, "do not apt-get install pgbouncer when it is missing (skip the target instead)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if o.quick {
		if !set["diagnose"] {
			o.diagnose = false
		}
		if !set["relay-scaling"] {
			o.relay = false
		}
		if !set["duration"] {
			o.duration = 5 * time.Second
		}
		if !set["cases"] {
			cases = "select-simple,select-extended"
		}
		if !set["clients"] {
			clients = "1,64"
		}
	}
	o.runCases = o.idle == 0 || set["cases"] || o.quick
	var err error
	if o.cases, err = parseCaseList(cases); err != nil {
		return o, err
	}
	if clients != "" {
		if o.clients, err = parseInts(clients); err != nil {
			return o, fmt.Errorf("-clients: %w", err)
		}
	}
	if o.targets, err = parseTargetList(targets); err != nil {
		return o, err
	}
	if o.reps < 1 || o.duration < time.Second {
		return o, errors.New("-reps must be at least 1 and -duration at least 1s")
	}
	o.argv = args
	return o, nil
}

// parseInts parses "1,8,64".
func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("bad number %q", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// parseCaseList checks a comma list of case names.
func parseCaseList(s string) ([]string, error) {
	known := map[string]bool{}
	for _, n := range caseNames() {
		known[n] = true
	}
	var out []string
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if !known[f] {
			return nil, fmt.Errorf("unknown case %q (known: %s)", f, strings.Join(caseNames(), ", "))
		}
		out = append(out, f)
	}
	return out, nil
}

// parseTargetList checks a comma list of target names.
func parseTargetList(s string) ([]string, error) {
	var out []string
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		switch f {
		case targetDirect, targetPgBouncer, targetGovernor:
			out = append(out, f)
		default:
			return nil, fmt.Errorf("unknown target %q (known: direct, pgbouncer, pggovernor)", f)
		}
	}
	return out, nil
}

// run is the whole session: set up, measure, report, tear down.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseOptions(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	o.root = root
	if o.out == "" {
		o.out = filepath.Join(root, "bench", "results")
	}
	logf := func(format string, a ...any) { fmt.Fprintf(stderr, format+"\n", a...) }

	// File descriptors: pgbench and each pooler hold one per client (the
	// limit is inherited by the children).
	need := 2048
	for _, n := range o.clients {
		need = max(need, 2*n+1024)
	}
	if o.runCases && o.clients == nil {
		need = max(need, 2*1000+1024)
	}
	if o.idle > 0 {
		need = max(need, o.idle+1024)
	}
	limit, lerr := raiseNoFile(uint64(need))
	logf("RLIMIT_NOFILE: %d (wanted %d)", limit, need)
	if lerr != nil {
		logf("warning: %v", lerr)
	}

	cases := selectCases(o)
	targetNames := o.targets
	if !o.runCases {
		// The idle mode measures poolers only.
		targetNames = without(targetNames, targetDirect)
	}
	work, cred, err := makeWorkDir()
	if err != nil {
		return err
	}
	defer func() {
		if o.keep {
			logf("kept %s (pooler configurations and logs)", work)
			return
		}
		_ = os.RemoveAll(work)
	}()
	bins, err := findTools(ctx, root, work, o, targetNames, logf)
	if err != nil {
		return err
	}
	if bins.pgbouncer == "" {
		targetNames = without(targetNames, targetPgBouncer)
	}

	e, err := newEnv(ctx, o, bins, work, cred, logf)
	if err != nil {
		return err
	}
	defer e.close()

	maxClients := 1000
	for _, c := range cases {
		for _, n := range c.Clients {
			maxClients = max(maxClients, n)
		}
	}
	targets := makeTargets(e, targetNames)
	defer func() {
		for _, t := range targets {
			t.Stop()
		}
	}()

	started := time.Now()
	facts := gatherFacts(ctx, e, bins)
	var results *resultSet
	if o.runCases && len(cases) > 0 {
		results, err = runCases(ctx, e, o, cases, targets, maxClients, logf)
		if err != nil && results == nil {
			return err
		}
		if err != nil {
			logf("session ended early: %v (writing what was measured)", err)
		}
	}
	var diag diagnostics
	if o.runCases && o.diagnose && ctx.Err() == nil {
		diag = runDiagnostics(ctx, e, o, targets, maxClients, logf)
	}
	var relay relayScaling
	if o.runCases && o.relay && ctx.Err() == nil {
		relay = runRelayScaling(ctx, e, o, logf)
	}
	var idle []idleResult
	if o.idle > 0 && ctx.Err() == nil {
		n := o.idle
		if limit < uint64(n)+1024 {
			n = int(limit) - 1024
			logf("file limit %d does not allow %d idle clients: measuring %d", limit, o.idle, n)
			facts.notes = append(facts.notes, fmt.Sprintf("RLIMIT_NOFILE %d did not allow %d idle clients; %d were measured", limit, o.idle, n))
		}
		idle, err = runIdle(ctx, e, targets, n, logf)
		if err != nil {
			logf("idle mode: %v", err)
		}
	}
	facts.elapsed = time.Since(started)
	if ctx.Err() != nil {
		facts.notes = append(facts.notes, "the session was interrupted: the results are partial")
	}
	if results == nil && idle == nil {
		return errors.New("nothing was measured")
	}
	if err := writeReport(o, facts, cases, targetNames, results, idle, diag, relay, stdout, logf); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return errors.New("interrupted (partial results written)")
	}
	return nil
}

// without returns list minus name.
func without(list []string, name string) []string {
	var out []string
	for _, s := range list {
		if s != name {
			out = append(out, s)
		}
	}
	return out
}

// runCases runs every (case, clients) with every target, rep by rep, the
// targets interleaved inside each rep. Poolers are restarted only when the
// client authentication method changes between cases.
func runCases(ctx context.Context, e *env, o options, cases []benchCase, targets []target, maxClients int, logf func(string, ...any)) (*resultSet, error) {
	rs := newResultSet()
	total := 0
	for _, c := range cases {
		for _, n := range c.Clients {
			for _, t := range targets {
				if ok, _ := t.Supports(c, n); ok {
					total += o.reps
				}
			}
		}
	}
	logf("%d pgbench runs of %s each (about %s)", total, o.duration, (time.Duration(total) * (o.duration + 2*time.Second)).Round(time.Second))
	done := 0
	auth := ""
	for _, c := range cases {
		if c.Auth != auth {
			auth = c.Auth
			for _, t := range targets {
				t.Stop()
				if err := t.Start(ctx, auth, maxClients+100); err != nil {
					return rs, fmt.Errorf("starting %s (client auth %s): %w", t.Name(), auth, err)
				}
			}
			logf("targets ready with client auth %s", auth)
		}
		for _, n := range c.Clients {
			for _, t := range targets {
				if ok, why := t.Supports(c, n); !ok {
					rs.markNA(c.Name, n, t.Name(), why)
				}
			}
			for rep := 1; rep <= o.reps; rep++ {
				for _, t := range targets {
					if ok, _ := t.Supports(c, n); !ok {
						continue
					}
					if err := ctx.Err(); err != nil {
						return rs, err
					}
					if t.Exited() {
						logf("%s exited; its log (last lines):\n%s\nrestarting it", t.Name(), indent(t.LogTail(40), "    | "))
						t.Stop()
						if err := t.Start(ctx, auth, maxClients+100); err != nil {
							return rs, fmt.Errorf("restarting %s: %w", t.Name(), err)
						}
					}
					done++
					r := runOne(ctx, e, o, c, n, t, rep)
					if ctx.Err() != nil {
						return rs, ctx.Err() // an interrupted run is not a result
					}
					rs.add(r)
					logf("[%d/%d] %-15s c=%-4d %-10s rep %d: %s", done, total, c.Name, n, t.Name(), rep, r.summary())
					if r.Err != "" || r.Errors() > 0 {
						logf("%s", indent(r.Output, "    | "))
						if tail := t.LogTail(40); tail != "" {
							logf("    %s log (last lines):\n%s", t.Name(), indent(tail, "    | "))
						}
					}
				}
			}
		}
	}
	return rs, nil
}

// indent prefixes every line of s.
func indent(s, prefix string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return prefix + strings.ReplaceAll(s, "\n", "\n"+prefix)
}
