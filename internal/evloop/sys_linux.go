package evloop

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The relay's system calls are made with RawSyscall, which does not enter
// the Go runtime's system-call state: the sockets are non-blocking, so the
// calls return at once, and entering that state would wake the runtime's
// monitor thread (see internal/rawsock). Only the blocking epoll_pwait goes
// through Syscall, so that the runtime can hand the loop's P to other
// goroutines while the loop sleeps.

func rawRead(fd int, p []byte) (int, syscall.Errno) {
	n, _, errno := syscall.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	return int(n), errno
}

func rawWrite(fd int, p []byte) (int, syscall.Errno) {
	n, _, errno := syscall.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	return int(n), errno
}

func rawWritev(fd int, iov []unix.Iovec) (int, syscall.Errno) {
	n, _, errno := syscall.RawSyscall(unix.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
	return int(n), errno
}

// epollWait waits for events; a zero timeout polls without entering the
// runtime's system-call state.
func epollWait(epfd int, events []unix.EpollEvent, msec int) (int, syscall.Errno) {
	var n uintptr
	var errno syscall.Errno
	if msec == 0 {
		n, _, errno = syscall.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	} else {
		n, _, errno = syscall.Syscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), uintptr(msec), 0, 0)
	}
	return int(n), errno
}

func epollCtl(epfd, op, fd int, events uint32, slot, gen uint32) syscall.Errno {
	ev := unix.EpollEvent{Events: events, Fd: int32(slot), Pad: int32(gen)}
	_, _, errno := syscall.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(&ev)), 0, 0)
	return errno
}
