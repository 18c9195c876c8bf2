// Package wire frames the PostgreSQL protocol without decoding it: a Reader
// buffers bytes from a connection and yields whole frames (type byte, length,
// body) from one reusable buffer, and a Writer coalesces outgoing frames into
// one write per batch. Only the messages pggovernor must understand are
// decoded, elsewhere, with pgproto3.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// HeaderLen is the size of a regular message header: one type byte and a
// four-byte big-endian length that counts itself but not the type byte.
const HeaderLen = 5

// BufferSize is the default buffer size: 8 KiB, as Postgres' own
// PQ_RECV_BUFFER_SIZE/PQ_SEND_BUFFER_SIZE in src/backend/libpq/pqcomm.c.
const BufferSize = 8192

// MaxStartupLen bounds a startup packet, as Postgres'
// MAX_STARTUP_PACKET_LENGTH in src/include/libpq/pqcomm.h.
const MaxStartupLen = 10000

// ErrMessageTooLarge is returned (wrapped in *FrameError) when a message is
// longer than the Reader's limit.
var ErrMessageTooLarge = errors.New("message too large")

// FrameError describes a malformed frame: a length below 4 or above the
// limit. The connection cannot be resynchronised after it.
type FrameError struct {
	Type   byte
	Length int64
	Limit  int
	Err    error
}

func (e *FrameError) Error() string {
	if errors.Is(e.Err, ErrMessageTooLarge) {
		return fmt.Sprintf("message of type %q is %d bytes, more than the limit of %d bytes", e.Type, e.Length, e.Limit)
	}
	return fmt.Sprintf("invalid length %d in message of type %q", e.Length, e.Type)
}

func (e *FrameError) Unwrap() error { return e.Err }

// BufferPool lends buffers of BufferSize bytes, so that an idle connection
// holds none.
type BufferPool interface {
	Get() []byte
	Put([]byte)
}

// Pool is a BufferPool over sync.Pool.
type Pool struct{ p sync.Pool }

// Get returns a buffer of BufferSize bytes.
func (p *Pool) Get() []byte {
	if b, ok := p.p.Get().(*[]byte); ok {
		return (*b)[:BufferSize]
	}
	return make([]byte, BufferSize)
}

// Put takes a buffer back.
func (p *Pool) Put(b []byte) {
	if cap(b) >= BufferSize {
		b = b[:BufferSize]
		p.p.Put(&b)
	}
}

// Budget counts, over every Reader that shares it, the bytes held in
// buffers grown beyond their base size, against one limit (pggovernor's
// limits.max_buffered_bytes); the Readers' owner counts its own copies of
// large messages in it too. A nil *Budget accepts everything and counts
// nothing. It is safe for concurrent use.
type Budget struct {
	limit int64
	held  atomic.Int64
}

// NewBudget returns a Budget of limit bytes.
func NewBudget(limit int64) *Budget { return &Budget{limit: limit} }

// Reserve takes n bytes if the total stays within the limit, and reports
// whether it did.
func (b *Budget) Reserve(n int) bool {
	if b == nil || n <= 0 {
		return true
	}
	for {
		cur := b.held.Load()
		if cur+int64(n) > b.limit {
			return false
		}
		if b.held.CompareAndSwap(cur, cur+int64(n)) {
			return true
		}
	}
}

// Force takes n bytes whatever the limit: for bytes that are held already
// and only move from one holder to another.
func (b *Budget) Force(n int) {
	if b != nil && n > 0 {
		b.held.Add(int64(n))
	}
}

// Return gives back n bytes taken by Reserve or Force.
func (b *Budget) Return(n int) {
	if b != nil && n > 0 {
		b.held.Add(-int64(n))
	}
}

// Held returns the bytes taken now.
func (b *Budget) Held() int64 {
	if b == nil {
		return 0
	}
	return b.held.Load()
}

// Limit returns the limit in bytes (0 for a nil Budget: no limit).
func (b *Budget) Limit() int64 {
	if b == nil {
		return 0
	}
	return b.limit
}

// ErrOverBudget is returned (wrapped in *BudgetError) when holding a
// message would take the Reader's Budget over its limit.
var ErrOverBudget = errors.New("buffered bytes over the limit")

// BudgetError says that a Reader could not grow its buffer to hold a
// message: Need more bytes beyond its base size than the Budget had left
// under its Limit. The Reader is unchanged by the attempt but for the bytes
// it read: the message can still be streamed or skipped (Stream).
type BudgetError struct {
	Need  int
	Limit int64
}

func (e *BudgetError) Error() string {
	return fmt.Sprintf("holding %d more bytes would take the buffered bytes over the limit of %d bytes", e.Need, e.Limit)
}

func (e *BudgetError) Unwrap() error { return ErrOverBudget }

// tinyLen is the inline buffer a Reader without a buffer reads into: a
// connection that was idle gets its next message's first bytes there, and
// a pooled buffer only once it has data.
const tinyLen = 256

// Reader buffers a connection's bytes and exposes them frame by frame. Its
// buffer grows for a frame that must be held whole (Frame, Ensure) as the
// frame's bytes arrive — doubling, never beyond the frame — not to the
// length a header announces, so a header of a large message costs nothing
// until its bytes come; what it holds beyond its base size is counted in
// its Budget, if any. It is not safe for concurrent use.
type Reader struct {
	rd     io.Reader
	buf    []byte
	r, w   int
	maxLen int // maximum message length (including the 4 length bytes)
	base   int // the buffer size to shrink back to
	pool   BufferPool
	tiny   *[tinyLen]byte
	budget *Budget
	held   int    // bytes of buf counted in budget: len(buf) − base when grown
	spare  []byte // the base buffer of a Reader without a pool, while grown
}

// NewReader returns a Reader with a buffer of BufferSize bytes that accepts
// messages up to maxLen bytes (counting the length field, as the protocol
// does).
func NewReader(rd io.Reader, buf []byte, maxLen int) *Reader {
	if buf == nil {
		buf = make([]byte, BufferSize)
	}
	return &Reader{rd: rd, buf: buf, maxLen: maxLen, base: len(buf)}
}

// NewPooledReader returns a Reader whose buffer is lent by pool: Release
// gives it back while nothing is buffered, and Fill borrows one again once
// there is something to read.
func NewPooledReader(rd io.Reader, pool BufferPool, maxLen int) *Reader {
	return &Reader{rd: rd, maxLen: maxLen, base: BufferSize, pool: pool, tiny: new([tinyLen]byte)}
}

// SetBudget makes b count what the Reader holds beyond its base size from
// now on; growth that b refuses fails with a *BudgetError. Call it before
// the buffer grows.
func (r *Reader) SetBudget(b *Budget) { r.budget = b }

// Held returns the bytes of the buffer counted in the Reader's budget.
func (r *Reader) Held() int { return r.held }

// Release gives the buffer back to the pool when nothing is buffered
// (a Reader from NewPooledReader only).
func (r *Reader) Release() {
	if r.pool == nil || r.buf == nil || r.Buffered() > 0 {
		return
	}
	r.dropBuffer()
}

// Free drops the buffer and what is in it, giving the buffer back to the
// pool and the bytes counted for it back to the budget: for a Reader that
// is no longer used (it may be used again, but reads from an empty
// buffer).
func (r *Reader) Free() {
	if r.buf == nil {
		return
	}
	r.dropBuffer()
	if r.pool == nil {
		r.buf = make([]byte, r.base)
	}
}

// dropBuffer lets the buffer go: back to the pool if it is a base one,
// else its count back to the budget.
func (r *Reader) dropBuffer() {
	if len(r.buf) == r.base {
		if r.pool != nil {
			r.pool.Put(r.buf)
		}
	} else {
		r.budget.Return(r.held)
		r.held = 0
		if r.pool != nil && r.spare != nil {
			r.pool.Put(r.spare)
		}
	}
	r.spare = nil
	r.buf, r.r, r.w = nil, 0, 0
}

// borrow gets a buffer from the pool for a released Reader.
func (r *Reader) borrow() {
	if r.buf == nil {
		r.buf = r.baseBuffer()
		r.r, r.w = 0, 0
	}
}

// baseBuffer returns a buffer of the base size: the pool's, or the one
// kept while grown, or a new one.
func (r *Reader) baseBuffer() []byte {
	if r.spare != nil {
		b := r.spare
		r.spare = nil
		return b
	}
	if r.pool != nil {
		return r.pool.Get()
	}
	return make([]byte, r.base)
}

// resize replaces the buffer with one of size bytes (at least what is
// unread, placed at off), counting it in the budget: force counts it even
// over the limit (bytes that only move), otherwise a refusal is a
// *BudgetError and leaves the Reader as it was.
func (r *Reader) resize(size, off int, force bool) error {
	extra := size - r.base - r.held
	if force {
		r.budget.Force(extra)
	} else if !r.budget.Reserve(extra) {
		return &BudgetError{Need: size - r.base, Limit: r.budget.Limit()}
	}
	grown := make([]byte, size)
	n := copy(grown[off:], r.buf[r.r:r.w])
	if len(r.buf) == r.base {
		// Kept to come back to (a pool's goes back to the pool now).
		if r.pool != nil {
			r.pool.Put(r.buf)
		} else {
			r.spare = r.buf
		}
	}
	r.buf, r.r, r.w = grown, 0, off+n
	r.held += extra
	return nil
}

// Size is the Reader's buffer size when not grown.
func (r *Reader) Size() int { return r.base }

// Reset points the Reader at a new source with an empty buffer.
func (r *Reader) Reset(rd io.Reader) {
	r.rd = rd
	r.r, r.w = 0, 0
}

// SetMaxLen changes the message length limit.
func (r *Reader) SetMaxLen(n int) { r.maxLen = n }

// Buffered returns the number of unread bytes in the buffer.
func (r *Reader) Buffered() int { return r.w - r.r }

// Bytes returns the unread bytes, valid until the next Fill.
func (r *Reader) Bytes() []byte { return r.buf[r.r:r.w] }

// Discard drops n buffered bytes.
func (r *Reader) Discard(n int) { r.r += n }

// Buffer returns the Reader's buffer, for returning it to a pool once the
// Reader is no longer used.
func (r *Reader) Buffer() []byte { return r.buf }

// Fill reads at least once from the source into the buffer, moving unread
// bytes to the front first. It returns io.EOF only when nothing was read.
func (r *Reader) Fill() error {
	if r.buf == nil {
		// Released: wait for data without holding a buffer.
		n, err := r.rd.Read(r.tiny[:])
		if n == 0 {
			if err == nil {
				err = io.ErrNoProgress
			}
			return err
		}
		r.borrow()
		r.w = copy(r.buf, r.tiny[:n])
		return nil
	}
	if r.r > 0 {
		n := copy(r.buf, r.buf[r.r:r.w])
		r.r, r.w = 0, n
	}
	if r.w == len(r.buf) {
		return errors.New("wire: Fill on a full buffer")
	}
	n, err := r.rd.Read(r.buf[r.w:])
	r.w += n
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// Header returns the type and total frame length (header included) of the
// next regular message, reading until five bytes are buffered. A length
// field below 4 or above the limit is a *FrameError.
func (r *Reader) Header() (typ byte, frameLen int, err error) {
	for r.Buffered() < HeaderLen {
		if err := r.Fill(); err != nil {
			if errors.Is(err, io.EOF) && r.Buffered() > 0 {
				err = io.ErrUnexpectedEOF
			}
			return 0, 0, err
		}
	}
	typ = r.buf[r.r]
	n := int64(binary.BigEndian.Uint32(r.buf[r.r+1:]))
	if n < 4 {
		return typ, 0, &FrameError{Type: typ, Length: n, Limit: r.maxLen, Err: errors.New("length below 4")}
	}
	if n > int64(r.maxLen) {
		return typ, 0, &FrameError{Type: typ, Length: n, Limit: r.maxLen, Err: ErrMessageTooLarge}
	}
	return typ, int(n) + 1, nil
}

// PeekHeader parses the next header if five bytes are buffered, without
// reading: ok is false when fewer are.
func (r *Reader) PeekHeader() (typ byte, frameLen int, ok bool, err error) {
	if r.Buffered() < HeaderLen {
		return 0, 0, false, nil
	}
	typ = r.buf[r.r]
	n := int64(binary.BigEndian.Uint32(r.buf[r.r+1:]))
	if n < 4 {
		return typ, 0, false, &FrameError{Type: typ, Length: n, Limit: r.maxLen, Err: errors.New("length below 4")}
	}
	if n > int64(r.maxLen) {
		return typ, 0, false, &FrameError{Type: typ, Length: n, Limit: r.maxLen, Err: ErrMessageTooLarge}
	}
	return typ, int(n) + 1, true, nil
}

// Frame returns the next n bytes, reading (and growing the buffer) until
// they are all buffered, and consumes them. The slice is valid until the
// next call on the Reader. A *BudgetError consumes nothing.
func (r *Reader) Frame(n int) ([]byte, error) {
	if err := r.Ensure(n); err != nil {
		return nil, err
	}
	b := r.buf[r.r : r.r+n]
	r.r += n
	return b, nil
}

// Ensure reads until n bytes are buffered. The buffer grows only when it
// is full of unread bytes, to twice its size (at most n): what it holds is
// never more than twice what arrived. Growth the budget refuses — at once
// when n could never fit under its limit — is a *BudgetError, with the
// bytes read so far still buffered.
func (r *Reader) Ensure(n int) error {
	r.borrow()
	if n > len(r.buf) && r.budget != nil && int64(n-r.base) > r.budget.Limit() {
		return &BudgetError{Need: n - r.base, Limit: r.budget.Limit()}
	}
	for r.Buffered() < n {
		if r.Buffered() == len(r.buf) {
			if err := r.resize(min(n, 2*len(r.buf)), 0, false); err != nil {
				return err
			}
		}
		if err := r.Fill(); err != nil {
			if errors.Is(err, io.EOF) {
				return io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}

// Prepend puts b back in front of the unread bytes, as if it had not been
// read yet (a request replayed on another server connection). A buffer
// grown for it is counted in the budget even over the limit: its bytes
// were held already, in b.
func (r *Reader) Prepend(b []byte) {
	if len(b) == 0 {
		return
	}
	r.borrow()
	unread := r.Buffered()
	if len(b)+unread > len(r.buf) {
		_ = r.resize(len(b)+unread, len(b), true)
	} else {
		copy(r.buf[len(b):], r.buf[r.r:r.w])
		r.r, r.w = 0, len(b)+unread
	}
	copy(r.buf, b)
}

// TakeBuffer hands a grown buffer that holds nothing unread to the caller —
// a frame just read from it stays valid, and is the caller's from now on —
// with the bytes the budget counts for it (all of it, from now on), which
// the caller gives back
// (Budget.Return) when it lets the buffer go. The Reader goes back to a
// base buffer. ok is false, and nothing changes, for a buffer that is not
// grown or still holds unread bytes. This keeps a large message without
// copying it.
func (r *Reader) TakeBuffer() (buf []byte, held int, ok bool) {
	if len(r.buf) <= r.base || r.Buffered() > 0 {
		return nil, 0, false
	}
	// Its first base-size bytes are counted from now on too: the Reader
	// takes a new base buffer.
	r.budget.Force(r.base)
	buf, held = r.buf, r.held+r.base
	r.held = 0
	r.buf, r.r, r.w = r.baseBuffer(), 0, 0
	return buf, held, true
}

// Shrink returns a grown buffer to the base size once it holds nothing
// unread, so one large message does not pin memory, and gives back what
// the budget counted for it.
func (r *Reader) Shrink() {
	if len(r.buf) > r.base && r.Buffered() == 0 {
		r.budget.Return(r.held)
		r.held = 0
		r.buf, r.r, r.w = r.baseBuffer(), 0, 0
	}
}

// ReadStartup reads one untyped startup-phase packet (StartupMessage,
// SSLRequest, GSSENCRequest, CancelRequest): a four-byte length then the
// body. It returns the body (after the length), valid until the next call.
func (r *Reader) ReadStartup() ([]byte, error) {
	for r.Buffered() < 4 {
		if err := r.Fill(); err != nil {
			if errors.Is(err, io.EOF) && r.Buffered() > 0 {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	n := int64(binary.BigEndian.Uint32(r.buf[r.r:]))
	if n < 8 || n > MaxStartupLen {
		return nil, &FrameError{Length: n, Limit: MaxStartupLen, Err: fmt.Errorf("invalid startup packet length %d", n)}
	}
	b, err := r.Frame(int(n))
	if err != nil {
		return nil, err
	}
	return b[4:], nil
}

// Stream copies the next n bytes to w, first from the buffer, then straight
// from the source through the buffer, without growing it.
func (r *Reader) Stream(w io.Writer, n int) error {
	r.borrow()
	for n > 0 {
		if r.Buffered() == 0 {
			if err := r.Fill(); err != nil {
				if errors.Is(err, io.EOF) {
					return io.ErrUnexpectedEOF
				}
				return err
			}
		}
		chunk := r.Buffered()
		if chunk > n {
			chunk = n
		}
		if w != nil {
			if _, err := w.Write(r.buf[r.r : r.r+chunk]); err != nil {
				return err
			}
		}
		r.r += chunk
		n -= chunk
	}
	return nil
}

// Writer coalesces frames into one buffer and writes it in one call on
// Flush, or straight through when a frame does not fit.
type Writer struct {
	wr   io.Writer
	buf  []byte
	pool BufferPool
}

// NewPooledWriter returns a Writer whose buffer is lent by pool: Release
// gives it back while nothing is buffered, and Write borrows one again.
func NewPooledWriter(wr io.Writer, pool BufferPool) *Writer {
	return &Writer{wr: wr, pool: pool}
}

// Release gives the buffer back to the pool when nothing is buffered (a
// Writer from NewPooledWriter only).
func (w *Writer) Release() {
	if w.pool == nil || w.buf == nil || len(w.buf) > 0 {
		return
	}
	w.pool.Put(w.buf[:cap(w.buf)])
	w.buf = nil
}

// borrow gets a buffer for a released Writer.
func (w *Writer) borrow() {
	if w.buf == nil {
		if w.pool != nil {
			w.buf = w.pool.Get()[:0]
		} else {
			w.buf = make([]byte, 0, BufferSize)
		}
	}
}

// NewWriter returns a Writer over wr using buf's capacity as its buffer.
func NewWriter(wr io.Writer, buf []byte) *Writer {
	if buf == nil {
		buf = make([]byte, 0, BufferSize)
	}
	return &Writer{wr: wr, buf: buf[:0]}
}

// Reset points the Writer at a new destination, dropping buffered bytes.
func (w *Writer) Reset(wr io.Writer) {
	w.wr = wr
	w.buf = w.buf[:0]
}

// Buffered returns the number of bytes waiting for Flush.
func (w *Writer) Buffered() int { return len(w.buf) }

// Write buffers p, flushing first when it would not fit; a p larger than the
// buffer is written straight through.
func (w *Writer) Write(p []byte) (int, error) {
	w.borrow()
	if len(w.buf)+len(p) > cap(w.buf) {
		if err := w.Flush(); err != nil {
			return 0, err
		}
		if len(p) > cap(w.buf) {
			return w.wr.Write(p)
		}
	}
	w.buf = append(w.buf, p...)
	return len(p), nil
}

// WriteString is Write for a string, without converting it.
func (w *Writer) WriteString(s string) (int, error) {
	w.borrow()
	if len(w.buf)+len(s) > cap(w.buf) {
		if err := w.Flush(); err != nil {
			return 0, err
		}
		if len(s) > cap(w.buf) {
			return w.wr.Write([]byte(s))
		}
	}
	w.buf = append(w.buf, s...)
	return len(s), nil
}

// Flush writes the buffered bytes.
func (w *Writer) Flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	_, err := w.wr.Write(w.buf)
	w.buf = w.buf[:0]
	return err
}

// Buffer returns the Writer's buffer, for returning it to a pool.
func (w *Writer) Buffer() []byte { return w.buf[:0] }

// AppendHeader appends a message header with the given type and body
// length to dst.
func AppendHeader(dst []byte, typ byte, bodyLen int) []byte {
	return append(dst, typ, byte((bodyLen+4)>>24), byte((bodyLen+4)>>16), byte((bodyLen+4)>>8), byte(bodyLen+4))
}

// SetLength rewrites the length field of the frame starting at dst[start]
// (its type byte) to cover everything appended after it.
func SetLength(dst []byte, start int) {
	binary.BigEndian.PutUint32(dst[start+1:], uint32(len(dst)-start-1))
}

// CString returns the NUL-terminated string at the start of b and the rest
// after the NUL; ok is false when there is no NUL.
func CString(b []byte) (s, rest []byte, ok bool) {
	for i, c := range b {
		if c == 0 {
			return b[:i], b[i+1:], true
		}
	}
	return nil, nil, false
}
