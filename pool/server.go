package pool

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/wire"
)

// Handler receives what a server sends while a client holds it. Its methods
// are called from the server's reader goroutine, one at a time.
type Handler interface {
	// ServerMessage handles one frame, header included, or a part of a
	// frame too large to buffer: more is the number of bytes of the same
	// frame still to come in later calls (same typ). data is valid only
	// during the call. An error closes the server connection.
	ServerMessage(s *Server, typ byte, data []byte, more int) error
	// ServerFlush is called when the reader has nothing more buffered,
	// before it blocks: the moment to flush what was forwarded.
	ServerFlush(s *Server) error
	// ServerLost is called once if the connection fails while attached.
	ServerLost(s *Server, err error)
}

// Server is one connection to the upstream Postgres server. Fields without
// a note belong to whoever holds the Server: the pool while it is idle, the
// client session between Acquire and Release.
type Server struct {
	pool  *Pool
	route Route
	conn  net.Conn
	id    uint64
	// addr is the address the connection reached; opened is what its
	// server was when it was opened (upstream.go).
	addr   string
	opened Role

	// PID and secret key of the backend, for CancelRequest.
	pid       uint32
	secretKey []byte

	created  time.Time
	expires  time.Time
	lastUsed time.Time

	// Params are the server's reported run-time parameters as it last said
	// (ParameterStatus), updated by the holder's handler.
	Params map[string]string
	// Settings are the values of non-reported parameters the governor set
	// on this connection (startup values and SETs it injected).
	Settings map[string]string
	// TxStatus is the transaction status of the last ReadyForQuery.
	TxStatus byte
	// State is free for the holder's per-connection data (the proxy keeps
	// its prepared-statement cache here). It travels with the connection.
	State any

	handler atomic.Pointer[HandlerSlot]
	closing atomic.Bool
	broken  atomic.Bool
	// retired: its server no longer fits, so it is closed at release.
	retired atomic.Bool
	// terminatedIdle records that the backend said it was terminated
	// (admin_shutdown, idle_session_timeout) while nobody held it.
	terminatedIdle atomic.Bool
	readDone       chan struct{}
	cancelMu       sync.Mutex // held while a cancel to this backend is in flight
	lifeMu         sync.Mutex // orders close and the reader's exit
	gone           bool       // the reader has exited (guarded by lifeMu)
	writeMu        sync.Mutex // serialises the pool's own writes (Close) with nothing else writing
}

// HandlerSlot holds a Handler for Server.SetHandler. A holder makes one
// for its lifetime, so attaching a connection allocates nothing.
type HandlerSlot struct{ h Handler }

// NewHandlerSlot wraps h.
func NewHandlerSlot(h Handler) *HandlerSlot { return &HandlerSlot{h: h} }

// ID is the connection's process-unique number, for logs.
func (s *Server) ID() uint64 { return s.id }

// Route is the database and user the connection serves.
func (s *Server) Route() Route { return s.route }

// PID is the backend process ID.
func (s *Server) PID() uint32 { return s.pid }

// Conn is the raw connection, for the holder's writes.
func (s *Server) Conn() net.Conn { return s.conn }

// Created is when the connection was opened.
func (s *Server) Created() time.Time { return s.created }

// SetHandler directs the server's messages to the slot's handler (nil:
// the pool's idle handling). The holder sets it before its first write.
func (s *Server) SetHandler(slot *HandlerSlot) { s.handler.Store(slot) }

// MarkBroken records that the connection's state is unknown, so it is
// closed instead of being reused at release.
func (s *Server) MarkBroken() { s.broken.Store(true) }

// TerminatedIdle reports whether the backend ended the connection while it
// was idle in the pool, saying so (a FATAL 57P01 or 57P05): a request a
// holder wrote to it since was never read by the backend.
func (s *Server) TerminatedIdle() bool { return s.terminatedIdle.Load() }

// Broken reports whether the connection failed or was marked broken.
func (s *Server) Broken() bool { return s.broken.Load() || s.closing.Load() }

// maxDecodedServerMessage bounds a server message that the reader must hold
// whole (everything but DataRow and CopyData, which stream).
const maxDecodedServerMessage = 1 << 20

// readLoop is the connection's only reader. It runs from connect to close
// and is the owner of the connection's lifetime: when it returns, the
// connection is closed and its budget slot released.
func (s *Server) readLoop(buf []byte) {
	defer func() {
		_ = s.conn.Close()
		close(s.readDone)
		s.pool.serverGone(s)
		s.pool.putBuf(buf)
	}()
	rd := wire.NewReader(s.conn, buf, 1<<30)
	for {
		if rd.Buffered() < wire.HeaderLen {
			if b := s.handler.Load(); b != nil && rd.Buffered() == 0 {
				if err := b.h.ServerFlush(s); err != nil {
					s.fail(err)
					return
				}
			}
			if err := rd.Fill(); err != nil {
				s.fail(err)
				return
			}
			continue
		}
		typ, n, _, err := rd.PeekHeader()
		if err != nil {
			s.fail(err)
			return
		}
		streamable := typ == 'D' || typ == 'd'
		if n > rd.Buffered() && (n <= len(rd.Buffer()) || !streamable) {
			if !streamable && n > maxDecodedServerMessage {
				s.fail(&wire.FrameError{Type: typ, Length: int64(n - 1), Limit: maxDecodedServerMessage, Err: wire.ErrMessageTooLarge})
				return
			}
			if err := rd.Ensure(n); err != nil {
				s.fail(err)
				return
			}
		}
		if n <= rd.Buffered() {
			frame := rd.Bytes()[:n]
			err = s.dispatch(typ, frame, 0)
			rd.Discard(n)
			rd.Shrink()
		} else {
			err = s.stream(rd, typ, n)
		}
		if err != nil {
			s.fail(err)
			return
		}
	}
}

// stream hands a frame larger than the buffer to the handler in parts.
func (s *Server) stream(rd *wire.Reader, typ byte, n int) error {
	for n > 0 {
		if rd.Buffered() == 0 {
			if err := rd.Fill(); err != nil {
				return err
			}
		}
		chunk := rd.Buffered()
		if chunk > n {
			chunk = n
		}
		n -= chunk
		if err := s.dispatch(typ, rd.Bytes()[:chunk], n); err != nil {
			return err
		}
		rd.Discard(chunk)
	}
	return nil
}

func (s *Server) dispatch(typ byte, data []byte, more int) error {
	if b := s.handler.Load(); b != nil {
		return b.h.ServerMessage(s, typ, data, more)
	}
	return s.idleMessage(typ, data)
}

// idleMessage handles what a server says while nobody holds it: a
// parameter change marks it for closing, notices are ignored, and anything else (typically a
// FATAL error before the backend exits) ends the connection.
func (s *Server) idleMessage(typ byte, frame []byte) error {
	switch typ {
	case 'S':
		// A parameter changed while idle (in_hot_standby at a promotion,
		// say): the connection's recorded state is stale, so it is not
		// reused. If it says the server changed, the server is checked.
		s.broken.Store(true)
		var ps pgproto3.ParameterStatus
		if err := ps.Decode(frame[wire.HeaderLen:]); err == nil {
			if now := s.opened.with(ps.Name, ps.Value); !s.pool.opts.Target.Fits(s.opened, now) {
				s.pool.suspect(s, fmt.Sprintf("the server reported %s = %s", ps.Name, ps.Value), false)
			}
		}
		return nil
	case 'N':
		return nil
	case 'E':
		var er pgproto3.ErrorResponse
		if err := er.Decode(frame[wire.HeaderLen:]); err == nil {
			if er.Code == "57P01" || er.Code == "57P05" {
				s.terminatedIdle.Store(true)
			}
			if er.Code == "57P01" || er.Code == "57P02" || er.Code == "57P03" {
				s.pool.suspect(s, "the server terminated an idle connection (SQLSTATE "+er.Code+")", false)
			}
			return fmt.Errorf("idle server connection closed by the server: %s (SQLSTATE %s)", er.Message, er.Code)
		}
	}
	return fmt.Errorf("idle server connection sent an unexpected message of type %q", typ)
}

// fail ends the connection after a read error: the holder (if any) learns
// it was lost; an expected close (Close) is not an error.
func (s *Server) fail(err error) {
	expected := s.closing.Load()
	s.broken.Store(true)
	if b := s.handler.Load(); b != nil {
		b.h.ServerLost(s, err)
	}
	if !expected && !errors.Is(err, net.ErrClosed) {
		level := zap.WarnLevel
		if errors.Is(err, io.EOF) {
			level = zap.InfoLevel
		}
		s.pool.logger.Log(level, "server connection lost", zap.Uint64("server_id", s.id),
			zap.String("db", s.route.Database), zap.String("user", s.route.User), zap.Error(err))
	}
}

// terminateTimeout bounds how long a closing connection waits for the
// backend to exit (the server closing its end) before it is dropped.
const terminateTimeout = 5 * time.Second

// close asks the backend to exit (Terminate) and lets the reader wait for
// the server to close its end, so the budget slot is freed only once the
// backend is gone from pg_stat_activity. Idempotent. It writes to the
// server: never call it with the pool's lock held; under the lock, retire
// the connection and terminate it after unlocking.
func (s *Server) close() {
	if s.retire() {
		s.terminate()
	}
}

// retire marks the connection as closing: from now on it serves nobody and
// counts among the closing connections (closingN). It reports whether this
// call retired it, in which case the caller must call terminate, after
// releasing the pool's lock. No I/O: safe under the lock.
func (s *Server) retire() bool {
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	if s.closing.Load() || s.gone {
		return false
	}
	s.closing.Store(true)
	s.pool.closingN.Add(1)
	s.broken.Store(true)
	return true
}

// terminate writes Terminate (giving up after a second) and gives the
// backend terminateTimeout to exit. Called once, after retire.
func (s *Server) terminate() {
	s.writeMu.Lock()
	_ = s.conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = s.conn.Write([]byte{'X', 0, 0, 0, 4})
	s.writeMu.Unlock()
	_ = s.conn.SetReadDeadline(time.Now().Add(terminateTimeout))
}

// terminateAll terminates the connections retired under the pool's lock;
// called after releasing it.
func terminateAll(retired []*Server) {
	for _, s := range retired {
		s.terminate()
	}
}

// Cancel sends a CancelRequest for this backend's current query to the
// server, and holds off the connection's release until the server has
// processed it, so a late cancel never hits the next client's query.
func (s *Server) Cancel(ctx context.Context) error {
	s.cancelMu.Lock()
	defer s.cancelMu.Unlock()
	if s.closing.Load() {
		return nil
	}
	return s.sendCancel(ctx)
}

// Abort ends a held connection at once, for a holder that cannot wait for
// it to finish (the forced end of a drain): its socket is closed, so its
// reader stops at once and the holder learns it was lost (ServerLost);
// with cancel, a CancelRequest is sent too (bounded by ctx), so that a
// backend that is not writing to it (pg_sleep, a lock wait) does not run
// on after it. The holder still releases it; the release waits for the
// cancel.
func (s *Server) Abort(ctx context.Context, cancel bool) {
	s.MarkBroken()
	s.cancelMu.Lock()
	defer s.cancelMu.Unlock()
	_ = s.conn.Close()
	if cancel {
		_ = s.sendCancel(ctx)
	}
}

// sendCancel sends a CancelRequest for the backend and waits for the
// postmaster to close the connection (it has signalled the backend then).
// Called with cancelMu held.
func (s *Server) sendCancel(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, s.conn.RemoteAddr().Network(), s.conn.RemoteAddr().String())
	if err != nil {
		return fmt.Errorf("sending cancel request to the server: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	buf := make([]byte, 0, 16+len(s.secretKey))
	buf = binary.BigEndian.AppendUint32(buf, uint32(12+len(s.secretKey)))
	buf = binary.BigEndian.AppendUint32(buf, 80877102)
	buf = binary.BigEndian.AppendUint32(buf, s.pid)
	buf = append(buf, s.secretKey...)
	if _, err := c.Write(buf); err != nil {
		return fmt.Errorf("sending cancel request to the server: %w", err)
	}
	// The postmaster closes the connection once it has signalled the
	// backend; wait for that so the release that follows is safe.
	_, _ = c.Read(make([]byte, 1))
	return nil
}
