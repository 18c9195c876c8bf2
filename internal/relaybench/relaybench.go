// Package relaybench measures a relay of PostgreSQL frames alone: K clients
// and K scripted servers (pgtest.FakeBackend) run in a child process (the
// driver: the test binary itself, started again), and the process under
// test only relays, so that its CPU time (getrusage) and its system calls
// (strace -c -f on it alone) are the relay's. Each client runs simple-query
// round trips (Query → RowDescription, DataRow, CommandComplete,
// ReadyForQuery) one after the other.
//
// A benchmark's TestMain calls DriverMain first; Run then does the rest.
// The goroutine relay (two pumps per session over wire and rawsock, the
// shape of proxy's relay without its session logic) is here as the
// baseline.
package relaybench

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pggovernor/pggovernor/internal/pgtest"
	"github.com/pggovernor/pggovernor/internal/rawsock"
	"github.com/pggovernor/pggovernor/wire"
)

// driverEnv marks the driver process.
const driverEnv = "RELAYBENCH_DRIVER"

// StraceEnv, set to 1, makes Run count the relay's system calls with
// strace -c -f (which slows it several times over: the time figures of such
// a run are not the relay's).
const StraceEnv = "RELAYBENCH_STRACE"

// Relay is what is measured.
type Relay interface {
	// Pair relays frames between client and server, both connected (the
	// server's welcome already read), until either closes. It returns
	// once the relay has them.
	Pair(client, server net.Conn) error
	// Close stops relaying, closes every pair and returns when the relay's
	// goroutines have exited.
	Close()
}

// SyscallCounter is a Relay that counts its own system calls.
type SyscallCounter interface {
	Syscalls() uint64
}

// DriverMain runs the driver when this process was started as one, and
// returns false otherwise: call it first in TestMain, and exit with the code
// when it returns true.
func DriverMain() (code int, isDriver bool) {
	if os.Getenv(driverEnv) == "" {
		return 0, false
	}
	if err := drive(); err != nil {
		fmt.Fprintln(os.Stderr, "relaybench driver:", err)
		return 1, true
	}
	return 0, true
}

// The driver's protocol, one line each way on its stdin and stdout:
//
//	driver → "backend ADDR"               (its FakeBackend)
//	relay  → "clients ADDR K"             (dial K clients to the relay)
//	driver → "ready"
//	relay  → "go N"                       (N round trips over all clients)
//	driver → "done NANOSECONDS"
//	relay  → "idle ADDR K"                (dial K clients that stay idle)
//	driver → "ready"
//	relay  → "quit"
func drive() error {
	fb, err := pgtest.StartFakeBackend()
	if err != nil {
		return err
	}
	defer fb.Close()
	in := bufio.NewScanner(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	say := func(format string, args ...any) {
		fmt.Fprintf(out, format+"\n", args...)
		_ = out.Flush()
	}
	say("backend %s", fb.Addr())
	var clients []*client
	defer func() {
		for _, c := range clients {
			_ = c.conn.Close()
		}
	}()
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "clients", "idle":
			k, _ := strconv.Atoi(f[2])
			for i := 0; i < k; i++ {
				c, err := net.Dial("tcp", f[1])
				if err != nil {
					return err
				}
				clients = append(clients, newClient(c))
			}
			say("ready")
		case "go":
			n, _ := strconv.ParseInt(f[1], 10, 64)
			start := time.Now()
			if err := runClients(clients, n); err != nil {
				return err
			}
			say("done %d", time.Since(start).Nanoseconds())
		case "quit":
			return nil
		}
	}
	return in.Err()
}

type client struct {
	conn  net.Conn
	r     *bufio.Reader
	query []byte
	hdr   [5]byte
}

func newClient(c net.Conn) *client {
	q := []byte{'Q', 0, 0, 0, 0}
	q = append(q, "SELECT 1\x00"...)
	binary.BigEndian.PutUint32(q[1:], uint32(len(q)-1))
	return &client{conn: c, r: bufio.NewReaderSize(c, 8192), query: q}
}

func (c *client) roundTrip() error {
	if _, err := c.conn.Write(c.query); err != nil {
		return err
	}
	for {
		if _, err := io.ReadFull(c.r, c.hdr[:]); err != nil {
			return err
		}
		n := int(binary.BigEndian.Uint32(c.hdr[1:])) - 4
		if _, err := c.r.Discard(n); err != nil {
			return err
		}
		if c.hdr[0] == 'Z' {
			return nil
		}
	}
}

// runClients runs n round trips in all over the clients, each client one
// after the other.
func runClients(clients []*client, n int64) error {
	var done atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, len(clients))
	for _, c := range clients {
		wg.Add(1)
		go func() { // owner: runClients, which waits
			defer wg.Done()
			for done.Add(1) <= n {
				if err := c.roundTrip(); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// Driver is a started driver process.
type Driver struct {
	cmd     *exec.Cmd
	in      io.WriteCloser
	out     *bufio.Scanner
	backend string
}

// StartDriver starts this test binary again as the driver.
func StartDriver() (*Driver, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), driverEnv+"=1", "GOMAXPROCS="+strconv.Itoa(runtime.NumCPU()))
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	d := &Driver{cmd: cmd, in: in, out: bufio.NewScanner(outPipe)}
	line, err := d.expect("backend")
	if err != nil {
		d.Close()
		return nil, err
	}
	d.backend = line[1]
	return d, nil
}

func (d *Driver) send(format string, args ...any) error {
	_, err := fmt.Fprintf(d.in, format+"\n", args...)
	return err
}

func (d *Driver) expect(word string) ([]string, error) {
	if !d.out.Scan() {
		if err := d.out.Err(); err != nil {
			return nil, err
		}
		return nil, errors.New("relaybench: the driver exited")
	}
	f := strings.Fields(d.out.Text())
	if len(f) == 0 || f[0] != word {
		return nil, fmt.Errorf("relaybench: driver said %q, want %q", d.out.Text(), word)
	}
	return f, nil
}

// Close stops the driver.
func (d *Driver) Close() {
	_ = d.send("quit")
	_ = d.in.Close()
	done := make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(done) }() // owner: Close, which waits
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-done
	}
}

// DialServer opens a connection to the driver's fake backend and reads its
// welcome, as the pool does before it hands a connection on.
func (d *Driver) DialServer() (net.Conn, error) {
	c, err := net.Dial("tcp", d.backend)
	if err != nil {
		return nil, err
	}
	var startup []byte
	startup = binary.BigEndian.AppendUint32(startup, 0)
	startup = binary.BigEndian.AppendUint32(startup, 196608)
	startup = append(startup, "user\x00bench\x00database\x00bench\x00\x00"...)
	binary.BigEndian.PutUint32(startup, uint32(len(startup)))
	if _, err := c.Write(startup); err != nil {
		_ = c.Close()
		return nil, err
	}
	var hdr [5]byte
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			_ = c.Close()
			return nil, err
		}
		body := make([]byte, int(binary.BigEndian.Uint32(hdr[1:]))-4)
		if _, err := io.ReadFull(c, body); err != nil {
			_ = c.Close()
			return nil, err
		}
		if hdr[0] == 'Z' {
			return c, nil
		}
	}
}

// Result is one measured run.
type Result struct {
	Tx        int64
	Wall, CPU time.Duration
	// Syscalls is what the relay counted itself (0 when it does not).
	Syscalls uint64
	// Mallocs is the heap allocations of the relay process.
	Mallocs uint64
	// Strace is the calls strace counted by system call, when it ran.
	Strace map[string]int64
}

// Setup connects k clients through relay to k servers of the driver.
func Setup(d *Driver, relay Relay, k int) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	if err := d.send("clients %s %d", ln.Addr(), k); err != nil {
		return err
	}
	for i := 0; i < k; i++ {
		cl, err := ln.Accept()
		if err != nil {
			return err
		}
		srv, err := d.DialServer()
		if err != nil {
			_ = cl.Close()
			return err
		}
		if err := relay.Pair(cl, srv); err != nil {
			return err
		}
	}
	_, err = d.expect("ready")
	return err
}

// Measure runs n round trips through the relay set up by Setup.
func Measure(d *Driver, relay Relay, n int64, strace bool) (Result, error) {
	var res Result
	var st *straceRun
	if strace {
		var err error
		if st, err = startStrace(); err != nil {
			return res, err
		}
	}
	counter, _ := relay.(SyscallCounter)
	var sys0 uint64
	if counter != nil {
		sys0 = counter.Syscalls()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	mallocs0 := ms.Mallocs
	cpu0 := processCPU()
	if err := d.send("go %d", n); err != nil {
		return res, err
	}
	f, err := d.expect("done")
	if err != nil {
		return res, err
	}
	res.CPU = processCPU() - cpu0
	runtime.ReadMemStats(&ms)
	res.Mallocs = ms.Mallocs - mallocs0
	if counter != nil {
		res.Syscalls = counter.Syscalls() - sys0
	}
	ns, _ := strconv.ParseInt(f[1], 10, 64)
	res.Wall, res.Tx = time.Duration(ns), n
	if st != nil {
		if res.Strace, err = st.stop(); err != nil {
			return res, err
		}
	}
	return res, nil
}

// Run is a benchmark of relay at k clients: b.N round trips, reported per
// transaction: ns/op (wall), cpu-µs/tx (the relay process' user+system
// time), tx/cpu-s (what one core of the relay serves), syscalls/tx (the
// relay's own count, when it keeps one), allocs/tx (the relay process'
// heap allocations) and, with RELAYBENCH_STRACE=1, strace-calls/tx.
func Run(b *testing.B, newRelay func() Relay, k int) {
	d, err := StartDriver()
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	relay := newRelay()
	defer relay.Close()
	if err := Setup(d, relay, k); err != nil {
		b.Fatal(err)
	}
	// Warm up: buffers, the scheduler, TCP.
	if _, err := Measure(d, relay, int64(min(1000, 10*k)), false); err != nil {
		b.Fatal(err)
	}
	strace := os.Getenv(StraceEnv) == "1"
	b.ResetTimer()
	res, err := Measure(d, relay, int64(b.N), strace)
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	tx := float64(res.Tx)
	b.ReportMetric(float64(res.CPU.Microseconds())/tx, "cpu-µs/tx")
	if res.CPU > 0 {
		b.ReportMetric(tx/res.CPU.Seconds(), "tx/cpu-s")
	}
	b.ReportMetric(tx/res.Wall.Seconds(), "tx/s")
	b.ReportMetric(float64(res.Mallocs)/tx, "allocs/tx")
	if res.Syscalls > 0 {
		b.ReportMetric(float64(res.Syscalls)/tx, "syscalls/tx")
	}
	if res.Strace != nil {
		var total int64
		var parts []string
		for name, n := range res.Strace {
			total += n
			if float64(n)/tx >= 0.05 {
				parts = append(parts, fmt.Sprintf("%s %.2f", name, float64(n)/tx))
			}
		}
		b.ReportMetric(float64(total)/tx, "strace-calls/tx")
		b.Logf("strace -c -f, per transaction: %s", strings.Join(parts, ", "))
	}
}

// processCPU is this process' user+system time.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

type straceRun struct {
	cmd *exec.Cmd
	out string
}

// startStrace attaches strace -c -f to this process and waits until it
// traces every thread.
func startStrace() (*straceRun, error) {
	path, err := exec.LookPath("strace")
	if err != nil {
		return nil, fmt.Errorf("strace not found (apt-get install strace): %w", err)
	}
	f, err := os.CreateTemp("", "relaybench-strace-*.txt")
	if err != nil {
		return nil, err
	}
	_ = f.Close()
	cmd := exec.Command(path, "-c", "-f", "-q", "-o", f.Name(), "-p", strconv.Itoa(os.Getpid()))
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(10 * time.Second)
	for !allTraced() {
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return nil, errors.New("strace did not attach")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return &straceRun{cmd: cmd, out: f.Name()}, nil
}

func allTraced() bool {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return false
	}
	for _, t := range tasks {
		b, err := os.ReadFile("/proc/self/task/" + t.Name() + "/status")
		if err != nil {
			continue
		}
		if strings.Contains(string(b), "\nTracerPid:\t0\n") {
			return false
		}
	}
	return true
}

var reStraceLine = regexp.MustCompile(`^\s*[0-9.]+\s+[0-9.]+\s+[0-9]+\s+([0-9]+)\s+(?:[0-9]+\s+)?(\w+)\s*$`)

func (s *straceRun) stop() (map[string]int64, error) {
	_ = s.cmd.Process.Signal(os.Interrupt)
	_ = s.cmd.Wait()
	defer os.Remove(s.out)
	b, err := os.ReadFile(s.out)
	if err != nil {
		return nil, err
	}
	counts := map[string]int64{}
	for _, line := range strings.Split(string(b), "\n") {
		m := reStraceLine.FindStringSubmatch(line)
		if m == nil || m[2] == "total" {
			continue
		}
		n, _ := strconv.ParseInt(m[1], 10, 64)
		counts[m[2]] = n
	}
	if len(counts) == 0 {
		return nil, fmt.Errorf("no system calls in strace's output: %q", b)
	}
	return counts, nil
}

// Idle measures what n idle client sockets cost the relay's process in
// resident memory: the driver dials n connections that never send; adopt
// takes each accepted one (and keeps it until the relay closes). It returns
// the RSS growth per socket, after a garbage collection.
func Idle(d *Driver, n int, adopt func(net.Conn) error) (perSocket float64, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	before := settledRSS()
	if err := d.send("idle %s %d", ln.Addr(), n); err != nil {
		return 0, err
	}
	for i := 0; i < n; i++ {
		c, err := ln.Accept()
		if err != nil {
			return 0, err
		}
		if err := adopt(c); err != nil {
			return 0, err
		}
	}
	if _, err := d.expect("ready"); err != nil {
		return 0, err
	}
	after := settledRSS()
	return float64(after-before) / float64(n), nil
}

// settledRSS is VmRSS in bytes after the garbage collector returned what it
// could.
func settledRSS() int64 {
	runtime.GC()
	debug.FreeOSMemory()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// GoroutineRelay is the baseline: two goroutines per session, each reading
// frames with a wire.Reader and writing them with a wire.Writer (flushed
// when nothing more is buffered), over raw system calls (internal/rawsock)
// — the I/O shape of proxy's relay, without its session logic.
type GoroutineRelay struct {
	pool  wire.Pool
	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

// Pair starts the two pumps.
func (g *GoroutineRelay) Pair(client, server net.Conn) error {
	cl, sv := rawsock.Wrap(client), rawsock.Wrap(server)
	g.mu.Lock()
	g.conns = append(g.conns, client, server)
	g.mu.Unlock()
	g.wg.Add(2)
	go g.pump(cl, sv) // owner: g; exits when either socket closes
	go g.pump(sv, cl) // owner: g; likewise
	return nil
}

// Adopt starts a client pump with no server: an idle client.
func (g *GoroutineRelay) Adopt(client net.Conn) error {
	g.mu.Lock()
	g.conns = append(g.conns, client)
	g.mu.Unlock()
	g.wg.Add(1)
	go g.pump(rawsock.Wrap(client), io.Discard) // owner: g; exits when the socket closes
	return nil
}

func (g *GoroutineRelay) pump(src io.Reader, dst io.Writer) {
	defer g.wg.Done()
	r := wire.NewPooledReader(src, &g.pool, 1<<30)
	w := wire.NewPooledWriter(dst, &g.pool)
	defer func() {
		if c, ok := src.(io.Closer); ok {
			_ = c.Close()
		}
		if c, ok := dst.(io.Closer); ok {
			_ = c.Close()
		}
	}()
	for {
		_, n, err := r.Header()
		if err != nil {
			return
		}
		if n <= wire.BufferSize {
			f, err := r.Frame(n)
			if err != nil {
				return
			}
			if _, err := w.Write(f); err != nil {
				return
			}
		} else {
			if err := w.Flush(); err != nil {
				return
			}
			if err := r.Stream(dst, n); err != nil {
				return
			}
		}
		if r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return
			}
			r.Release()
			w.Release()
		}
	}
}

// Close closes every socket and waits for the pumps.
func (g *GoroutineRelay) Close() {
	g.mu.Lock()
	for _, c := range g.conns {
		_ = c.Close()
	}
	g.conns = nil
	g.mu.Unlock()
	g.wg.Wait()
}
