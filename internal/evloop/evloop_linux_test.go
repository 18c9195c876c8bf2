package evloop

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/pggovernor/pggovernor/internal/relaybench"
)

func TestMain(m *testing.M) {
	if code, ok := relaybench.DriverMain(); ok {
		os.Exit(code)
	}
	goleak.VerifyTestMain(m)
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// onLoop runs f on l and waits for it.
func onLoop(t *testing.T, l *Loop, f func()) {
	t.Helper()
	done := make(chan struct{})
	if err := l.Submit(func() { f(); close(done) }); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the loop did not run a submitted function")
	}
}

func frame(typ byte, body []byte) []byte {
	out := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(out[1:], uint32(len(body)+4))
	return append(out, body...)
}

// recorder is a Handler that keeps copies of what it got; with echo it also
// writes every frame back (and with a peer, to the peer instead).
type recorder struct {
	mu     sync.Mutex
	frames []Frame
	closed []error
	relay  bool
}

func (r *recorder) Frame(c *Conn, f Frame) {
	r.mu.Lock()
	f.Data = append([]byte(nil), f.Data...)
	r.frames = append(r.frames, f)
	r.mu.Unlock()
	if r.relay && c.Peer() != nil {
		_ = c.Peer().Write(f.Data)
	}
}

func (r *recorder) Closed(c *Conn, err error) {
	r.mu.Lock()
	r.closed = append(r.closed, err)
	r.mu.Unlock()
	if r.relay && c.Peer() != nil {
		c.Peer().Close()
	}
}

func (r *recorder) snapshot() ([]Frame, []error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Frame(nil), r.frames...), append([]error(nil), r.closed...)
}

// socketPair returns a socket registered on l with h and the other end as a
// net.Conn for the test.
func socketPair(t *testing.T, l *Loop, h Handler) (*Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[1]), "peer")
	peer, err := net.FileConn(f)
	_ = f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = peer.Close() })
	var c *Conn
	onLoop(t, l, func() {
		c, err = l.Register(fds[0], nil, h)
	})
	if err != nil {
		t.Fatal(err)
	}
	return c, peer
}

func newEngine(t *testing.T, opts Options) *Engine {
	t.Helper()
	e, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

var modes = []struct {
	name string
	et   bool
}{{"level", false}, {"edge", true}}

// TestFramesAcrossPartialReads: a frame split at any byte arrives whole, in
// a later read than its first part.
func TestFramesAcrossPartialReads(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			e := newEngine(t, Options{Loops: 1, EdgeTriggered: m.et})
			l := e.Loops()[0]
			rec := &recorder{}
			_, peer := socketPair(t, l, rec)
			msg := frame('Q', []byte("SELECT 1\x00"))
			for split := 1; split < len(msg); split++ {
				before := l.Stats().Read
				if _, err := peer.Write(msg[:split]); err != nil {
					t.Fatal(err)
				}
				waitFor(t, "the loop to read the first part", func() bool { return l.Stats().Read > before })
				if got, _ := rec.snapshot(); len(got) != split-1 {
					t.Fatalf("split %d: a frame was delivered before it was whole: %d frames", split, len(got))
				}
				if _, err := peer.Write(msg[split:]); err != nil {
					t.Fatal(err)
				}
				waitFor(t, "the frame", func() bool { got, _ := rec.snapshot(); return len(got) == split })
				got, _ := rec.snapshot()
				f := got[split-1]
				if !f.First || !f.Last || f.Type != 'Q' || f.Len != len(msg) || !bytes.Equal(f.Data, msg) {
					t.Fatalf("split %d: want = the whole frame %q, got = %+v", split, msg, f)
				}
			}
		})
	}
}

// TestLargeFrameInParts: a frame longer than the buffer comes in parts that
// add up to it, and the frames around it come whole.
func TestLargeFrameInParts(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			e := newEngine(t, Options{Loops: 1, EdgeTriggered: m.et})
			rec := &recorder{}
			_, peer := socketPair(t, e.Loops()[0], rec)
			big := frame('D', bytes.Repeat([]byte("0123456789abcdef"), 100000/16))
			small := frame('Z', []byte{'I'})
			stream := append(append(append([]byte(nil), small...), big...), small...)
			go func() { _, _ = peer.Write(stream) }() // the socket buffer may not take it at once
			var got []Frame
			waitFor(t, "every frame", func() bool {
				got, _ = rec.snapshot()
				return len(got) > 0 && got[len(got)-1].Type == 'Z' && len(got) > 2
			})
			if !bytes.Equal(got[0].Data, small) || !got[0].First || !got[0].Last {
				t.Fatalf("first frame: want = %q whole, got = %+v", small, got[0])
			}
			var joined []byte
			parts := got[1 : len(got)-1]
			for i, p := range parts {
				if p.Type != 'D' || p.Len != len(big) || p.First != (i == 0) || p.Last != (i == len(parts)-1) {
					t.Fatalf("part %d of %d: type %q len %d first %v last %v", i, len(parts), p.Type, p.Len, p.First, p.Last)
				}
				if len(p.Data) > BufferSize {
					t.Fatalf("part %d: %d bytes, more than the buffer", i, len(p.Data))
				}
				joined = append(joined, p.Data...)
			}
			if len(parts) < 2 || !bytes.Equal(joined, big) {
				t.Fatalf("want = %d bytes in parts, got = %d bytes in %d parts", len(big), len(joined), len(parts))
			}
			if last := got[len(got)-1]; !bytes.Equal(last.Data, small) {
				t.Fatalf("last frame: want = %q, got = %q", small, last.Data)
			}
		})
	}
}

// TestWritesCoalescedNoEpollCtl: frames written in one iteration go out in
// one system call, and relaying round trips needs no epoll_ctl.
func TestWritesCoalescedNoEpollCtl(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			e := newEngine(t, Options{Loops: 1, EdgeTriggered: m.et})
			l := e.Loops()[0]
			echo := &echoHandler{}
			_, peer := socketPair(t, l, echo)
			batch := bytes.Repeat(frame('Q', []byte("SELECT 1\x00")), 20)
			r := bufio.NewReader(peer)
			got := make([]byte, len(batch))
			before := l.Stats()
			for i := 0; i < 200; i++ {
				if _, err := peer.Write(batch); err != nil {
					t.Fatal(err)
				}
				if _, err := io.ReadFull(r, got); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, batch) {
					t.Fatal("echo differs")
				}
			}
			// The loop counts a write after it returned: wait for the last.
			waitFor(t, "the loop's counters", func() bool {
				s := l.Stats()
				return s.Write+s.Writev-before.Write-before.Writev >= 200
			})
			after := l.Stats()
			reads, writes := after.Read-before.Read, after.Write+after.Writev-before.Write-before.Writev
			if writes > reads {
				t.Fatalf("%d writes for %d reads of 20 frames each: writes are not coalesced per iteration", writes, reads)
			}
			if d := after.EpollCtl - before.EpollCtl; d != 0 {
				t.Fatalf("epoll_ctl calls while relaying: want = 0, got = %d", d)
			}
		})
	}
}

// echoHandler writes every frame back to its socket.
type echoHandler struct{}

func (echoHandler) Frame(c *Conn, f Frame) { _ = c.Write(f.Data) }
func (echoHandler) Closed(*Conn, error)    {}

// TestBackpressureStopsReading: when the side a relay writes to does not
// read, the loop stops reading the side that sends, what it holds stays
// within the bound, and everything arrives once the reader reads.
func TestBackpressureStopsReading(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			const high = 16 << 10
			e := newEngine(t, Options{Loops: 1, EdgeTriggered: m.et, HighWater: high})
			l := e.Loops()[0]
			rec := &recorder{relay: true}
			src, srcPeer := socketPair(t, l, rec)
			dst, dstPeer := socketPair(t, l, rec)
			// Small kernel buffers, so that the socket fills soon.
			onLoop(t, l, func() {
				src.SetPeer(dst)
				_ = unix.SetsockoptInt(dst.fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4096)
			})
			payload := bytes.Repeat([]byte("x"), 1000)
			var want bytes.Buffer
			for i := 0; i < 4000; i++ { // 4 MB: far more than every buffer on the way
				want.Write(frame('d', payload))
			}
			writeDone := make(chan error, 1)
			go func() { _, err := srcPeer.Write(want.Bytes()); writeDone <- err }()
			// The loop pauses src and holds at most the bound plus one read.
			var paused bool
			var pending int
			waitFor(t, "the source to be paused", func() bool {
				onLoop(t, l, func() { paused, pending = !src.Reading(), dst.Buffered() })
				return paused
			})
			frames := func() int { f, _ := rec.snapshot(); return len(f) }
			n1 := frames()
			// It stays paused: the frames read do not grow while nobody reads dst.
			for i := 0; i < 50; i++ {
				onLoop(t, l, func() { paused, pending = !src.Reading(), dst.Buffered() })
				if !paused {
					t.Fatal("the source was read again while its peer's output is full")
				}
				if pending > high+BufferSize+HeaderLen {
					t.Fatalf("pending output %d beyond the bound %d", pending, high+BufferSize)
				}
			}
			if n2 := frames(); n2 != n1 {
				t.Fatalf("frames read while paused: %d then %d", n1, n2)
			}
			// The reader reads: everything arrives, in order.
			got := make([]byte, want.Len())
			if _, err := io.ReadFull(dstPeer, got); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want.Bytes()) {
				t.Fatal("relayed bytes differ")
			}
			if err := <-writeDone; err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestPeerCloseAndReset: an orderly close is io.EOF, a reset is ECONNRESET;
// a relay closes the other side after either.
func TestPeerCloseAndReset(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			e := newEngine(t, Options{Loops: 1, EdgeTriggered: m.et})
			l := e.Loops()[0]
			// Orderly close: the pending frame is delivered first.
			rec := &recorder{}
			_, peer := socketPair(t, l, rec)
			if _, err := peer.Write(frame('X', nil)); err != nil {
				t.Fatal(err)
			}
			_ = peer.Close()
			waitFor(t, "Closed", func() bool { _, c := rec.snapshot(); return len(c) == 1 })
			frames, closed := rec.snapshot()
			if len(frames) != 1 || frames[0].Type != 'X' || !errors.Is(closed[0], io.EOF) {
				t.Fatalf("want = frame X then io.EOF, got = %d frames, %v", len(frames), closed)
			}
			// Reset: a TCP peer that closes with SO_LINGER 0.
			rec2 := &recorder{}
			c, tcpPeer := tcpPair(t, l, rec2, nil)
			_ = tcpPeer.(*net.TCPConn).SetLinger(0)
			_ = tcpPeer.Close()
			waitFor(t, "Closed", func() bool { _, c := rec2.snapshot(); return len(c) == 1 })
			_, closed = rec2.snapshot()
			if !errors.Is(closed[0], syscall.ECONNRESET) {
				t.Fatalf("want = ECONNRESET, got = %v", closed[0])
			}
			onLoop(t, l, func() {
				if !c.Closed() || c.fd != -1 {
					t.Error("the socket is not closed after Closed")
				}
			})
		})
	}
}

// tcpPair accepts a TCP connection, reads what the test's pre function
// wants from it on the Go side, and hands it over to l with what the
// reader buffered.
func tcpPair(t *testing.T, l *Loop, h Handler, pre func(client net.Conn, br *bufio.Reader)) (*Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReaderSize(srv, 4096)
	if pre != nil {
		pre(client, br)
	}
	var buffered []byte
	if n := br.Buffered(); n > 0 {
		buffered, _ = br.Peek(n)
	}
	type result struct {
		c   *Conn
		err error
	}
	res := make(chan result, 1)
	if err := l.Handover(srv, buffered, h, func(c *Conn, err error) { res <- result{c, err} }); err != nil {
		t.Fatal(err)
	}
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.c, client
}

// TestHandoverCarriesBufferedBytes: the Go side read the startup and, with
// it, the first bytes of the next messages; after the hand-over the loop
// delivers those and the rest of the stream, whole and in order.
func TestHandoverCarriesBufferedBytes(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			e := newEngine(t, Options{Loops: 1, EdgeTriggered: m.et})
			l := e.Loops()[0]
			rec := &recorder{}
			first := frame('p', []byte("login"))
			q1 := frame('Q', []byte("SELECT 1\x00"))
			q2 := frame('Q', []byte("SELECT 2\x00"))
			_, client := tcpPair(t, l, rec, func(clientSide net.Conn, br *bufio.Reader) {
				// The client sends its login frame, a whole query and half
				// of the next one in one write; the Go side reads the
				// login frame only.
				burst := append(append(append([]byte(nil), first...), q1...), q2[:7]...)
				if _, err := clientSide.Write(burst); err != nil {
					t.Fatal(err)
				}
				got := make([]byte, len(first))
				if _, err := io.ReadFull(br, got); err != nil {
					t.Fatal(err)
				}
				waitFor(t, "the reader to buffer the rest", func() bool {
					_, _ = br.Peek(1)
					return br.Buffered() == len(q1)+7
				})
			})
			if _, err := client.Write(q2[7:]); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "both queries", func() bool { f, _ := rec.snapshot(); return len(f) == 2 })
			got, _ := rec.snapshot()
			if !bytes.Equal(got[0].Data, q1) || !bytes.Equal(got[1].Data, q2) {
				t.Fatalf("want = %q, %q; got = %q, %q", q1, q2, got[0].Data, got[1].Data)
			}
		})
	}
}

// TestTimers: timers fire in deadline order, Stop and Reset work, and a
// timer can close a socket (a deadline).
func TestTimers(t *testing.T) {
	e := newEngine(t, Options{Loops: 1})
	l := e.Loops()[0]
	var mu sync.Mutex
	var fired []int
	record := func(i int) func() {
		return func() { mu.Lock(); fired = append(fired, i); mu.Unlock() }
	}
	rec := &recorder{}
	c, _ := socketPair(t, l, rec)
	onLoop(t, l, func() {
		l.AfterFunc(30*time.Millisecond, record(3))
		l.AfterFunc(10*time.Millisecond, record(1))
		stopped := l.AfterFunc(5*time.Millisecond, record(99))
		if !stopped.Stop() || stopped.Stop() {
			t.Error("Stop: want = true then false")
		}
		moved := l.AfterFunc(time.Hour, record(2))
		moved.Reset(20 * time.Millisecond)
		l.AfterFunc(40*time.Millisecond, func() { record(4)(); c.Close() })
	})
	waitFor(t, "the deadline to close the socket", func() bool { _, cl := rec.snapshot(); return len(cl) == 1 })
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(fired) != "[1 2 3 4]" {
		t.Fatalf("timers fired: want = [1 2 3 4], got = %v", fired)
	}
	if _, cl := rec.snapshot(); cl[0] != nil {
		t.Fatalf("Closed after Close: want = nil, got = %v", cl[0])
	}
}

// TestBadFrameLength closes the socket with a *FrameError.
func TestBadFrameLength(t *testing.T) {
	e := newEngine(t, Options{Loops: 1, MaxFrameLen: 1000})
	for _, length := range []uint32{3, 1001} {
		rec := &recorder{}
		_, peer := socketPair(t, e.Loops()[0], rec)
		hdr := []byte{'Q', 0, 0, 0, 0}
		binary.BigEndian.PutUint32(hdr[1:], length)
		if _, err := peer.Write(hdr); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "Closed", func() bool { _, c := rec.snapshot(); return len(c) == 1 })
		_, closed := rec.snapshot()
		var fe *FrameError
		if !errors.As(closed[0], &fe) || fe.Length != length {
			t.Fatalf("length %d: want = *FrameError, got = %v", length, closed[0])
		}
	}
}

// TestShutdownClosesEverything: Close stops every loop, closes every socket
// with ErrClosed, refuses later work, runs what was submitted with Register
// refusing, and every goroutine exits (goleak in TestMain).
func TestShutdownClosesEverything(t *testing.T) {
	e, err := New(Options{Loops: 2})
	if err != nil {
		t.Fatal(err)
	}
	var recs []*recorder
	var peers []net.Conn
	for _, l := range e.Loops() {
		for i := 0; i < 3; i++ {
			rec := &recorder{}
			_, peer := socketPair(t, l, rec)
			recs = append(recs, rec)
			peers = append(peers, peer)
		}
	}
	e.Close()
	for i, rec := range recs {
		if _, closed := rec.snapshot(); len(closed) != 1 || !errors.Is(closed[0], ErrClosed) {
			t.Fatalf("socket %d: want = Closed(ErrClosed) once, got = %v", i, closed)
		}
		// The engine's end is closed: the test's end reads EOF.
		_ = peers[i].SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := peers[i].Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Fatalf("socket %d: want = EOF on the other end, got = %v", i, err)
		}
	}
	if err := e.Loops()[0].Submit(func() {}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Submit after Close: want = ErrClosed, got = %v", err)
	}
	e.Close() // idempotent
}

// TestHold: a held socket is not read; released, what came meanwhile is
// delivered.
func TestHold(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			e := newEngine(t, Options{Loops: 1, EdgeTriggered: m.et})
			l := e.Loops()[0]
			rec := &recorder{}
			c, peer := socketPair(t, l, rec)
			onLoop(t, l, func() { c.Hold(true) })
			msg := frame('Q', []byte("SELECT 1\x00"))
			if _, err := peer.Write(msg); err != nil {
				t.Fatal(err)
			}
			// Other work on the loop goes on while c is held.
			for i := 0; i < 20; i++ {
				onLoop(t, l, func() {})
			}
			if got, _ := rec.snapshot(); len(got) != 0 {
				t.Fatalf("a held socket was read: %d frames", len(got))
			}
			onLoop(t, l, func() { c.Hold(false) })
			waitFor(t, "the frame after the release", func() bool { got, _ := rec.snapshot(); return len(got) == 1 })
		})
	}
}

// TestRelayDoesNotAllocate: reading, framing, writing and flushing a round
// trip allocates nothing once the loop's buffers are warm.
func TestRelayDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	e := newEngine(t, Options{Loops: 1})
	_, peer := socketPair(t, e.Loops()[0], echoHandler{})
	msg := frame('Q', []byte("SELECT 1\x00"))
	got := make([]byte, len(msg))
	roundTrip := func() {
		if _, err := peer.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(peer, got); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 100; i++ {
		roundTrip()
	}
	if allocs := testing.AllocsPerRun(1000, roundTrip); allocs != 0 {
		t.Fatalf("allocations per round trip: want = 0, got = %v", allocs)
	}
}
