package proxy

// This file delivers the notifications of the route's listen hub
// (listen.go) to one client without letting that client hold anyone up.
//
// The hub's reader only appends a NotificationResponse to the session's
// backlog (notifyQueue: a mutex held for an append, no I/O) and wakes the
// session's notifier goroutine. What is queued goes to the client at a
// message boundary, written by whichever of the session's writers comes
// first, under wmu: the notifier (the client is idle, or between the frames
// the relay forwards); the relay, right after a frame it was forwarding in
// parts; the pump, before the governor's own answers (so that a client's
// UNLISTEN is answered after the notifications received before it). A client
// that does not read blocks only its own writers.
//
// The backlog is bounded by clients.notify_backlog_size, counting what is
// queued and what a writer has taken but not yet handed to the client's
// socket: over it, the queued notifications are dropped and the client is
// disconnected with 53200 (after what was already being written, if the
// client takes it within notifyOverflowGrace), counted and logged once.

import (
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// notifyOverflowGrace is how long a client over its backlog has to take
// what was already being written to it and the error that ends it.
const notifyOverflowGrace = 5 * time.Second

// maxSpareFrames bounds the frame list a backlog keeps for reuse.
const maxSpareFrames = 256

// notifyQueue is a session's backlog of notifications. The frames are
// shared, read only, by every session a notification was fanned out to.
type notifyQueue struct {
	mu       sync.Mutex
	frames   [][]byte // queued
	spare    [][]byte // an empty list to reuse
	queued   int      // bytes in frames
	inflight int      // bytes a writer took and has not yet written
	// final, once set, ends the session: the notifier writes it (by
	// finalBy) and closes the connection. Nothing is queued after it.
	final   *clientError
	finalBy time.Time
	// overflowWaiting is what waited when the backlog overflowed, for the
	// log.
	overflowWaiting int
	started         bool // the notifier goroutine runs (or ran)
	closed          bool // the session ended

	// pending says frames is not empty; the relay reads it without mu.
	pending atomic.Bool
	wake    chan struct{} // capacity 1: there is something for the notifier
	done    chan struct{} // closed when the session ends
	exited  chan struct{} // closed by the notifier as it returns
}

// kick wakes the notifier without waiting.
func (q *notifyQueue) kick() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// startNotifier starts the session's notifier goroutine, once: before the
// session first subscribes to the hub. It runs until stopNotifier. Called
// by the pump.
func (sess *session) startNotifier() {
	q := &sess.nq
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.started || q.closed {
		return
	}
	q.started = true
	q.wake = make(chan struct{}, 1)
	q.done = make(chan struct{})
	q.exited = make(chan struct{})
	go sess.notifier()
}

// stopNotifier drops what is queued and ends the notifier, waiting for it.
// Called by serve once the session is unsubscribed and its connection
// closed (which ends a write the notifier may be blocked in).
func (sess *session) stopNotifier() {
	q := &sess.nq
	q.mu.Lock()
	q.closed = true
	dropped := q.queued
	q.frames, q.queued = nil, 0
	q.pending.Store(false)
	started := q.started
	q.mu.Unlock()
	sess.srv.stats.notifyQueued.Add(-int64(dropped))
	if started {
		close(q.done)
		<-q.exited
	}
}

// notifier writes the queued notifications when woken, and ends the
// session when a final error was set (the hub lost its connection, or the
// backlog overflowed). It is owned by the session: it exits at
// stopNotifier, or after ending the session.
func (sess *session) notifier() {
	q := &sess.nq
	defer close(q.exited)
	for {
		select {
		case <-q.wake:
		case <-q.done:
			return
		}
		sess.wmu.Lock()
		if !sess.clientDead && !sess.midFrame && q.pending.Load() {
			// Mid-frame, the relay writes them when the frame is done.
			err := sess.writeNotificationsLocked()
			if err == nil {
				err = sess.cw.Flush()
			}
			if err != nil {
				sess.clientDead = true
				_ = sess.conn.Close()
			} else {
				sess.cw.Release() // an idle listener holds no buffer
			}
		}
		sess.wmu.Unlock()
		q.mu.Lock()
		final, by := q.final, q.finalBy
		q.mu.Unlock()
		if final != nil {
			sess.terminateBy(final, by)
			return
		}
	}
}

// writeNotificationsLocked writes the queued notifications into the client
// writer (the caller flushes). The caller holds wmu, at a message boundary
// (not midFrame), with the client alive. The hub may go on queueing
// meanwhile: what this call took counts against the bound until written.
func (sess *session) writeNotificationsLocked() error {
	q := &sess.nq
	q.mu.Lock()
	frames, n := q.frames, q.queued
	q.frames, q.spare = q.spare, nil
	q.queued = 0
	q.inflight += n
	q.pending.Store(false)
	q.mu.Unlock()
	var err error
	for i, f := range frames {
		if err == nil {
			_, err = sess.cw.Write(f)
		}
		frames[i] = nil
	}
	if err == nil {
		sess.bytesOut.Add(int64(n))
	}
	q.mu.Lock()
	q.inflight -= n
	if q.spare == nil && cap(frames) <= maxSpareFrames {
		q.spare = frames[:0]
	}
	q.mu.Unlock()
	sess.srv.stats.notifyQueued.Add(-int64(n))
	return err
}

// deliver queues a notification frame for the client; it never blocks on
// the client. It reports true when the frame would take the backlog over
// clients.notify_backlog_size: the session is then set to end, and the
// caller calls notifyOverflowed once it holds no lock. Called by the hub
// with its mu held.
func (sess *session) deliver(frame []byte) (overflow bool) {
	q := &sess.nq
	limit := sess.srv.cfg.Clients.NotifyBacklogSize
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || q.final != nil {
		return false
	}
	if q.queued+q.inflight+len(frame) > limit {
		q.overflowWaiting = q.queued + q.inflight
		q.final = fatalf(codeOutOfMemory, "out of memory: more than clients.notify_backlog_size (%d bytes) of notifications waited for this client", limit).
			withDetail("The client did not read the notifications pggovernor received for it fast enough; those still waiting were dropped.").
			withHint("Read notifications as they arrive (a pq.Listener's Notify channel must be drained), or raise clients.notify_backlog_size.")
		q.finalBy = time.Now().Add(notifyOverflowGrace)
		for i := range q.frames {
			q.frames[i] = nil
		}
		sess.srv.stats.notifyQueued.Add(-int64(q.queued))
		q.frames, q.queued = q.frames[:0], 0
		q.pending.Store(false)
		return true
	}
	q.frames = append(q.frames, frame)
	q.queued += len(frame)
	q.pending.Store(true)
	sess.srv.stats.notifyQueued.Add(int64(len(frame)))
	q.kick()
	return false
}

// notifyOverflowed counts and logs a backlog overflow reported by deliver,
// and has the notifier end the session: a write it is blocked in gives up
// after notifyOverflowGrace. Called by the hub, holding no lock.
func (sess *session) notifyOverflowed() {
	q := &sess.nq
	q.mu.Lock()
	by, waiting := q.finalBy, q.overflowWaiting
	q.mu.Unlock()
	sess.srv.stats.notifyOverflows.Add(1)
	sess.log.Warn("client disconnected: notifications for it exceeded clients.notify_backlog_size",
		zap.String("sqlstate", codeOutOfMemory), zap.Int("waiting_bytes", waiting),
		zap.Int("limit_bytes", sess.srv.cfg.Clients.NotifyBacklogSize))
	_ = sess.conn.SetWriteDeadline(by)
	q.kick()
}

// endAsync has the notifier end the session with ce, after the
// notifications already queued, within a second; it does not wait. For the
// hub, which must not wait on a client.
func (sess *session) endAsync(ce *clientError) {
	q := &sess.nq
	by := time.Now().Add(time.Second)
	q.mu.Lock()
	if q.closed || q.final != nil {
		q.mu.Unlock()
		return
	}
	if !q.started { // not a subscriber: nothing to say it with
		q.mu.Unlock()
		_ = sess.conn.Close()
		return
	}
	q.final, q.finalBy = ce, by
	q.mu.Unlock()
	_ = sess.conn.SetWriteDeadline(by) // a blocked write gives up in time
	q.kick()
}
