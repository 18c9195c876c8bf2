package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// benchCase is one pgbench workload.
type benchCase struct {
	// Name selects the case with -cases.
	Name string
	// Args are the pgbench arguments of the workload (script and protocol).
	Args []string
	// Clients are the client counts to run it at.
	Clients []int
	// Auth is the client authentication of the targets (authSCRAM, or
	// authMD5 where pgbench's own SCRAM cost would dominate).
	Auth string
	// Prepared marks -M prepared (protocol-level named statements).
	Prepared bool
	// Storm marks -C: a new connection for every transaction.
	Storm bool
}

// allCases is the full matrix, in run order. The SCRAM cases come first and
// the md5 one last, so that the poolers restart once.
func allCases() []benchCase {
	sel := []int{1, 8, 64, 1000}
	return []benchCase{
		{Name: "select-simple", Args: []string{"-S", "-M", "simple"}, Clients: sel, Auth: authSCRAM},
		{Name: "select-extended", Args: []string{"-S", "-M", "extended"}, Clients: sel, Auth: authSCRAM},
		{Name: "select-prepared", Args: []string{"-S", "-M", "prepared"}, Clients: sel, Auth: authSCRAM, Prepared: true},
		{Name: "tpcb", Args: []string{"-M", "simple"}, Clients: []int{8, 64}, Auth: authSCRAM},
		{Name: "storm", Args: []string{"-C", "-S", "-M", "simple"}, Clients: []int{32}, Auth: authMD5, Storm: true},
	}
}

// caseNames lists the case names in run order.
func caseNames() []string {
	var out []string
	for _, c := range allCases() {
		out = append(out, c.Name)
	}
	return out
}

// selectCases returns the chosen cases in run order, with -clients applied.
func selectCases(o options) []benchCase {
	var out []benchCase
	for _, c := range allCases() {
		if !contains(o.cases, c.Name) {
			continue
		}
		if o.clients != nil && !c.Storm {
			c.Clients = o.clients
		}
		out = append(out, c)
	}
	return out
}

// runResult is one pgbench run against one target.
type runResult struct {
	Case    string
	Clients int
	Target  string
	Rep     int

	// TPS is pgbench's tps line: without the initial connection time, or,
	// for -C, including the reconnections.
	TPS float64
	// Tx is the number of transactions processed.
	Tx int64
	// Failed is pgbench's "number of failed transactions".
	Failed int64
	// Aborted is the number of clients pgbench reports as aborted.
	Aborted int
	// MeanMs and P99Ms are computed from the per-transaction log.
	MeanMs, P99Ms float64
	// ConnMs is pgbench's initial (or, with -C, average) connection time.
	ConnMs float64
	// CPUSeconds is the pooler's user+system CPU over the measured window
	// (see measureProc); CPUOK is false for direct or when unmeasured.
	CPUSeconds float64
	CPUOK      bool
	// CPUTx is the number of transactions that CPUSeconds is divided by.
	CPUTx int64
	// PeakRSS is the pooler's peak resident set during the run, bytes.
	PeakRSS int64
	// Err is set when pgbench failed or its output could not be parsed.
	Err string
	// Output is pgbench's stdout and stderr.
	Output string
}

// Errors is failed transactions plus aborted clients plus a failed run.
func (r runResult) Errors() int64 {
	n := r.Failed + int64(r.Aborted)
	if r.Err != "" {
		n++
	}
	return n
}

// summary is the one-line progress report of a run.
func (r runResult) summary() string {
	if r.Err != "" && r.TPS == 0 {
		return "FAILED: " + r.Err
	}
	s := fmt.Sprintf("%9.0f tps  mean %7.3f ms  p99 %7.3f ms  errors %d", r.TPS, r.MeanMs, r.P99Ms, r.Errors())
	if r.CPUOK {
		s += fmt.Sprintf("  cpu %.2fs", r.CPUSeconds)
	}
	if r.PeakRSS > 0 {
		s += fmt.Sprintf("  rss %.1f MiB", float64(r.PeakRSS)/(1<<20))
	}
	if r.Err != "" {
		s += "  (" + r.Err + ")"
	}
	return s
}

// runOne runs pgbench once against a target and measures the pooler.
func runOne(ctx context.Context, e *env, o options, c benchCase, clients int, t target, rep int) runResult {
	r := runResult{Case: c.Name, Clients: clients, Target: t.Name(), Rep: rep}
	ep := t.Endpoint()
	logDir, err := os.MkdirTemp(e.work, "pgbench-log-")
	if err != nil {
		r.Err = err.Error()
		return r
	}
	keepLog := false
	defer func() {
		if keepLog {
			e.logf("    per-transaction log kept in %s", logDir)
			return
		}
		_ = os.RemoveAll(logDir)
	}()
	jobs := 2
	if clients < 2 {
		jobs = 1
	}
	args := []string{"-n", "-h", ep.Host, "-p", strconv.Itoa(ep.Port), "-U", ep.User,
		"-c", strconv.Itoa(clients), "-j", strconv.Itoa(jobs), "-T", strconv.Itoa(int(o.duration.Seconds())),
		"--log", "--log-prefix=" + filepath.Join(logDir, "tx")}
	args = append(args, c.Args...)
	args = append(args, database)

	// A hung run is killed after the duration plus a generous grace, so that
	// a stuck pooler shows up as a failed run rather than a stuck session.
	grace := o.duration + time.Minute
	rctx, cancel := context.WithTimeout(ctx, grace)
	defer cancel()
	cmd := exec.CommandContext(rctx, e.bins.pgbench, args...)
	cmd.Env = pgEnv(ep.Password)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGINT) }
	cmd.WaitDelay = 5 * time.Second

	var m *procMonitor
	if pid := t.PID(); pid > 0 {
		m = startProcMonitor(pid)
	}
	start := time.Now()
	out, runErr := cmd.CombinedOutput()
	end := time.Now()
	r.Output = "$ pgbench " + strings.Join(args, " ") + "\n" + string(out)
	parsePgbenchOutput(string(out), &r)
	if runErr != nil {
		switch {
		case rctx.Err() == context.DeadlineExceeded:
			r.Err = fmt.Sprintf("pgbench did not finish within %s: killed", grace)
		case ctx.Err() != nil:
			r.Err = "interrupted"
		case r.TPS > 0:
			r.Err = fmt.Sprintf("pgbench exit status: %v", runErr)
		default:
			r.Err = fmt.Sprintf("pgbench failed: %v", runErr)
		}
	} else if r.TPS == 0 {
		r.Err = "no tps line in pgbench output"
	}
	if lat, failed, err := readTxLog(logDir); err == nil {
		r.MeanMs, r.P99Ms = lat.meanMs(), lat.p99Ms()
		r.Failed = max(r.Failed, failed)
	} else if r.Err == "" {
		r.Err = "per-transaction log: " + err.Error()
	}
	keepLog = o.keep && r.Errors() > 0
	if m != nil {
		// The window starts once pgbench's clients are connected, except in
		// a storm, where connecting is the workload.
		from := start
		if !c.Storm {
			from = start.Add(time.Duration(r.ConnMs * float64(time.Millisecond)))
		}
		st := m.stop()
		r.CPUSeconds, r.CPUOK = st.cpuBetween(from, end)
		r.CPUTx = r.Tx
		r.PeakRSS = st.peakRSS
	}
	return r
}

// Lines of pgbench's report (PostgreSQL 15).
var (
	reTx      = regexp.MustCompile(`(?m)^number of transactions actually processed: (\d+)`)
	reFailed  = regexp.MustCompile(`(?m)^number of failed transactions: (\d+)`)
	reTPS     = regexp.MustCompile(`(?m)^tps = ([0-9.]+)`)
	reConn    = regexp.MustCompile(`(?m)^(?:initial|average) connection time = ([0-9.]+) ms`)
	reAborted = regexp.MustCompile(`(?m)client \d+ aborted`)
)

// parsePgbenchOutput fills the counters of r from pgbench's output.
func parsePgbenchOutput(out string, r *runResult) {
	if m := reTx.FindStringSubmatch(out); m != nil {
		r.Tx, _ = strconv.ParseInt(m[1], 10, 64)
	}
	if m := reFailed.FindStringSubmatch(out); m != nil {
		r.Failed, _ = strconv.ParseInt(m[1], 10, 64)
	}
	if m := reTPS.FindStringSubmatch(out); m != nil {
		r.TPS, _ = strconv.ParseFloat(m[1], 64)
	}
	if m := reConn.FindStringSubmatch(out); m != nil {
		r.ConnMs, _ = strconv.ParseFloat(m[1], 64)
	}
	r.Aborted = len(reAborted.FindAllString(out, -1))
}

// latencies are per-transaction latencies in microseconds.
type latencies []int64

// meanMs is the mean latency in milliseconds.
func (l latencies) meanMs() float64 {
	if len(l) == 0 {
		return 0
	}
	var sum int64
	for _, v := range l {
		sum += v
	}
	return float64(sum) / float64(len(l)) / 1000
}

// p99Ms is the 99th percentile (nearest rank) in milliseconds; l must be
// sorted.
func (l latencies) p99Ms() float64 {
	if len(l) == 0 {
		return 0
	}
	i := (len(l)*99+99)/100 - 1
	return float64(l[i]) / 1000
}

// readTxLog reads pgbench's per-transaction logs (one file per thread,
// <prefix>.<pid>[.<thread>]) and returns the sorted latencies and the number
// of transactions logged as failed. A line is
// "client_id transaction_no time script_no time_epoch time_us ..." with
// time the latency in microseconds, or "failed" for a failed transaction.
func readTxLog(dir string) (latencies, int64, error) {
	files, err := filepath.Glob(filepath.Join(dir, "tx.*"))
	if err != nil {
		return nil, 0, err
	}
	if len(files) == 0 {
		return nil, 0, fmt.Errorf("no log files in %s", dir)
	}
	var lat latencies
	var failed int64
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			return nil, 0, err
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 3 {
				continue
			}
			v, err := strconv.ParseInt(fields[2], 10, 64)
			if err != nil {
				failed++ // "failed" (or "skipped", which needs -L and is not used)
				continue
			}
			lat = append(lat, v)
		}
		err = sc.Err()
		f.Close()
		if err != nil {
			return nil, 0, err
		}
	}
	slices.Sort(lat)
	return lat, failed, nil
}
