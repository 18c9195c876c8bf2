package proxy

// This file is the server connection's side of the relay: each message the
// server sends is matched against the queue of expected responses and
// forwarded to the client, with the governor's own responses (synthetic
// entries) put in their places and the responses to its own messages
// (suppressed entries) left out.

import (
	"bytes"

	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// Entry flags.
const (
	entSuppress  uint8 = 1 << iota // the governor's own message: its responses are not forwarded
	entSynthetic                   // no server response: the governor answers with synth
	entUnnamed                     // a Parse of the unnamed statement
	entOwnParse                    // the client's own Parse (its failure is the client's)
	entParams                      // a suppressed statement whose ParameterStatus messages reach the client
)

// entry is one expected response, in the order the server sends them.
type entry struct {
	kind  byte // client message type P B D E C S Q F; 'q' the governor's query; 'y' synthetic
	flags uint8
	stmt  *clientStmt // a client's own named Parse: forgotten if it fails
	key   stmtKey     // the statement a Parse prepares
	synth string      // what a synthetic entry sends
	close []byte      // the statement a governor Close closes: closed again if skipped
}

// ServerMessage implements pool.Handler: it follows the server's responses
// against the queue and forwards them to the client.
func (sess *session) ServerMessage(srv *pool.Server, typ byte, data []byte, more int) error {
	sess.mu.Lock()
	if sess.server != srv {
		cur := sess.server
		sess.mu.Unlock()
		sess.log.Warn("dropped a message from a server connection this client no longer holds",
			zap.Uint64("server_id", srv.ID()), zap.String("type", string(typ)), zap.Bool("holds_another", cur != nil))
		return nil
	}
	suppress := false
	if head := sess.q.peek(); head != nil {
		// The parameter changes of an entParams statement reach the client.
		suppress = head.flags&entSuppress != 0 && (typ != 'S' || head.flags&entParams == 0)
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
			if h := sess.q.peek(); h != nil && h.kind == 'P' && h.flags&entUnnamed == 0 {
				sess.srv.known.add(sess.route, h.key)
			}
			sess.popIf('P')
		case '2':
			sess.popIf('B')
		case '3':
			sess.popIf('C')
		case 'n', 'T':
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
		if !suppress && err == nil {
			_, err = sess.cw.Write(data)
			sess.midFrame = more > 0
			if !sess.midFrame && len(sess.pendingNotify) > 0 && err == nil {
				_, err = sess.cw.Write(sess.pendingNotify)
				sess.pendingNotify = sess.pendingNotify[:0]
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
			ss.drop(head.key, false)
			sess.srv.known.forget(sess.route, head.key)
			if head.stmt != nil && sess.stmts[head.stmt.name] == head.stmt {
				delete(sess.stmts, head.stmt.name)
			}
		case head.kind == 'B' || head.kind == 'E':
			if code := errorCode(data); code == "0A000" || code == "26000" {
				// "cached plan must not change result type" (the schema
				// changed) or a statement the server lost: prepare afresh
				// next time.
				sess.dropStale(ss)
			}
		}
	}
	// The server skips everything up to the next Sync; so does the queue
	// (synthetic responses in between are dropped, as the server would
	// not have answered those messages either). A Parse skipped there
	// created nothing: what recorded it as prepared is undone.
	sess.q.pop() // the failed entry itself, handled above
	for h := sess.q.peek(); h != nil && h.kind != 'S'; h = sess.q.peek() {
		if sess.virtual {
			sess.skipped(srv, *h)
		}
		sess.q.pop()
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
		if e.flags&entUnnamed != 0 {
			ss.unnamedOK = false
			if e.flags&entOwnParse != 0 {
				sess.unnamedOK = false
			}
		} else {
			ss.drop(e.key, false)
		}
	}
	if e.stmt != nil && sess.stmts[e.stmt.name] == e.stmt {
		delete(sess.stmts, e.stmt.name)
	}
}

// dropStale forgets the statements of the client's last Bind on this
// connection after the server said their plan is unusable. Without knowing
// which one, it drops all the client's statements from the connection:
// they are re-prepared on their next use. Called with mu held.
func (sess *session) dropStale(ss *serverState) {
	for _, cs := range sess.stmts {
		ss.drop(cs.key, true)
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
// failed, so the client's transaction is gone: tell it and end the session.
func (sess *session) ServerLost(srv *pool.Server, err error) {
	sess.mu.Lock()
	if sess.server != srv {
		sess.mu.Unlock()
		return
	}
	sess.server = nil
	sess.q = queue{items: sess.q.items[:0]}
	if sess.qEmpty != nil {
		close(sess.qEmpty)
		sess.qEmpty = nil
	}
	sess.mu.Unlock()
	sess.srv.pool.Release(srv)
	sess.terminate(fatalf(codeConnectionFailure, "server connection lost").
		withDetail("The connection between pggovernor and the server failed; the current transaction, if any, is lost.").
		withCause(err))
}
