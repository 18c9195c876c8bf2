package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// session is one logged-in client.
//
// Two goroutines work on it: the client pump (serve, reading the client and
// writing the attached server) and the reader goroutine of the attached
// server connection (ServerMessage, forwarding to the client). mu guards the
// shared protocol state; wmu guards the client writer. Lock order: mu, then
// wmu. No I/O happens under mu.
type session struct {
	srv      *Server
	id       uint64
	conn     net.Conn
	log      *zap.Logger
	started  time.Time
	txMode   bool
	user     string
	database string
	route    pool.Route
	key      cancelKey
	// settings are the client's startup run-time parameters.
	settings map[string]string
	// slot carries this session as the attached server's handler.
	slot *pool.HandlerSlot
	// stats are the session's figures for the admin console and metrics.
	stats sessionStats
	// console is set for an admin console session (admin.go).
	console *console

	// Owned by the client pump.
	rd           *wire.Reader
	sw           *wire.Writer // to the attached server
	skipToSync   bool         // an error was reported mid-pipeline: drop until Sync
	pinLogged    bool
	bytesIn      atomic.Int64
	bytesOut     atomic.Int64
	transactions atomic.Int64

	wmu        sync.Mutex
	cw         *wire.Writer // to the client
	clientDead bool         // writing to the client failed or it was terminated
	midFrame   bool         // a frame is partly forwarded to the client

	mu              sync.Mutex
	server          *pool.Server // attached server connection
	q               queue        // responses expected from it, in order
	tx              byte         // transaction status of the last ReadyForQuery
	writing         bool         // the pump has bytes for the server not yet flushed
	releaseDeferred bool         // a release waits for the pump's flush
	pins            pinKind
	advisory        int
	pendingUnpin    pinKind // unpins taking effect at the next error-free ReadyForQuery
	batchError      bool    // an error was seen since the last ReadyForQuery
	linger          bool    // an unnamed statement was parsed and not executed yet
	unsynced        bool    // extended-protocol messages were sent after the last Sync
	copyIn          bool    // the server is in COPY FROM STDIN mode
	view            map[string]string
	draining        bool
	qEmpty          chan struct{} // closed when q empties, for cleanup; nil when nobody waits
}

// entry is one expected response, in the order the server will send it.
type entry struct {
	kind     byte // client message type: P B D E C S Q F; or 'q' for the governor's own query
	suppress bool // responses are not forwarded (the governor's own traffic)
}

// queue is a FIFO of entries that reuses its storage.
type queue struct {
	items      []entry
	head, size int
}

func (q *queue) empty() bool { return q.size == 0 }

func (q *queue) push(e entry) {
	if q.size == len(q.items) {
		grown := make([]entry, max(16, 2*len(q.items)))
		for i := 0; i < q.size; i++ {
			grown[i] = q.items[(q.head+i)%len(q.items)]
		}
		q.items, q.head = grown, 0
	}
	q.items[(q.head+q.size)%len(q.items)] = e
	q.size++
}

func (q *queue) peek() *entry {
	if q.size == 0 {
		return nil
	}
	return &q.items[q.head]
}

func (q *queue) pop() {
	q.head = (q.head + 1) % len(q.items)
	q.size--
}

// serve runs the client pump until the client leaves or is terminated,
// then leaves the server connection (if any) clean.
func (sess *session) serve() {
	err := sess.pump()
	sess.finish(err)
	sess.srv.unregister(sess)
	_ = sess.conn.Close()
	outcome := "closed"
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		outcome = err.Error()
	}
	sess.log.Info("client session ended",
		zap.Duration("duration", time.Since(sess.started)),
		zap.Int64("bytes_in", sess.bytesIn.Load()),
		zap.Int64("bytes_out", sess.bytesOut.Load()),
		zap.Int64("transactions", sess.transactions.Load()),
		zap.String("outcome", outcome))
}

// errTerminate ends the pump after the client's Terminate message.
var errTerminate = errors.New("client sent Terminate")

// pump reads client messages and relays them. It flushes what it buffered
// for the server before every blocking read.
func (sess *session) pump() error {
	for {
		typ, n, ok, err := sess.rd.PeekHeader()
		if err != nil {
			return sess.protocolError(err)
		}
		if !ok {
			if err := sess.flushServer(); err != nil {
				return err
			}
			if err := sess.rd.Fill(); err != nil {
				return err
			}
			sess.bytesIn.Add(int64(sess.rd.Buffered()))
			continue
		}
		if err := sess.clientMessage(typ, n); err != nil {
			if errors.Is(err, errTerminate) {
				return nil
			}
			return err
		}
		sess.rd.Shrink()
	}
}

// protocolError tells the client about a malformed message and ends it.
func (sess *session) protocolError(err error) error {
	ce := toClientError(err, true, 0)
	sess.sendError(ce)
	return err
}

// clientMessage handles one client message of type typ and frame length n.
func (sess *session) clientMessage(typ byte, n int) error {
	if sess.skipToSync && typ != 'S' {
		return sess.rd.Stream(nil, n)
	}
	var eff sqlEffects
	switch typ {
	case 'X':
		_ = sess.rd.Stream(nil, n)
		return errTerminate
	case 'Q', 'P':
		frame, err := sess.rd.Frame(n)
		if err != nil {
			return err
		}
		body := frame[wire.HeaderLen:]
		if typ == 'P' {
			name, rest, ok := wire.CString(body)
			query, _, ok2 := wire.CString(rest)
			if !ok || !ok2 {
				return sess.protocolError(fatalf(codeProtocolViolation, "invalid Parse message"))
			}
			eff = scanSQL(query)
			if len(name) > 0 {
				eff.pin |= pinProtocol
			}
		} else {
			eff = scanSQL(body)
		}
		// The frame stays buffered in the reader until sent below: put
		// it back by rewinding is not possible, so send it from here.
		return sess.toServer(typ, frame, 0, eff)
	case 'B', 'D', 'E', 'C', 'S', 'H', 'F', 'd', 'c', 'f':
		if n <= sess.rd.Buffered() {
			frame, _ := sess.rd.Frame(n)
			return sess.toServer(typ, frame, 0, eff)
		}
		if n <= len(sess.rd.Buffer()) {
			frame, err := sess.rd.Frame(n)
			if err != nil {
				return err
			}
			return sess.toServer(typ, frame, 0, eff)
		}
		return sess.toServer(typ, nil, n, eff)
	default:
		return sess.protocolError(fatalf(codeProtocolViolation, "invalid frontend message type %d", typ))
	}
}

// toServer relays a client message: frame holds it whole, or (frame nil)
// streamLen bytes are streamed from the reader.
func (sess *session) toServer(typ byte, frame []byte, streamLen int, eff sqlEffects) error {
	sess.mu.Lock()
	srv := sess.server
	if srv == nil {
		switch typ {
		case 'H', 'd', 'c', 'f':
			// Nothing to flush; copy messages outside COPY are ignored,
			// as Postgres does.
			sess.mu.Unlock()
			return sess.discard(frame, streamLen)
		case 'S':
			sess.mu.Unlock()
			sess.skipToSync = false
			return sess.sendToClient(readyForQuery('I'))
		}
		sess.mu.Unlock()
		var err error
		srv, err = sess.attach()
		if err != nil {
			_ = sess.discard(frame, streamLen)
			return sess.attachFailed(typ, err)
		}
		sess.mu.Lock()
	}
	switch typ {
	case 'P', 'B', 'D', 'E', 'C', 'S', 'Q', 'F':
		sess.q.push(entry{kind: typ})
	}
	switch typ {
	case 'P':
		sess.linger = true
	case 'E', 'Q':
		sess.linger = false
	}
	switch typ {
	case 'P', 'B', 'D', 'E', 'C', 'H':
		sess.unsynced = true
	case 'S':
		sess.unsynced = false
	}
	if eff.pin != 0 || eff.advisory != 0 {
		sess.pins |= eff.pin
		sess.advisory += eff.advisory
		if sess.advisory > 0 {
			sess.pins |= pinAdvisory
		}
	}
	sess.pendingUnpin &^= eff.pin // state created after an unpin in the same batch stays
	sess.pendingUnpin |= eff.unpin
	if eff.advisory < 0 && sess.advisory <= 0 {
		sess.pendingUnpin |= pinAdvisory
	}
	pins := sess.pins
	sess.writing = true
	sess.noteRequestLocked()
	sess.mu.Unlock()
	if pins != 0 && !sess.pinLogged && sess.txMode {
		sess.pinLogged = true
		sess.log.Info("client pinned to its server connection by session state", zap.String("reason", pins.String()))
	}
	if frame != nil {
		_, err := sess.sw.Write(frame)
		return sess.serverWriteErr(err)
	}
	if err := sess.sw.Flush(); err != nil {
		return sess.serverWriteErr(err)
	}
	if err := sess.rd.Stream(srv.Conn(), streamLen); err != nil {
		// The server got part of a frame: it cannot be used again.
		srv.MarkBroken()
		return err
	}
	return nil
}

func (sess *session) discard(frame []byte, streamLen int) error {
	if frame == nil {
		return sess.rd.Stream(nil, streamLen)
	}
	return nil
}

func (sess *session) serverWriteErr(err error) error {
	if err == nil {
		return nil
	}
	sess.sendError(fatalf(codeConnectionFailure, "server connection lost").withCause(err))
	return fmt.Errorf("writing to the server: %w", err)
}

// attach acquires a server connection for the client's next transaction
// and brings it to the client's settings.
func (sess *session) attach() (*pool.Server, error) {
	s := sess.srv
	srv := s.pool.TryAcquire(sess.route) // the common case, without a timer
	if srv == nil {
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Timeouts.QueryWait)
		var err error
		sess.stats.beginWait()
		srv, err = s.pool.Acquire(ctx, sess.route, nil)
		sess.stats.endWait()
		cancel()
		if err != nil {
			return nil, err
		}
	}
	srv.SetHandler(sess.slot)
	sess.sw.Reset(srv.Conn())
	sess.mu.Lock()
	sess.server = srv
	sess.tx = srv.TxStatus
	sess.batchError = false
	var stmts string
	if sess.settingsDiffer(srv, sess.view) {
		stmts = sess.settingStatements(srv, sess.view)
	}
	if stmts != "" {
		sess.q.push(entry{kind: 'q', suppress: true})
		sess.recordSettings(srv)
		sess.writing = true
	}
	sess.mu.Unlock()
	sess.transactions.Add(1)
	if stmts != "" {
		buf := wire.AppendHeader(nil, 'Q', len(stmts)+1)
		buf = append(append(buf, stmts...), 0)
		if _, err := sess.sw.Write(buf); err != nil {
			return srv, sess.serverWriteErr(err)
		}
	}
	return srv, nil
}

// attachFailed reports that no server connection could be had for the
// client's message: an ERROR (the session goes on), then ReadyForQuery for a
// simple query, or skipping to the next Sync for the extended protocol.
func (sess *session) attachFailed(typ byte, err error) error {
	ce := toClientError(err, false, sess.srv.cfg.Timeouts.QueryWait)
	if errors.Is(err, pool.ErrClosed) {
		sess.sendError(ce)
		return err
	}
	sess.log.Warn("no server connection for the client", zap.String("sqlstate", ce.code), zap.Error(err))
	buf := sess.srv.appendError(nil, ce, sess.user)
	switch typ {
	case 'Q', 'F':
		buf = append(buf, readyForQuery('I')...)
	case 'S':
		buf = append(buf, readyForQuery('I')...)
	default:
		sess.skipToSync = true
	}
	return sess.sendToClient(buf)
}

// flushServer writes what the pump buffered for the server; then, if a
// release waited for it, releases.
func (sess *session) flushServer() error {
	if sess.sw.Buffered() > 0 {
		if err := sess.sw.Flush(); err != nil {
			return sess.serverWriteErr(err)
		}
	}
	sess.mu.Lock()
	sess.writing = false
	deferred := sess.releaseDeferred
	sess.releaseDeferred = false
	srv := sess.server
	sess.mu.Unlock()
	if deferred && srv != nil {
		sess.tryRelease(srv)
	}
	return nil
}

// tryRelease returns the server connection to the pool if the client is at
// a safe point: ReadyForQuery idle, nothing in flight, nothing buffered,
// no session state, transaction mode.
func (sess *session) tryRelease(srv *pool.Server) {
	sess.mu.Lock()
	if sess.server != srv || !sess.releasableLocked() {
		sess.mu.Unlock()
		return
	}
	if sess.writing {
		sess.releaseDeferred = true
		sess.mu.Unlock()
		return
	}
	sess.server = nil
	draining := sess.draining
	sess.wmu.Lock() // ordering: nothing from the next server before this flush
	sess.mu.Unlock()
	if !sess.clientDead {
		if err := sess.cw.Flush(); err != nil {
			sess.clientDead = true
		}
	}
	sess.wmu.Unlock()
	sess.srv.pool.Release(srv)
	if draining {
		sess.terminate(fatalf(codeAdminShutdown, "terminating connection due to administrator command").withDetail("pggovernor is shutting down"))
	}
}

func (sess *session) releasableLocked() bool {
	return sess.txMode && sess.q.empty() && sess.tx == 'I' && sess.pins == 0 && !sess.linger
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
		return nil // a late message from a connection already released
	}
	suppress := false
	if head := sess.q.peek(); head != nil {
		suppress = head.suppress
	}
	release := false
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
				if sess.pendingUnpin&pinAdvisory != 0 {
					sess.advisory = 0
				}
			}
			sess.pendingUnpin = 0
			sess.batchError = false
			sess.noteReadyLocked(srv.TxStatus)
		} else if sess.batchError {
			// The governor's own SET failed: the connection's settings
			// are unknown, so it must not serve anyone after this client.
			srv.MarkBroken()
			sess.batchError = false
		}
		release = sess.q.empty() && srv.TxStatus == 'I'
		if sess.qEmpty != nil && sess.q.empty() {
			close(sess.qEmpty)
			sess.qEmpty = nil
		}
	case 'E':
		sess.batchError = true
		sess.copyIn = false
		if head := sess.q.peek(); head != nil {
			switch head.kind {
			case 'P', 'B', 'D', 'E', 'C':
				// The server skips everything up to the next Sync.
				for h := sess.q.peek(); h != nil && h.kind != 'S'; h = sess.q.peek() {
					sess.q.pop()
				}
			}
		}
	case '1':
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
				if !suppress && sess.view != nil {
					sess.view[ps.Name] = ps.Value
				}
			}
		}
	}
	sess.mu.Unlock()

	if !suppress {
		sess.wmu.Lock()
		if !sess.clientDead {
			if _, err := sess.cw.Write(data); err != nil {
				sess.clientDead = true
				_ = sess.conn.Close()
			}
			sess.midFrame = more > 0
			sess.bytesOut.Add(int64(len(data)))
		}
		sess.wmu.Unlock()
	}
	if release {
		sess.mu.Lock()
		if sess.draining && !sess.txMode && sess.q.empty() {
			sess.mu.Unlock()
			sess.wmu.Lock()
			if !sess.clientDead {
				_ = sess.cw.Flush()
			}
			sess.wmu.Unlock()
			sess.terminate(fatalf(codeAdminShutdown, "terminating connection due to administrator command").withDetail("pggovernor is shutting down"))
			return nil
		}
		sess.mu.Unlock()
		sess.tryRelease(srv)
	}
	return nil
}

// completeSync pops the entries a ReadyForQuery completes: everything up to
// and including the first Sync, simple query or governor query.
func (sess *session) completeSync() {
	for h := sess.q.peek(); h != nil; h = sess.q.peek() {
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

// terminate sends a final error (at a message boundary only) and closes
// the client connection; the pump then ends the session.
func (sess *session) terminate(ce *clientError) {
	sess.wmu.Lock()
	if !sess.clientDead {
		if !sess.midFrame {
			_ = sess.conn.SetWriteDeadline(time.Now().Add(time.Second))
			buf := sess.srv.appendError(nil, ce, sess.user)
			if _, err := sess.cw.Write(buf); err == nil {
				_ = sess.cw.Flush()
			}
		}
		sess.clientDead = true
	}
	sess.wmu.Unlock()
	_ = sess.conn.Close()
}

// drain is called at shutdown: an idle client is disconnected now; one in
// a transaction when it finishes (or now, if force).
func (sess *session) drain(force bool) {
	sess.mu.Lock()
	sess.draining = true
	idle := (sess.txMode && sess.server == nil) || (!sess.txMode && sess.q.empty() && sess.tx == 'I')
	sess.mu.Unlock()
	if idle || force {
		sess.terminate(fatalf(codeAdminShutdown, "terminating connection due to administrator command").withDetail("pggovernor is shutting down"))
	}
}

// sendError writes an ErrorResponse to the client.
func (sess *session) sendError(ce *clientError) {
	_ = sess.sendToClient(sess.srv.appendError(nil, ce, sess.user))
}

// sendToClient writes governor-made bytes to the client and flushes.
func (sess *session) sendToClient(b []byte) error {
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	if sess.clientDead {
		return net.ErrClosed
	}
	if _, err := sess.cw.Write(b); err != nil {
		sess.clientDead = true
		return err
	}
	if err := sess.cw.Flush(); err != nil {
		sess.clientDead = true
		return err
	}
	return nil
}

func readyForQuery(status byte) []byte {
	return []byte{'Z', 0, 0, 0, 5, status}
}

// cleanupTimeout bounds how long a departed client's server connection may
// take to finish what was in flight (after a cancel) before it is closed.
const cleanupTimeout = 10 * time.Second

// finish leaves the server connection (if the client still holds one)
// clean after the client is gone: a query in flight is cancelled and
// awaited, an open transaction rolled back, session state discarded; a
// connection that cannot be made clean is closed, never reused.
func (sess *session) finish(cause error) {
	sess.wmu.Lock()
	sess.clientDead = true
	sess.wmu.Unlock()
	sess.mu.Lock()
	srv := sess.server
	if srv == nil {
		sess.mu.Unlock()
		return
	}
	// Complete what the client left half-done so the server comes back
	// to ReadyForQuery: end a COPY FROM STDIN, close an extended batch.
	var tail []byte
	if sess.copyIn {
		msg := "client disconnected during COPY"
		tail = wire.AppendHeader(tail, 'f', len(msg)+1)
		tail = append(append(tail, msg...), 0)
	}
	if sess.unsynced {
		tail = append(tail, 'S', 0, 0, 0, 4)
		sess.q.push(entry{kind: 'S'})
		sess.unsynced = false
	}
	var wait chan struct{}
	if !sess.q.empty() {
		wait = make(chan struct{})
		sess.qEmpty = wait
	}
	sess.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	// Complete frames the client sent are delivered, as a direct server
	// would have received them; then the tail.
	_ = srv.Conn().SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := sess.sw.Write(tail); err != nil || sess.sw.Flush() != nil {
		srv.MarkBroken()
	}
	_ = srv.Conn().SetWriteDeadline(time.Time{})
	if wait != nil {
		if err := srv.Cancel(ctx); err != nil {
			sess.log.Debug("cancel after client left failed", zap.Error(err))
		}
		select {
		case <-wait:
		case <-ctx.Done():
			srv.MarkBroken()
		}
	}
	sess.mu.Lock()
	if sess.server != srv { // released by the reader, or lost
		sess.mu.Unlock()
		return
	}
	sess.server = nil
	tx, pins := srv.TxStatus, sess.pins
	sess.mu.Unlock()
	var queries []string
	if tx != 'I' {
		queries = append(queries, "ROLLBACK")
	}
	if pins != 0 || !sess.txMode {
		queries = append(queries, "DISCARD ALL")
	}
	if srv.Broken() || len(queries) == 0 {
		sess.srv.pool.Release(srv)
		return
	}
	sess.log.Debug("resetting the server connection the client left", zap.Strings("queries", queries), zap.NamedError("cause", cause))
	if err := sess.srv.pool.Reset(ctx, srv, queries...); err != nil {
		sess.log.Info("server connection closed: resetting it after the client left failed", zap.Error(err))
		return
	}
}

// settingStatements returns the SQL that brings srv to what the client
// expects: the reported parameters of view, and its other startup
// settings; "" if nothing differs.
func (sess *session) settingStatements(srv *pool.Server, view map[string]string) string {
	// set_config takes a value as the startup packet does (a list such as
	// search_path is not one quoted identifier, as SET would make it).
	var b strings.Builder
	add := func(name, value string, reset bool) {
		if reset {
			fmt.Fprintf(&b, "RESET %s;", quoteIdent(name))
			return
		}
		fmt.Fprintf(&b, "SELECT pg_catalog.set_config(%s, %s, false);", quoteLiteral(name), quoteLiteral(value))
	}
	wanted := map[string]bool{}
	for _, k := range sortedKeys(sess.settings) {
		if _, reported := reportedName(srv.Params, k); reported {
			continue // part of view
		}
		v := sess.settings[k]
		lk := strings.ToLower(k)
		wanted[lk] = true
		if cur, ok := srv.Settings[lk]; !ok || cur != v {
			add(k, v, false)
		}
	}
	for _, k := range sortedKeys(srv.Settings) {
		if !wanted[k] {
			add(k, "", true)
		}
	}
	for _, k := range settableReported {
		canon, ok := reportedName(srv.Params, k)
		if !ok {
			continue
		}
		if want, ok := view[canon]; ok && srv.Params[canon] != want {
			add(canon, want, false)
		}
	}
	return b.String()
}

// settingsDiffer reports, without allocating, whether settingStatements
// would return anything.
func (sess *session) settingsDiffer(srv *pool.Server, view map[string]string) bool {
	nonReported := 0
	for k, v := range sess.settings {
		if _, reported := reportedName(srv.Params, k); reported {
			continue
		}
		nonReported++
		if cur, ok := srv.Settings[lowerASCII(k)]; !ok || cur != v {
			return true
		}
	}
	if len(srv.Settings) != nonReported {
		return true
	}
	for _, k := range settableReported {
		canon, ok := reportedName(srv.Params, k)
		if !ok {
			continue
		}
		if want, ok := view[canon]; ok && srv.Params[canon] != want {
			return true
		}
	}
	return false
}

// lowerASCII lowercases a parameter name, without allocating when it is
// lowercase already.
func lowerASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			return strings.ToLower(s)
		}
	}
	return s
}

// loginView is what a client should see at login before normalisation:
// the route's defaults for the reported parameters it can change,
// overridden by its own startup values.
func (sess *session) loginView(srv *pool.Server, defaults map[string]string) map[string]string {
	view := make(map[string]string, len(settableReported))
	for _, k := range settableReported {
		if canon, ok := reportedName(srv.Params, k); ok {
			view[canon] = defaults[canon]
		}
	}
	for k, v := range sess.settings {
		if canon, ok := reportedName(srv.Params, k); ok {
			view[canon] = v
		}
	}
	return view
}

// recordSettings notes on srv the non-reported settings the client's SETs
// leave there.
func (sess *session) recordSettings(srv *pool.Server) {
	for k := range srv.Settings {
		delete(srv.Settings, k)
	}
	for k, v := range sess.settings {
		if _, reported := reportedName(srv.Params, k); !reported {
			srv.Settings[strings.ToLower(k)] = v
		}
	}
}

// settableReported are the reported parameters a client can change, which
// the governor keeps in step across server connections.
var settableReported = [...]string{"application_name", "client_encoding", "DateStyle", "IntervalStyle", "TimeZone", "standard_conforming_strings", "default_transaction_read_only", "search_path"}

// reportedName finds a parameter among the server's reported ones, case
// insensitively (GUC names are), returning the server's spelling.
func reportedName(params map[string]string, name string) (string, bool) {
	if _, ok := params[name]; ok {
		return name, true
	}
	for k := range params {
		if strings.EqualFold(k, name) {
			return k, true
		}
	}
	return "", false
}

func sortedKeys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// quoteLiteral quotes a value as an E” literal, correct whatever
// standard_conforming_strings is.
func quoteLiteral(s string) string {
	s = strings.ReplaceAll(s, `\`, `\\`)
	return "E'" + strings.ReplaceAll(s, `'`, `''`) + "'"
}
