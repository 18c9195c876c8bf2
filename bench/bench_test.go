package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// pgbench 15's report for a normal run.
const pgbenchOut = `pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 10
query mode: simple
number of clients: 64
number of threads: 2
maximum number of tries: 1
duration: 3 s
number of transactions actually processed: 50049
number of failed transactions: 2 (0.004%)
latency average = 3.734 ms
initial connection time = 120.512 ms
tps = 16683.123456 (without initial connection time)
pgbench: error: client 3 aborted in command 1 (SQL) of script 0; ERROR:  boom
`

func TestParsePgbenchOutput(t *testing.T) {
	var r runResult
	parsePgbenchOutput(pgbenchOut, &r)
	if r.Tx != 50049 || r.Failed != 2 || r.TPS != 16683.123456 || r.ConnMs != 120.512 || r.Aborted != 1 {
		t.Fatalf("parsed %+v", r)
	}
	if r.Errors() != 3 {
		t.Fatalf("Errors() = %d, want 3", r.Errors())
	}

	var storm runResult
	parsePgbenchOutput("number of transactions actually processed: 10\naverage connection time = 4.941 ms\ntps = 401.5 (including reconnection times)\n", &storm)
	if storm.TPS != 401.5 || storm.ConnMs != 4.941 {
		t.Fatalf("storm parsed %+v", storm)
	}
}

func TestReadTxLog(t *testing.T) {
	dir := t.TempDir()
	var a, b strings.Builder
	for i := 1; i <= 100; i++ { // latencies 1..100 ms, split over two thread files
		w := &a
		if i%2 == 0 {
			w = &b
		}
		w.WriteString("0 1 " + strconv.Itoa(i*1000) + " 0 1700000000 123456\n")
	}
	b.WriteString("1 7 failed 0 1700000000 123456\n")
	if err := os.WriteFile(filepath.Join(dir, "tx.123"), []byte(a.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "tx.123.1"), []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	lat, failed, err := readTxLog(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(lat) != 100 || failed != 1 {
		t.Fatalf("got %d latencies, %d failed", len(lat), failed)
	}
	if got := lat.p99Ms(); got != 99 {
		t.Fatalf("p99 = %v ms, want 99", got)
	}
	if got := lat.meanMs(); got != 50.5 {
		t.Fatalf("mean = %v ms, want 50.5", got)
	}
}

func TestCPUBetween(t *testing.T) {
	t0 := time.Unix(1000, 0)
	st := procStats{tck: 100}
	for i := range 11 { // one sample per 100ms, 5 ticks each
		st.samples = append(st.samples, cpuSample{at: t0.Add(time.Duration(i) * 100 * time.Millisecond), ticks: int64(5 * i)})
	}
	got, ok := st.cpuBetween(t0.Add(250*time.Millisecond), t0.Add(time.Second))
	if !ok || got != 0.35 { // samples 3..10: 35 ticks
		t.Fatalf("cpuBetween = %v, %v", got, ok)
	}
	if _, ok := st.cpuBetween(t0.Add(2*time.Second), t0.Add(3*time.Second)); ok {
		t.Fatal("a window without samples should not be ok")
	}
}

func TestAggregate(t *testing.T) {
	rs := newResultSet()
	for i, tps := range []float64{100, 300, 200} {
		rs.add(runResult{Case: "c", Clients: 8, Target: targetGovernor, Rep: i + 1, TPS: tps, MeanMs: tps / 100,
			CPUOK: true, CPUSeconds: 1, CPUTx: 10000, PeakRSS: int64(i+1) << 20})
	}
	rs.add(runResult{Case: "c", Clients: 8, Target: targetGovernor, Rep: 4, Err: "pgbench failed"})
	rs.markNA("c", 8, targetPgBouncer, "because")
	r := rs.aggregate(resultKey{"c", 8, targetGovernor})
	if !r.ok || r.tps != 200 || r.meanMs != 2 || r.cpuPer10k != 1 || r.rssMiB != 3 || r.errors != 1 {
		t.Fatalf("aggregate = %+v", r)
	}
	if na := rs.aggregate(resultKey{"c", 8, targetPgBouncer}); na.na != "because" {
		t.Fatalf("n/a row = %+v", na)
	}
}

func TestParseOptionsQuick(t *testing.T) {
	o, err := parseOptions([]string{"-quick", "-duration", "3s"}, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	if o.duration != 3*time.Second || o.reps != 3 || strings.Join(o.cases, ",") != "select-simple,select-extended" || len(o.clients) != 2 || !o.runCases {
		t.Fatalf("options %+v", o)
	}
	o, err = parseOptions([]string{"-idle", "100"}, os.Stderr)
	if err != nil || o.runCases {
		t.Fatalf("idle-only: %+v, %v", o, err)
	}
	if _, err := parseOptions([]string{"-cases", "nope"}, os.Stderr); err == nil {
		t.Fatal("an unknown case was accepted")
	}
}

func TestGitHead(t *testing.T) {
	root := t.TempDir()
	git := filepath.Join(root, ".git")
	if err := os.MkdirAll(filepath.Join(git, "refs", "heads"), 0o755); err != nil {
		t.Fatal(err)
	}
	_ = os.WriteFile(filepath.Join(git, "HEAD"), []byte("ref: refs/heads/main\n"), 0o644)
	_ = os.WriteFile(filepath.Join(git, "packed-refs"), []byte("# pack-refs\nabc123 refs/heads/main\n"), 0o644)
	if got := gitHead(root); got != "abc123" {
		t.Fatalf("packed: %q", got)
	}
	_ = os.WriteFile(filepath.Join(git, "refs", "heads", "main"), []byte("def456\n"), 0o644)
	if got := gitHead(root); got != "def456" {
		t.Fatalf("loose: %q", got)
	}
}
