package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// link is a governor's path to Postgres, and what can go wrong with it.
type link interface {
	// kind names the mechanism, for the report.
	kind() string
	// upstream is the host:port the governor's upstream.url names.
	upstream() string
	// prefix is the command the governor runs under (nil: none).
	prefix() []string
	// drop makes the path lose everything from now on, silently: no
	// connection is closed, no packet answered.
	drop() error
	// cut resets every connection on the path and refuses new ones.
	cut() error
	// heal ends drop or cut.
	heal() error
	close()
}

var errUnsupported = errors.New("this link cannot do that")

// direct is the plain path: the governor dials Postgres itself.
type direct string

func (d direct) kind() string     { return "direct" }
func (d direct) upstream() string { return string(d) }
func (d direct) prefix() []string { return nil }
func (d direct) drop() error      { return errUnsupported }
func (d direct) cut() error       { return errUnsupported }
func (d direct) heal() error      { return nil }
func (d direct) close()           {}

// forwarder is a TCP relay in this process between a governor and
// Postgres. It can reset every connection (cut) and stop relaying without
// closing anything (drop). A drop through it is a stall: this host's
// kernel still acknowledges what the governor sends (into the
// forwarder's socket buffers), so TCP keepalives and TCP_USER_TIMEOUT on
// the governor's side cannot notice it — only the governor's own
// deadlines can. The network namespace link drops packets for real.
type forwarder struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	stalled chan struct{} // non-nil while dropping: closed at heal
	refuse  bool          // while cut: new connections are reset
	closed  bool
}

func newForwarder(target string) (*forwarder, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f := &forwarder{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	f.wg.Add(1)
	go f.accept() // owner: f; exits at close
	return f, nil
}

func (f *forwarder) kind() string     { return "forwarder" }
func (f *forwarder) upstream() string { return f.ln.Addr().String() }
func (f *forwarder) prefix() []string { return nil }

func (f *forwarder) accept() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.wg.Add(1)
		go func() { defer f.wg.Done(); f.serve(c) }() // owner: f; exits when the pair closes
	}
}

// gate blocks while the forwarder drops, and reports whether the
// connection may go on (false once cut or closed).
func (f *forwarder) gate() bool {
	f.mu.Lock()
	st := f.stalled
	f.mu.Unlock()
	if st != nil {
		<-st
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return !f.refuse && !f.closed
}

func (f *forwarder) track(cs ...net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.refuse || f.closed {
		return false
	}
	for _, c := range cs {
		f.conns[c] = struct{}{}
	}
	return true
}

func (f *forwarder) untrack(cs ...net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range cs {
		delete(f.conns, c)
	}
}

func (f *forwarder) serve(c net.Conn) {
	if !f.gate() {
		reset(c)
		return
	}
	up, err := net.DialTimeout("tcp", f.target, 5*time.Second)
	if err != nil {
		reset(c)
		return
	}
	if !f.track(c, up) {
		reset(c)
		reset(up)
		return
	}
	var once sync.Once
	end := func() {
		once.Do(func() {
			f.untrack(c, up)
			_ = c.Close()
			_ = up.Close()
		})
	}
	done := make(chan struct{}, 2)
	go func() { f.pipe(up, c); end(); done <- struct{}{} }() // owner: serve; exits when either side closes
	f.pipe(c, up)
	end()
	<-done
}

// pipe copies src to dst. While the forwarder drops, what it read waits,
// and so does an end of the stream: a close crossing a dropped path is
// not seen on the other side until it heals.
func (f *forwarder) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if !f.gate() {
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// reset closes c with an RST (SO_LINGER 0), as a cut path does.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

func (f *forwarder) drop() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stalled == nil {
		f.stalled = make(chan struct{})
	}
	return nil
}

func (f *forwarder) cut() error {
	f.mu.Lock()
	f.refuse = true
	var cs []net.Conn
	for c := range f.conns {
		cs = append(cs, c)
	}
	f.mu.Unlock()
	for _, c := range cs {
		reset(c)
	}
	return nil
}

func (f *forwarder) heal() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stalled != nil {
		close(f.stalled)
		f.stalled = nil
	}
	f.refuse = false
	return nil
}

func (f *forwarder) close() {
	_ = f.ln.Close()
	f.mu.Lock()
	f.closed = true
	if f.stalled != nil {
		close(f.stalled)
		f.stalled = nil
	}
	var cs []net.Conn
	for c := range f.conns {
		cs = append(cs, c)
	}
	f.mu.Unlock()
	for _, c := range cs {
		_ = c.Close()
	}
	f.wg.Wait()
}

// netns runs a governor in a network namespace of its own, joined to this
// one by a veth pair: Postgres (listening on every address here) is
// reached through the pair, and its clients reach the governor through its
// Unix socket (a path on the shared file system). drop makes each end of
// the pair send to a MAC address the other end does not have, so that
// every frame is silently discarded on arrival: both kernels see their
// segments go unacknowledged, as across a real network partition, and
// their keepalives and TCP_USER_TIMEOUT act. It needs CAP_NET_ADMIN and
// CAP_SYS_ADMIN (root), iproute2 and nsenter.
type netns struct {
	holder  *exec.Cmd // sleeps in the namespace, which lives as long as it does
	host    string    // the pair's end in this namespace
	hostIP  string
	nsIP    string
	pgPort  int
	nsenter []string
}

// nsSubnet is where the pairs' addresses come from (a /30 each); Postgres'
// pg_hba.conf admits it.
const nsSubnet = "10.214.0.0/16"

// newNetns makes the namespace and the pair; n numbers it within this
// process.
func newNetns(n, pgPort int) (*netns, error) {
	holder := exec.Command("sleep", "infinity")
	holder.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	if err := holder.Start(); err != nil {
		return nil, fmt.Errorf("a network namespace (CLONE_NEWNET needs root): %w", err)
	}
	pid := holder.Process.Pid
	// Addresses from the process id and n: /30 blocks of 10.214.0.0/16.
	block := (os.Getpid()%200)*64 + n%64
	a, b := 214, block*4
	l := &netns{holder: holder, host: fmt.Sprintf("pgf%d_%d", os.Getpid()%100000, n),
		hostIP: fmt.Sprintf("10.%d.%d.%d", a, b/256%256, b%256+1), nsIP: fmt.Sprintf("10.%d.%d.%d", a, b/256%256, b%256+2),
		pgPort: pgPort, nsenter: []string{"nsenter", fmt.Sprintf("--net=/proc/%d/ns/net", pid), "--"}}
	steps := [][]string{
		{"ip", "link", "add", l.host, "type", "veth", "peer", "name", "eth0", "netns", fmt.Sprint(pid)},
		{"ip", "addr", "add", l.hostIP + "/30", "dev", l.host},
		{"ip", "link", "set", l.host, "up"},
		l.in("ip", "link", "set", "lo", "up"),
		l.in("ip", "addr", "add", l.nsIP+"/30", "dev", "eth0"),
		l.in("ip", "link", "set", "eth0", "up"),
	}
	for _, s := range steps {
		if err := sh(s...); err != nil {
			l.close()
			return nil, err
		}
	}
	return l, nil
}

// in is a command run in the namespace.
func (l *netns) in(args ...string) []string { return append(append([]string{}, l.nsenter...), args...) }

func sh(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (l *netns) kind() string     { return "netns" }
func (l *netns) upstream() string { return fmt.Sprintf("%s:%d", l.hostIP, l.pgPort) }
func (l *netns) prefix() []string { return l.nsenter }
func (l *netns) cut() error       { return errUnsupported }

func (l *netns) drop() error {
	if err := sh("ip", "neigh", "replace", l.nsIP, "lladdr", "02:00:00:00:00:01", "dev", l.host, "nud", "permanent"); err != nil {
		return err
	}
	return sh(l.in("ip", "neigh", "replace", l.hostIP, "lladdr", "02:00:00:00:00:02", "dev", "eth0", "nud", "permanent")...)
}

// heal forgets the wrong neighbours: ARP finds the right ones again at the
// next segment.
func (l *netns) heal() error {
	err1 := sh("ip", "neigh", "del", l.nsIP, "dev", l.host)
	err2 := sh(l.in("ip", "neigh", "del", l.hostIP, "dev", "eth0")...)
	return errors.Join(err1, err2)
}

func (l *netns) close() {
	_ = sh("ip", "link", "del", l.host) // both ends; the namespace's goes with it anyway
	_ = l.holder.Process.Kill()
	_ = l.holder.Wait()
}

// netnsWorks reports why governors cannot run in network namespaces here,
// or nil when they can.
func netnsWorks(pgPort int) error {
	for _, tool := range []string{"ip", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found", tool)
		}
	}
	l, err := newNetns(63, pgPort)
	if err != nil {
		return err
	}
	defer l.close()
	if err := l.drop(); err != nil {
		return err
	}
	return l.heal()
}
