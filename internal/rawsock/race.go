//go:build race

package rawsock

import (
	"runtime"
	"unsafe"
)

// ioSync is what the race detector sees synchronising a write with the
// reads that may follow it, as package syscall does for its Read and
// Write: data that crossed a socket (a cancel key sent to a client and sent
// back on another connection) is ordered, for the detector, by the I/O.
var ioSync int64

func raceReleaseWrite(p []byte) {
	runtime.RaceReleaseMerge(unsafe.Pointer(&ioSync))
	if len(p) > 0 {
		runtime.RaceReadRange(unsafe.Pointer(&p[0]), len(p))
	}
}

func raceAcquireRead(p []byte) {
	if len(p) > 0 {
		runtime.RaceWriteRange(unsafe.Pointer(&p[0]), len(p))
	}
	runtime.RaceAcquire(unsafe.Pointer(&ioSync))
}
