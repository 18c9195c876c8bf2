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
	if o.duration != 3*time.Second || o.reps != 3 || strings.Join(o.cases, ",") != "select-simple,select-extended" || len(o.clients) != 2 || !o.runCases || o.diagnose || o.relay {
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

func TestParseRelayBench(t *testing.T) {
	out := `goos: linux
BenchmarkRelay/evloop-level/loops=1/clients=64-2   	   30000	     37855 ns/op	         0.0001500 allocs/tx	        24.84 cpu-µs/tx	         4.196 syscalls/tx	     40265 tx/cpu-s	     26428 tx/s
BenchmarkRelay/evloop-level/loops=2/clients=64-2   	   30000	     30000 ns/op	         0 allocs/tx	        30.00 cpu-µs/tx	         4.100 syscalls/tx	     33333 tx/cpu-s	     33000 tx/s
PASS
`
	runs := parseRelayBench(out)
	if len(runs) != 2 {
		t.Fatalf("parsed %d runs, want 2: %+v", len(runs), runs)
	}
	if r := runs[0]; r.loops != 1 || r.txPerSec != 26428 || r.txPerCPUs != 40265 || r.cpuUsTx != 24.84 || r.sysPerTx != 4.196 {
		t.Fatalf("first run %+v", r)
	}
	if runs[1].loops != 2 {
		t.Fatalf("second run %+v", runs[1])
	}
}

// TestTargetGoals checks the targets table against a made-up session: each
// of issue 14's targets MET, NOT MET or not measured from the figures.
func TestTargetGoals(t *testing.T) {
	rs := newResultSet()
	add := func(c string, n int, target string, tps, meanMs, cpuS float64, rss int64) {
		rs.add(runResult{Case: c, Clients: n, Target: target, Rep: 1, TPS: tps, MeanMs: meanMs, Tx: 10000,
			CPUOK: target != targetDirect, CPUSeconds: cpuS, CPUTx: 10000, PeakRSS: rss << 20})
	}
	for _, c := range []string{"select-simple", "select-extended"} {
		add(c, 1, targetDirect, 6000, 0.150, 0, 0)
		add(c, 1, targetPgBouncer, 5000, 0.200, 0.5, 8)
		add(c, 1, targetGovernor, 5500, 0.180, 0.4, 20) // 1.10×, latency 1.20× direct: MET
		for _, n := range []int{8, 64} {
			add(c, n, targetPgBouncer, 18000, 1, 0.2, 8)
			add(c, n, targetGovernor, 20000, 1, 0.14, 20) // 1.11×, 0.70× CPU: MET
		}
		add(c, 1000, targetPgBouncer, 17000, 60, 0.24, 15)
		add(c, 1000, targetGovernor, 15000, 70, 0.38, 85) // 0.88×, 1.58× CPU, 85 MiB: NOT MET
	}
	// No storm: not measured.
	idle := []idleResult{{Target: targetPgBouncer, Opened: 10000, RSS0: 0, RSS1: 8 << 20}, {Target: targetGovernor, Opened: 10000, RSS0: 0, RSS1: 10000 * 1536}}
	diag := diagnostics{syscalls: []syscallProfile{{target: targetPgBouncer, total: 7.37}, {target: targetGovernor, total: 6.31}}}
	relay := relayScaling{runs: []relayRun{{loops: 1, txPerSec: 26000, txPerCPUs: 40000}, {loops: 2, txPerSec: 33000, txPerCPUs: 33000}, {loops: 1, txPerSec: 27000, txPerCPUs: 41000}, {loops: 2, txPerSec: 31000, txPerCPUs: 32000}}}

	got := map[string]goal{}
	for _, g := range targetGoals(rs, idle, diag, relay) {
		got[g.name] = g
	}
	want := map[string]string{
		"own CPU per transaction ≤ 0.75× PgBouncer's, -S simple, 8 clients":     verdictMet,
		"own CPU per transaction ≤ 0.75× PgBouncer's, -S extended, 64 clients":  verdictMet,
		"own CPU per transaction ≤ 0.75× PgBouncer's, -S simple, 1000 clients":  verdictNotMet,
		"TPS ≥ 1.0× PgBouncer's, -S simple, 1 client":                           verdictMet,
		"TPS ≥ 1.1× PgBouncer's, -S extended, 8 clients":                        verdictMet,
		"TPS ≥ 1.1× PgBouncer's, -S extended, 1000 clients":                     verdictNotMet,
		"1-client mean latency ≤ 1.3× direct, -S simple":                        verdictMet,
		"1-client mean latency ≤ 1.3× direct, -S extended":                      verdictMet,
		"system calls per transaction ≤ 4.5 (strace -c, -S simple, 64 clients)": verdictNotMet,
		"10000 idle clients ≤ 2 KiB RSS each":                                   verdictMet,
		"1000 active clients ≤ 40 MiB peak RSS (-S simple and extended)":        verdictNotMet,
		"connection storm (-C, 32 clients, md5) ≥ 1.0× PgBouncer's TPS":         verdictNotMeasured,
	}
	for name, verdict := range want {
		g, ok := got[name]
		if !ok {
			t.Errorf("no goal %q", name)
			continue
		}
		if g.verdict != verdict {
			t.Errorf("%s: verdict %q, want %q (figures %s)", name, g.verdict, verdict, g.figures)
		}
	}
	if n := len(got); n != 3*2+4*2+2+5 {
		t.Errorf("%d goals, want 21", n)
	}
	if f := got["own CPU per transaction ≤ 0.75× PgBouncer's, -S simple, 8 clients"].figures; f != "0.70× (14.0 vs 20.0 µs)" {
		t.Errorf("CPU figures %q", f)
	}
	if f := got["system calls per transaction ≤ 4.5 (strace -c, -S simple, 64 clients)"].figures; f != "6.31 (PgBouncer 7.37)" {
		t.Errorf("syscall figures %q", f)
	}
	scaling := got["relay scaling, N=1/N=2 loops, per core (relaybench: "+relayEngine+", 64 clients, scripted servers)"]
	if scaling.verdict != verdictReported || !strings.Contains(scaling.figures, "N=1: 40500 [40000–41000] tx per CPU-second") || !strings.Contains(scaling.figures, "N=2/N=1 tx/s 1.21×") {
		t.Errorf("scaling: %+v", scaling)
	}

	// Nothing measured: every target says so.
	for _, g := range targetGoals(nil, nil, diagnostics{}, relayScaling{}) {
		if g.verdict != verdictNotMeasured {
			t.Errorf("%s: %q with nothing measured", g.name, g.verdict)
		}
	}
	// Fewer idle clients than the target's: figures, no verdict.
	for _, g := range targetGoals(nil, []idleResult{{Target: targetGovernor, Opened: 500, RSS1: 500 * 1024}}, diagnostics{}, relayScaling{}) {
		if strings.Contains(g.name, "idle") && (g.verdict != verdictNotMeasured || !strings.Contains(g.figures, "fewer than 10000")) {
			t.Errorf("500 idle clients: %+v", g)
		}
	}
}
