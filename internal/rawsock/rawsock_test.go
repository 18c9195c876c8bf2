package rawsock

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// pair returns both ends of a loopback connection of the given network,
// the first one wrapped.
func pair(t *testing.T, network string) (wrapped, peer net.Conn) {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "s")
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() { // owner: this function; exits after one Accept
		c, err := l.Accept()
		if err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	c, err := net.Dial(network, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	p := <-accepted
	if p == nil {
		t.FailNow()
	}
	t.Cleanup(func() { _ = c.Close(); _ = p.Close() })
	w := Wrap(c)
	if _, ok := w.(*Conn); !ok {
		t.Fatalf("Wrap(%T): want *rawsock.Conn, got %T", c, w)
	}
	return w, p
}

// TestReadWrite moves 8 MiB each way at once through a wrapped TCP and
// Unix socket (so writes meet full send buffers and wait in the poller)
// and checks every byte.
func TestReadWrite(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			w, p := pair(t, network)
			out := bytes.Repeat([]byte("0123456789abcdef"), 1<<19)
			var wg sync.WaitGroup
			var fromWrapped, fromPeer []byte
			var errs [4]error
			wg.Add(4)
			go func() { defer wg.Done(); _, errs[0] = w.Write(out) }()
			go func() { defer wg.Done(); _, errs[1] = p.Write(out) }()
			go func() { defer wg.Done(); fromWrapped, errs[2] = readN(p, len(out)) }()
			go func() { defer wg.Done(); fromPeer, errs[3] = readN(w, len(out)) }()
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Fatalf("transfer %d: %v", i, err)
				}
			}
			if !bytes.Equal(fromWrapped, out) || !bytes.Equal(fromPeer, out) {
				t.Fatal("the bytes read differ from the bytes written")
			}
		})
	}
}

func readN(c net.Conn, n int) ([]byte, error) {
	b := make([]byte, n)
	_, err := io.ReadFull(c, b)
	return b, err
}

// TestEOFDeadlineClose: a closed peer reads as io.EOF, a read deadline
// ends a waiting Read with os.ErrDeadlineExceeded (a net.Error whose
// Timeout is true), and Close ends a waiting Read with net.ErrClosed, as on
// a net.Conn.
func TestEOFDeadlineClose(t *testing.T) {
	w, p := pair(t, "tcp")
	buf := make([]byte, 16)

	if err := w.SetReadDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	_, err := w.Read(buf)
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past the deadline: want os.ErrDeadlineExceeded, got = %v", err)
	}
	if err := w.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}

	if _, err := p.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	if n, err := w.Read(buf); err != nil || string(buf[:n]) != "hi" {
		t.Fatalf("read: want = hi, got = %q, %v", buf[:n], err)
	}
	_ = p.Close()
	if _, err := w.Read(buf); err != io.EOF {
		t.Fatalf("read after the peer closed: want io.EOF, got = %v", err)
	}

	w2, _ := pair(t, "tcp")
	done := make(chan error, 1)
	go func() { _, err := w2.Read(buf[:1]); done <- err }() // owner: this test; exits at Close
	_ = w2.Close()                                          // whether the Read waits in the poller yet or not, it must end
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read ended by Close: want net.ErrClosed, got = %v", err)
	}
}

// TestWriteToClosedPeer: writing to a connection the peer reset returns
// an error (EPIPE or ECONNRESET) instead of killing the process with
// SIGPIPE.
func TestWriteToClosedPeer(t *testing.T) {
	w, p := pair(t, "tcp")
	_ = p.(*net.TCPConn).SetLinger(0)
	_ = p.Close()
	var err error
	for i := 0; i < 100 && err == nil; i++ {
		_, err = w.Write(make([]byte, 64<<10))
	}
	if err == nil {
		t.Fatal("writes to a reset connection: want an error, got none")
	}
}

// TestWriteTimeout: a Write the peer takes nothing of for the write
// timeout fails with ErrWriteTimeout (a net.Error whose Timeout is true),
// the socket is closed (the peer reads EOF after what was written),
// onStall is called once, and later Writes fail at once.
func TestWriteTimeout(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			w, p := pair(t, network)
			stalls := make(chan struct{}, 2)
			w.(*Conn).SetWriteTimeout(100*time.Millisecond, func() { stalls <- struct{}{} })
			_, err := w.Write(make([]byte, 64<<20)) // far more than the socket buffers hold
			var ne net.Error
			if !errors.Is(err, ErrWriteTimeout) || !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("write to a peer that does not read: want ErrWriteTimeout, got = %v", err)
			}
			if _, err := w.Write([]byte("x")); !errors.Is(err, ErrWriteTimeout) {
				t.Fatalf("write after the timeout: want ErrWriteTimeout at once, got = %v", err)
			}
			if _, err := io.Copy(io.Discard, p); err != nil {
				t.Fatalf("the peer reading after the timeout: want what was written then EOF, got = %v", err)
			}
			if len(stalls) != 1 {
				t.Fatalf("onStall calls: want = 1, got = %d", len(stalls))
			}
		})
	}
}

// TestWriteTimeoutRunsFromProgress: a peer that reads slowly but steadily
// is not cut off, though the whole Write takes longer than the timeout; a
// deadline of the user's that passes first ends the Write as on a
// net.Conn, not as a write timeout, and the connection stays usable.
func TestWriteTimeoutRunsFromProgress(t *testing.T) {
	w, p := pair(t, "tcp")
	const timeout = time.Second
	stalls := make(chan struct{}, 1)
	w.(*Conn).SetWriteTimeout(timeout, func() { stalls <- struct{}{} })
	// Small socket buffers, so that the Write lasts about as long as the
	// reading: 256 reads of 16 KiB, 10 ms apart, at least 2.5 s.
	if err := w.(*Conn).Conn.(*net.TCPConn).SetWriteBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	if err := p.(*net.TCPConn).SetReadBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 4<<20)
	began := time.Now()
	done := make(chan error, 1)
	go func() { _, err := w.Write(out); done <- err }() // owner: this test; ends when everything was read
	buf := make([]byte, 16<<10)
	for got := 0; got < len(out); {
		n, err := p.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got += n
		time.Sleep(10 * time.Millisecond) // a slow reader: 10 ms between reads
	}
	if err := <-done; err != nil {
		t.Fatalf("write to a slow but steady reader: want no error, got = %v", err)
	}
	if took := time.Since(began); took < 2*timeout {
		t.Fatalf("the write took %s, less than twice the timeout %s: the test proves nothing about progress", took, timeout)
	}

	// A user deadline before the write timeout.
	if err := w.SetWriteDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	_, err := w.Write(make([]byte, 64<<20))
	if !errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, ErrWriteTimeout) {
		t.Fatalf("write past the user's deadline: want os.ErrDeadlineExceeded, got = %v", err)
	}
	if len(stalls) != 0 {
		t.Fatal("onStall was called for the user's deadline")
	}
	if err := w.SetWriteDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = io.Copy(io.Discard, p) }() // owner: this test; ends when w is closed at cleanup
	if _, err := w.Write(make([]byte, 1<<20)); err != nil {
		t.Fatalf("write after the user's deadline was cleared: %v", err)
	}
}

// TestWrapLeavesOthers: what is not a socket of the net package is
// returned as it is.
func TestWrapLeavesOthers(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if got := Wrap(a); got != a {
		t.Fatalf("Wrap(net.Pipe end): want it unchanged, got %T", got)
	}
}

// TestNoAllocations guards the relay's hot path: a write and a read
// through wrapped sockets allocate nothing.
func TestNoAllocations(t *testing.T) {
	w, p := pair(t, "tcp")
	w.(*Conn).SetWriteTimeout(time.Minute, nil) // free while writes complete at once
	w2 := Wrap(p)
	msg := []byte("Q\x00\x00\x00\x0dSELECT 1\x00")
	buf := make([]byte, 64)
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := w.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(w2, buf[:len(msg)]); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("allocations per write and read: want = 0, got = %v", allocs)
	}
}

// BenchmarkRoundTrip is a ping-pong of a small message over loopback TCP,
// through wrapped sockets and through net.Conn.
func BenchmarkRoundTrip(b *testing.B) {
	for _, raw := range []bool{true, false} {
		name := "net.Conn"
		if raw {
			name = "rawsock"
		}
		b.Run(name, func(b *testing.B) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			go func() { // owner: this benchmark; echoes until the connection closes
				c, err := l.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				if raw {
					c = Wrap(c)
				}
				buf := make([]byte, 64)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
			c, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			if raw {
				c = Wrap(c)
			}
			msg, buf := []byte("ping"), make([]byte, 64)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf[:len(msg)]); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
