package proxy

// This file moves a client's request to another server connection when the
// pooled one it was sent on turns out to have been terminated before it read
// anything of it — a transaction mode client then sees nothing of the lost
// connection, as if the pool had never handed it out.
//
// When is it safe? The request was the first of a new attachment (the
// connection came from the pool, idle, with no transaction open), and the
// first thing the server said on it (or, just before, while it was idle in
// the pool: pool.Server.TerminatedIdle) is a FATAL error with SQLSTATE 57P01
// (admin_shutdown: pg_terminate_backend, a smart or fast shutdown) or 57P05
// (idle_session_timeout). Postgres sends those from a backend that is exiting
// on a signal it handles only where interrupts are checked; every response
// the backend produced before (a ParseComplete, a CommandComplete, the
// ReadyForQuery after a COMMIT) sits in its output buffer ahead of the FATAL
// and is flushed before it. So a FATAL that comes first means the backend
// completed none of the request: no statement ran to completion, nothing was
// committed (a statement it was in the middle of is rolled back with its
// transaction). Any other ending — a crash (57P02, where the signal
// arrives anywhere, even after a commit), a connection cut without a word, a
// response before the FATAL — is not retried: the client gets what Postgres
// would have said, and its connection is closed.
//
// The request is the client's messages since the attachment began, up to
// replayLimit bytes, kept as they came (replayBuf); they are processed again
// from the start on the next connection, so everything the governor adds
// for a connection (settings, statements) is made for the new one. A
// request with session-state effects the governor records (SET, advisory
// locks, temporary tables…) is not retried; named statements a
// Parse or Close of the request added or removed are put back first, the last change first.

import (
	"bytes"
	"time"

	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// replayLimit bounds the request kept for a retry.
const replayLimit = 64 << 10

// maxRetries bounds how often one request moves on.
const maxRetries = 3

// capture keeps the client's next message (type typ, n bytes) for a retry
// while the attachment has not been answered. Called by the pump before it
// handles the message.
func (sess *session) capture(n int) error {
	sess.curCaptured = false
	if !sess.txMode || sess.answered.Load() {
		sess.freeReplay() // nothing is kept until the next attachment
		return nil
	}
	if len(sess.replayBuf)+n > replayLimit {
		sess.replayBuf = sess.replayBuf[:0]
		sess.setReplayable(false)
	}
	sess.curStart = len(sess.replayBuf)
	if n > replayLimit {
		sess.setReplayable(false)
		return nil
	}
	if err := sess.rd.Ensure(n); err != nil {
		if isBudgetError(err) {
			// Not kept: the message itself is refused, or streamed,
			// where it is handled.
			sess.setReplayable(false)
			return nil
		}
		return err
	}
	if !sess.keepReplay(sess.rd.Bytes()[:n]) {
		sess.setReplayable(false)
		return nil
	}
	sess.curCaptured = true
	return nil
}

// beginAttempt starts a request on a newly attached connection: what was
// kept before the current message belongs to no attachment. Called by the
// pump with mu held.
func (sess *session) beginAttemptLocked() {
	sess.answered.Store(false)
	sess.relinked = false
	sess.settleStmtLogLocked()
	if !sess.txMode || !sess.curCaptured || sess.pins != 0 {
		sess.replayable = false
		return
	}
	n := copy(sess.replayBuf, sess.replayBuf[sess.curStart:])
	sess.replayBuf = sess.replayBuf[:n]
	sess.curStart = 0
	sess.replayable = true
}

// stmtChange is one thing a request did to the client's named statements:
// a Parse made name (closed is nil), or a Close removed closed.
type stmtChange struct {
	name   string
	closed *clientStmt
}

// settleStmtLogLocked makes the request's statement changes final: the
// statements it closed are forgotten (no retry puts them back). Called with
// mu held.
func (sess *session) settleStmtLogLocked() {
	for _, c := range sess.stmtLog {
		if c.closed != nil {
			sess.forgetStmtLocked(c.closed)
		}
	}
	clear(sess.stmtLog)
	sess.stmtLog = sess.stmtLog[:0]
}

// undoStmtLogLocked takes the request's statement changes back, the last
// first, so that the request, read again, finds the statements as it did:
// a statement it parsed and then closed is gone, one it closed and parsed
// again under the same name is the old one. Called with mu held.
func (sess *session) undoStmtLogLocked() {
	for i := len(sess.stmtLog) - 1; i >= 0; i-- {
		c := sess.stmtLog[i]
		if c.closed != nil {
			sess.stmts[c.name] = c.closed
		} else {
			sess.dropStmtLocked(c.name) // the request parses it again
		}
	}
	clear(sess.stmtLog)
	sess.stmtLog = sess.stmtLog[:0]
}

// setReplayable records whether the current request can still be retried.
func (sess *session) setReplayable(ok bool) {
	sess.mu.Lock()
	sess.replayable = sess.replayable && ok
	sess.mu.Unlock()
}

// retryOnFatal reports whether a FATAL error frame, the first answer on the
// attachment, lets the request move to another connection, and if so
// prepares it: the pump is woken to do it. Called by the server's reader
// with mu held.
func (sess *session) retryOnFatalLocked(srv *pool.Server, frame []byte) bool {
	if !sess.replayable || sess.retries >= maxRetries || !errorIsFatal(frame) {
		return false
	}
	switch errorCode(frame) {
	case "57P01", "57P05":
	default:
		return false
	}
	return sess.retryLocked(srv)
}

// retryLocked has the pump send the request again on another connection,
// if it may. Called with mu held.
func (sess *session) retryLocked(srv *pool.Server) bool {
	if !sess.replayable || sess.retries >= maxRetries || sess.pins != 0 {
		// A client with session state on the connection loses it with
		// the connection: nothing to retry.
		return false
	}
	srv.MarkBroken()
	sess.retryPending.Store(true)
	sess.verified(verifyResult{failed: true})
	// Wake the pump if it waits for the client: it retries at its next
	// message boundary.
	_ = sess.conn.SetReadDeadline(time.Now())
	return true
}

// takeRetry moves the request to another connection: the lost one is
// given back (it is closed), what the governor expected from it is
// dropped, and the request's messages are read again. Called by the pump at
// a message boundary.
func (sess *session) takeRetry() {
	sess.mu.Lock()
	srv := sess.server
	sess.server = nil
	sess.q = queue{items: sess.q.items[:0]}
	if sess.qEmpty != nil {
		close(sess.qEmpty)
		sess.qEmpty = nil
	}
	sess.tx = 'I'
	sess.linger, sess.unsynced, sess.copyIn, sess.batchError = false, false, false, false
	sess.writing, sess.releaseDeferred = false, false
	sess.undoStmtLogLocked()
	sess.retries++
	sess.retryPending.Store(false)
	sess.answered.Store(false)
	sess.replayable = false // set again when the request attaches
	sess.mu.Unlock()
	_ = sess.conn.SetReadDeadline(time.Time{})
	sess.skipToSync = false
	sess.sw.Reset(nil)
	// Drain what the verify channel may hold for the lost connection.
	select {
	case <-sess.verifyCh:
	default:
	}
	if srv != nil {
		sess.srv.pool.Release(srv)
	}
	sess.srv.stats.retries.Add(1)
	sess.log.Info("server connection terminated before it read the client's request: sent again on another",
		zap.Int("bytes", len(sess.replayBuf)), zap.Int("retry", sess.retries))
	sess.rd.Prepend(sess.replayBuf)
	sess.replayBuf = sess.replayBuf[:0]
}

// errorIsFatal reports whether an ErrorResponse frame has severity FATAL or
// PANIC: its non-localised severity (V), or S where the server sends no V.
func errorIsFatal(frame []byte) bool {
	b := frame[wire.HeaderLen:]
	var severity []byte
	for len(b) > 0 && b[0] != 0 {
		field := b[0]
		end := bytes.IndexByte(b[1:], 0)
		if end < 0 {
			return false
		}
		switch field {
		case 'V':
			severity = b[1 : 1+end]
			b = nil
			continue
		case 'S':
			severity = b[1 : 1+end]
		}
		b = b[2+end:]
	}
	return string(severity) == "FATAL" || string(severity) == "PANIC"
}

// awaitingVerdict reports whether a failed write to the server should wait
// for the server's reader: the request is unanswered and retriable. The
// connection is marked broken either way. Called by the pump.
func (sess *session) awaitingVerdict() bool {
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if sess.server != nil {
		sess.server.MarkBroken()
	}
	return sess.retryPending.Load() || (sess.replayable && !sess.answered.Load())
}
