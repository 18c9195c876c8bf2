// Package rawsock makes the relay's reads and writes on sockets as raw
// system calls, so that the Go runtime's system-call bookkeeping does not
// wake its monitor thread at every round trip.
//
// A read or write made through net.Conn enters the runtime's syscall state
// (entersyscall), and the first one after the process was idle wakes the
// runtime's monitor thread (sysmon) from its deep sleep; it then polls every
// 20 µs until the process is idle again. A relay that forwards one query at
// a time is idle between round trips, so with net.Conn that costs two or
// three extra context switches and tens of microseconds of CPU per
// transaction on a small machine (measured with perf stat --per-thread
// under pgbench; see bench/README.md). The sockets of the net package are
// non-blocking, so a read or write on them returns at once: making it as a
// raw system call (no entersyscall) is what PgBouncer's event loop does, and
// waiting, when the socket is not ready, still goes through the runtime's
// network poller, with deadlines and Close working as on the net.Conn.
package rawsock

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// Wrap returns c with Read and Write made as raw system calls when c is a
// TCP or Unix socket of the net package, and c itself otherwise (a TLS
// connection wraps the socket returned by Wrap instead). Everything but
// Read and Write (deadlines, addresses, Close) is c's.
func Wrap(c net.Conn) net.Conn {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
	default:
		return c
	}
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return c
	}
	s := &Conn{Conn: c, raw: rc, armedAt: -1}
	s.readFn, s.writeFn = s.read, s.write
	return s
}

// ErrWriteTimeout is what a Write returns (wrapped in a *net.OpError) when
// the peer took none of its bytes for the write timeout (SetWriteTimeout).
// It is a net.Error whose Timeout is true.
var ErrWriteTimeout error = writeTimeoutError{}

type writeTimeoutError struct{}

func (writeTimeoutError) Error() string {
	return "write timed out: the peer took no bytes within the write timeout"
}
func (writeTimeoutError) Timeout() bool   { return true }
func (writeTimeoutError) Temporary() bool { return false }

// Conn is a socket whose Read and Write are raw system calls. Its zero
// value is not usable: make one with Wrap.
type Conn struct {
	net.Conn
	raw syscall.RawConn

	// readFn and writeFn are s.read and s.write, bound once so that a
	// call allocates nothing.
	readFn, writeFn func(fd uintptr) bool

	rmu  sync.Mutex // serialises Read: rbuf, rn and rerr belong to the call holding it
	rbuf []byte
	rn   int
	rerr syscall.Errno
	wmu  sync.Mutex // serialises Write: wbuf, wn and werr belong to the call holding it
	wbuf []byte
	wn   int
	werr syscall.Errno

	// The write timeout (SetWriteTimeout). stall and onStall are set
	// before the connection is shared; armedAt (s.wn when the automatic
	// deadline was last set, -1 when none is) and timedOut belong to the
	// Write holding wmu.
	stall    time.Duration
	onStall  func()
	armedAt  int
	timedOut bool
	// dmu orders the write deadlines: userWD is the one set through
	// SetWriteDeadline or SetDeadline, autoWD the automatic one in force
	// (zero when none); the socket's is the earlier of the two.
	dmu    sync.Mutex
	userWD time.Time
	autoWD time.Time
}

// SetWriteTimeout bounds how long a Write may wait for the peer to take
// bytes: a Write during which the socket accepts none of them for d fails
// with ErrWriteTimeout, the socket is closed, onStall (if not nil) is
// called once, and every later Write fails at once. A peer that reads
// slowly but steadily is not cut off: the time runs from the last byte the
// socket took. 0 (the default) waits for ever.
//
// It costs nothing while writes complete at once: the deadline is set only
// when a write has to wait for the peer (the socket's send buffer is full),
// and cleared when it completes. A deadline set with SetWriteDeadline or
// SetDeadline still applies; the earlier of the two ends the wait, and only
// the write timeout's counts as a timeout here. Call it before the
// connection is used by more than one goroutine. onStall runs on the
// writing goroutine after the socket was closed; it must not write to the
// connection.
func (s *Conn) SetWriteTimeout(d time.Duration, onStall func()) {
	s.stall, s.onStall = d, onStall
}

// SetWriteDeadline sets the write deadline as net.Conn's does; while a
// Write waits under the write timeout, the earlier of the two applies.
func (s *Conn) SetWriteDeadline(t time.Time) error {
	s.dmu.Lock()
	defer s.dmu.Unlock()
	s.userWD = t
	if !s.autoWD.IsZero() && (t.IsZero() || s.autoWD.Before(t)) {
		t = s.autoWD
	}
	return s.Conn.SetWriteDeadline(t)
}

// SetDeadline sets the read and write deadlines as net.Conn's does (see
// SetWriteDeadline).
func (s *Conn) SetDeadline(t time.Time) error {
	if err := s.Conn.SetReadDeadline(t); err != nil {
		return err
	}
	return s.SetWriteDeadline(t)
}

// armWriteTimeout sets the automatic write deadline, d from now. Called by
// the Write holding wmu, from the poller's callback.
func (s *Conn) armWriteTimeout() {
	s.dmu.Lock()
	defer s.dmu.Unlock()
	s.autoWD = time.Now().Add(s.stall)
	t := s.autoWD
	if !s.userWD.IsZero() && s.userWD.Before(t) {
		t = s.userWD
	}
	_ = s.Conn.SetWriteDeadline(t)
}

// disarmWriteTimeout puts the socket's write deadline back to the one set
// by the user, and reports whether the automatic one was the earlier, so
// that a deadline error is the write timeout's.
func (s *Conn) disarmWriteTimeout() (autoFirst bool) {
	s.dmu.Lock()
	defer s.dmu.Unlock()
	autoFirst = s.userWD.IsZero() || !s.autoWD.After(s.userWD)
	s.autoWD = time.Time{}
	_ = s.Conn.SetWriteDeadline(s.userWD)
	return autoFirst
}

// Read reads from the socket like net.Conn's Read: it waits in the
// runtime's network poller until data arrives, the read deadline passes
// (os.ErrDeadlineExceeded) or the connection is closed, and returns io.EOF
// when the peer has closed its end.
func (s *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.rmu.Lock()
	defer s.rmu.Unlock()
	s.rbuf, s.rn, s.rerr = p, 0, 0
	err := s.raw.Read(s.readFn)
	n, errno := s.rn, s.rerr
	s.rbuf = nil
	switch {
	case err != nil:
		return 0, err
	case errno != 0:
		return 0, s.opError("read", errno)
	case n == 0:
		return 0, io.EOF
	}
	raceAcquireRead(p[:n])
	return n, nil
}

// read is called by the poller with the socket's descriptor; false means
// "not ready, wait and call again".
func (s *Conn) read(fd uintptr) bool {
	for {
		n, _, errno := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&s.rbuf[0])), uintptr(len(s.rbuf)))
		switch errno {
		case 0:
			s.rn = int(n)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		default:
			s.rerr = errno
			return true
		}
	}
}

// Write writes all of p like net.Conn's Write, waiting in the runtime's
// network poller while the socket's send buffer is full.
func (s *Conn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.wmu.Lock()
	if s.timedOut {
		s.wmu.Unlock()
		return 0, s.opError("write", ErrWriteTimeout)
	}
	raceReleaseWrite(p)
	s.wbuf, s.wn, s.werr = p, 0, 0
	err := s.raw.Write(s.writeFn)
	n, errno := s.wn, s.werr
	s.wbuf = nil
	stalled := false
	if s.armedAt >= 0 {
		s.armedAt = -1
		if s.disarmWriteTimeout() && err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			s.timedOut, stalled = true, true
			err = s.opError("write", ErrWriteTimeout)
		}
	}
	s.wmu.Unlock()
	if stalled {
		_ = s.Conn.Close()
		if s.onStall != nil {
			s.onStall()
		}
	}
	switch {
	case err != nil:
		return n, err
	case errno != 0:
		return n, s.opError("write", errno)
	}
	return n, nil
}

func (s *Conn) write(fd uintptr) bool {
	for s.wn < len(s.wbuf) {
		n, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&s.wbuf[s.wn])), uintptr(len(s.wbuf)-s.wn))
		switch errno {
		case 0:
			s.wn += int(n)
		case syscall.EINTR:
		case syscall.EAGAIN:
			if s.stall > 0 && s.wn != s.armedAt {
				// The peer is not reading: the write timeout runs from
				// now, or again from now if it took bytes since.
				s.armedAt = s.wn
				s.armWriteTimeout()
			}
			return false
		default:
			s.werr = errno
			return true
		}
	}
	return true
}

// opError is the error net.Conn would return for errno.
func (s *Conn) opError(op string, err error) error {
	if errno, ok := err.(syscall.Errno); ok {
		err = os.NewSyscallError(op, errno)
	}
	return &net.OpError{Op: op, Net: s.LocalAddr().Network(), Source: s.LocalAddr(), Addr: s.RemoteAddr(), Err: err}
}
