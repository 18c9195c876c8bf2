package proxy

// This file is the server connection's side of the relay: each message the
// server sends is matched against the queue of expected responses and
// forwarded to the client, with the governor's own responses (synthetic
// entries) put in their places and the responses to its own messages
// (suppressed entries) left out.

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/internal/rawsock"
	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// Entry flags.
const (
	entSuppress     uint16 = 1 << iota // the governor's own message: its responses are not forwarded
	entSynthetic                       // no server response: the governor answers with synth
	entUnnamed                         // a Parse or statement Describe of the unnamed statement
	entOwnParse                        // the client's own Parse (its failure is the client's)
	entShape                           // a statement Describe whose answer gives the statement's shape
	entVerify                          // the pump waits for this Describe's answer (verifyCh)
	entForwardError                    // suppressed, but an error is the client's: it answers the client's next message
	entReplaceError                    // the server's error is replaced by synth (the error Postgres would give)
	entParams                          // a suppressed statement whose ParameterStatus messages reach the client
)

// entry is one expected response, in the order the server sends them.
type entry struct {
	kind  byte // client message type P B D E C S Q F; 'q' the governor's query; 'y' synthetic
	flags uint16
	stmt  *clientStmt // a client's own named Parse (and its Describe): forgotten if it fails
	key   stmtKey     // the statement a Parse prepares
	copy  *serverStmt // the statement on the connection a Parse, Describe or Bind is about
	synth string      // what a synthetic entry sends, or the error replacing the server's
	close []byte      // the statement a governor Close closes: closed again if skipped
}

// ServerMessage implements pool.Handler: it follows the server's responses
// against the queue and forwards them to the client.
func (sess *session) ServerMessage(srv *pool.Server, typ byte, data []byte, more int) error {
	if typ == 'E' && more == 0 {
		srv.ObserveError(data) // a read-only or terminated server: the pool checks it
	}
	sess.mu.Lock()
	if sess.server != srv {
		cur := sess.server
		sess.mu.Unlock()
		sess.log.Warn("dropped a message from a server connection this client no longer holds",
			zap.Uint64("server_id", srv.ID()), zap.String("type", string(typ)), zap.Bool("holds_another", cur != nil))
		return nil
	}
	if !sess.answered.Load() {
		if typ == 'E' && more == 0 && sess.retryOnFatalLocked(srv, data) {
			sess.mu.Unlock()
			return nil // the request moves to another connection
		}
		sess.answered.Store(true)
		sess.retries = 0
	}
	fatal := typ == 'E' && more == 0 && errorIsFatal(data)
	if fatal && sess.idleOnLocked() {
		// The client is between transactions: it never learns that
		// this connection went away (it was only lingering). The
		// connection is closed, never handed out again; what the server
		// answered before, read with the FATAL, is the client's and is
		// flushed here (the reader flushes only for the client it
		// serves, which is no longer this one).
		srv.MarkBroken()
		sess.detachLocked()
		sess.mu.Unlock()
		_ = sess.ServerFlush(srv)
		sess.srv.pool.Release(srv)
		return nil
	}
	suppress := false
	var replaced string
	if head := sess.q.peek(); head != nil {
		// The parameter changes of an entParams statement reach the client.
		suppress = head.flags&entSuppress != 0 && (typ != 'S' || head.flags&entParams == 0)
		if typ == 'E' {
			if head.flags&entForwardError != 0 {
				suppress = false // it answers the client's message that follows
			}
			if head.flags&entReplaceError != 0 {
				replaced = head.synth
			}
		}
	}
	if fatal {
		// The server's last word is the client's, whatever it answers.
		suppress, replaced = false, ""
	}
	if typ == 'E' && more == 0 && sess.wd.timedOut && !suppress && replaced == "" {
		replaced = sess.queryTimeoutErrorLocked(data) // timeouts.query cancelled the request
	}
	release := false
	sess.synthBefore, sess.synthAfter = sess.synthBefore[:0], sess.synthAfter[:0]
	if more == 0 {
		// Whole frames are followed; the parts of a frame too large to
		// buffer (DataRow, CopyData: nothing to follow) are only forwarded.
		switch typ {
		case 'Z':
			if len(data) == wire.HeaderLen+1 {
				srv.TxStatus = data[wire.HeaderLen]
			}
			sess.completeSync()
			if !suppress {
				sess.tx = srv.TxStatus
				if !sess.batchError {
					sess.pins &^= sess.pendingUnpin
					sess.countPinned()
				}
				sess.pendingUnpin = 0
				sess.batchError = false
				sess.copyIn = false
				sess.noteReadyLocked(srv.TxStatus)
			} else if sess.batchError {
				// The governor's own statement failed: the connection's
				// state is unknown, so it serves nobody after this client.
				srv.MarkBroken()
				sess.batchError = false
			}
			release = sess.q.empty() && srv.TxStatus == 'I'
			if release && sess.linger && !suppress {
				// The client's unnamed statement waits for its Bind on
				// this connection, for a while (lingerExpired). The Bind
				// is a new request, retriable as one that attaches.
				sess.armLinger()
				sess.answered.Store(false)
				sess.relinked = true
				// What was kept for a retry is answered: a FATAL on the
				// lingering connection before the Bind (its backend
				// terminated) must not send it again (the client would
				// get its answers twice); the connection is then left
				// silently, and the Bind prepares the statement again
				// on another one.
				sess.replayable = false
			}
			if sess.q.empty() {
				sess.lexSettledLocked()
			}
			if sess.qEmpty != nil && sess.q.empty() {
				close(sess.qEmpty)
				sess.qEmpty = nil
			}
		case 'E':
			sess.serverError(srv, data)
		case '1':
			sess.popIf('P')
		case '2':
			sess.popIf('B')
		case '3':
			sess.popIf('C')
		case 't':
			if h := sess.q.peek(); h != nil && h.kind == 'D' && h.flags&entShape != 0 {
				sess.paramDesc = append(sess.paramDesc[:0], data[wire.HeaderLen:]...)
			}
		case 'n', 'T':
			if h := sess.q.peek(); h != nil && h.kind == 'D' && h.flags&entShape != 0 {
				var rows []byte
				if typ == 'T' {
					rows = data[wire.HeaderLen:]
				}
				sess.learnShape(srv, h, sess.srv.hasher.shape(sess.paramDesc, rows))
				sess.paramDesc = sess.paramDesc[:0]
			}
			sess.popIf('D')
		case 'C', 'I', 's':
			sess.copyIn = false
			sess.popIf('E')
		case 'G':
			sess.copyIn = true
		case 'S':
			if more == 0 {
				var ps pgproto3.ParameterStatus
				if err := ps.Decode(data[wire.HeaderLen:]); err == nil {
					srv.Params[ps.Name] = ps.Value
					srv.ObserveParameter(ps.Name, ps.Value)
					sess.stateOf(srv).paramsChanged()
					if !suppress {
						sess.noteParam(ps.Name, ps.Value)
					}
					if !suppress && sess.view != nil && sess.view[ps.Name] != ps.Value {
						if sess.fit != nil { // shared: copy before changing
							own := make(map[string]string, len(sess.view))
							for k, v := range sess.view {
								own[k] = v
							}
							sess.view, sess.fit = own, nil
						}
						sess.view[ps.Name] = ps.Value
					}
				}
			}
		}
	}
	// Synthetic responses now at the head are due: they follow this
	// message.
	sess.takeSynthetic()
	before, after := sess.synthBefore, sess.synthAfter
	sess.mu.Unlock()

	sess.wmu.Lock()
	if !sess.clientDead {
		var err error
		for _, s := range before {
			if err == nil {
				_, err = sess.cw.WriteString(s)
			}
		}
		if replaced != "" && err == nil {
			_, err = sess.cw.WriteString(replaced)
		} else if !suppress && err == nil {
			_, err = sess.cw.Write(data)
			sess.midFrame = more > 0
			if !sess.midFrame && err == nil && sess.nq.pending.Load() {
				// Notifications from the hub, at this frame boundary.
				err = sess.writeNotificationsLocked()
			}
		}
		for _, s := range after {
			if err == nil {
				_, err = sess.cw.WriteString(s)
			}
		}
		if err != nil {
			sess.clientDead = true
			_ = sess.conn.Close()
		}
		if !suppress {
			sess.bytesOut.Add(int64(len(data)))
		}
	}
	sess.wmu.Unlock()
	if release {
		sess.afterIdle(srv)
	}
	return nil
}

// serverError handles an ErrorResponse: an extended-protocol message failed
// and the server skips to the next Sync, so the queue does too; a failed
// Parse leaves no statement behind; a statement whose plan went stale is
// dropped from the connection. Called with mu held.
func (sess *session) serverError(srv *pool.Server, data []byte) {
	sess.batchError = true
	sess.copyIn = false
	head := sess.q.peek()
	if head == nil {
		return // an error outside any request: a FATAL before the server exits
	}
	switch head.kind {
	case 'P', 'B', 'D', 'E', 'C':
	default:
		return // inside a simple query: the query goes on to ReadyForQuery
	}
	if sess.virtual {
		ss := sess.stmtsOf(srv)
		switch {
		case head.kind == 'P' && head.flags&entUnnamed != 0:
			ss.unnamedOK = false
			if head.flags&entOwnParse != 0 {
				sess.unnamedOK = false
			}
		case head.kind == 'P':
			if head.copy != nil {
				ss.dropCopy(head.copy, false)
			} else {
				ss.drop(head.key, false)
			}
			if head.stmt != nil && sess.stmts[head.stmt.name] == head.stmt {
				sess.dropStmtLocked(head.stmt.name)
			}
		case head.flags&entReplaceError != 0:
			// The governor's own substitute for a stale statement.
		case head.kind == 'B' || head.kind == 'D':
			if code := errorCode(data); code == "0A000" || code == "26000" {
				// "cached plan must not change result type" (the schema
				// changed) or a statement the server lost: that copy serves
				// nobody any more; it is prepared afresh at its next use.
				if head.copy != nil {
					ss.dropCopy(head.copy, code == "0A000")
				} else {
					ss.unnamedOK = false
				}
			}
		}
	}
	// The server skips everything up to the next Sync; so does the queue
	// (synthetic responses in between are dropped, as the server would
	// not have answered those messages either). A Parse skipped there
	// created nothing: what recorded it as prepared is undone.
	verify := head.flags&entVerify != 0
	sess.q.pop() // the failed entry itself, handled above
	for h := sess.q.peek(); h != nil && h.kind != 'S'; h = sess.q.peek() {
		verify = verify || h.flags&entVerify != 0
		if sess.virtual {
			sess.skipped(srv, *h)
		}
		sess.q.pop()
	}
	if verify {
		sess.verified(verifyResult{failed: true})
	}
}

// learnShape records what a statement Describe said (the entry at the head
// of the queue): on the client's statement and the connection's copy, and
// for the pump when it waits for it. Called with mu held.
func (sess *session) learnShape(srv *pool.Server, h *entry, shape stmtShape) {
	if cs := h.stmt; cs != nil && !cs.shape.ok {
		cs.shape = shape
		cs.paramTypes = append([]byte(nil), sess.paramDesc...)
	}
	if h.copy != nil {
		h.copy.shape = shape
	}
	if h.flags&entUnnamed != 0 {
		ss := sess.stmtsOf(srv)
		if ss.unnamedOwner == sess && ss.unnamedSeq == sess.unnamedSeq {
			ss.unnamedShape = shape
			if h.flags&entSuppress == 0 { // the client's own Describe
				sess.unnamedShape = shape
				sess.unnamedParamTypes = append(sess.unnamedParamTypes[:0], sess.paramDesc...)
			}
		}
	}
	if h.flags&entVerify != 0 {
		sess.verified(verifyResult{shape: shape})
	}
}

// verified hands the pump the answer it waits for; never blocks.
func (sess *session) verified(r verifyResult) {
	select {
	case sess.verifyCh <- r:
	default:
	}
}

// skipped undoes what a Parse the server skipped (after an error, up to
// Sync) recorded: the statement is neither on the connection nor, if it
// was the client's own, the client's. Called with mu held.
func (sess *session) skipped(srv *pool.Server, e entry) {
	ss := sess.stmtsOf(srv)
	if e.kind == 'C' && e.close != nil {
		ss.pendingClose = append(ss.pendingClose, e.close) // it still exists
	}
	if e.kind == 'P' {
		switch {
		case e.flags&entUnnamed != 0:
			ss.unnamedOK = false
			if e.flags&entOwnParse != 0 {
				sess.unnamedOK = false
			}
		case e.copy != nil:
			ss.dropCopy(e.copy, false)
		default:
			ss.drop(e.key, false)
		}
	}
	if e.stmt != nil && sess.stmts[e.stmt.name] == e.stmt {
		sess.dropStmtLocked(e.stmt.name)
	}
}

// errorCode extracts the SQLSTATE field of an ErrorResponse frame without
// decoding the rest.
func errorCode(frame []byte) string {
	b := frame[wire.HeaderLen:]
	for len(b) > 0 && b[0] != 0 {
		field := b[0]
		end := bytes.IndexByte(b[1:], 0)
		if end < 0 {
			return ""
		}
		if field == 'C' {
			return string(b[1 : 1+end])
		}
		b = b[2+end:]
	}
	return ""
}

// completeSync pops the entries a ReadyForQuery completes: everything up to
// and including the first Sync, simple query or governor query; synthetic
// entries among them go out before it. Called with mu held.
func (sess *session) completeSync() {
	for h := sess.q.peek(); h != nil; h = sess.q.peek() {
		if h.flags&entSynthetic != 0 {
			sess.synthBefore = append(sess.synthBefore, h.synth)
			sess.q.pop()
			continue
		}
		k := h.kind
		sess.q.pop()
		if k == 'S' || k == 'Q' || k == 'F' || k == 'q' {
			return
		}
	}
}

func (sess *session) popIf(kind byte) {
	if h := sess.q.peek(); h != nil && h.kind == kind {
		sess.q.pop()
	}
}

// takeSynthetic pops the synthetic entries now at the head of the queue
// into synthAfter. Called with mu held.
func (sess *session) takeSynthetic() {
	for h := sess.q.peek(); h != nil && h.flags&entSynthetic != 0; h = sess.q.peek() {
		sess.synthAfter = append(sess.synthAfter, h.synth)
		sess.q.pop()
	}
}

// ServerFlush implements pool.Handler: flush the client writer when the
// server has nothing more buffered.
func (sess *session) ServerFlush(*pool.Server) error {
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	if sess.clientDead || sess.cw.Buffered() == 0 {
		return nil
	}
	if err := sess.cw.Flush(); err != nil {
		sess.clientDead = true
		_ = sess.conn.Close()
	}
	return nil
}

// ServerLost implements pool.Handler: the attached server connection
// failed. A request the connection never read moves to another one
// (retry.go); a client between transactions (transaction mode) is not
// told; otherwise the client's session is gone as it would be with
// Postgres: it has had the server's last message, if there was one (a
// FATAL is always forwarded), and its connection is closed without a word
// of the governor's, so that drivers see what they see when a server goes
// away and reconnect (lib/pq returns driver.ErrBadConn on the next use).
// When the server did not close the connection itself (a reset, a
// timeout, the governor's own close), the client's connection is reset
// too, as the broken path would have reset it: a clean close tells lib/pq
// that nothing was executed (driver.ErrBadConn, on which database/sql runs
// the statement again on a new connection), when an autocommit statement
// may have committed and only its answer was lost.
func (sess *session) ServerLost(srv *pool.Server, err error) {
	sess.mu.Lock()
	if sess.server != srv {
		sess.mu.Unlock()
		return
	}
	if !sess.retryPending.Load() && !sess.answered.Load() && srv.TerminatedIdle() {
		// The backend said it was terminated before this client held it:
		// it read nothing of the request.
		sess.retryLocked(srv)
	}
	if sess.retryPending.Load() {
		sess.mu.Unlock()
		_ = sess.conn.SetReadDeadline(time.Now()) // the pump retries
		return
	}
	idle := sess.idleOnLocked()
	sess.detachLocked()
	if !idle {
		// With the detach, under mu: the pump attaches no other
		// connection for what the client sent before (needServer), as a
		// server that went away runs nothing more of it.
		sess.quitOnce.Do(func() { close(sess.quit) })
	}
	sess.verified(verifyResult{failed: true})
	sess.mu.Unlock()
	_ = sess.ServerFlush(srv) // the answers read before the loss are the client's
	sess.srv.pool.Release(srv)
	if idle {
		return
	}
	sess.log.Info("client disconnected: its server connection was lost", zap.Error(err))
	if !errors.Is(err, io.EOF) {
		resetOnClose(sess.conn)
	}
	sess.closeClient()
}

// resetOnClose makes the close of a client's TCP connection (under TLS
// and the raw-socket wrapper, if any) a reset: SO_LINGER 0, so that the
// client reads "connection reset by peer" rather than the end of the
// stream. A Unix socket has no reset: its client sees the end.
func resetOnClose(c net.Conn) {
	for {
		switch x := c.(type) {
		case *tls.Conn:
			c = x.NetConn()
		case *rawsock.Conn:
			c = x.Conn
		case *net.TCPConn:
			_ = x.SetLinger(0)
			return
		default:
			return
		}
	}
}

// idleOnLocked reports whether the client is between transactions on its
// attached connection (transaction mode, nothing in flight or being
// written, no session state): losing the connection costs it nothing.
// Called with mu held.
func (sess *session) idleOnLocked() bool {
	return sess.txMode && sess.q.empty() && sess.tx == 'I' && sess.pins == 0 && !sess.writing
}

// detachLocked forgets the attached connection and what was expected of
// it. Called with mu held.
func (sess *session) detachLocked() {
	sess.server = nil
	sess.answered.Store(false)
	sess.linger = false
	sess.q = queue{items: sess.q.items[:0]}
	if sess.qEmpty != nil {
		close(sess.qEmpty)
		sess.qEmpty = nil
	}
}
