package evloop

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// Detach takes c's socket out of the Go runtime: it duplicates the
// descriptor, closes c (which removes the original from the runtime's
// network poller) and returns the duplicate, non-blocking and close-on-exec,
// for Loop.Register. c must be a *net.TCPConn or *net.UnixConn that nothing
// else uses any more; bytes its reader already buffered go to Register.
// A TLS connection cannot be detached: its records need crypto/tls.
func Detach(c net.Conn) (int, error) {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
	default:
		return -1, fmt.Errorf("evloop: cannot detach a %T", c)
	}
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var dupErr error
	if err := rc.Control(func(s uintptr) {
		fd, dupErr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	if dupErr != nil {
		return -1, fmt.Errorf("evloop: dup: %w", dupErr)
	}
	if err := c.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		_ = unix.Close(fd)
		return -1, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		_ = unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// Handover detaches c and registers it on l, running done on l with the
// socket (or the error) once it is there: the way a goroutine that did a
// session's login and TLS-less startup gives its socket to a loop. buffered
// is copied before Handover returns. If the loop refuses (stopped, inbox
// full) the socket is closed and done is not called.
func (l *Loop) Handover(c net.Conn, buffered []byte, h Handler, done func(*Conn, error)) error {
	fd, err := Detach(c)
	if err != nil {
		return err
	}
	var pending []byte
	if len(buffered) > 0 {
		pending = append([]byte(nil), buffered...)
	}
	err = l.Submit(func() {
		conn, err := l.Register(fd, pending, h)
		if done != nil {
			done(conn, err)
		}
	})
	if err != nil {
		_ = unix.Close(fd)
	}
	return err
}
