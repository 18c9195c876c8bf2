package proxy

// This file bounds the memory a client can make the governor hold
// (limits.max_buffered_bytes, pool.max_client_statements). What streams —
// Bind parameters, COPY data, rows — costs only the session's 8 KiB
// buffers. What must be held whole is counted in the Server's wire.Budget:
// the reader's buffer while it grows for a Query or Parse (wire.Reader),
// the kept body of each distinct named statement (stmtTexts), a client's
// last unnamed statement text and its request kept for a retry beyond
// 8 KiB. A message that would take the total over the limit is answered as
// Postgres answers one it cannot allocate (pq_getmessage: the body is
// skipped, then ERROR 53200): the session goes on, and where the client
// holds a server connection the server is made to fail in the message's
// place, so that its transaction (explicit, or the implicit one of an
// extended-protocol batch) aborts as it would have on a direct connection.

import (
	"encoding/binary"
	"errors"
	"fmt"

	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/wire"
)

// refusedText is what the server is sent in place of a message the
// governor refused: a text that fails at the parser, whatever the
// transaction's state, and says in the server's log where it came from.
const refusedText = "pggovernor refused this message (its error went to the client)"

// refusedStmtName names the statement of the failing Parse sent in place
// of a refused one (nothing is ever prepared under it: its text does not
// parse).
var refusedStmtName = []byte("pgg_refused")

// bufferError is what a client is told when its message of type typ and n
// bytes cannot be held under limits.max_buffered_bytes.
func (sess *session) bufferError(typ byte, n int, fatal bool) *clientError {
	limit := sess.srv.buffers.Limit()
	ce := &clientError{fatal: fatal, code: codeOutOfMemory,
		message: fmt.Sprintf("out of memory: holding this message (type %q, %d bytes) would take what pggovernor holds for clients' messages over limits.max_buffered_bytes (%d bytes)", typ, n, limit),
		hint:    "Raise limits.max_buffered_bytes, or send large values as parameters of the extended protocol (Bind), which stream without being held.",
	}
	if int64(n-wire.BufferSize) > limit {
		ce.detail = "A Query or Parse longer than limits.max_buffered_bytes is always refused."
	}
	return ce
}

// readWhole reads the client's next message (type typ, n bytes) whole. A
// message the budget cannot hold is refused (refuseBuffer): frame is nil
// and err is what the pump returns.
func (sess *session) readWhole(typ byte, n int) (frame []byte, err error) {
	frame, err = sess.rd.Frame(n)
	if err != nil && isBudgetError(err) {
		return nil, sess.refuseBuffer(typ, n, true)
	}
	return frame, err
}

// isBudgetError reports whether err is a *wire.BudgetError (kept out of
// the callers so that their success path does not allocate the target).
func isBudgetError(err error) bool {
	var be *wire.BudgetError
	return errors.As(err, &be)
}

// refuseBuffer refuses the client's message of type typ and n bytes
// because holding it would take the buffered bytes over
// limits.max_buffered_bytes. unread says that the message is still in the
// reader (its bytes are then skipped). A Query or Parse gets an ERROR in its
// place (see the file comment); any other message so large ends the
// session with a FATAL.
func (sess *session) refuseBuffer(typ byte, n int, unread bool) error {
	sess.srv.stats.bufferRefusals.Add(1)
	sess.log.Warn("client message refused: holding it would exceed limits.max_buffered_bytes",
		zap.String("sqlstate", codeOutOfMemory), zap.String("type", string(typ)), zap.Int("bytes", n),
		zap.Int64("held_bytes", sess.srv.buffers.Held()), zap.Int64("limit_bytes", sess.srv.buffers.Limit()))
	if typ != 'Q' && typ != 'P' {
		ce := sess.bufferError(typ, n, true)
		sess.sendError(ce)
		return ce
	}
	if err := sess.failInPlace(typ, sess.bufferError(typ, n, false)); err != nil {
		return err
	}
	if !unread {
		return nil
	}
	// The answer is on its way (the client may read it while it sends the
	// rest); the message's bytes are skipped before the next one is read,
	// so the responses stay in order.
	if err := sess.flushServer(); err != nil {
		return err
	}
	if err := sess.rd.Stream(nil, n); err != nil {
		return err
	}
	sess.rd.Shrink()
	return nil
}

// failInPlace answers a Query or Parse (typ) the governor refuses with the
// error ce, in the message's place, as the server would have answered it
// had it failed there: for a client that holds no server connection, ce
// (and ReadyForQuery after a Query); otherwise the server is sent, in the
// message's place, a Query or Parse that fails (refusedText), its error
// replaced by ce, so that the server's transaction — explicit, or the
// implicit one of an extended-protocol batch — aborts where Postgres'
// would have, and its ReadyForQuery says so. After a Parse the pump skips
// to the next Sync, as the server does.
func (sess *session) failInPlace(typ byte, ce *clientError) error {
	msg := string(sess.srv.appendError(nil, ce, sess.user))
	sess.mu.Lock()
	attached := sess.server != nil
	if !attached {
		// Nothing of the client's is on a server: the error is all there
		// is to say (then, for a Query, ReadyForQuery; after a Parse the
		// messages up to Sync are skipped, as the server would).
		if typ == 'Q' {
			msg += string(readyForQuery('I'))
		}
		sess.pushSynthetic(msg)
		sess.mu.Unlock()
		if typ == 'P' {
			sess.skipToSync = true
		}
		return nil
	}
	sess.mu.Unlock()
	srv, ok, err := sess.needServer(typ)
	if !ok {
		return err
	}
	// The server fails in the message's place; its error is replaced by
	// the governor's.
	var out []byte
	sess.mu.Lock()
	if typ == 'Q' {
		out = wire.AppendHeader(out, 'Q', len(refusedText)+1)
		out = append(append(out, refusedText...), 0)
		if sess.virtual {
			sess.stmtsOf(srv).unnamedOK = false // a simple query replaces the server's unnamed statement
		}
		sess.push(entry{kind: 'Q', flags: entReplaceError, synth: msg})
	} else {
		start := len(out)
		out = append(out, 'P', 0, 0, 0, 0)
		out = append(append(out, refusedStmtName...), 0)
		out = append(append(out, refusedText...), 0, 0, 0) // no parameter types
		wire.SetLength(out, start)
		sess.push(entry{kind: 'P', flags: entReplaceError, synth: msg})
		sess.unsynced = true
		sess.skipToSync = true
	}
	sess.sending()
	sess.mu.Unlock()
	_, err = sess.sw.Write(out)
	return sess.serverWriteErr(err)
}

// tooManyStatements is the error for a Parse beyond
// pool.max_client_statements.
func (sess *session) tooManyStatements() *clientError {
	sess.srv.stats.stmtRefusals.Add(1)
	max := sess.srv.cfg.Pool.MaxClientStatements
	sess.log.Warn("client Parse refused: the client holds pool.max_client_statements named statements",
		zap.String("sqlstate", codeConfigLimitExceeded), zap.Int("limit", max))
	return &clientError{code: codeConfigLimitExceeded,
		message: fmt.Sprintf("too many prepared statements: this client holds pool.max_client_statements (%d) already", max),
		hint:    "Close (DEALLOCATE) prepared statements the client no longer uses, or raise pool.max_client_statements.",
	}
}

// forgetStmtLocked gives back the kept body of a statement the client no
// longer has. Idempotent. Called with mu held.
func (sess *session) forgetStmtLocked(cs *clientStmt) {
	if cs.kept {
		cs.kept = false
		sess.srv.texts.release(cs.key)
	}
}

// dropStmtLocked removes the client's statement name, giving its body
// back. Called with mu held.
func (sess *session) dropStmtLocked(name string) {
	if cs := sess.stmts[name]; cs != nil {
		delete(sess.stmts, name)
		sess.forgetStmtLocked(cs)
	}
}

// dropAllStmtsLocked forgets every named statement of the client. Called
// with mu held.
func (sess *session) dropAllStmtsLocked() {
	for _, cs := range sess.stmts {
		sess.forgetStmtLocked(cs)
	}
	sess.stmts = map[string]*clientStmt{}
}

// forgetUnstored gives back the body of cs unless the client's statements
// hold it (a Parse that did not go through).
func (sess *session) forgetUnstored(cs *clientStmt) {
	sess.mu.Lock()
	if sess.stmts[cs.name] != cs {
		sess.forgetStmtLocked(cs)
	}
	sess.mu.Unlock()
}

// keepStmtText keeps body, the text of the named Parse just read, for the
// statement keyed k: the reader's buffer itself when it grew for the
// message (no copy), else a copy; false when the budget refuses a copy.
func (sess *session) keepStmtText(k stmtKey, body []byte) ([]byte, bool) {
	if len(body) > wire.BufferSize {
		if _, held, ok := sess.rd.TakeBuffer(); ok {
			return sess.srv.texts.holdOwned(k, body, held), true
		}
	}
	return sess.srv.texts.hold(k, body)
}

// reserveUnnamed provides, before the client's unnamed Parse of body (just
// read) is sent, for keeping body beyond 8 KiB: the reader's buffer taken
// whole when it grew for the message, else a reservation for a copy; false
// when the budget refuses it. keepUnnamedLocked then keeps body;
// releaseUnnamedReservation gives back what was not used. Nothing is
// needed up to 8 KiB (a reused buffer).
func (sess *session) reserveUnnamed(body []byte) bool {
	sess.unnamedTaken = false
	if len(body) <= wire.BufferSize {
		return true
	}
	if _, held, ok := sess.rd.TakeBuffer(); ok {
		sess.unnamedPending, sess.unnamedTaken = held, true
		return true
	}
	if !sess.srv.buffers.Reserve(len(body)) {
		return false
	}
	sess.unnamedPending = len(body)
	return true
}

func (sess *session) releaseUnnamedReservation() {
	sess.srv.buffers.Return(sess.unnamedPending)
	sess.unnamedPending, sess.unnamedTaken = 0, false
}

// keepUnnamedLocked keeps body as the client's last unnamed Parse (after
// its name): in a reused buffer up to 8 KiB; beyond, in what
// reserveUnnamed provided, counted. Called with mu held.
func (sess *session) keepUnnamedLocked(body []byte) {
	if len(body) <= wire.BufferSize {
		if sess.unnamedHeld > 0 {
			// Never reuse a large one: it may be a reader's buffer.
			sess.srv.buffers.Return(sess.unnamedHeld)
			sess.unnamedHeld = 0
			sess.unnamedParse = nil
		}
		sess.unnamedParse = append(sess.unnamedParse[:0], body...)
		return
	}
	sess.srv.buffers.Return(sess.unnamedHeld)
	sess.unnamedHeld = sess.unnamedPending
	if sess.unnamedTaken {
		sess.unnamedParse = body // the reader's buffer, the session's now
	} else {
		sess.unnamedParse = append([]byte(nil), body...)
	}
	sess.unnamedPending, sess.unnamedTaken = 0, false
}

// keepReplay appends b to the request kept for a retry: its buffer beyond
// 8 KiB is counted in the budget. false when the budget refuses (the
// request is then not kept).
func (sess *session) keepReplay(b []byte) bool {
	need := len(sess.replayBuf) + len(b)
	if need > cap(sess.replayBuf) && need > wire.BufferSize {
		size := min(replayLimit, max(need, 2*cap(sess.replayBuf)))
		extra := size - wire.BufferSize - sess.replayHeld
		if !sess.srv.buffers.Reserve(extra) {
			return false
		}
		sess.replayHeld += extra
		grown := make([]byte, len(sess.replayBuf), size)
		copy(grown, sess.replayBuf)
		sess.replayBuf = grown
	}
	sess.replayBuf = append(sess.replayBuf, b...)
	return true
}

// freeReplay drops a request buffer grown beyond 8 KiB once no request is
// kept in it. Called by the pump.
func (sess *session) freeReplay() {
	if sess.replayHeld > 0 {
		sess.srv.buffers.Return(sess.replayHeld)
		sess.replayHeld = 0
		sess.replayBuf = nil
	}
}

// releaseHeld gives back everything the session holds in the budget: for a
// session that ended.
func (sess *session) releaseHeld() {
	sess.rd.Free()
	sess.freeReplay()
	sess.mu.Lock()
	for _, cs := range sess.stmts {
		sess.forgetStmtLocked(cs)
	}
	sess.settleStmtLogLocked()
	sess.srv.buffers.Return(sess.unnamedHeld)
	sess.unnamedHeld, sess.unnamedParse = 0, nil
	sess.releaseUnnamedReservation()
	sess.mu.Unlock()
}

// injectParse appends to the governor's messages for the server a Parse of
// name with the body parse (query, NUL, parameter types) — with the
// parameter types of paramTypes (a ParameterDescription body) instead, when
// known. A query over 8 KiB is not copied: writeInject writes it in its
// place, so a large statement is not held once more.
func (sess *session) injectParse(name, parse, paramTypes []byte) {
	head, tail := parse, []byte(nil)
	if len(paramTypes) >= 2 {
		if end := indexNUL(parse); end >= 0 {
			head, tail = parse[:end+1], paramTypes
		}
	}
	start := len(sess.inject)
	sess.inject = append(sess.inject, 'P', 0, 0, 0, 0)
	sess.inject = append(append(sess.inject, name...), 0)
	binary.BigEndian.PutUint32(sess.inject[start+1:], uint32(4+len(name)+1+len(head)+len(tail)))
	if len(head) > wire.BufferSize && sess.injectBig == nil {
		sess.injectBig, sess.injectAt = head, len(sess.inject)
	} else {
		sess.inject = append(sess.inject, head...)
	}
	sess.inject = append(sess.inject, tail...)
}

// resetInject empties the governor's messages for the server.
func (sess *session) resetInject() {
	sess.inject = sess.inject[:0]
	sess.injectBig = nil
}

// writeInject writes the governor's messages to the server writer, a large
// Parse body in its place.
func (sess *session) writeInject() error {
	big, at := sess.injectBig, sess.injectAt
	sess.injectBig = nil
	if big == nil {
		_, err := sess.sw.Write(sess.inject)
		return err
	}
	if _, err := sess.sw.Write(sess.inject[:at]); err != nil {
		return err
	}
	if _, err := sess.sw.Write(big); err != nil {
		return err
	}
	_, err := sess.sw.Write(sess.inject[at:])
	return err
}
