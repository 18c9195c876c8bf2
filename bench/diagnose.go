package main

// Diagnostics explain the figures: a CPU profile of pggovernor under
// pgbench, the system calls each pooler makes per transaction (strace -c),
// and the GOMAXPROCS pggovernor chose.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// diagnostics are the results of runDiagnostics.
type diagnostics struct {
	// gomaxprocs is what pggovernor logged at start.
	gomaxprocs string
	// profileTop is `go tool pprof -top` of a CPU profile of pggovernor
	// under pgbench -S at profileClients clients.
	profileTop string
	profileTPS float64
	// syscalls are the system calls per transaction of each pooler.
	syscalls []syscallProfile
	notes    []string
}

// syscallProfile is one pooler's system calls per transaction.
type syscallProfile struct {
	target string
	tps    float64 // under strace: much slower than without
	tx     int64
	perTx  map[string]float64
	total  float64
}

const (
	profileClients = 64
	diagDuration   = 8 * time.Second
)

// runDiagnostics profiles pggovernor and counts each pooler's system calls
// under pgbench -S -M simple at profileClients clients.
func runDiagnostics(ctx context.Context, e *env, o options, targets []target, maxClients int, logf func(string, ...any)) diagnostics {
	var d diagnostics
	strace, _ := exec.LookPath("strace")
	if strace == "" && !o.noInstall {
		logf("strace not found: installing it with `apt-get install -y strace` (for system call counts)")
		if err := aptInstall(ctx, "strace", logf); err != nil {
			logf("warning: installing strace failed: %v", err)
		}
		strace, _ = exec.LookPath("strace")
	}
	for _, t := range targets {
		if t.Name() == targetDirect || ctx.Err() != nil {
			continue
		}
		if err := t.Start(ctx, authSCRAM, maxClients); err != nil {
			d.notes = append(d.notes, fmt.Sprintf("%s did not start for the diagnostics: %v", t.Name(), err))
			continue
		}
		if g, ok := t.(*governorTarget); ok {
			d.gomaxprocs = g.proc.logValue("gomaxprocs")
			logf("diagnostics: CPU profile of pggovernor under pgbench -S at %d clients", profileClients)
			top, tps, err := profileGovernor(ctx, e, g)
			if err != nil {
				d.notes = append(d.notes, "CPU profile: "+err.Error())
			} else {
				d.profileTop, d.profileTPS = top, tps
			}
		}
		if strace != "" {
			logf("diagnostics: system calls of %s per transaction (strace -c)", t.Name())
			sp, err := countSyscalls(ctx, e, strace, t)
			if err != nil {
				d.notes = append(d.notes, fmt.Sprintf("system calls of %s: %v", t.Name(), err))
			} else {
				d.syscalls = append(d.syscalls, sp)
			}
		}
		t.Stop()
	}
	if strace == "" {
		d.notes = append(d.notes, "strace is not available: no system call counts")
	}
	return d
}

// pgbenchFor starts pgbench -S -M simple against t for dur and returns
// its output and the number of transactions.
func pgbenchFor(ctx context.Context, e *env, t target, clients int, dur time.Duration) (string, int64, float64, error) {
	ep := t.Endpoint()
	args := []string{"-n", "-h", ep.Host, "-p", strconv.Itoa(ep.Port), "-U", ep.User, "-c", strconv.Itoa(clients),
		"-j", "2", "-T", strconv.Itoa(int(dur.Seconds())), "-S", "-M", "simple", database}
	cmd := exec.CommandContext(ctx, e.bins.pgbench, args...)
	cmd.Env = pgEnv(ep.Password)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.CombinedOutput()
	var r runResult
	parsePgbenchOutput(string(out), &r)
	if err != nil {
		return string(out), 0, 0, fmt.Errorf("pgbench: %v\n%s", err, out)
	}
	return string(out), r.Tx, r.TPS, nil
}

// profileGovernor takes a CPU profile of pggovernor over most of a pgbench
// run and returns the top of it.
func profileGovernor(ctx context.Context, e *env, g *governorTarget) (string, float64, error) {
	type res struct {
		tps float64
		err error
	}
	done := make(chan res, 1)
	go func() {
		_, _, tps, err := pgbenchFor(ctx, e, g, profileClients, diagDuration)
		done <- res{tps, err}
	}()
	time.Sleep(time.Second) // let the clients connect: the profile is of the steady state
	secs := int(diagDuration.Seconds()) - 3
	url := fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/profile?seconds=%d", g.admin, secs)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := (&http.Client{Timeout: time.Duration(secs+30) * time.Second}).Do(req)
	if err != nil {
		<-done
		return "", 0, err
	}
	profile := filepath.Join(e.work, "pggovernor.cpu.pprof")
	f, err := os.Create(profile)
	if err == nil {
		_, err = io.Copy(f, resp.Body)
		f.Close()
	}
	resp.Body.Close()
	r := <-done
	if err != nil {
		return "", 0, err
	}
	if r.err != nil {
		return "", 0, r.err
	}
	out, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", "-nodecount=30", e.bins.governor, profile).CombinedOutput()
	if err != nil {
		return "", 0, fmt.Errorf("go tool pprof: %v\n%s", err, out)
	}
	return string(out), r.tps, nil
}

// countSyscalls runs strace -c -f on the pooler during a pgbench run.
func countSyscalls(ctx context.Context, e *env, strace string, t target) (syscallProfile, error) {
	sp := syscallProfile{target: t.Name(), perTx: map[string]float64{}}
	out := filepath.Join(e.work, "strace-"+t.Name()+".txt")
	cmd := exec.CommandContext(ctx, strace, "-c", "-f", "-q", "-o", out, "-p", strconv.Itoa(t.PID()))
	if err := cmd.Start(); err != nil {
		return sp, err
	}
	time.Sleep(300 * time.Millisecond) // strace attaches to every thread
	_, tx, tps, err := pgbenchFor(ctx, e, t, profileClients, diagDuration/2)
	_ = cmd.Process.Signal(os.Interrupt)
	_ = cmd.Wait()
	if err != nil {
		return sp, err
	}
	counts, err := parseStraceSummary(out)
	if err != nil {
		return sp, err
	}
	sp.tx, sp.tps = tx, tps
	for name, n := range counts {
		sp.perTx[name] = float64(n) / float64(tx)
		sp.total += float64(n) / float64(tx)
	}
	return sp, nil
}

var reStraceLine = regexp.MustCompile(`^\s*[0-9.]+\s+[0-9.]+\s+[0-9]+\s+([0-9]+)\s+(?:[0-9]+\s+)?(\w+)\s*$`)

// parseStraceSummary reads strace -c's table: calls by system call.
func parseStraceSummary(path string) (map[string]int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	counts := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		m := reStraceLine.FindStringSubmatch(sc.Text())
		if m == nil || m[2] == "total" {
			continue
		}
		n, _ := strconv.ParseInt(m[1], 10, 64)
		counts[m[2]] = n
	}
	if len(counts) == 0 {
		return nil, fmt.Errorf("no system calls in %s", path)
	}
	return counts, sc.Err()
}

// writeDiagnostics renders the diagnostics section.
func writeDiagnostics(b *strings.Builder, d diagnostics) {
	if d.profileTop == "" && len(d.syscalls) == 0 && len(d.notes) == 0 {
		return
	}
	fmt.Fprintf(b, "## Diagnostics\n\n")
	if d.gomaxprocs != "" {
		fmt.Fprintf(b, "pggovernor ran with GOMAXPROCS %s (Go sets it from the CPUs and the cgroup CPU limit).\n\n", d.gomaxprocs)
	}
	if len(d.syscalls) > 0 {
		fmt.Fprintf(b, "System calls per transaction, pgbench -S -M simple, %d clients, counted with `strace -c -f` (which slows the pooler: the TPS shown are under strace):\n\n", profileClients)
		names := map[string]bool{}
		for _, sp := range d.syscalls {
			for n, v := range sp.perTx {
				if v >= 0.01 {
					names[n] = true
				}
			}
		}
		cols := make([]string, 0, len(names))
		for n := range names {
			cols = append(cols, n)
		}
		sort.Strings(cols)
		fmt.Fprintf(b, "| pooler | TPS under strace | total |")
		for _, c := range cols {
			fmt.Fprintf(b, " %s |", c)
		}
		fmt.Fprintf(b, "\n|---|---:|---:|")
		for range cols {
			fmt.Fprintf(b, "---:|")
		}
		fmt.Fprintln(b)
		for _, sp := range d.syscalls {
			fmt.Fprintf(b, "| %s | %.0f | %.2f |", sp.target, sp.tps, sp.total)
			for _, c := range cols {
				fmt.Fprintf(b, " %.2f |", sp.perTx[c])
			}
			fmt.Fprintln(b)
		}
		fmt.Fprintln(b)
	}
	if d.profileTop != "" {
		fmt.Fprintf(b, "Top of pggovernor's CPU profile under pgbench -S -M simple, %d clients (%.0f TPS; `go tool pprof -top`):\n\n```\n%s```\n\n", profileClients, d.profileTPS, d.profileTop)
	}
	for _, n := range d.notes {
		fmt.Fprintf(b, "- note: %s\n", n)
	}
	fmt.Fprintln(b)
}
