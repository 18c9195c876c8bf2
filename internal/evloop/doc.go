// Package evloop is an event-loop engine for the relay of established,
// plaintext PostgreSQL sessions: N loops, each a goroutine locked to its own
// OS thread with its own epoll set, serving sockets taken out of the Go
// runtime's network poller. A loop reads a socket only when epoll says it is
// readable (one read per readiness), cuts what it read into PostgreSQL frames
// (a type byte and a four-byte length; frames longer than the read buffer are
// delivered in parts) and hands them to a Handler on the loop thread; what the
// handler writes is buffered per socket and flushed once per loop iteration
// (write, or writev across buffer chunks). Backpressure: a socket whose own
// output, or whose linked peer's output, is pending beyond a bound is not read
// until that output drains, so no buffer grows without a bound. Per loop there
// are timers (a min-heap) for the deadlines that sockets taken from the
// netpoller no longer have, and an inbox, touched only when something is
// handed over, through which other goroutines run functions on the loop
// (registering a socket, closing one).
//
// An idle socket holds no buffer: reads go into the loop's own buffer, and a
// socket keeps one of the loop's 8 KiB buffers only while a frame is
// incomplete or output is pending.
//
// The package is Linux only (epoll, eventfd); elsewhere it has no API, and
// the goroutine relay is used.
package evloop
