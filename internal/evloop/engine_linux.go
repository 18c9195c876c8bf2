package evloop

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// BufferSize is the size of a loop's read buffer and of the chunks a
// socket's pending input and output are kept in: 8 KiB, as Postgres'
// PQ_RECV_BUFFER_SIZE and PQ_SEND_BUFFER_SIZE (src/backend/libpq/pqcomm.c).
// A frame up to this size is delivered whole; a longer one in parts.
const BufferSize = 8192

// HeaderLen is a frame's header: its type byte and four-byte length.
const HeaderLen = 5

var (
	// ErrClosed is returned for work given to a loop or engine that is
	// closed, and passed to Handler.Closed for sockets the engine closed
	// as it stopped.
	ErrClosed = errors.New("evloop: closed")
	// ErrInboxFull is returned by Submit when the loop has more pending
	// hand-overs than Options.InboxSize: the caller keeps what it tried to
	// hand over.
	ErrInboxFull = errors.New("evloop: inbox full")
)

// FrameError is passed to Handler.Closed when a socket sent a frame whose
// length is below 4 or above Options.MaxFrameLen.
type FrameError struct {
	Type   byte
	Length uint32
	Limit  int
}

func (e *FrameError) Error() string {
	return fmt.Sprintf("frame of type %q has length %d (limit %d)", e.Type, e.Length, e.Limit)
}

// Options configure an Engine.
type Options struct {
	// Loops is the number of event loops; 0 means runtime.GOMAXPROCS(0).
	Loops int
	// EdgeTriggered registers sockets with EPOLLET: no epoll_ctl after
	// registration, ever (a paused socket is simply not read); a read
	// that fills the buffer is followed by another in the next iteration.
	// Level-triggered (false) changes a socket's events with
	// EPOLL_CTL_MOD when it is paused or resumed and when a write blocks
	// or drains.
	EdgeTriggered bool
	// HighWater is the output pending on a socket beyond which neither it
	// nor its linked peer is read; 0 means 64 KiB. Reading resumes once the
	// output is below LowWater (0 means HighWater/4).
	HighWater, LowWater int
	// MaxFrameLen bounds a frame's length field (which counts itself); a
	// longer frame closes the socket with a *FrameError. 0 means 1 GiB − 1
	// as Postgres' own limit for a message.
	MaxFrameLen int
	// InboxSize bounds the functions waiting to run on a loop (Submit);
	// 0 means 4096.
	InboxSize int
	// Events is how many epoll events one wait returns at most; 0 means 256.
	Events int
	// FreeBuffers is how many idle 8 KiB chunks a loop keeps for reuse;
	// 0 means Events. A chunk holds a socket's output from a Write to the
	// end of the iteration's flush, so an iteration that serves Events
	// sockets needs as many: fewer would allocate at every busy
	// iteration (measured: at 1000 clients a free list of 64 cost 40% more
	// CPU per transaction).
	FreeBuffers int
}

func (o Options) withDefaults() Options {
	if o.Loops <= 0 {
		o.Loops = runtime.GOMAXPROCS(0)
	}
	if o.HighWater <= 0 {
		o.HighWater = 64 << 10
	}
	if o.LowWater <= 0 || o.LowWater > o.HighWater {
		o.LowWater = o.HighWater / 4
	}
	if o.MaxFrameLen <= 0 {
		o.MaxFrameLen = 1<<30 - 1
	}
	if o.InboxSize <= 0 {
		o.InboxSize = 4096
	}
	if o.Events <= 0 {
		o.Events = 256
	}
	if o.FreeBuffers <= 0 {
		o.FreeBuffers = o.Events
	}
	return o
}

// Engine is a set of loops. Make one with New; Close stops it.
type Engine struct {
	loops []*Loop
	next  atomic.Uint32
	wg    sync.WaitGroup
}

// New starts the loops of an engine. The caller must call Close.
func New(opts Options) (*Engine, error) {
	opts = opts.withDefaults()
	e := &Engine{}
	for i := 0; i < opts.Loops; i++ {
		l, err := newLoop(i, opts)
		if err != nil {
			e.Close()
			return nil, err
		}
		e.loops = append(e.loops, l)
		e.wg.Add(1)
		go l.run(&e.wg) // owner: e; exits when Close stops the loop
	}
	for _, l := range e.loops {
		<-l.started
	}
	return e, nil
}

// Loops returns the engine's loops.
func (e *Engine) Loops() []*Loop { return e.loops }

// Next returns a loop, round robin: where a new session's sockets go.
func (e *Engine) Next() *Loop {
	return e.loops[int(e.next.Add(1)-1)%len(e.loops)]
}

// Close stops every loop: each closes its sockets (Handler.Closed gets
// ErrClosed), runs what is left in its inbox with its Register refusing, and
// exits. Close returns when every loop goroutine has exited. Idempotent.
func (e *Engine) Close() {
	for _, l := range e.loops {
		l.stop()
	}
	e.wg.Wait()
}

// Stats are a loop's counters since it started: system calls by kind, loop
// iterations and frames delivered. They are written by the loop only and may
// be read from any goroutine.
type Stats struct {
	EpollWait, EpollCtl, Read, Write, Writev, Eventfd uint64
	Iterations, Frames                                uint64
	// CPU is the loop thread's CPU time (user and system), as the kernel
	// accounts it.
	CPU time.Duration
}

// Syscalls is the number of system calls of every kind.
func (s Stats) Syscalls() uint64 {
	return s.EpollWait + s.EpollCtl + s.Read + s.Write + s.Writev + s.Eventfd
}

type counters struct {
	epollWait, epollCtl, read, write, writev, eventfd atomic.Uint64
	iterations, frames                                atomic.Uint64
}

// Loop is one event loop: a goroutine locked to its OS thread, its epoll
// set, its sockets and timers. Submit may be called from any goroutine;
// every other method, and every method of the Conns and Timers of the loop,
// only on the loop (from a Handler, a timer or a submitted function).
type Loop struct {
	id   int
	opts Options
	epfd int
	evfd int
	tid  atomic.Int32

	started chan struct{}

	// mu guards the inbox: taken by Submit and once per wake-up by the
	// loop, never on the relay's path.
	mu      sync.Mutex
	inbox   []func()
	closed  bool
	stopped bool // set by the loop once it refuses Register

	events  []unix.EpollEvent
	scratch []byte       // the read buffer of sockets holding none
	free    [][]byte     // idle chunks for reuse
	iov     []unix.Iovec // writev's vector
	conns   []*Conn      // by slot
	slots   []uint32     // free slots
	gens    []uint32     // generation per slot, in the events' data
	ready   []*Conn      // to read (or dispatch) again this iteration, not waiting for epoll
	dirty   []*Conn      // with output to flush at the end of the iteration
	gone    []*Conn      // closed this iteration: Handler.Closed to call
	runq    []func()     // the inbox taken for this iteration
	timers  timerHeap    // by deadline
	epoch   time.Time    // timers count from here (monotonic)
	stats   counters
	ctlMask uint32 // EPOLLET or 0
}

func newLoop(id int, opts Options) (*Loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	evfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		_ = unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	l := &Loop{id: id, opts: opts, epfd: epfd, evfd: evfd, started: make(chan struct{}),
		events: make([]unix.EpollEvent, opts.Events), scratch: make([]byte, BufferSize), epoch: time.Now()}
	if opts.EdgeTriggered {
		l.ctlMask = unix.EPOLLET
	}
	// The eventfd's slot is -1; level-triggered, read to reset.
	if errno := epollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, unix.EPOLLIN, ^uint32(0), 0); errno != 0 {
		_ = unix.Close(evfd)
		_ = unix.Close(epfd)
		return nil, fmt.Errorf("epoll_ctl: %w", errno)
	}
	return l, nil
}

// ID is the loop's index in its engine.
func (l *Loop) ID() int { return l.id }

// Stats returns the loop's counters.
func (l *Loop) Stats() Stats {
	s := Stats{EpollWait: l.stats.epollWait.Load(), EpollCtl: l.stats.epollCtl.Load(), Read: l.stats.read.Load(),
		Write: l.stats.write.Load(), Writev: l.stats.writev.Load(), Eventfd: l.stats.eventfd.Load(),
		Iterations: l.stats.iterations.Load(), Frames: l.stats.frames.Load()}
	if tid := l.tid.Load(); tid != 0 {
		s.CPU = threadCPU(int(tid))
	}
	return s
}

// Submit runs f on the loop, soon: this is how other goroutines hand a
// socket over (f calls Register) or act on the loop's sockets. It fails with
// ErrClosed once the loop is stopping and with ErrInboxFull when
// Options.InboxSize functions are waiting; f does not run then. A function
// submitted successfully always runs, also when the loop stops (Register
// then fails with ErrClosed, so f can close what it holds).
func (l *Loop) Submit(f func()) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	if len(l.inbox) >= l.opts.InboxSize {
		l.mu.Unlock()
		return ErrInboxFull
	}
	l.inbox = append(l.inbox, f)
	wake := len(l.inbox) == 1
	l.mu.Unlock()
	if wake {
		l.wake()
	}
	return nil
}

func (l *Loop) wake() {
	one := uint64(1)
	// EAGAIN (the counter at its maximum) still leaves the loop woken.
	_, _ = unix.Write(l.evfd, (*[8]byte)(unsafe.Pointer(&one))[:])
}

func (l *Loop) stop() {
	l.mu.Lock()
	already := l.closed
	l.closed = true
	l.mu.Unlock()
	if !already {
		l.wake()
	}
}

// now is the loop's clock for timers.
func (l *Loop) now() int64 { return int64(time.Since(l.epoch)) }

func (l *Loop) run(wg *sync.WaitGroup) {
	defer wg.Done()
	// The loop keeps its thread for life; the thread ends with it.
	runtime.LockOSThread()
	l.tid.Store(int32(unix.Gettid()))
	close(l.started)
	for !l.iterate() {
	}
	l.shutdown()
}

// iterate is one turn of the loop: wait, read and dispatch, timers, flush.
// It returns true when the loop was stopped.
func (l *Loop) iterate() bool {
	l.stats.iterations.Add(1)
	timeout := -1
	if len(l.ready) > 0 {
		timeout = 0
	} else if len(l.timers) > 0 {
		d := l.timers[0].when - l.now()
		if d <= 0 {
			timeout = 0
		} else {
			timeout = int((d + int64(time.Millisecond) - 1) / int64(time.Millisecond))
		}
	}
	n, errno := epollWait(l.epfd, l.events, timeout)
	l.stats.epollWait.Add(1)
	if errno != 0 && errno != syscall.EINTR {
		panic(fmt.Sprintf("evloop: epoll_pwait: %v", errno))
	}
	stop := false
	for i := 0; i < n; i++ {
		ev := &l.events[i]
		slot := uint32(ev.Fd)
		if slot == ^uint32(0) {
			stop = l.takeInbox() || stop
			continue
		}
		if int(slot) >= len(l.conns) || l.gens[slot] != uint32(ev.Pad) {
			continue // closed earlier in this iteration
		}
		c := l.conns[slot]
		if c == nil || c.closed {
			continue
		}
		if ev.Events&unix.EPOLLOUT != 0 && c.outBlocked {
			c.outBlocked = false
			l.markDirty(c)
		}
		if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 && l.opts.EdgeTriggered {
				c.hup = true
			}
			// A paused socket is still read once it failed or hung up:
			// level-triggered, that event would repeat at every wait, and
			// what it holds is bounded by its receive buffer.
			l.readable(c, ev.Events&(unix.EPOLLERR|unix.EPOLLHUP) != 0)
		}
		l.reap()
	}
	// The inbox: hand-overs and commands.
	for len(l.runq) > 0 {
		q := l.runq
		l.runq = nil
		for _, f := range q {
			f()
			l.reap()
		}
	}
	// Sockets to read again without waiting (edge-triggered, after a full
	// buffer or a resume; and the bytes a hand-over carried).
	if len(l.ready) > 0 {
		q := l.ready
		l.ready = nil
		for _, c := range q {
			c.queued = false
			if !c.closed {
				l.readable(c, c.hup)
			}
			l.reap()
		}
		if l.ready == nil {
			l.ready = q[:0]
		}
	}
	l.runTimers()
	l.flushAll()
	return stop
}

// takeInbox resets the eventfd and moves the inbox to the run queue.
func (l *Loop) takeInbox() (stop bool) {
	var b [8]byte
	_, _ = unix.Read(l.evfd, b[:])
	l.stats.eventfd.Add(1)
	l.mu.Lock()
	l.runq = append(l.runq, l.inbox...)
	clear(l.inbox)
	l.inbox = l.inbox[:0]
	stop = l.closed
	l.mu.Unlock()
	return stop
}

// shutdown closes every socket and runs what is left in the inbox with
// Register refusing.
func (l *Loop) shutdown() {
	l.mu.Lock()
	l.stopped = true
	l.mu.Unlock()
	for _, c := range l.conns {
		if c != nil && !c.closed {
			l.closeConn(c, ErrClosed)
		}
	}
	l.reap()
	for {
		l.mu.Lock()
		q := append(l.runq, l.inbox...)
		l.runq, l.inbox = nil, nil
		l.mu.Unlock()
		if len(q) == 0 {
			break
		}
		for _, f := range q {
			f()
			l.reap()
		}
	}
	for _, c := range l.conns {
		if c != nil && !c.closed {
			l.closeConn(c, ErrClosed)
		}
	}
	l.reap()
	l.timers = nil
	_ = unix.Close(l.evfd)
	_ = unix.Close(l.epfd)
}

// reap calls Handler.Closed for the sockets closed since the last call.
func (l *Loop) reap() {
	for i := 0; i < len(l.gone); i++ { // Closed may close more: they are appended
		c := l.gone[i]
		l.gone[i] = nil
		h := c.h
		c.h = nil
		h.Closed(c, c.err)
	}
	l.gone = l.gone[:0]
}

// getChunk returns an 8 KiB chunk from the loop's free list.
func (l *Loop) getChunk() []byte {
	if n := len(l.free); n > 0 {
		b := l.free[n-1]
		l.free[n-1] = nil
		l.free = l.free[:n-1]
		return b[:BufferSize]
	}
	return make([]byte, BufferSize)
}

func (l *Loop) putChunk(b []byte) {
	if cap(b) == BufferSize && len(l.free) < l.opts.FreeBuffers {
		l.free = append(l.free, b[:BufferSize])
	}
}

func (l *Loop) markDirty(c *Conn) {
	if !c.dirty {
		c.dirty = true
		l.dirty = append(l.dirty, c)
	}
}

func (l *Loop) markReady(c *Conn) {
	if !c.queued {
		c.queued = true
		l.ready = append(l.ready, c)
	}
}

func (l *Loop) flushAll() {
	for i := 0; i < len(l.dirty); i++ { // flushing may close, never add
		c := l.dirty[i]
		l.dirty[i] = nil
		c.dirty = false
		if !c.closed {
			l.flush(c)
		}
	}
	l.dirty = l.dirty[:0]
	l.reap()
}

// threadCPU is a thread's CPU time from /proc/self/task/TID/schedstat
// (nanoseconds on CPU).
func threadCPU(tid int) time.Duration {
	fd, err := unix.Open(fmt.Sprintf("/proc/self/task/%d/schedstat", tid), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0
	}
	defer unix.Close(fd)
	var b [128]byte
	n, err := unix.Read(fd, b[:])
	if err != nil || n <= 0 {
		return 0
	}
	var ns int64
	for _, ch := range b[:n] {
		if ch < '0' || ch > '9' {
			break
		}
		ns = ns*10 + int64(ch-'0')
	}
	return time.Duration(ns)
}
