package proxy

// This file is the client pump's side of the relay: each client message is
// inspected as little as it needs, rewritten where statements are
// virtualised (transaction mode), recorded in the queue of expected
// responses, and buffered for the attached server connection.

import (
	"net"

	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// Responses the governor answers itself.
const (
	parseCompleteMsg = "1\x00\x00\x00\x04"
	closeCompleteMsg = "3\x00\x00\x00\x04"
)

// bindHeadLen is how much of a Bind must be buffered to rewrite its
// statement name; the rest streams.
const bindHeadLen = 4096

// clientMessage handles one client message of type typ and frame length n.
func (sess *session) clientMessage(typ byte, n int) error {
	if sess.skipToSync && typ != 'S' {
		return sess.rd.Stream(nil, n) // the server would skip it too
	}
	switch typ {
	case 'X':
		_ = sess.rd.Stream(nil, n)
		return errTerminate
	case 'Q':
		frame, err := sess.readWhole(typ, n)
		if frame == nil {
			return err
		}
		return sess.query(frame)
	case 'P':
		frame, err := sess.readWhole(typ, n)
		if frame == nil {
			return err
		}
		return sess.parse(frame)
	case 'B':
		return sess.bind(n)
	case 'D', 'C':
		frame, err := sess.readWhole(typ, n)
		if frame == nil {
			return err
		}
		if typ == 'D' {
			return sess.describe(frame)
		}
		return sess.closeMsg(frame)
	case 'S':
		frame, err := sess.readWhole(typ, n)
		if frame == nil {
			return err
		}
		return sess.sync(frame)
	case 'E', 'H', 'F', 'd', 'c', 'f':
		return sess.passthrough(typ, n)
	default:
		return sess.protocolError(fatalf(codeProtocolViolation, "invalid frontend message type %d", typ))
	}
}

// needServer returns the attached server connection, attaching one for the
// client's message typ if there is none. ok is false when none could be
// had; the client has then been told, and the message must be dropped.
func (sess *session) needServer(typ byte) (srv *pool.Server, ok bool, err error) {
	sess.mu.Lock()
	sess.awaitTimeoutCancelLocked()
	srv = sess.server
	if srv != nil {
		// The pump is about to write to it: a release waits for the
		// pump's next flush, so srv stays the client's meanwhile.
		sess.writing = true
		if sess.relinked {
			sess.relinked = false
			sess.beginAttemptLocked()
		}
	} else if sess.terminated() {
		// The client was disconnected (its server connection lost
		// under a request, or terminated): nothing it sent before runs
		// on another connection.
		sess.mu.Unlock()
		return nil, false, net.ErrClosed
	}
	sess.mu.Unlock()
	if srv != nil {
		if err := sess.reapplyIfDue(srv); err != nil {
			return nil, false, err
		}
		return srv, true, nil
	}
	srv, err = sess.attach()
	if err != nil {
		return nil, false, sess.attachFailed(typ, err)
	}
	return srv, true, nil
}

// query relays a simple Query.
func (sess *session) query(frame []byte) error {
	text, _, ok := wire.CString(frame[wire.HeaderLen:])
	if !ok {
		return sess.protocolError(fatalf(codeProtocolViolation, "invalid Query message"))
	}
	eff := sess.scan(text)
	if handled, err := sess.queryLocally(text, eff); handled || err != nil {
		return err
	}
	if eff.databaseDDL {
		if target, ok := parseDatabaseDDL(text); ok {
			sess.freeDatabaseFor(text, target) // ddl.go
		}
	}
	srv, ok, err := sess.needServer('Q')
	if !ok {
		return err
	}
	sess.mu.Lock()
	if sess.virtual {
		ss := sess.stmtsOf(srv)
		ss.unnamedOK = false // a simple query replaces the unnamed statement
		if eff.discardAll || eff.deallocAll {
			ss.dropAll()
		}
	}
	// On a direct connection a simple query destroys the client's unnamed
	// statement, and DISCARD/DEALLOCATE ALL its named ones.
	sess.unnamedOK = false
	if eff.discardAll || eff.deallocAll {
		sess.dropAllStmtsLocked()
	}
	sess.linger = false
	sess.applyEffects(eff)
	sess.push(entry{kind: 'Q'})
	sess.sending()
	sess.mu.Unlock()
	sess.logPin()
	_, err = sess.sw.Write(frame)
	return sess.serverWriteErr(err)
}

// queryLocally answers the simple queries the governor serves itself:
// DEALLOCATE of a statement it virtualises.
func (sess *session) queryLocally(text []byte, eff sqlEffects) (bool, error) {
	if eff.listen {
		return sess.listenLocally(text)
	}
	if len(text) == 0 || isBlank(text) {
		// An empty query (pq.Listener's ping): answered without a server.
		sess.mu.Lock()
		defer sess.mu.Unlock()
		if sess.server != nil {
			return false, nil
		}
		sess.pushSynthetic("I\x00\x00\x00\x04" + string(readyForQuery('I')))
		return true, nil
	}
	if !sess.virtual || !eff.dealloc {
		return false, nil
	}
	name, ok := parseDeallocate(text)
	if !ok {
		return false, nil
	}
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if _, ok := sess.stmts[name]; !ok || sess.tx == 'E' {
		return false, nil // an SQL-level statement, or an error the server must report
	}
	sess.dropStmtLocked(name)
	sess.pushSynthetic(commandComplete("DEALLOCATE") + string(readyForQuery(sess.tx)))
	return true, nil
}

// parse relays a Parse. In transaction mode a named statement is recorded
// for the client and prepared under its governor-owned name on the server
// connection: always for real, so that ParseComplete (or the error) is
// what the server says of the text now, whatever changed in the schema
// since another connection prepared it. A Describe the governor adds after
// it tells the statement's shape.
func (sess *session) parse(frame []byte) error {
	body := frame[wire.HeaderLen:]
	name, rest, ok := wire.CString(body)
	query, _, ok2 := wire.CString(rest)
	if !ok || !ok2 {
		return sess.protocolError(fatalf(codeProtocolViolation, "invalid Parse message"))
	}
	eff := sess.scan(query)
	if !sess.virtual {
		return sess.plain('P', frame, eff)
	}
	if len(name) == 0 {
		return sess.parseUnnamed(frame, rest, eff)
	}
	sess.mu.Lock()
	_, exists := sess.stmts[string(name)]
	full := len(sess.stmts) >= sess.srv.cfg.Pool.MaxClientStatements
	attached := sess.server != nil
	sess.mu.Unlock()
	if exists {
		return sess.failExtended(&clientError{code: "42P05", message: "prepared statement \"" + string(name) + "\" already exists"})
	}
	if full {
		return sess.failExtended(sess.tooManyStatements())
	}
	key := sess.srv.hasher.key(rest)
	kept, ok := sess.keepStmtText(key, rest)
	if !ok {
		return sess.refuseBuffer('P', len(frame), false)
	}
	cs := &clientStmt{id: sess.srv.stmtIDs.Add(1), name: string(name), key: key, server: serverName(key), parse: kept, kept: true, eff: eff}
	if !attached {
		if done, err := sess.prepareWithoutServer(cs); done || err != nil {
			sess.forgetUnstored(cs)
			return err
		}
	}
	srv, ok, err := sess.needServer('P')
	if !ok {
		sess.forgetUnstored(cs)
		return err
	}
	sess.mu.Lock()
	sess.stmts[cs.name] = cs
	if !sess.answered.Load() {
		sess.stmtLog = append(sess.stmtLog, stmtChange{name: cs.name})
	}
	ss := sess.stmtsOf(srv)
	sess.resetInject()
	sess.closePending(ss)
	if old := ss.lookup(key); old != nil {
		// The connection has the text already, perhaps from before a
		// schema change: closed and parsed again.
		sess.inject = appendClose(sess.inject, 'S', old.name)
		sess.push(entry{kind: 'C', flags: entSuppress, close: old.name})
	}
	copy, evict := ss.add(key, cs.server, cs)
	if evict != nil {
		sess.inject = appendClose(sess.inject, 'S', evict)
		sess.push(entry{kind: 'C', flags: entSuppress, close: evict})
	}
	sess.injectParse(cs.server, cs.parse, nil)
	sess.push(entry{kind: 'P', stmt: cs, key: key, copy: copy})
	sess.inject = appendDescribe(sess.inject, cs.server)
	sess.push(entry{kind: 'D', flags: entSuppress | entShape, stmt: cs, copy: copy})
	sess.srv.notePrepared(false)
	sess.unsynced = true
	sess.sending()
	sess.mu.Unlock()
	return sess.serverWriteErr(sess.writeInject())
}

// parseUnnamed relays a Parse of the unnamed statement and remembers it,
// so that a Bind after a Sync (lib/pq) finds it on whichever connection
// serves the client then.
func (sess *session) parseUnnamed(frame, rest []byte, eff sqlEffects) error {
	if !sess.reserveUnnamed(rest) {
		return sess.refuseBuffer('P', len(frame), false)
	}
	srv, ok, err := sess.needServer('P')
	if !ok {
		sess.mu.Lock()
		sess.releaseUnnamedReservation()
		sess.mu.Unlock()
		return err
	}
	sess.mu.Lock()
	sess.keepUnnamedLocked(rest)
	sess.unnamedKey = sess.srv.hasher.key(rest)
	sess.unnamedOK = true
	sess.unnamedEff = eff
	sess.unnamedSeq++
	sess.unnamedShape = stmtShape{}
	sess.unnamedParamTypes = sess.unnamedParamTypes[:0]
	ss := sess.stmtsOf(srv)
	sess.ownUnnamed(ss)
	sess.push(entry{kind: 'P', flags: entUnnamed | entOwnParse})
	sess.linger = sess.linkUnnamed
	sess.unsynced = true
	sess.sending()
	sess.mu.Unlock()
	_, err = sess.sw.Write(frame)
	return sess.serverWriteErr(err)
}

// ownUnnamed records that the connection's unnamed statement is the
// client's latest. Called with mu held.
func (sess *session) ownUnnamed(ss *serverState) {
	ss.unnamed, ss.unnamedOK = sess.unnamedKey, true
	ss.unnamedOwner, ss.unnamedSeq = sess, sess.unnamedSeq
	ss.unnamedShape = sess.unnamedShape
}

func appendDescribe(dst, name []byte) []byte {
	dst = wire.AppendHeader(dst, 'D', 1+len(name)+1)
	dst = append(dst, 'S')
	return append(append(dst, name...), 0)
}

// flushMsg is a Flush: the server sends what it has buffered.
var flushMsg = []byte{'H', 0, 0, 0, 4}

// closePending appends Closes for statements the server may still hold
// though the governor dropped them.
func (sess *session) closePending(ss *serverState) {
	pending := ss.pendingClose
	ss.pendingClose = nil
	for _, name := range pending {
		sess.inject = appendClose(sess.inject, 'S', name)
		sess.push(entry{kind: 'C', flags: entSuppress, close: name})
	}
}

func appendClose(dst []byte, what byte, name []byte) []byte {
	dst = wire.AppendHeader(dst, 'C', 1+len(name)+1)
	dst = append(dst, what)
	return append(append(dst, name...), 0)
}

// target is where a client's Bind or Describe of a statement goes on the
// server connection.
type target struct {
	name []byte      // the statement's name on the server (nil: unchanged)
	cs   *clientStmt // the client's named statement, if it is one of ours
	copy *serverStmt // its copy on the connection
	// stale is an error the server would give instead of running the
	// statement (its shape changed): the message is sent to a statement
	// that does not exist and the server's error replaced by this one.
	stale string
	// failed: preparing the statement again failed; the server's error
	// went to the client in the message's place, and the server skips to
	// the next Sync, so the pump does too.
	failed bool
}

// staleStmtName names no statement: a message sent to it fails, and its
// error is replaced by the one Postgres gives for a stale statement.
var staleStmtName = []byte("pgg_stale")

// resolve makes sure the statement a Bind or Describe names exists on srv
// as the client's statement, and says where the message goes. Where the
// connection has no copy of the client's statement with its shape, the
// statement is prepared again there (with the parameter types the server
// resolved for the client) and described, and the pump waits for the
// answer before sending the client's message: a copy whose shape differs
// is a statement whose plan changed, which Postgres refuses; a Parse that
// fails is what Postgres' revalidation reports. Called by the pump,
// without mu.
func (sess *session) resolve(srv *pool.Server, name []byte) (target, error) {
	sess.mu.Lock()
	// No answer is awaited now: one left in the channel is a lost
	// connection's (ServerLost posts one in case the pump waits), and
	// must not be taken for the answer to what is prepared below.
	select {
	case <-sess.verifyCh:
	default:
	}
	ss := sess.stmtsOf(srv)
	sess.resetInject()
	sess.closePending(ss)
	var tg target
	var want stmtShape
	verify := false
	if len(name) == 0 {
		switch {
		case !sess.unnamedOK:
			if ss.unnamedOK {
				// The connection holds another client's unnamed
				// statement: close it so that a Bind without a Parse fails
				// as it would on a direct connection.
				sess.inject = appendClose(sess.inject, 'S', nil)
				sess.push(entry{kind: 'C', flags: entSuppress})
				ss.unnamedOK = false
			}
		case ss.unnamedOK && ss.unnamed == sess.unnamedKey &&
			((ss.unnamedOwner == sess && ss.unnamedSeq == sess.unnamedSeq) ||
				(ss.unnamedShape.ok && ss.unnamedShape == sess.unnamedShape)):
			sess.srv.notePrepared(true)
		default:
			// Replayed: the client's last unnamed Parse, with the types
			// the server resolved for it when it was described.
			sess.injectParse(nil, sess.unnamedParse, sess.unnamedParamTypes)
			sess.ownUnnamed(ss)
			sess.srv.notePrepared(false)
			if sess.unnamedShape.ok {
				want, verify = sess.unnamedShape, true
				ss.unnamedShape = stmtShape{}
				sess.push(entry{kind: 'P', flags: entSuppress | entUnnamed | entForwardError})
				sess.inject = appendDescribe(sess.inject, nil)
				sess.push(entry{kind: 'D', flags: entSuppress | entUnnamed | entShape | entVerify})
			} else {
				// Never described to the client: nothing to compare.
				sess.push(entry{kind: 'P', flags: entSuppress | entUnnamed})
			}
		}
	} else if cs := sess.stmts[string(name)]; cs != nil {
		tg.cs, tg.name = cs, cs.server
		if copy := ss.lookup(cs.key); copy != nil && copy.servesClient(cs) {
			tg.copy = copy
			sess.srv.notePrepared(true)
		} else {
			if copy != nil {
				sess.inject = appendClose(sess.inject, 'S', copy.name)
				sess.push(entry{kind: 'C', flags: entSuppress, close: copy.name})
			}
			copy, evict := ss.add(cs.key, cs.server, cs)
			if evict != nil {
				sess.inject = appendClose(sess.inject, 'S', evict)
				sess.push(entry{kind: 'C', flags: entSuppress, close: evict})
			}
			tg.copy = copy
			sess.injectParse(cs.server, cs.parse, cs.paramTypes)
			sess.push(entry{kind: 'P', flags: entSuppress | entForwardError, key: cs.key, copy: copy})
			sess.inject = appendDescribe(sess.inject, cs.server)
			sess.push(entry{kind: 'D', flags: entSuppress | entShape | entVerify, copy: copy})
			sess.srv.notePrepared(false)
			want, verify = cs.shape, true
		}
	}
	if len(sess.inject) > 0 {
		sess.sending()
	}
	sess.mu.Unlock()
	if len(sess.inject) == 0 {
		return tg, nil
	}
	if verify {
		sess.inject = append(sess.inject, flushMsg...)
	}
	if err := sess.writeInject(); err != nil {
		return tg, sess.serverWriteErr(err)
	}
	if !verify {
		return tg, nil
	}
	if err := sess.sw.Flush(); err != nil {
		return tg, sess.serverWriteErr(err)
	}
	r, err := sess.awaitVerify()
	if err != nil {
		return tg, err
	}
	switch {
	case r.failed:
		tg.failed = true
	case !want.ok:
		// Never described before: this is its shape from now on.
		sess.mu.Lock()
		if tg.cs != nil && !tg.cs.shape.ok {
			tg.cs.shape = r.shape
		}
		sess.mu.Unlock()
	case r.shape != want:
		tg.name, tg.stale = staleStmtName, cachedPlanChanged
	}
	return tg, nil
}

// cachedPlanChanged is Postgres' error for a prepared statement whose
// result type changed (plancache.c, RevalidateCachedQuery).
var cachedPlanChanged = string(wire.AppendHeader(nil, 'E', 0)) // set in init

func init() {
	fields := "SERROR\x00VERROR\x00C0A000\x00Mcached plan must not change result type\x00Fplancache.c\x00RRevalidateCachedQuery\x00\x00"
	b := wire.AppendHeader(nil, 'E', len(fields))
	cachedPlanChanged = string(append(b, fields...))
}

// terminated reports whether the session was terminated (quit closed).
func (sess *session) terminated() bool {
	select {
	case <-sess.quit:
		return true
	default:
		return false
	}
}

// awaitVerify waits for the answer to a statement the pump prepared again.
func (sess *session) awaitVerify() (verifyResult, error) {
	select {
	case r := <-sess.verifyCh:
		return r, nil
	case <-sess.quit:
		return verifyResult{}, net.ErrClosed
	}
}

// verifyResult is what the server said of a statement prepared again
// before a client's Bind or Describe.
type verifyResult struct {
	shape  stmtShape
	failed bool // refused (its error went to the client), or the connection was lost
}

// skipFailed drops the client's message after resolve failed: the server
// skips to the next Sync, and so does the pump.
func (sess *session) skipFailed(n int) error {
	sess.skipToSync = true
	return sess.rd.Stream(nil, n)
}

// bind relays a Bind, naming the governor-owned statement.
func (sess *session) bind(n int) error {
	head := min(n, bindHeadLen)
	if err := sess.rd.Ensure(head); err != nil {
		return err
	}
	buf := sess.rd.Bytes()[:head]
	_, rest, ok := wire.CString(buf[wire.HeaderLen:])
	stmt, _, ok2 := wire.CString(rest)
	if !ok || !ok2 {
		return sess.protocolError(fatalf(codeProtocolViolation, "invalid Bind message"))
	}
	srv, ok, err := sess.needServer('B')
	if !ok {
		_ = sess.rd.Stream(nil, n)
		return err
	}
	var tg target
	if sess.virtual {
		// The reader's buffer is unchanged by what follows: the pump reads
		// no more of the client until this frame is sent.
		if tg, err = sess.resolve(srv, stmt); err != nil {
			return err
		}
		if tg.failed {
			return sess.skipFailed(n)
		}
	}
	buf = sess.rd.Bytes()[:head]
	portal, rest, _ := wire.CString(buf[wire.HeaderLen:])
	stmt, after, _ := wire.CString(rest)
	sess.mu.Lock()
	switch {
	case tg.cs != nil:
		sess.applyEffects(tg.cs.eff)
	case sess.virtual && len(stmt) == 0 && sess.unnamedOK:
		sess.applyEffects(sess.unnamedEff)
	}
	e := entry{kind: 'B', copy: tg.copy}
	if tg.stale != "" {
		e.flags, e.synth = entReplaceError, tg.stale
	}
	sess.push(e)
	sess.unsynced = true
	sess.sending()
	sess.mu.Unlock()
	sess.logPin()
	afterOff := head - len(after) // where the parameters start in the frame
	if tg.name != nil {
		// Rewrite: header with the new length, portal, the new name.
		newLen := n - len(stmt) + len(tg.name)
		hdr := sess.scratch[:0]
		hdr = wire.AppendHeader(hdr, 'B', newLen-wire.HeaderLen)
		hdr = append(append(hdr, portal...), 0)
		hdr = append(append(hdr, tg.name...), 0)
		sess.scratch = hdr
		if _, err := sess.sw.Write(hdr); err != nil {
			return sess.serverWriteErr(err)
		}
		sess.rd.Discard(afterOff)
		return sess.streamRest(srv, n-afterOff)
	}
	return sess.streamRest(srv, n)
}

// streamRest writes the next k bytes of the reader to the server: through
// the buffer when they are all buffered, else streamed.
func (sess *session) streamRest(srv *pool.Server, k int) error {
	if k <= sess.rd.Buffered() {
		b, _ := sess.rd.Frame(k)
		_, err := sess.sw.Write(b)
		return sess.serverWriteErr(err)
	}
	if err := sess.sw.Flush(); err != nil {
		return sess.serverWriteErr(err)
	}
	if err := sess.rd.Stream(srv.Conn(), k); err != nil {
		srv.MarkBroken() // the server got part of a frame
		return err
	}
	return nil
}

// describe relays a Describe; a statement Describe names the
// governor-owned statement. The client's Describe of its unnamed statement
// also tells the governor the statement's shape.
func (sess *session) describe(frame []byte) error {
	body := frame[wire.HeaderLen:]
	if len(body) < 2 {
		return sess.protocolError(fatalf(codeProtocolViolation, "invalid Describe message"))
	}
	name, _, ok := wire.CString(body[1:])
	if !ok {
		return sess.protocolError(fatalf(codeProtocolViolation, "invalid Describe message"))
	}
	srv, ok, err := sess.needServer('D')
	if !ok {
		return err
	}
	var tg target
	e := entry{kind: 'D'}
	if sess.virtual && body[0] == 'S' {
		// frame lies in the reader's buffer, which resolve leaves alone.
		if tg, err = sess.resolve(srv, name); err != nil {
			return err
		}
		if tg.failed {
			sess.skipToSync = true
			return nil
		}
		e.copy = tg.copy
		if len(name) == 0 && sess.unnamedOK {
			e.flags |= entShape | entUnnamed
		}
		if tg.stale != "" {
			e.flags, e.synth = entReplaceError, tg.stale
		}
	}
	sess.mu.Lock()
	sess.push(e)
	sess.unsynced = true
	sess.sending()
	sess.mu.Unlock()
	if tg.name != nil {
		sess.inject = appendDescribe(sess.inject[:0], tg.name)
		_, err = sess.sw.Write(sess.inject)
	} else {
		_, err = sess.sw.Write(frame)
	}
	return sess.serverWriteErr(err)
}

// closeMsg relays a Close. In transaction mode, closing a statement is the
// client's business only: its name is forgotten and CloseComplete answered
// by the governor (the server keeps the statement for others).
func (sess *session) closeMsg(frame []byte) error {
	body := frame[wire.HeaderLen:]
	if len(body) < 2 {
		return sess.protocolError(fatalf(codeProtocolViolation, "invalid Close message"))
	}
	name, _, ok := wire.CString(body[1:])
	if !ok {
		return sess.protocolError(fatalf(codeProtocolViolation, "invalid Close message"))
	}
	if sess.virtual && body[0] == 'S' {
		sess.mu.Lock()
		if len(name) == 0 {
			sess.unnamedOK = false
		} else if cs := sess.stmts[string(name)]; cs != nil {
			delete(sess.stmts, string(name))
			if sess.server != nil && !sess.answered.Load() {
				sess.stmtLog = append(sess.stmtLog, stmtChange{name: cs.name, closed: cs}) // its body is kept for a retry
			} else {
				sess.forgetStmtLocked(cs)
			}
		}
		sess.pushSynthetic(closeCompleteMsg)
		sess.unsynced = sess.unsynced || sess.server != nil
		sess.mu.Unlock()
		return nil
	}
	sess.mu.Lock()
	attached := sess.server != nil
	sess.mu.Unlock()
	if !attached && sess.virtual {
		// A portal lives only inside the transaction of an attached
		// connection; closing one that does not exist is not an error.
		sess.mu.Lock()
		sess.pushSynthetic(closeCompleteMsg)
		sess.mu.Unlock()
		return nil
	}
	return sess.plain('C', frame, sqlEffects{})
}

// sync relays a Sync, or answers it when no server connection is attached.
func (sess *session) sync(frame []byte) error {
	sess.skipToSync = false
	sess.mu.Lock()
	if sess.server == nil {
		sess.pushSynthetic(string(readyForQuery('I')))
		sess.mu.Unlock()
		return nil
	}
	sess.push(entry{kind: 'S'})
	sess.unsynced = false
	sess.sending()
	sess.mu.Unlock()
	_, err := sess.sw.Write(frame)
	return sess.serverWriteErr(err)
}

// passthrough relays Execute, Flush, FunctionCall and the COPY messages.
func (sess *session) passthrough(typ byte, n int) error {
	sess.mu.Lock()
	attached := sess.server != nil
	sess.mu.Unlock()
	if !attached {
		switch typ {
		case 'H', 'd', 'c', 'f':
			// Nothing to flush; COPY messages outside COPY are ignored,
			// as Postgres does.
			return sess.rd.Stream(nil, n)
		}
	}
	srv, ok, err := sess.needServer(typ)
	if !ok {
		_ = sess.rd.Stream(nil, n)
		return err
	}
	sess.mu.Lock()
	switch typ {
	case 'E':
		sess.push(entry{kind: 'E'})
		sess.linger = false
		sess.unsynced = true
	case 'F':
		sess.push(entry{kind: 'F'})
	case 'H':
		sess.unsynced = true
	}
	sess.sending()
	sess.mu.Unlock()
	return sess.streamRest(srv, n)
}

// plain relays a whole frame unchanged with its queue entry.
func (sess *session) plain(typ byte, frame []byte, eff sqlEffects) error {
	if _, ok, err := sess.needServer(typ); !ok {
		return err
	}
	sess.mu.Lock()
	if typ == 'P' && !sess.virtual {
		sess.linger = false
	}
	sess.applyEffects(eff)
	sess.push(entry{kind: typ})
	sess.unsynced = true
	sess.sending()
	sess.mu.Unlock()
	sess.logPin()
	_, err := sess.sw.Write(frame)
	return sess.serverWriteErr(err)
}

// failExtended reports an error the governor detects in a Parse, in its
// place in the pipeline, then skips the client's messages up to Sync, as
// the server would; a server connection the client holds fails in the
// message's place too, so that its transaction aborts (failInPlace).
func (sess *session) failExtended(ce *clientError) error {
	return sess.failInPlace('P', ce)
}

// sending records that the pump has bytes for the server (a release waits
// for their flush) and notes the request for the statistics. Called with
// mu held.
func (sess *session) sending() {
	sess.writing = true
	sess.noteRequestLocked()
}

// push adds an entry to the queue. Called with mu held.
func (sess *session) push(e entry) { sess.q.push(e) }

// pushSynthetic queues a response the governor makes itself, in its place:
// after what is in flight, or (nothing in flight) straight to the client
// before the pump next blocks. Called with mu held.
func (sess *session) pushSynthetic(msg string) {
	if sess.q.empty() {
		sess.synthOut = append(sess.synthOut, msg...)
		return
	}
	sess.q.push(entry{kind: 'y', flags: entSynthetic, synth: msg})
}

// applyEffects records the session state a statement creates or drops
// (verify.go). A request with such effects is not retried on another
// connection (retry.go). Called with mu held.
func (sess *session) applyEffects(eff sqlEffects) {
	if eff.pin|eff.unpin|eff.recheck != 0 || eff.verify || eff.opaque || eff.resetAll || eff.resetReported != 0 {
		sess.replayable = false
	}
	sess.noteEffectsLocked(eff)
}

// countPinned keeps the server's pinned-clients count. Called with mu held.
func (sess *session) countPinned() {
	pinned := sess.pins != 0 && sess.txMode
	if pinned != sess.pinCounted {
		sess.pinCounted = pinned
		if pinned {
			sess.srv.stats.pinned.Add(1)
		} else {
			sess.srv.stats.pinned.Add(-1)
		}
	}
}

// logPin logs the first pin of the session, once, with its reason.
func (sess *session) logPin() {
	if sess.pinLogged || !sess.txMode {
		return
	}
	sess.mu.Lock()
	pins := sess.pins
	sess.mu.Unlock()
	if pins != 0 {
		sess.pinLogged = true
		sess.log.Info("client pinned to its server connection by session state", zap.String("reason", pins.String()))
	}
}

func (sess *session) stmtsOf(srv *pool.Server) *serverState { return sess.stateOf(srv) }

// stateOf returns what the proxy keeps with srv.
func (sess *session) stateOf(srv *pool.Server) *serverState {
	return stmtsOf(srv, sess.srv.cfg.Pool.MaxPreparedStatements)
}

func isBlank(b []byte) bool {
	lx := lexer{src: b}
	for t := lx.next(); t.kind != tokEOF; t = lx.next() {
		if !(t.kind == tokPunct && t.text(b)[0] == ';') {
			return false
		}
	}
	return true
}

// commandComplete encodes a CommandComplete with tag.
func commandComplete(tag string) string {
	b := wire.AppendHeader(nil, 'C', len(tag)+1)
	b = append(append(b, tag...), 0)
	return string(b)
}
