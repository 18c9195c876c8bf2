package proxy

// This file keeps one client's session state off other clients' way in
// transaction mode, beyond what the scanner (sqlscan.go) sees in a query
// text:
//
//   - Verification. After a transaction that ran code the scanner cannot
//     see into (DO, CALL, EXECUTE, a function that is not a known built-in),
//     an unlock, a RESET, or whatever pool.session_state_check demands, the
//     connection is not released at ReadyForQuery 'I': the governor sends
//     it one query of its own (not forwarded) that reports the session state
//     the server holds — advisory locks, temporary objects, LISTEN channels,
//     cursors, SQL prepared statements, role, parameters set for the
//     session other than those the governor applied. Clean, the connection
//     is released; otherwise the client is pinned to it, as for state the
//     scanner detects, and verified again at the end of each of its
//     transactions until the state is gone.
//   - Custom parameters (app.tenant) are invisible to pg_settings: after
//     opaque code, a connection released clean is RESET ALL before another
//     client's first message on it.
//   - Startup settings. The governor applies a client's startup parameters
//     with set_config, so the server's RESET default is not the startup
//     value as on a direct connection; after RESET ALL, DISCARD ALL or
//     RESET x they are applied again, before the client's next message.
//   - Lexing mode: the session's standard_conforming_strings, as the server
//     lexes the client's texts.
//
// No I/O happens under mu; the check runs on the server's reader goroutine
// and never waits on the client.

import (
	"errors"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// verifyState is the session's part in verification. Guarded by mu, except
// tempPath (set at login) and check (used by the reader goroutine between
// startCheckLocked and the check's end).
type verifyState struct {
	// due: verify the connection before it is released.
	due bool
	// watch: the client is pinned by state a verification found: verify
	// again at the end of each transaction, to unpin it once it is gone.
	watch bool
	// opaque: code the scanner cannot see into ran since the last check.
	opaque bool
	// reapply: startup settings were reset on the attached connection:
	// restore them before the client's next message; reapplyReported are
	// the reported ones among them (bits of reportedParams).
	reapply         bool
	reapplyReported uint8
	// tempPath: the startup search_path names pg_temp, so CREATE may
	// create temporary objects.
	tempPath bool
	// checking is the connection being verified (detached from the
	// session meanwhile); done is closed when the check ends.
	checking *pool.Server
	done     chan struct{}
	// err says the check ended without an answer (connection lost or
	// timed out): the client's state, if any, is gone with it.
	err error
	// abandoned: nobody waits for the check any more: a connection found
	// dirty is closed instead of going back to the client.
	abandoned bool
	// logged: the first pin found by a check was logged.
	logged bool
	check  *stateCheck
}

// connCheck is what verification keeps with a server connection (in its
// serverState), touched by its holder only.
type connCheck struct {
	// resetDue: opaque code ran on the connection and may have left
	// custom parameters no query can list: RESET ALL before another
	// client (than resetOwner, the session that ran it) uses it.
	resetDue   bool
	resetOwner uint64
}

// Lexing state bits (session.lexState).
const (
	lexSCSOff     uint32           = 1 << iota // standard_conforming_strings is off
	lexUncertain                               // a change of it may be in flight
	checkDeadline = cleanupTimeout             // bounds a verification
)

var (
	errCheckLost    = errors.New("the server connection was lost while pggovernor verified its session state")
	errCheckTimeout = errors.New("verifying the server connection's session state timed out")
)

// scan returns what a client's query text does to session state, lexed as
// the server will lex it: under the session's standard_conforming_strings,
// or both ways when a change of it may be in flight.
func (sess *session) scan(q []byte) sqlEffects {
	st := sess.lexState.Load()
	mode := scanMode(0)
	if st&lexSCSOff != 0 {
		mode = scanBackslashQuotes
	}
	eff := scanSQL(q, mode)
	if st&lexUncertain != 0 {
		eff = either(eff, scanSQL(q, mode^scanBackslashQuotes))
	}
	return eff
}

// noteParam follows a reported parameter the client sees.
func (sess *session) noteParam(name, value string) {
	if !strings.EqualFold(name, "standard_conforming_strings") {
		return
	}
	for {
		old := sess.lexState.Load()
		v := old &^ lexSCSOff
		if strings.EqualFold(value, "off") {
			v |= lexSCSOff
		}
		if sess.lexState.CompareAndSwap(old, v) {
			return
		}
	}
}

// lexSettledLocked: nothing is in flight, so the session's view of
// standard_conforming_strings is the server's. Called with mu held.
func (sess *session) lexSettledLocked() {
	if sess.lexState.Load()&lexUncertain != 0 {
		sess.lexState.And(^lexUncertain)
	}
}

// startupTempPath reports whether startup settings put pg_temp on the
// search_path.
func startupTempPath(settings map[string]string) bool {
	for k, v := range settings {
		if strings.EqualFold(k, "search_path") && strings.Contains(strings.ToLower(v), "pg_temp") {
			return true
		}
	}
	return false
}

// noteEffectsLocked records what a statement about to run does to session
// state. Called with mu held.
func (sess *session) noteEffectsLocked(eff sqlEffects) {
	if eff == (sqlEffects{}) {
		return
	}
	sess.pins |= eff.pin
	sess.pendingUnpin &^= eff.pin // state created after an unpin in the same batch stays
	sess.pendingUnpin |= eff.unpin
	if eff.verify || eff.recheck&sess.pins != 0 || (eff.creates && sess.vs.tempPath) {
		sess.vs.due = true
	}
	if eff.opaque {
		sess.vs.opaque = true
	}
	if eff.scs {
		sess.lexState.Or(lexUncertain)
	}
	if eff.resetAll && sess.server != nil {
		sess.startupResetLocked(sess.server)
	}
	if eff.resetReported != 0 && sess.server != nil && len(sess.settings) > 0 {
		sess.vs.reapply = true
		sess.vs.reapplyReported |= eff.resetReported
	}
	sess.countPinned()
}

// startupResetLocked records that RESET ALL or DISCARD ALL runs on srv:
// the connection no longer carries the client's startup settings, which
// are applied again before its next message. Called with mu held.
func (sess *session) startupResetLocked(srv *pool.Server) {
	if len(sess.settings) == 0 {
		return
	}
	for k := range sess.settings {
		delete(srv.Settings, lowerASCII(k))
	}
	sess.stateOf(srv).paramsChanged()
	sess.vs.reapply = true
	sess.vs.reapplyReported = 0xff
}

// reapplyReportedLocked reports whether a reported startup setting is to
// be restored. Called with mu held.
func (sess *session) reapplyReportedLocked(name string) bool {
	i := reportedIndex([]byte(name))
	return i >= 0 && sess.vs.reapplyReported&(1<<i) != 0
}

// checkDueLocked reports whether the connection must be verified before
// release: something may have created or dropped state the server alone
// knows of, and no state the check cannot see pins the client anyway.
// Called with mu held.
func (sess *session) checkDueLocked() bool {
	if !sess.txMode || sess.pins&^verifiable != 0 {
		return false
	}
	return sess.vs.due || sess.vs.watch || sess.srv.cfg.Pool.SessionStateCheck == config.SessionStateCheckAlways
}

// startCheckLocked detaches srv from the session for its verification: the
// check's responses go to the check's own handler, and the client's next
// message waits for its outcome (attach). Called with mu held; the caller
// then calls sendCheck without it.
func (sess *session) startCheckLocked(srv *pool.Server) {
	c := sess.vs.check
	if c == nil {
		c = &stateCheck{sess: sess}
		c.slot = pool.NewHandlerSlot(c)
		sess.vs.check = c
	}
	*c = stateCheck{sess: sess, slot: c.slot, query: checkQuery(srv, sess.route.User)}
	sess.vs.checking, sess.vs.done, sess.vs.err, sess.vs.due = srv, make(chan struct{}), nil, false
	srv.SetHandler(c.slot)
	sess.srv.stats.stateChecks.Add(1)
}

// sendCheck writes the verification query to srv.
func (sess *session) sendCheck(srv *pool.Server) {
	q := sess.vs.check.query
	buf := wire.AppendHeader(make([]byte, 0, len(q)+wire.HeaderLen+1), 'Q', len(q)+1)
	buf = append(append(buf, q...), 0)
	_ = srv.Conn().SetWriteDeadline(time.Now().Add(checkDeadline))
	_, err := srv.Conn().Write(buf)
	_ = srv.Conn().SetWriteDeadline(time.Time{})
	if err != nil {
		// The reader notices the broken socket too; make sure it does.
		srv.MarkBroken()
		_ = srv.Conn().Close()
	}
}

// awaitCheck waits for a verification of the session's connection in
// flight, if any. It returns an error if the check ended without an answer
// (the client has been told and is being disconnected). Called without mu.
func (sess *session) awaitCheck() error {
	sess.mu.Lock()
	done, srv := sess.vs.done, sess.vs.checking
	sess.mu.Unlock()
	if done == nil {
		return nil
	}
	t := time.NewTimer(checkDeadline)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		sess.mu.Lock()
		if sess.vs.checking == srv {
			sess.vs.abandoned = true
		}
		sess.mu.Unlock()
		sess.log.Warn("verifying the server connection's session state timed out: connection closed", zap.Uint64("server_id", srv.ID()))
		srv.MarkBroken()
		_ = srv.Conn().Close() // the check's ServerLost releases it
		sess.terminate(fatalf(codeConnectionFailure, "server connection lost").
			withDetail("pggovernor could not verify the session state of the server connection within " + checkDeadline.String() + "."))
		return errCheckTimeout
	}
	sess.mu.Lock()
	err := sess.vs.err
	sess.mu.Unlock()
	return err
}

// afterCheck is called by attach: it waits for a verification in flight and
// returns the connection if the check gave it back to the client (state
// found), after restoring startup settings the check found reset.
func (sess *session) afterCheck() (*pool.Server, error) {
	if err := sess.awaitCheck(); err != nil {
		return nil, err
	}
	sess.mu.Lock()
	srv := sess.server
	sess.mu.Unlock()
	if srv == nil {
		return nil, nil
	}
	sess.sw.Reset(srv.Conn())
	sess.transactions.Add(1)
	return srv, sess.reapplyIfDue(srv)
}

// finishCheck acts on the answer of a verification. It runs on srv's
// reader goroutine.
func (sess *session) finishCheck(srv *pool.Server, c *stateCheck) {
	found := c.found
	if c.failed || !c.answered {
		found = pinUnverified
	}
	sess.mu.Lock()
	if sess.vs.checking != srv {
		sess.mu.Unlock()
		return
	}
	done := sess.vs.done
	sess.vs.checking, sess.vs.done = nil, nil
	if len(c.missing) > 0 {
		// Startup settings reset by code the scanner did not see: the
		// connection no longer carries them.
		for _, n := range c.missing {
			delete(srv.Settings, n)
		}
		sess.stateOf(srv).paramsChanged()
	}
	sess.pins = sess.pins&^verifiable | found
	sess.vs.watch = found != 0
	keep := sess.pins != 0 && !sess.vs.abandoned
	closeIt := sess.pins != 0 && sess.vs.abandoned
	logIt := false
	if keep {
		sess.server = srv
		srv.SetHandler(sess.slot)
		sess.tx = srv.TxStatus
		if len(c.missing) > 0 {
			sess.vs.reapply = true
		}
		logIt = !sess.vs.logged
		sess.vs.logged = true
	} else {
		if sess.vs.opaque || sess.srv.cfg.Pool.SessionStateCheck == config.SessionStateCheckAlways {
			ss := sess.stateOf(srv)
			ss.check.resetDue, ss.check.resetOwner = true, sess.id
		}
		sess.vs.opaque = false
	}
	sess.countPinned()
	draining := sess.draining
	sess.mu.Unlock()
	close(done)
	if found != 0 {
		sess.srv.stats.stateFound.Add(1)
	}
	if logIt {
		sess.log.Info("client pinned to its server connection by session state found at release",
			zap.String("reason", found.String()), zap.String("sqlstate", c.code))
	}
	if keep {
		return
	}
	if closeIt {
		srv.MarkBroken()
	}
	sess.srv.pool.Release(srv)
	if draining {
		sess.terminate(fatalf(codeAdminShutdown, "terminating connection due to administrator command").withDetail("pggovernor is shutting down"))
	}
}

// checkLost handles the loss of a connection being verified: the client's
// state, if it had any, is gone with it, so the client is told, as when an
// attached connection is lost.
func (sess *session) checkLost(srv *pool.Server, err error) {
	sess.mu.Lock()
	if sess.vs.checking != srv {
		sess.mu.Unlock()
		return
	}
	done := sess.vs.done
	sess.vs.checking, sess.vs.done, sess.vs.err = nil, nil, errCheckLost
	mayHaveState := sess.pins != 0 || sess.vs.opaque
	sess.mu.Unlock()
	close(done)
	sess.srv.pool.Release(srv)
	if mayHaveState {
		sess.terminate(fatalf(codeConnectionFailure, "server connection lost").
			withDetail("The connection between pggovernor and the server failed; the session state it held is lost.").
			withCause(err))
		return
	}
	sess.mu.Lock()
	sess.vs.err = nil // nothing to lose: the next message gets another connection
	sess.mu.Unlock()
}

// reapplyIfDue restores the client's startup settings on its attached
// connection after they were reset, with a query pipelined before the
// client's next message (not inside an extended-protocol batch nor a
// failed transaction, where it would fail). Parameter changes it causes
// reach the client, which saw the reset.
func (sess *session) reapplyIfDue(srv *pool.Server) error {
	sess.mu.Lock()
	if !sess.vs.reapply || sess.server != srv || sess.unsynced || sess.tx == 'E' {
		sess.mu.Unlock()
		return nil
	}
	sess.vs.reapply = false
	var b strings.Builder
	for _, k := range sortedKeys(sess.settings) {
		v := sess.settings[k]
		canon, reported := reportedName(srv.Params, k)
		switch {
		case reported && !sess.reapplyReportedLocked(canon):
			continue
		case reported:
			// Forced: the RESET's ParameterStatus may not have arrived.
			sess.setViewLocked(canon, v)
			k = canon
		default:
			if cur, ok := srv.Settings[lowerASCII(k)]; ok && cur == v {
				continue
			}
		}
		b.WriteString("SELECT pg_catalog.set_config(" + quoteLiteral(k) + ", " + quoteLiteral(v) + ", false);")
	}
	sess.vs.reapplyReported = 0
	stmts := b.String()
	if stmts == "" {
		sess.mu.Unlock()
		return nil
	}
	sess.recordSettings(srv)
	sess.stateOf(srv).paramsChanged()
	sess.q.push(entry{kind: 'q', flags: entSuppress | entParams})
	sess.writing = true
	sess.mu.Unlock()
	buf := wire.AppendHeader(nil, 'Q', len(stmts)+1)
	buf = append(append(buf, stmts...), 0)
	_, err := sess.sw.Write(buf)
	return sess.serverWriteErr(err)
}

// attachStatementsLocked returns what must run on srv before the client's
// first message when verification requires it: RESET ALL and all the
// client's settings if opaque code of another client ran there; "" if
// nothing (then the usual comparison of settings applies). synth are
// ParameterStatus messages for the client, to send after those
// statements: its startup values of reported parameters, back after a
// RESET of its own (which told it the server's defaults). Called with mu
// held, by attach.
func (sess *session) attachStatementsLocked(srv *pool.Server, st *serverState) (stmts string, synth []string) {
	if sess.vs.reapply {
		sess.vs.reapply = false
		for _, k := range sortedKeys(sess.settings) {
			if canon, ok := reportedName(srv.Params, k); ok && sess.reapplyReportedLocked(canon) && sess.view[canon] != sess.settings[k] {
				sess.setViewLocked(canon, sess.settings[k])
				synth = append(synth, parameterStatus(canon, sess.settings[k]))
			}
		}
		sess.vs.reapplyReported = 0
	}
	if !st.check.resetDue || st.check.resetOwner == sess.id {
		return "", synth
	}
	st.check.resetDue = false
	var b strings.Builder
	b.WriteString("RESET ALL;")
	for _, k := range sortedKeys(sess.settings) {
		if _, reported := reportedName(srv.Params, k); !reported {
			b.WriteString("SELECT pg_catalog.set_config(" + quoteLiteral(k) + ", " + quoteLiteral(sess.settings[k]) + ", false);")
		}
	}
	for _, k := range settableReported {
		if canon, ok := reportedName(srv.Params, k); ok {
			if want, ok := sess.view[canon]; ok {
				b.WriteString("SELECT pg_catalog.set_config(" + quoteLiteral(canon) + ", " + quoteLiteral(want) + ", false);")
			}
		}
	}
	st.paramsChanged()
	st.fittedTo, st.fittedGen = sess.fit, st.gen
	return b.String(), synth
}

// setViewLocked changes one parameter of the client's view (a copy, if it
// is shared with other sessions). Called with mu held.
func (sess *session) setViewLocked(name, value string) {
	if sess.view[name] == value {
		return
	}
	if sess.fit != nil {
		own := make(map[string]string, len(sess.view)+1)
		for k, v := range sess.view {
			own[k] = v
		}
		sess.view, sess.fit = own, nil
	}
	sess.view[name] = value
	sess.noteParam(name, value)
}

func parameterStatus(name, value string) string {
	b, _ := (&pgproto3.ParameterStatus{Name: name, Value: value}).Encode(nil)
	return string(b)
}

// checkQuery is the verification query for srv: one row of the session
// state the server holds. Every name is qualified with pg_catalog and every
// operator spelled OPERATOR(pg_catalog.…), so that a search_path the client
// changed cannot bend it. Columns:
//
//	advisory  session advisory locks held (at ReadyForQuery 'I' every
//	          transaction lock is gone)
//	temp      anything in the session's temporary schema
//	listen    LISTEN channels
//	cursors   open cursors (at 'I', only WITH HOLD ones remain)
//	prepared  SQL-level prepared statements
//	role      SET ROLE in effect, or a session user other than the login one
//	extra     parameters set for the session that the governor did not set
//	          (reported parameters it follows are not counted)
//	settings  the governor's settings for the client that changed
//	          (name) or were reset (-name); compared with set_config(…,
//	          true), whose effect ends with the query's own transaction
func checkQuery(srv *pool.Server, login string) string {
	expected := make([]string, 0, len(srv.Params)+len(srv.Settings))
	for k := range srv.Params {
		expected = append(expected, quoteLiteral(strings.ToLower(k)))
	}
	for k := range srv.Settings {
		expected = append(expected, quoteLiteral(k))
	}
	var b strings.Builder
	b.WriteString(`WITH s AS MATERIALIZED (SELECT pg_catalog.lower(name) AS n, source AS src FROM pg_catalog.pg_settings) SELECT ` +
		`EXISTS (SELECT FROM pg_catalog.pg_locks l WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()), ` +
		`CASE WHEN pg_catalog.pg_my_temp_schema() OPERATOR(pg_catalog.=) 0 THEN false ELSE ` +
		`EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) OR ` +
		`EXISTS (SELECT FROM pg_catalog.pg_type t WHERE t.typnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) OR ` +
		`EXISTS (SELECT FROM pg_catalog.pg_proc p WHERE p.pronamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) END, ` +
		`EXISTS (SELECT FROM pg_catalog.pg_listening_channels()), ` +
		`EXISTS (SELECT FROM pg_catalog.pg_cursors), ` +
		`EXISTS (SELECT FROM pg_catalog.pg_prepared_statements p WHERE p.from_sql), ` +
		`pg_catalog.current_setting('role') OPERATOR(pg_catalog.<>) 'none' OR session_user OPERATOR(pg_catalog.<>) ` + quoteLiteral(login) + `, ` +
		`(SELECT pg_catalog.string_agg(n, ',') FROM s WHERE src OPERATOR(pg_catalog.=) 'session'`)
	if len(expected) > 0 {
		b.WriteString(` AND n OPERATOR(pg_catalog.<>) ALL (ARRAY[` + strings.Join(expected, ",") + `]::pg_catalog.text[])`)
	}
	b.WriteString(`), `)
	if len(srv.Settings) == 0 {
		b.WriteString(`NULL::pg_catalog.text`)
	} else {
		b.WriteString(`(SELECT pg_catalog.string_agg(CASE WHEN x.reset THEN '-' ELSE '' END OPERATOR(pg_catalog.||) x.n, ',') FROM ` +
			`(SELECT t.n, t.v, pg_catalog.current_setting(t.n, true) AS cur, ` +
			`EXISTS (SELECT FROM s WHERE s.n OPERATOR(pg_catalog.=) t.n) AND NOT EXISTS (SELECT FROM s WHERE s.n OPERATOR(pg_catalog.=) t.n AND s.src OPERATOR(pg_catalog.=) 'session') AS reset ` +
			`FROM (VALUES `)
		for i, k := range sortedKeys(srv.Settings) {
			if i > 0 {
				b.WriteString(",")
			}
			b.WriteString("(" + quoteLiteral(k) + "::pg_catalog.text," + quoteLiteral(srv.Settings[k]) + "::pg_catalog.text)")
		}
		b.WriteString(`) AS t(n, v) OFFSET 0) x WHERE x.reset OR NOT COALESCE(x.cur OPERATOR(pg_catalog.=) pg_catalog.set_config(x.n, x.v, true), false))`)
	}
	return b.String()
}

// stateCheck is the handler of a connection under verification.
type stateCheck struct {
	sess  *session
	slot  *pool.HandlerSlot
	query string
	// The answer.
	answered, failed bool
	code             string // SQLSTATE of a failure
	found            pinKind
	missing          []string // startup settings found reset
}

// ServerMessage implements pool.Handler.
func (c *stateCheck) ServerMessage(srv *pool.Server, typ byte, data []byte, more int) error {
	if more > 0 {
		return nil // the answer is one short row
	}
	switch typ {
	case 'D':
		c.answered = c.parseRow(data)
	case 'E':
		c.failed, c.code = true, errorCode(data)
	case 'S':
		var ps pgproto3.ParameterStatus
		if err := ps.Decode(data[wire.HeaderLen:]); err == nil {
			srv.Params[ps.Name] = ps.Value
			if ss, ok := srv.State.(*serverState); ok {
				ss.paramsChanged()
			}
		}
	case 'A':
		// A notification for the client (it LISTENs on this connection).
		_ = c.sess.sendToClient(data)
	case 'Z':
		if len(data) == wire.HeaderLen+1 {
			srv.TxStatus = data[wire.HeaderLen]
		}
		c.sess.finishCheck(srv, c)
	}
	return nil
}

// parseRow reads the check's DataRow.
func (c *stateCheck) parseRow(data []byte) bool {
	var row pgproto3.DataRow
	if err := row.Decode(data[wire.HeaderLen:]); err != nil || len(row.Values) != 8 {
		return false
	}
	for i, k := range [...]pinKind{pinAdvisory, pinTemp, pinListen, pinCursor, pinPrepare, pinRole} {
		if string(row.Values[i]) != "f" {
			c.found |= k
		}
	}
	if row.Values[6] != nil {
		c.found |= pinGUC
	}
	if row.Values[7] != nil {
		for _, n := range strings.Split(string(row.Values[7]), ",") {
			if name, ok := strings.CutPrefix(n, "-"); ok {
				c.missing = append(c.missing, name)
			} else {
				c.found |= pinGUC
			}
		}
	}
	return true
}

// ServerFlush implements pool.Handler.
func (c *stateCheck) ServerFlush(*pool.Server) error { return nil }

// ServerLost implements pool.Handler.
func (c *stateCheck) ServerLost(srv *pool.Server, err error) { c.sess.checkLost(srv, err) }
