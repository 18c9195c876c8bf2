package main

// The relay scaling figures: internal/evloop's BenchmarkRelay (the relay
// alone, between K clients and K scripted servers in a driver process, no
// Postgres, no pgbench; internal/relaybench) at N = 1 and N = 2 loops, run
// -reps times interleaved, reported per core (transactions per CPU-second of
// the relay process).

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

const (
	// relayEngine is the sub-benchmark of BenchmarkRelay measured: the
	// event-loop engine chosen by the spike (bench/README.md, "Relay
	// engine spike").
	relayEngine = "evloop-level"
	// relayClients is the clients (and scripted servers) of the scaling
	// run, relayTx its round trips per measurement.
	relayClients = 64
	relayTx      = 30000
)

// relayLoops are the loop counts of the scaling run.
var relayLoops = []int{1, 2}

// relayRun is one measurement of BenchmarkRelay.
type relayRun struct {
	loops     int
	txPerSec  float64 // wall-clock throughput
	txPerCPUs float64 // transactions per CPU-second of the relay process: per core
	cpuUsTx   float64 // the relay process' CPU per round trip, µs
	sysPerTx  float64 // the engine's own count of system calls per round trip
}

// relayScaling is the result of runRelayScaling.
type relayScaling struct {
	runs []relayRun
	note string // why it was not measured, or what went wrong
}

// runRelayScaling builds internal/evloop's test binary and runs its
// BenchmarkRelay at relayLoops loops, reps times, the loop counts
// alternating.
func runRelayScaling(ctx context.Context, e *env, o options, logf func(string, ...any)) relayScaling {
	var rs relayScaling
	bin := filepath.Join(e.work, "evloop.test")
	logf("relay scaling: building internal/evloop's benchmark (cd %s && go test -c -o %s ./internal/evloop)", o.root, bin)
	build := exec.CommandContext(ctx, "go", "test", "-c", "-o", bin, "./internal/evloop")
	build.Dir = o.root
	if out, err := build.CombinedOutput(); err != nil {
		rs.note = fmt.Sprintf("building internal/evloop's benchmark: %v: %s", err, strings.TrimSpace(string(out)))
		return rs
	}
	loops := make([]string, len(relayLoops))
	for i, n := range relayLoops {
		loops[i] = strconv.Itoa(n)
	}
	re := fmt.Sprintf("^BenchmarkRelay$/^%s$/^loops=(%s)$/^clients=%d$", relayEngine, strings.Join(loops, "|"), relayClients)
	// One process per rep, both loop counts in each: they alternate (1, 2,
	// 1, 2, ...; -test.count would run each one reps times in a row).
	for rep := 1; rep <= o.reps && ctx.Err() == nil; rep++ {
		cmd := exec.CommandContext(ctx, bin, "-test.run", "^$", "-test.bench", re, "-test.benchtime", strconv.Itoa(relayTx)+"x")
		cmd.Dir = e.work
		cmd.WaitDelay = 10 * time.Second
		out, err := cmd.CombinedOutput()
		if err != nil {
			rs.note = fmt.Sprintf("BenchmarkRelay, rep %d: %v: %s", rep, err, lastLines(string(out), 5))
			break
		}
		runs := parseRelayBench(string(out))
		if len(runs) == 0 {
			rs.note = fmt.Sprintf("BenchmarkRelay, rep %d, printed no result: %s", rep, lastLines(string(out), 5))
			break
		}
		rs.runs = append(rs.runs, runs...)
	}
	for _, r := range rs.runs {
		logf("relay scaling: %s, %d loops, %d clients: %.0f tx/s, %.0f tx per CPU-second, %.1f µs CPU/tx", relayEngine, r.loops, relayClients, r.txPerSec, r.txPerCPUs, r.cpuUsTx)
	}
	return rs
}

// parseRelayBench reads BenchmarkRelay's result lines, e.g.
//
//	BenchmarkRelay/evloop-level/loops=1/clients=64-2  30000  37855 ns/op  0.00015 allocs/tx  24.84 cpu-µs/tx  4.196 syscalls/tx  40265 tx/cpu-s  26428 tx/s
func parseRelayBench(out string) []relayRun {
	var runs []relayRun
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasPrefix(f[0], "BenchmarkRelay/") {
			continue
		}
		var r relayRun
		for _, part := range strings.Split(f[0], "/") {
			if v, ok := strings.CutPrefix(part, "loops="); ok {
				r.loops, _ = strconv.Atoi(v)
			}
		}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				continue
			}
			switch f[i+1] {
			case "tx/s":
				r.txPerSec = v
			case "tx/cpu-s":
				r.txPerCPUs = v
			case "cpu-µs/tx":
				r.cpuUsTx = v
			case "syscalls/tx":
				r.sysPerTx = v
			}
		}
		if r.loops > 0 && r.txPerSec > 0 {
			runs = append(runs, r)
		}
	}
	return runs
}

// byLoops returns the runs at n loops.
func (rs relayScaling) byLoops(n int) []relayRun {
	var out []relayRun
	for _, r := range rs.runs {
		if r.loops == n {
			out = append(out, r)
		}
	}
	return out
}

// spread formats the median and the range of the runs' figure.
func spread(runs []relayRun, figure func(relayRun) float64, format string) string {
	v := make([]float64, len(runs))
	for i, r := range runs {
		v[i] = figure(r)
	}
	lo, hi := v[0], v[0]
	for _, x := range v {
		lo, hi = min(lo, x), max(hi, x)
	}
	return fmt.Sprintf(format+" ["+format+"–"+format+"]", median(v), lo, hi)
}

// lastLines is the last n lines of s, on one line.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " / ")
}
