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
	"io"
	"net"
	"os"
	"sync"
	"syscall"
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
	s := &Conn{Conn: c, raw: rc}
	s.readFn, s.writeFn = s.read, s.write
	return s
}

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
	defer s.wmu.Unlock()
	raceReleaseWrite(p)
	s.wbuf, s.wn, s.werr = p, 0, 0
	err := s.raw.Write(s.writeFn)
	n, errno := s.wn, s.werr
	s.wbuf = nil
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
			return false
		default:
			s.werr = errno
			return true
		}
	}
	return true
}

// opError is the error net.Conn would return for errno.
func (s *Conn) opError(op string, errno syscall.Errno) error {
	return &net.OpError{Op: op, Net: s.LocalAddr().Network(), Source: s.LocalAddr(), Addr: s.RemoteAddr(), Err: os.NewSyscallError(op, errno)}
}
