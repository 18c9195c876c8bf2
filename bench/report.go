package main

import (
	"context"
	"debug/buildinfo"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// resultKey identifies one cell of the matrix.
type resultKey struct {
	Case    string
	Clients int
	Target  string
}

// resultSet collects the runs of a session.
type resultSet struct {
	runs map[resultKey][]runResult
	na   map[resultKey]string
}

func newResultSet() *resultSet {
	return &resultSet{runs: map[resultKey][]runResult{}, na: map[resultKey]string{}}
}

func (rs *resultSet) add(r runResult) {
	k := resultKey{r.Case, r.Clients, r.Target}
	rs.runs[k] = append(rs.runs[k], r)
}

func (rs *resultSet) markNA(c string, clients int, t, why string) {
	rs.na[resultKey{c, clients, t}] = why
}

// row is one line of the table: the aggregate of a cell's reps.
type row struct {
	key       resultKey
	na        string // reason, when the cell cannot run
	runs      int
	ok        bool // at least one run produced a TPS
	tps       float64
	meanMs    float64
	p99Ms     float64
	connMs    float64
	cpuPer10k float64
	cpuOK     bool
	rssMiB    float64
	errors    int64
}

// aggregate summarizes a cell: medians over reps of TPS, mean latency, p99
// latency and connection time; CPU is total CPU over total transactions;
// RSS is the highest peak; errors are summed.
func (rs *resultSet) aggregate(k resultKey) row {
	r := row{key: k}
	if why, ok := rs.na[k]; ok {
		r.na = why
		return r
	}
	runs := rs.runs[k]
	r.runs = len(runs)
	var tps, mean, p99, conn []float64
	var cpu float64
	var tx int64
	for _, x := range runs {
		r.errors += x.Errors()
		r.rssMiB = max(r.rssMiB, float64(x.PeakRSS)/(1<<20))
		if x.TPS <= 0 {
			continue
		}
		tps = append(tps, x.TPS)
		mean = append(mean, x.MeanMs)
		p99 = append(p99, x.P99Ms)
		conn = append(conn, x.ConnMs)
		if x.CPUOK {
			cpu += x.CPUSeconds
			tx += x.CPUTx
		}
	}
	if len(tps) == 0 {
		return r
	}
	r.ok = true
	r.tps, r.meanMs, r.p99Ms, r.connMs = median(tps), median(mean), median(p99), median(conn)
	if tx > 0 {
		r.cpuPer10k, r.cpuOK = cpu/float64(tx)*10000, true
	}
	return r
}

// median of a non-empty slice.
func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// facts describe the machine and the software measured.
type facts struct {
	cpuModel       string
	nproc          int
	kernel         string
	postgres       string
	pgbouncer      string
	goVersion      string
	governorGo     string
	governorCommit string
	date           time.Time
	elapsed        time.Duration
	command        string
	notes          []string
}

// gatherFacts collects the machine facts for the report.
func gatherFacts(ctx context.Context, e *env, bins tools) facts {
	f := facts{nproc: runtime.NumCPU(), goVersion: runtime.Version(), date: time.Now().UTC(), pgbouncer: "not used"}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				f.cpuModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		f.kernel = strings.TrimSpace(string(b))
	}
	if rows, err := e.cluster.Exec(ctx, "SELECT version()"); err == nil && len(rows) > 0 {
		f.postgres = rows[0][0]
	}
	if bins.pgbouncer != "" {
		f.pgbouncer = "PgBouncer " + bins.pgbouncerVersion + " (" + bins.pgbouncer + ")"
	}
	f.governorCommit = "unknown (binary has no VCS stamp)"
	if bi, err := buildinfo.ReadFile(bins.governor); err == nil {
		f.governorGo = bi.GoVersion
		var rev, modified, when string
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				modified = s.Value
			case "vcs.time":
				when = s.Value
			}
		}
		if rev != "" {
			f.governorCommit = rev
			if when != "" {
				f.governorCommit += " (" + when + ")"
			}
			if modified == "true" {
				f.governorCommit += ", with uncommitted changes"
			}
		}
	}
	if bins.governorBuilt && strings.HasPrefix(f.governorCommit, "unknown") {
		// Built here without a VCS stamp (GOFLAGS=-buildvcs=false, say).
		if rev := gitHead(e.opts.root); rev != "" {
			f.governorCommit = rev + " (HEAD of the work tree it was built from; uncommitted changes not detected)"
		}
	}
	f.command = commandLine()
	return f
}

// gitHead reads the commit HEAD points to from the .git directory's files
// (no git command is run), or "" when it cannot.
func gitHead(root string) string {
	gitDir := filepath.Join(root, ".git")
	head, err := os.ReadFile(filepath.Join(gitDir, "HEAD"))
	if err != nil {
		return ""
	}
	ref, isRef := strings.CutPrefix(strings.TrimSpace(string(head)), "ref: ")
	if !isRef {
		return ref // detached HEAD
	}
	if b, err := os.ReadFile(filepath.Join(gitDir, filepath.FromSlash(ref))); err == nil {
		return strings.TrimSpace(string(b))
	}
	packed, err := os.ReadFile(filepath.Join(gitDir, "packed-refs"))
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(packed), "\n") {
		if sha, name, ok := strings.Cut(line, " "); ok && name == ref {
			return sha
		}
	}
	return ""
}

// commandLine is how this session was started.
func commandLine() string {
	name := os.Args[0]
	if strings.Contains(name, "go-build") { // go run
		name = "(cd bench && go run .)"
	}
	parts := []string{name}
	for _, a := range os.Args[1:] {
		if strings.ContainsAny(a, " \t'\"$") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}

// writeReport prints the report and writes it, and the chart, to o.out.
func writeReport(o options, f facts, cases []benchCase, targetNames []string, rs *resultSet, idle []idleResult, diag diagnostics, relay relayScaling, stdout io.Writer, logf func(string, ...any)) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# pggovernor benchmark, %s\n\n", f.date.Format("2006-01-02 15:04 UTC"))
	if rs != nil {
		writeTable(&b, o, cases, targetNames, rs)
	}
	if len(idle) > 0 {
		writeIdleTable(&b, idle)
	}
	writeTargets(&b, rs, idle, diag, relay)
	writeDiagnostics(&b, diag)
	fmt.Fprintf(&b, "## Machine and software\n\n")
	fmt.Fprintf(&b, "- CPU: %s, nproc %d\n", f.cpuModel, f.nproc)
	fmt.Fprintf(&b, "- kernel: %s\n", f.kernel)
	fmt.Fprintf(&b, "- Postgres: %s\n", f.postgres)
	fmt.Fprintf(&b, "- PgBouncer: %s\n", f.pgbouncer)
	fmt.Fprintf(&b, "- Go: %s (harness), %s (pggovernor binary)\n", f.goVersion, f.governorGo)
	fmt.Fprintf(&b, "- pggovernor commit: %s\n", f.governorCommit)
	fmt.Fprintf(&b, "- date: %s, session took %s\n", f.date.Format(time.RFC3339), f.elapsed.Round(time.Second))
	for _, n := range f.notes {
		fmt.Fprintf(&b, "- note: %s\n", n)
	}
	fmt.Fprintf(&b, "\nCommand: `%s`\n", f.command)
	text := b.String()
	fmt.Fprint(stdout, "\n"+text)

	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	name, latest := f.date.Format("20060102-150405")+".md", "latest.md"
	if rs == nil {
		name, latest = f.date.Format("20060102-150405")+"-idle.md", "latest-idle.md"
	}
	for _, n := range []string{name, latest} {
		if err := os.WriteFile(filepath.Join(o.out, n), []byte(text), 0o644); err != nil {
			return err
		}
	}
	logf("wrote %s and %s", filepath.Join(o.out, name), filepath.Join(o.out, latest))
	if rs != nil {
		png := filepath.Join(o.out, "tps.png")
		if wrote, err := writeChart(png, rs, targetNames); err != nil {
			logf("chart: %v", err)
		} else if wrote {
			logf("wrote %s", png)
		}
	}
	return nil
}

// writeTable writes the results table and its notes.
func writeTable(b *strings.Builder, o options, cases []benchCase, targetNames []string, rs *resultSet) {
	fmt.Fprintf(b, "pgbench -T %s, %d reps interleaved across targets, scale %d, pooler budget %d server connections, pgbench -j 2 (-j 1 for 1 client).\n\n",
		o.duration, o.reps, o.scale, o.budget)
	fmt.Fprintf(b, "| case | clients | target | median TPS | mean latency ms | p99 latency ms | ratio vs direct | ratio vs PgBouncer | pooler CPU s per 10k tx | peak RSS MiB | errors |\n")
	fmt.Fprintf(b, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	var notes []string
	naSeen := map[string]bool{}
	for _, c := range cases {
		for _, n := range c.Clients {
			direct := rs.aggregate(resultKey{c.Name, n, targetDirect})
			bouncer := rs.aggregate(resultKey{c.Name, n, targetPgBouncer})
			for _, t := range targetNames {
				r := rs.aggregate(resultKey{c.Name, n, t})
				if r.na != "" {
					fmt.Fprintf(b, "| %s | %d | %s | n/a | | | | | | | |\n", c.Name, n, t)
					if !naSeen[r.na] {
						naSeen[r.na] = true
						notes = append(notes, fmt.Sprintf("n/a %s: %s.", t, r.na))
					}
					continue
				}
				if r.runs == 0 {
					continue // not run (interrupted)
				}
				if !r.ok {
					fmt.Fprintf(b, "| %s | %d | %s | failed | | | | | | %s | %d |\n", c.Name, n, t, mib(r), r.errors)
					continue
				}
				fmt.Fprintf(b, "| %s | %d | %s | %.0f | %.3f | %.3f | %s | %s | %s | %s | %d |\n",
					c.Name, n, t, r.tps, r.meanMs, r.p99Ms, ratio(r, direct), ratio(r, bouncer), cpu(r), mib(r), r.errors)
				if c.Storm {
					notes = append(notes, fmt.Sprintf("storm, %s: average connection time %.3f ms (pgbench).", t, r.connMs))
				}
			}
		}
	}
	fmt.Fprintf(b, "\n")
	for _, n := range notes {
		fmt.Fprintf(b, "- %s\n", n)
	}
	for _, e := range errorSamples(rs) {
		fmt.Fprintf(b, "- errors, %s\n", e)
	}
	if slices.ContainsFunc(cases, func(c benchCase) bool { return c.Storm }) {
		fmt.Fprintf(b, "- storm is `pgbench -C -S`: a new connection per transaction, with md5 client authentication for every target (Postgres: a role with an md5 verifier and an md5 pg_hba line), so that pgbench's own SCRAM cost does not dominate; its TPS includes the reconnections.\n")
	}
	fmt.Fprintf(b, "- TPS is pgbench's, without the initial connection time (storm: including reconnections); latencies are from pgbench's per-transaction log (--log), connection time excluded; each is the median over reps.\n\n")
}

// errorSamples returns, for each cell with errors, the first pgbench error
// line seen.
func errorSamples(rs *resultSet) []string {
	var out []string
	keys := make([]resultKey, 0, len(rs.runs))
	for k := range rs.runs {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b resultKey) int {
		return strings.Compare(fmt.Sprintf("%s %06d %s", a.Case, a.Clients, a.Target), fmt.Sprintf("%s %06d %s", b.Case, b.Clients, b.Target))
	})
	for _, k := range keys {
		for _, r := range rs.runs[k] {
			if r.Errors() == 0 {
				continue
			}
			line := r.Err
			for _, l := range strings.Split(r.Output, "\n") {
				if strings.Contains(l, "error") || strings.Contains(l, "aborted") || strings.Contains(l, "FATAL") {
					line = strings.TrimSpace(l)
					break
				}
			}
			out = append(out, fmt.Sprintf("%s c=%d %s rep %d: `%s`", k.Case, k.Clients, k.Target, r.Rep, line))
			break
		}
	}
	return out
}

// ratio formats r's TPS over base's.
func ratio(r, base row) string {
	if !base.ok || base.tps == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", r.tps/base.tps)
}

// cpu formats the pooler CPU column.
func cpu(r row) string {
	if !r.cpuOK {
		return "-"
	}
	return fmt.Sprintf("%.3f", r.cpuPer10k)
}

// mib formats the peak RSS column.
func mib(r row) string {
	if r.rssMiB == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", r.rssMiB)
}

// The targets of issue 14 (relay engine v2) for this kind of machine (2
// cores shared by pgbench, the pooler and Postgres).
const (
	targetCPURatio      = 0.75 // own CPU per transaction ≤ this × PgBouncer's
	targetTPSRatio      = 1.1  // TPS ≥ this × PgBouncer's at 8, 64 and 1000 clients
	targetTPSRatio1     = 1.0  // TPS ≥ this × PgBouncer's at 1 client
	targetLatencyRatio  = 1.3  // 1-client mean latency ≤ this × direct
	targetSyscallsPerTx = 4.5  // strace -c, -S simple, 64 clients
	targetIdleClients   = 10000
	targetIdleKiB       = 2.0 // RSS per idle client
	targetActiveClients = 1000
	targetActiveMiB     = 40.0 // peak RSS with 1000 active clients
	targetStormRatio    = 1.0  // connection storm TPS ≥ this × PgBouncer's
)

// Verdicts of the targets table.
const (
	verdictMet         = "MET"
	verdictNotMet      = "NOT MET"
	verdictNotMeasured = "not measured in this session"
	verdictReported    = "reported (no threshold)"
)

// goal is one line of the targets table.
type goal struct {
	name    string
	verdict string
	figures string
}

// judge is MET or NOT MET.
func judge(ok bool) string {
	if ok {
		return verdictMet
	}
	return verdictNotMet
}

// targetGoals compares the session's results with the targets, each MET or
// NOT MET with the figures, or not measured in this session.
func targetGoals(rs *resultSet, idle []idleResult, diag diagnostics, relay relayScaling) []goal {
	var goals []goal
	cell := func(c string, n int, t string) (row, bool) {
		if rs == nil {
			return row{}, false
		}
		r := rs.aggregate(resultKey{c, n, t})
		return r, r.ok
	}
	both := func(c string, n int) (g, p row, ok bool) {
		g, ok1 := cell(c, n, targetGovernor)
		p, ok2 := cell(c, n, targetPgBouncer)
		return g, p, ok1 && ok2
	}
	mode := func(c string) string { return strings.TrimPrefix(c, "select-") }
	selects := []string{"select-simple", "select-extended"}

	for _, c := range selects {
		for _, n := range []int{8, 64, 1000} {
			gl := goal{name: fmt.Sprintf("own CPU per transaction ≤ %.2f× PgBouncer's, -S %s, %d clients", targetCPURatio, mode(c), n), verdict: verdictNotMeasured}
			if g, p, ok := both(c, n); ok && g.cpuOK && p.cpuOK && p.cpuPer10k > 0 {
				r := g.cpuPer10k / p.cpuPer10k
				gl.verdict = judge(r <= targetCPURatio)
				// s per 10k tx × 100 = µs per tx.
				gl.figures = fmt.Sprintf("%.2f× (%.1f vs %.1f µs)", r, g.cpuPer10k*100, p.cpuPer10k*100)
			}
			goals = append(goals, gl)
		}
	}
	for _, c := range selects {
		for _, n := range []int{1, 8, 64, 1000} {
			want := targetTPSRatio
			if n == 1 {
				want = targetTPSRatio1
			}
			gl := goal{name: fmt.Sprintf("TPS ≥ %.1f× PgBouncer's, -S %s, %d client%s", want, mode(c), n, plural(n)), verdict: verdictNotMeasured}
			if g, p, ok := both(c, n); ok && p.tps > 0 {
				r := g.tps / p.tps
				gl.verdict = judge(r >= want)
				gl.figures = fmt.Sprintf("%.2f× (%.0f vs %.0f TPS)", r, g.tps, p.tps)
			}
			goals = append(goals, gl)
		}
	}
	for _, c := range selects {
		gl := goal{name: fmt.Sprintf("1-client mean latency ≤ %.1f× direct, -S %s", targetLatencyRatio, mode(c)), verdict: verdictNotMeasured}
		if g, ok1 := cell(c, 1, targetGovernor); ok1 {
			if d, ok2 := cell(c, 1, targetDirect); ok2 && d.meanMs > 0 {
				r := g.meanMs / d.meanMs
				gl.verdict = judge(r <= targetLatencyRatio)
				gl.figures = fmt.Sprintf("%.2f× (%.3f vs %.3f ms)", r, g.meanMs, d.meanMs)
			}
		}
		goals = append(goals, gl)
	}

	sys := goal{name: fmt.Sprintf("system calls per transaction ≤ %.1f (strace -c, -S simple, %d clients)", targetSyscallsPerTx, profileClients), verdict: verdictNotMeasured}
	for _, sp := range diag.syscalls {
		if sp.target == targetGovernor {
			sys.verdict = judge(sp.total <= targetSyscallsPerTx)
			sys.figures = fmt.Sprintf("%.2f", sp.total)
		}
	}
	for _, sp := range diag.syscalls {
		if sp.target == targetPgBouncer && sys.figures != "" {
			sys.figures += fmt.Sprintf(" (PgBouncer %.2f)", sp.total)
		}
	}
	goals = append(goals, sys)

	idleGoal := goal{name: fmt.Sprintf("%d idle clients ≤ %.0f KiB RSS each", targetIdleClients, targetIdleKiB), verdict: verdictNotMeasured}
	for _, r := range idle {
		if r.Target != targetGovernor || r.Opened == 0 {
			continue
		}
		kib := r.perClientKiB()
		idleGoal.figures = fmt.Sprintf("%.2f KiB per client (%d clients)", kib, r.Opened)
		if r.Opened >= targetIdleClients {
			idleGoal.verdict = judge(kib <= targetIdleKiB)
		} else {
			idleGoal.figures += fmt.Sprintf("; fewer than %d opened", targetIdleClients)
		}
	}
	goals = append(goals, idleGoal)

	rss := goal{name: fmt.Sprintf("%d active clients ≤ %.0f MiB peak RSS (-S simple and extended)", targetActiveClients, targetActiveMiB), verdict: verdictNotMeasured}
	var peaks []string
	peak := 0.0
	for _, c := range selects {
		if g, ok := cell(c, targetActiveClients, targetGovernor); ok && g.rssMiB > 0 {
			peak = max(peak, g.rssMiB)
			peaks = append(peaks, fmt.Sprintf("%s %.1f MiB", mode(c), g.rssMiB))
		}
	}
	if len(peaks) > 0 {
		rss.verdict = judge(peak <= targetActiveMiB)
		rss.figures = strings.Join(peaks, ", ")
	}
	goals = append(goals, rss)

	storm := goal{name: fmt.Sprintf("connection storm (-C, 32 clients, md5) ≥ %.1f× PgBouncer's TPS", targetStormRatio), verdict: verdictNotMeasured}
	if g, p, ok := both("storm", 32); ok && p.tps > 0 {
		r := g.tps / p.tps
		storm.verdict = judge(r >= targetStormRatio)
		storm.figures = fmt.Sprintf("%.2f× (%.0f vs %.0f TPS)", r, g.tps, p.tps)
	}
	goals = append(goals, storm)

	var loops []string
	for _, n := range relayLoops {
		loops = append(loops, fmt.Sprintf("N=%d", n))
	}
	scaling := goal{name: fmt.Sprintf("relay scaling, %s loops, per core (relaybench: %s, %d clients, scripted servers)", strings.Join(loops, "/"), relayEngine, relayClients), verdict: verdictNotMeasured}
	var parts []string
	for _, n := range relayLoops {
		runs := relay.byLoops(n)
		if len(runs) == 0 {
			continue
		}
		parts = append(parts, fmt.Sprintf("N=%d: %s tx per CPU-second, %s tx/s (%d runs, median [range])", n,
			spread(runs, func(r relayRun) float64 { return r.txPerCPUs }, "%.0f"),
			spread(runs, func(r relayRun) float64 { return r.txPerSec }, "%.0f"), len(runs)))
	}
	if len(parts) == len(relayLoops) {
		scaling.verdict = verdictReported
		first, last := relay.byLoops(relayLoops[0]), relay.byLoops(relayLoops[len(relayLoops)-1])
		tps := func(runs []relayRun) float64 {
			v := make([]float64, len(runs))
			for i, r := range runs {
				v[i] = r.txPerSec
			}
			return median(v)
		}
		parts = append(parts, fmt.Sprintf("N=%d/N=%d tx/s %.2f×", relayLoops[len(relayLoops)-1], relayLoops[0], tps(last)/tps(first)))
	}
	scaling.figures = strings.Join(parts, "; ")
	if relay.note != "" {
		scaling.figures = strings.TrimPrefix(scaling.figures+"; "+relay.note, "; ")
	}
	goals = append(goals, scaling)
	return goals
}

// plural is "s" unless n is 1.
func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

// writeTargets writes the targets table (targetGoals).
func writeTargets(b *strings.Builder, rs *resultSet, idle []idleResult, diag diagnostics, relay relayScaling) {
	fmt.Fprintf(b, "## Targets\n\n| goal | result | figures |\n|---|---|---|\n")
	for _, g := range targetGoals(rs, idle, diag, relay) {
		fmt.Fprintf(b, "| %s | %s | %s |\n", g.name, g.verdict, strings.ReplaceAll(g.figures, "|", "\\|"))
	}
	fmt.Fprintln(b)
}
