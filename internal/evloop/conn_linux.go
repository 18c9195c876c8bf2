package evloop

import (
	"encoding/binary"
	"io"
	"syscall"

	"golang.org/x/sys/unix"
)

// Frame is a PostgreSQL frame, or a part of one, as a socket received it.
// Data is valid only during the Handler.Frame call.
type Frame struct {
	// Type is the frame's type byte.
	Type byte
	// Len is the whole frame's length, its header included (1 + the
	// length field).
	Len int
	// Data is the frame, or this part of it; a first part begins with
	// the header.
	Data []byte
	// First and Last say which part this is; a frame delivered whole is
	// both. Only frames longer than BufferSize come in parts.
	First, Last bool
}

// Handler is what a loop calls with a socket's frames and its end. It runs
// on the loop's thread and must not block: everything it does to the
// loop's sockets (Write, Close, SetPeer) is buffered or immediate.
type Handler interface {
	// Frame is called for every frame c received, or part of a frame
	// longer than BufferSize, in order.
	Frame(c *Conn, f Frame)
	// Closed is called once when c is closed: err is nil after Close, io.EOF
	// when the peer closed its end, a *FrameError for a bad frame, ErrClosed
	// when the engine stopped, else the socket's error (ECONNRESET, EPIPE).
	// c's descriptor is closed by then.
	Closed(c *Conn, err error)
}

// Conn is a socket registered with a loop. Its methods may be called only on
// its loop.
type Conn struct {
	l         *Loop
	fd        int
	slot, gen uint32
	h         Handler
	peer      *Conn

	// Value is the handler's own, e.g. the session the socket belongs to.
	Value any

	in           []byte // pending input: a frame not yet whole (nil when none)
	inLen        int
	undispatched bool // in holds bytes handed over, not dispatched yet
	partType     byte // the frame being delivered in parts
	partLen      int
	partLeft     int

	out        [][]byte  // pending output, chunk by chunk (each sliced to its used length)
	outArr     [2][]byte // out's backing array while it has at most two chunks
	outHead    int       // bytes of out[0] already written
	outLen     int       // bytes pending
	outBlocked bool      // a write found the send buffer full; waiting for EPOLLOUT
	outArmed   bool      // level-triggered: EPOLLOUT in the registration

	reading bool // willing to read (level-triggered: EPOLLIN in the registration)
	inReady bool // readiness seen while not reading
	hup     bool // edge-triggered: the peer closed or the socket failed; read to the end
	full    bool // output ≥ HighWater, and not yet back to LowWater
	held    bool // Hold: not read until released
	dirty   bool // in the loop's flush list
	queued  bool // in the loop's ready list
	closing bool // Close was called: flush, then close
	closed  bool
	err     error
}

// Register takes fd (a connected, non-blocking stream socket, which the
// loop now owns: see Detach) onto the loop with h as its handler. buffered
// are bytes already read from the socket by its previous owner (a
// wire.Reader's buffer); they are copied and dispatched before anything read
// from the socket, in this loop iteration, after the caller returned. On
// error fd is closed.
func (l *Loop) Register(fd int, buffered []byte, h Handler) (*Conn, error) {
	l.mu.Lock()
	stopped := l.stopped
	l.mu.Unlock()
	if stopped {
		_ = unix.Close(fd)
		return nil, ErrClosed
	}
	c := &Conn{l: l, fd: fd, h: h, reading: true}
	c.out = c.outArr[:0]
	if n := len(l.slots); n > 0 {
		c.slot = l.slots[n-1]
		l.slots = l.slots[:n-1]
	} else {
		c.slot = uint32(len(l.conns))
		l.conns = append(l.conns, nil)
		l.gens = append(l.gens, 0)
	}
	c.gen = l.gens[c.slot]
	events := uint32(unix.EPOLLIN)
	if l.opts.EdgeTriggered {
		// EPOLLRDHUP: data and the peer's FIN can come in one edge; the
		// read that takes the data is short, and the end must still be read.
		events = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET
	}
	l.stats.epollCtl.Add(1)
	if errno := epollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, events, c.slot, c.gen); errno != 0 {
		l.slots = append(l.slots, c.slot)
		_ = unix.Close(fd)
		return nil, errno
	}
	l.conns[c.slot] = c
	if len(buffered) > 0 {
		if len(buffered) <= BufferSize {
			c.in = l.getChunk()
		} else {
			c.in = make([]byte, len(buffered))
		}
		c.inLen = copy(c.in, buffered)
		c.undispatched = true
		l.markReady(c)
	}
	return c, nil
}

// Loop is the socket's loop.
func (c *Conn) Loop() *Loop { return c.l }

// Peer is the socket linked to c, or nil; once c is closed, the one it was
// linked to.
func (c *Conn) Peer() *Conn { return c.peer }

// SetPeer links c and p (nil unlinks c): while either's output is pending
// beyond HighWater, neither is read. A session links its client socket and
// the server socket attached to it; both must be on the same loop.
func (c *Conn) SetPeer(p *Conn) {
	if c.peer == p {
		return
	}
	if p != nil && p.l != c.l {
		panic("evloop: SetPeer across loops")
	}
	if old := c.peer; old != nil {
		c.peer = nil
		if old.peer == c {
			old.peer = nil
			c.l.updateReading(old)
		}
	}
	if p != nil {
		if old := p.peer; old != nil && old.peer == p {
			old.peer = nil
			c.l.updateReading(old)
		}
		p.peer = c
		c.peer = p
		c.l.updateReading(p)
	}
	c.l.updateReading(c)
}

// SetHandler replaces c's handler; the next frame goes to h.
func (c *Conn) SetHandler(h Handler) { c.h = h }

// Hold stops reading c (true) until Hold(false): what a session does while
// it waits for something before it may take the client's next message (a
// server connection, the answer of a statement it prepares first). Frames
// already read are still delivered.
func (c *Conn) Hold(on bool) {
	if c.held != on {
		c.held = on
		c.l.updateReading(c)
	}
}

// Buffered is the output pending on c.
func (c *Conn) Buffered() int { return c.outLen }

// Reading says whether the loop reads c now (false while paused by
// backpressure or closing).
func (c *Conn) Reading() bool { return c.reading }

// Closed says whether c is closed or closing.
func (c *Conn) Closed() bool { return c.closed || c.closing }

// Write queues p (copied) on c; it is flushed at the end of the loop
// iteration, with whatever else was written to c in it. It fails only when
// c is closed or closing.
func (c *Conn) Write(p []byte) error {
	if c.closed || c.closing {
		return ErrClosed
	}
	for len(p) > 0 {
		n := len(c.out)
		if n == 0 || len(c.out[n-1]) == cap(c.out[n-1]) {
			c.out = append(c.out, c.l.getChunk()[:0])
			n++
		}
		last := c.out[n-1]
		k := copy(last[len(last):cap(last)], p)
		c.out[n-1] = last[:len(last)+k]
		p = p[k:]
		c.outLen += k
	}
	c.l.markDirty(c)
	return nil
}

// Close closes c after one attempt, at the end of this loop iteration, to
// write what is pending on it (what the send buffer does not take is
// dropped). Handler.Closed follows with a nil error. Idempotent.
func (c *Conn) Close() {
	if c.closed || c.closing {
		return
	}
	c.closing = true
	c.l.updateReading(c)
	c.l.markDirty(c)
}

// updateReading starts or stops reading c according to backpressure.
func (l *Loop) updateReading(c *Conn) {
	want := !c.closed && !c.closing && !c.held && !c.full && (c.peer == nil || !c.peer.full)
	if want == c.reading || c.closed {
		return
	}
	c.reading = want
	if l.opts.EdgeTriggered {
		if want && c.inReady {
			c.inReady = false
			l.markReady(c)
		}
		return
	}
	l.ctl(c)
}

// ctl sets a level-triggered socket's events from its state.
func (l *Loop) ctl(c *Conn) {
	var events uint32
	if c.reading {
		events |= unix.EPOLLIN
	}
	if c.outArmed {
		events |= unix.EPOLLOUT
	}
	l.stats.epollCtl.Add(1)
	if errno := epollCtl(l.epfd, unix.EPOLL_CTL_MOD, c.fd, events, c.slot, c.gen); errno != 0 {
		l.closeConn(c, errno)
	}
}

// readable reads c once (or dispatches the bytes it was handed over with)
// and delivers the frames. A socket not reading (paused) is only marked,
// unless force (it failed or hung up).
func (l *Loop) readable(c *Conn, force bool) {
	if c.closed {
		return
	}
	if c.undispatched {
		c.undispatched = false
		l.deliver(c, c.in, c.inLen)
		return
	}
	if !c.reading && !force {
		c.inReady = true
		return
	}
	buf, w := l.scratch, 0
	if c.in != nil {
		buf, w = c.in, c.inLen
	}
	var n int
	var errno syscall.Errno
	for {
		n, errno = rawRead(c.fd, buf[w:])
		l.stats.read.Add(1)
		if errno != syscall.EINTR {
			break
		}
	}
	switch {
	case errno == syscall.EAGAIN:
		return
	case errno != 0:
		l.closeConn(c, errno)
		return
	case n == 0:
		l.closeConn(c, io.EOF)
		return
	}
	if l.opts.EdgeTriggered && (w+n == len(buf) || c.hup) {
		// The buffer is full, or the end is still to be read: there may
		// be more, and no new edge for it.
		l.markReady(c)
	}
	l.deliver(c, buf, w+n)
}

// deliver hands the frames in buf[:w] to c's handler and keeps what is left
// of a frame not yet whole.
func (l *Loop) deliver(c *Conn, buf []byte, w int) {
	r := 0
	for r < w && !c.closed && !c.closing {
		if c.partLeft > 0 {
			n := min(c.partLeft, w-r)
			c.partLeft -= n
			l.stats.frames.Add(1)
			c.h.Frame(c, Frame{Type: c.partType, Len: c.partLen, Data: buf[r : r+n], Last: c.partLeft == 0})
			r += n
			continue
		}
		if w-r < HeaderLen {
			break
		}
		typ := buf[r]
		length := binary.BigEndian.Uint32(buf[r+1:])
		if length < 4 || int64(length) > int64(l.opts.MaxFrameLen) {
			l.closeConn(c, &FrameError{Type: typ, Length: length, Limit: l.opts.MaxFrameLen})
			break
		}
		total := 1 + int(length)
		if total <= w-r {
			l.stats.frames.Add(1)
			c.h.Frame(c, Frame{Type: typ, Len: total, Data: buf[r : r+total], First: true, Last: true})
			r += total
			continue
		}
		if total <= BufferSize {
			break // wait for the rest
		}
		n := w - r
		c.partType, c.partLen, c.partLeft = typ, total, total-n
		l.stats.frames.Add(1)
		c.h.Frame(c, Frame{Type: typ, Len: total, Data: buf[r:w], First: true})
		r = w
	}
	if c.closed {
		return
	}
	left := w - r
	switch {
	case left == 0:
		if c.in != nil {
			l.putChunk(c.in)
			c.in = nil
		}
		c.inLen = 0
	case c.in == nil || cap(c.in) != BufferSize:
		nb := l.getChunk()
		c.inLen = copy(nb, buf[r:w])
		c.in = nb
	default:
		c.inLen = copy(c.in, buf[r:w])
	}
}

// flush writes c's pending output: one write (or writev across chunks);
// a short write means the send buffer is full, so the loop waits for
// EPOLLOUT instead of trying again.
func (l *Loop) flush(c *Conn) {
	if c.outLen > 0 && !c.outBlocked {
		var n int
		var errno syscall.Errno
		for {
			if len(c.out) == 1 {
				n, errno = rawWrite(c.fd, c.out[0][c.outHead:])
				l.stats.write.Add(1)
			} else {
				iov := l.iov[:0]
				for i, ch := range c.out {
					if i == 64 {
						break
					}
					if i == 0 {
						ch = ch[c.outHead:]
					}
					iov = append(iov, unix.Iovec{Base: &ch[0], Len: uint64(len(ch))})
				}
				l.iov = iov
				n, errno = rawWritev(c.fd, iov)
				l.stats.writev.Add(1)
				clear(iov)
			}
			if errno != syscall.EINTR {
				break
			}
		}
		switch {
		case errno == syscall.EAGAIN:
			n = 0
		case errno != 0:
			l.closeConn(c, errno)
			return
		}
		l.consume(c, n)
		if c.outLen > 0 {
			c.outBlocked = true
			if !l.opts.EdgeTriggered && !c.outArmed && !c.closing {
				c.outArmed = true
				l.ctl(c)
			}
		}
	}
	if c.closed {
		return
	}
	if c.outLen == 0 && c.outArmed && !c.closing {
		c.outArmed = false
		l.ctl(c)
	}
	if c.closing {
		l.closeConn(c, nil)
		return
	}
	switch {
	case !c.full && c.outLen >= l.opts.HighWater:
		c.full = true
	case c.full && c.outLen <= l.opts.LowWater:
		c.full = false
	default:
		return
	}
	l.updateReading(c)
	if c.peer != nil {
		l.updateReading(c.peer)
	}
}

// consume drops n written bytes from the front of c's output, giving
// emptied chunks back to the loop.
func (l *Loop) consume(c *Conn, n int) {
	c.outLen -= n
	for n > 0 {
		avail := len(c.out[0]) - c.outHead
		if n < avail {
			c.outHead += n
			return
		}
		n -= avail
		l.putChunk(c.out[0][:cap(c.out[0])])
		c.out[0] = nil
		c.out = c.out[1:]
		c.outHead = 0
	}
	if len(c.out) == 0 {
		c.out = c.outArr[:0]
	}
}

// closeConn closes c now and queues its Handler.Closed.
func (l *Loop) closeConn(c *Conn, err error) {
	if c.closed {
		return
	}
	c.closed, c.reading = true, false
	if errno, ok := err.(syscall.Errno); ok {
		err = &closeError{errno}
	}
	c.err = err
	// The descriptor is the only one of its socket (Detach closed the Go
	// runtime's), so closing it also removes it from the epoll set.
	_ = unix.Close(c.fd)
	c.fd = -1
	if c.in != nil {
		l.putChunk(c.in)
		c.in = nil
	}
	for _, ch := range c.out {
		l.putChunk(ch[:cap(ch)])
	}
	c.out, c.outLen, c.outHead = nil, 0, 0
	l.conns[c.slot] = nil
	l.gens[c.slot]++
	l.slots = append(l.slots, c.slot)
	// c.peer stays: Handler.Closed may want to close it too.
	if p := c.peer; p != nil {
		if p.peer == c {
			p.peer = nil
			l.updateReading(p)
		}
	}
	l.gone = append(l.gone, c)
}

// closeError is a socket's error as Handler.Closed sees it; errors.Is
// matches the errno (syscall.ECONNRESET).
type closeError struct{ errno syscall.Errno }

func (e *closeError) Error() string { return "evloop: socket: " + e.errno.Error() }
func (e *closeError) Unwrap() error { return e.errno }
