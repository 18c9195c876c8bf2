package proxy

// This file holds the limits that keep one client from holding anything
// else up:
//
//   - timeouts.client_write: a client that takes nothing written to it (it
//     stopped reading and its socket is full) is disconnected. The client
//     socket's own write timeout does it (rawsock.Conn.SetWriteTimeout: a
//     deadline set only when a write has to wait, so the relay pays
//     nothing while clients read); clientWriteTimedOut counts and logs.
//   - timeouts.query: a request running longer is cancelled with a
//     CancelRequest, and the server's 57014 is replaced by Postgres' own
//     statement-timeout error naming the setting.
//   - timeouts.idle_in_transaction: a client idle inside a transaction
//     longer is disconnected with FATAL 25P03, as Postgres'
//     idle_in_transaction_session_timeout does; its server connection is
//     rolled back and returned (finish).
//   - the forced end of a drain (forceDrain): deadlines are set on every
//     client socket before any session's write lock is taken, so that no
//     writer blocked on a client that does not read holds the shutdown up.
//
// The last two share one timer per session (watchdog), reset only when a
// due time comes before the one it is set for: a session whose requests
// are shorter than the timeouts resets it about once per timeout, not once
// per request, and allocates nothing for it.

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/pool"
)

// The forced end of a drain (Shutdown, once timeouts.shutdown_drain has
// passed) must leave the process within a second whatever the clients do:
//
//   - forcedWriteGrace: every client has this long to take what is being
//     written to it and its 57P01, then its socket is closed;
//   - forcedCancelTimeout bounds the CancelRequests sent for the queries
//     still running on the sessions' server connections (so that their
//     backends do not outlive the governor); the connections are closed,
//     not cleaned;
//   - forcedSessionsWait bounds how long Shutdown then waits for the
//     sessions to end.
const (
	forcedWriteGrace    = 200 * time.Millisecond
	forcedCancelTimeout = 300 * time.Millisecond
	forcedSessionsWait  = 600 * time.Millisecond
)

// timeoutCancelWait bounds a CancelRequest sent for timeouts.query.
const timeoutCancelWait = 5 * time.Second

// SQLSTATEs of the timeouts (Postgres' own).
const (
	codeIdleInTransactionTimeout = "25P03"
)

// clientWriteTimedOut is the client socket's write-timeout callback
// (rawsock.Conn.SetWriteTimeout): the socket is closed already, so the
// pump and the server's reader give up at their next use of it, and the
// server connection is cleaned as for any departed client. Runs once, on
// the writing goroutine, which may hold wmu.
func (sess *session) clientWriteTimedOut() {
	sess.quitOnce.Do(func() { close(sess.quit) })
	sess.srv.stats.clientWriteTimeouts.Add(1)
	sess.log.Warn("client disconnected: it took none of what pggovernor wrote to it for timeouts.client_write",
		zap.Duration("client_write", sess.srv.cfg.Timeouts.ClientWrite))
}

// watchdog is a session's timer for timeouts.query and
// timeouts.idle_in_transaction. Guarded by session.mu.
type watchdog struct {
	timer *time.Timer // made at first use
	at    time.Time   // when the timer fires; zero when it is not set
	// idleSince is when the ReadyForQuery that left the client idle in a
	// transaction arrived; zero when it is not idle in one.
	idleSince time.Time
	// cancelling, not nil while the CancelRequest for timeouts.query is in
	// flight, is closed when the server has processed it. Meanwhile the
	// pump sends nothing more and the connection is not released, so the
	// cancel cannot reach another request, or another client.
	cancelling chan struct{}
	// timedOut says the current request was cancelled for timeouts.query:
	// the server's 57014 is replaced by the statement-timeout error.
	timedOut bool
	stopped  bool // the session ended
}

// watchRequestLocked notes that a request began at now (its first message
// went to the server). Called with mu held.
func (sess *session) watchRequestLocked(now time.Time) {
	if !sess.srv.watch {
		return
	}
	sess.wd.idleSince = time.Time{}
	if q := sess.srv.cfg.Timeouts.Query; q > 0 {
		sess.armWatchLocked(now, now.Add(q))
	}
}

// watchReadyLocked notes a ReadyForQuery forwarded at now with the given
// transaction status; pipelined is true when the next request is already
// in flight (it began now). Called with mu held.
func (sess *session) watchReadyLocked(status byte, now time.Time, pipelined bool) {
	if !sess.srv.watch {
		return
	}
	if sess.wd.cancelling == nil {
		sess.wd.timedOut = false
	}
	if pipelined {
		sess.watchRequestLocked(now)
		return
	}
	if i := sess.srv.cfg.Timeouts.IdleInTransaction; i > 0 && (status == 'T' || status == 'E') {
		sess.wd.idleSince = now
		sess.armWatchLocked(now, now.Add(i))
	}
}

// armWatchLocked makes the timer fire at due at the latest. Called with mu
// held.
func (sess *session) armWatchLocked(now, due time.Time) {
	wd := &sess.wd
	if wd.stopped || (!wd.at.IsZero() && !due.Before(wd.at)) {
		return
	}
	wd.at = due
	if wd.timer == nil {
		wd.timer = time.AfterFunc(due.Sub(now), sess.watchFired)
		return
	}
	wd.timer.Reset(due.Sub(now))
}

// stopWatch ends the session's timer. Called by serve once the client is
// gone.
func (sess *session) stopWatch() {
	sess.mu.Lock()
	defer sess.mu.Unlock()
	sess.wd.stopped = true
	if sess.wd.timer != nil {
		sess.wd.timer.Stop()
	}
}

// idleInTransactionLocked reports whether the client is idle inside a
// transaction: its server connection said 'T' or 'E' in the last
// ReadyForQuery and nothing was sent to it since. Called with mu held.
func (sess *session) idleInTransactionLocked() bool {
	return sess.server != nil && !sess.wd.idleSince.IsZero() && sess.q.empty() && sess.stats.batchStart.IsZero() &&
		!sess.writing && (sess.tx == 'T' || sess.tx == 'E')
}

// watchFired runs on the timer's goroutine: a request over timeouts.query
// is cancelled, a client idle in a transaction over
// timeouts.idle_in_transaction is disconnected; otherwise the timer is set
// for what is due next. A fire that was overtaken (the timer reset
// meanwhile) finds nothing due yet and sets it again.
func (sess *session) watchFired() {
	now := time.Now()
	to := &sess.srv.cfg.Timeouts
	sess.mu.Lock()
	wd := &sess.wd
	if wd.stopped || (!wd.at.IsZero() && now.Before(wd.at)) {
		sess.mu.Unlock()
		return
	}
	wd.at = time.Time{}
	srv := sess.server
	var cancelDone chan struct{}
	idleTooLong := false
	switch start := sess.stats.batchStart; {
	case srv == nil:
	case to.Query > 0 && !start.IsZero():
		if wd.timedOut {
			break // cancelled already: the server ends the request
		}
		if due := start.Add(to.Query); now.Before(due) {
			sess.armWatchLocked(now, due)
			break
		}
		wd.timedOut = true
		cancelDone = make(chan struct{})
		wd.cancelling = cancelDone
	case to.IdleInTransaction > 0 && sess.idleInTransactionLocked():
		if due := wd.idleSince.Add(to.IdleInTransaction); now.Before(due) {
			sess.armWatchLocked(now, due)
			break
		}
		idleTooLong = true
	}
	sess.mu.Unlock()
	switch {
	case cancelDone != nil:
		sess.cancelForTimeout(srv, cancelDone)
	case idleTooLong:
		sess.srv.stats.idleInTransactionTimeouts.Add(1)
		sess.log.Warn("client disconnected: idle in a transaction for longer than timeouts.idle_in_transaction",
			zap.Duration("idle_in_transaction", to.IdleInTransaction))
		sess.terminate(&clientError{fatal: true, code: codeIdleInTransactionTimeout,
			message: "terminating connection due to idle-in-transaction timeout",
			detail:  fmt.Sprintf("The client sent nothing inside its transaction for longer than pggovernor's timeouts.idle_in_transaction (%s); the transaction was rolled back.", to.IdleInTransaction),
			hint:    "End transactions before waiting for anything else, or raise timeouts.idle_in_transaction."})
	}
}

// cancelForTimeout sends a CancelRequest for the request that ran longer
// than timeouts.query and, once the server has processed it, lets the pump
// go on and the connection be released.
func (sess *session) cancelForTimeout(srv *pool.Server, done chan struct{}) {
	sess.srv.stats.queryTimeouts.Add(1)
	sess.log.Warn("request cancelled: it ran longer than timeouts.query", zap.Duration("query", sess.srv.cfg.Timeouts.Query))
	// A forced drain cuts it short: the connection is aborted then.
	ctx, cancel := context.WithTimeout(sess.srv.forceCtx, timeoutCancelWait)
	err := srv.Cancel(ctx)
	cancel()
	if err != nil {
		sess.log.Info("cancel request for timeouts.query failed", zap.Error(err))
	}
	sess.mu.Lock()
	close(done)
	sess.wd.cancelling = nil
	switch {
	case sess.stats.batchStart.IsZero():
		sess.wd.timedOut = false // the request ended before the cancel landed
	case err != nil && sess.server == srv:
		// Not delivered: tried again after another timeouts.query.
		sess.wd.timedOut = false
		now := time.Now()
		sess.armWatchLocked(now, now.Add(sess.srv.cfg.Timeouts.Query))
	}
	held := sess.server == srv
	sess.mu.Unlock()
	if held {
		sess.afterIdle(srv) // a release held for the cancel
	}
}

// awaitTimeoutCancelLocked waits, with mu held on entry and on return,
// until no CancelRequest for timeouts.query is in flight: the pump sends
// nothing meanwhile, so that the cancel lands on the request it was meant
// for.
func (sess *session) awaitTimeoutCancelLocked() {
	for c := sess.wd.cancelling; c != nil; c = sess.wd.cancelling {
		sess.mu.Unlock()
		<-c
		sess.mu.Lock()
	}
}

// queryTimeoutErrorLocked returns what replaces the server's error frame
// while the current request was cancelled for timeouts.query: Postgres'
// own statement-timeout error, naming the setting, for its 57014; "" for
// any other error. Called with mu held.
func (sess *session) queryTimeoutErrorLocked(frame []byte) string {
	if errorCode(frame) != codeQueryCanceled {
		return ""
	}
	q := sess.srv.cfg.Timeouts.Query
	return string(sess.srv.appendError(nil, &clientError{code: codeQueryCanceled,
		message: "canceling statement due to statement timeout",
		detail:  fmt.Sprintf("pggovernor cancelled the request: it ran longer than timeouts.query (%s).", q),
		hint:    "Make the request faster, or raise timeouts.query."}, sess.user))
}

// forceDrain ends every session now: the deadline by is set on every
// client socket first, so that a writer blocked on a client that does not
// read gives up by then instead of holding the session's write lock; the
// server connections the sessions hold are aborted (closed, and a query
// running on one cancelled), so that their readers stop forwarding what
// nobody will read and their backends stop; then each client is
// terminated (57P01, if it takes it by then) and its socket closed. It
// returns when the aborts are done (within forcedCancelTimeout).
func (s *Server) forceDrain(sessions []*session, by time.Time) {
	s.forced.Store(true)
	s.forcing()
	for _, sess := range sessions {
		sess.quitOnce.Do(func() { close(sess.quit) })
		_ = sess.conn.SetWriteDeadline(by)
	}
	ctx, cancel := context.WithTimeout(context.Background(), forcedCancelTimeout)
	defer cancel()
	var aborts sync.WaitGroup
	for _, sess := range sessions {
		sess.mu.Lock()
		srv, busy := sess.server, !sess.q.empty()
		sess.mu.Unlock()
		if srv != nil {
			aborts.Add(1)
			go func() { // owner: forceDrain; exits within forcedCancelTimeout
				defer aborts.Done()
				srv.Abort(ctx, busy)
			}()
		}
	}
	for _, sess := range sessions {
		sess.drainNow(by)
	}
	aborts.Wait()
}

// terminateAll disconnects sessions with ce: deadlines first, then each
// one's final error, so that a client that does not read costs the others
// nothing.
func terminateAll(sessions []*session, ce *clientError, by time.Time) {
	for _, sess := range sessions {
		_ = sess.conn.SetWriteDeadline(by)
	}
	for _, sess := range sessions {
		sess.terminateBy(ce, by)
	}
}

// finishForced gives back srv, which a client cut off by a forced drain
// still held: forceDrain aborted it (or, attached since, it is closed as
// it is), so it is closed, not cleaned.
func (sess *session) finishForced(srv *pool.Server) {
	srv.MarkBroken()
	sess.srv.pool.Release(srv)
}
