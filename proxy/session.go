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
	// virtual is set in transaction mode: prepared statements are the
	// governor's business, rewritten per server connection.
	virtual bool
	// linkUnnamed keeps a server linked from a Parse of the unnamed
	// statement until its Execute (for at most unnamedLinger after a
	// Sync), instead of preparing it again on the connection that serves
	// the Bind (unless Options.ReplayUnnamed).
	linkUnnamed bool
	// stats are the session's figures for the admin console and metrics.
	stats sessionStats
	// console is set for an admin console session (admin.go).
	console *console
	// pending counts the session among the connections logging in until
	// its welcome (pending.go).
	pending *pendingLogin

	// Owned by the client pump.
	rd         *wire.Reader
	sw         *wire.Writer // to the attached server
	skipToSync bool         // an error was reported mid-pipeline: drop until Sync
	pinLogged  bool
	inject     []byte // messages the governor adds before the client's, reused
	// injectBig is a large Parse body written in inject's place at
	// injectAt, instead of being copied into it (memory.go).
	injectBig    []byte
	injectAt     int
	scratch      []byte // a rewritten header, reused
	synthOut     []byte // governor responses due before the pump next blocks
	unnamedParse []byte // the client's last unnamed Parse, after its name
	// unnamedHeld is what unnamedParse holds in the Server's budget (its
	// size, when over 8 KiB), unnamedPending what was reserved for the
	// next one (memory.go); written by the pump, under mu where the
	// reader may look (unnamedParse).
	unnamedHeld, unnamedPending int
	unnamedTaken                bool // unnamedPending is a reader's buffer taken whole
	// verifyCh carries the server's answer to a statement the pump
	// prepared again and waits for (resolve); quit is closed when the
	// session is terminated, so that such a wait ends.
	verifyCh chan verifyResult
	quit     chan struct{}
	quitOnce sync.Once
	// The request of the current attachment, kept for a retry on another
	// connection (retry.go): replayBuf holds its messages; curStart and
	// curCaptured say where the message being handled starts and whether
	// it was kept; stmtLog is what the request did to the client's named
	// statements, in order (under mu).
	replayBuf   []byte
	replayHeld  int // what replayBuf holds in the Server's budget
	curStart    int
	curCaptured bool
	stmtLog     []stmtChange
	// answered is false from an attachment until the server's first
	// answer on it; retryPending asks the pump to retry the request.
	answered     atomic.Bool
	retryPending atomic.Bool
	bytesIn      atomic.Int64
	bytesOut     atomic.Int64
	transactions atomic.Int64

	listening bool // subscribed through the route's listen hub

	// lexState says how the server lexes the client's texts (verify.go).
	lexState atomic.Uint32
	// vs is the session's part in verifying server connections
	// (verify.go), guarded by mu.
	vs verifyState

	// nq is the backlog of notifications from the listen hub (notify.go).
	nq notifyQueue

	// wd enforces timeouts.query and timeouts.idle_in_transaction
	// (timeouts.go); under mu.
	wd watchdog

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
	pinCounted      bool
	pendingUnpin    pinKind // unpins taking effect at the next error-free ReadyForQuery
	batchError      bool    // an error was seen since the last ReadyForQuery
	linger          bool    // linkUnnamed: an unnamed statement awaits its Execute
	replayable      bool    // the current request may be retried on another connection
	relinked        bool    // the next request goes to the lingering connection: it begins an attempt
	retries         int     // how often the current request moved on
	lingerTimer     *time.Timer
	unsynced        bool // extended-protocol messages were sent after the last Sync
	copyIn          bool // the server is in COPY FROM STDIN mode
	view            map[string]string
	// fit is the welcome entry whose view this session still shares (nil
	// once it changed a parameter): a server fitted to it fits this client.
	fit        *welcomeEntry
	draining   bool
	qEmpty     chan struct{} // closed when q empties, for cleanup; nil when nobody waits
	stmts      map[string]*clientStmt
	unnamedKey stmtKey    // the client's unnamed statement
	unnamedOK  bool       // the client has an unnamed statement
	unnamedEff sqlEffects // what executing it does to session state
	unnamedSeq uint64     // counts the client's unnamed Parses
	// unnamedShape and unnamedParamTypes are what the server said of the
	// client's unnamed statement when the client described it.
	unnamedShape      stmtShape
	unnamedParamTypes []byte
	// paramDesc holds a ParameterDescription until the RowDescription or
	// NoData of the same Describe (reader side, under mu).
	paramDesc   []byte
	synthBefore []string // synthetic responses due before the current server message
	synthAfter  []string // and after it
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
	sess.stopWatch()
	// Nothing more is written to the client: a write blocked on a client
	// that stopped reading gives up, so that finish can take wmu.
	_ = sess.conn.SetWriteDeadline(time.Now().Add(time.Second))
	sess.finish(err)
	if sess.listening {
		if err := sess.srv.hub(sess.route).unlisten(sess, "", false); err != nil {
			sess.log.Info("UNLISTEN for a departed client failed", zap.Error(err))
		}
	}
	sess.srv.unregister(sess)
	sess.srv.pool.RemoveClient(sess.route)
	_ = sess.conn.Close()
	sess.stopNotifier()
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
		if sess.retryPending.Load() {
			sess.takeRetry()
		}
		typ, n, ok, err := sess.rd.PeekHeader()
		if err != nil {
			return sess.protocolError(err)
		}
		if !ok {
			if err := sess.flushServer(); err != nil {
				return err
			}
			sess.mu.Lock()
			idle := sess.server == nil
			sess.mu.Unlock()
			if idle && sess.rd.Buffered() == 0 {
				// Nothing in flight and no server: the client may stay
				// idle for long, so it holds no buffer meanwhile (nor a
				// request kept for a retry: none is in progress).
				sess.releaseBuffers()
				sess.freeReplay()
			}
			if err := sess.rd.Fill(); err != nil {
				if sess.retryPending.Load() {
					continue // woken by a deadline to retry the request
				}
				return err
			}
			sess.bytesIn.Add(int64(sess.rd.Buffered()))
			continue
		}
		if err := sess.capture(n); err != nil {
			return err
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

// releaseBuffers gives the session's buffers back to the pool (those
// holding nothing). Called by the pump.
func (sess *session) releaseBuffers() {
	sess.rd.Release()
	sess.sw.Release()
	sess.wmu.Lock()
	sess.cw.Release()
	sess.wmu.Unlock()
}

// protocolError tells the client about a malformed message and ends it.
func (sess *session) protocolError(err error) error {
	ce := toClientError(err, true, 0)
	sess.sendError(ce)
	return err
}

func (sess *session) serverWriteErr(err error) error {
	if err == nil {
		return nil
	}
	if sess.awaitingVerdict() {
		// The connection may have been terminated before it read the
		// request: its reader decides whether the request moves on
		// (retry.go) or the client learns what the server said.
		return nil
	}
	sess.sendError(fatalf(codeConnectionFailure, "server connection lost").withCause(err))
	return fmt.Errorf("writing to the server: %w", err)
}

// attach acquires a server connection for the client's next transaction
// and brings it to the client's settings.
func (sess *session) attach() (*pool.Server, error) {
	if srv, err := sess.afterCheck(); srv != nil || err != nil {
		return srv, err // the connection a verification gave back
	}
	s := sess.srv
	for {
		srv := s.pool.TryAcquire(sess.route) // the common case, without a timer
		if srv == nil {
			// A wait ends when the shutdown begins: a client that holds
			// no server connection is not in a transaction, so it is
			// disconnected at once.
			ctx, cancel := context.WithTimeout(s.stopCtx, s.cfg.Timeouts.QueryWait)
			var err error
			sess.stats.beginWait()
			srv, err = s.pool.Acquire(ctx, sess.route, nil)
			sess.stats.endWait()
			cancel()
			if err != nil {
				if s.stopCtx.Err() != nil {
					err = pool.ErrClosed
				}
				return nil, err
			}
		}
		err := sess.attachServer(srv)
		if !errors.Is(err, errLostAtAttach) {
			return srv, err
		}
		// The connection failed as it was handed over (its backend was
		// terminated while idle): nothing of the client's was written to
		// it, so another one serves instead.
		s.pool.Release(srv)
	}
}

// errLostAtAttach: the connection being attached had already failed.
var errLostAtAttach = errors.New("server connection lost as it was attached")

// attachServer makes srv the client's server connection and brings it to
// the client's settings.
func (sess *session) attachServer(srv *pool.Server) error {
	srv.SetHandler(sess.slot)
	sess.mu.Lock()
	if srv.Broken() {
		// Failed before the handler was in place (its reader may have
		// reported it to nobody); after this check, its loss reaches
		// ServerLost with the connection the client's.
		sess.mu.Unlock()
		srv.SetHandler(nil)
		return errLostAtAttach
	}
	sess.sw.Reset(srv.Conn())
	sess.server = srv
	sess.writing = true // the pump writes next (see needServer)
	sess.beginAttemptLocked()
	sess.tx = srv.TxStatus
	sess.batchError = false
	st := sess.stateOf(srv)
	stmts, synth := sess.attachStatementsLocked(srv, st)
	if stmts == "" && (sess.fit == nil || st.fittedTo != sess.fit || st.fittedGen != st.gen) {
		if sess.settingsDiffer(srv, sess.view) {
			stmts = sess.settingStatements(srv, sess.view)
		}
		st.fittedTo, st.fittedGen = sess.fit, st.gen
	}
	if stmts != "" {
		sess.q.push(entry{kind: 'q', flags: entSuppress})
		sess.recordSettings(srv)
	}
	for _, m := range synth {
		sess.pushSynthetic(m)
	}
	sess.mu.Unlock()
	sess.transactions.Add(1)
	if stmts != "" {
		buf := wire.AppendHeader(nil, 'Q', len(stmts)+1)
		buf = append(append(buf, stmts...), 0)
		if _, err := sess.sw.Write(buf); err != nil {
			return sess.serverWriteErr(err)
		}
	}
	return nil
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
	if len(sess.synthOut) > 0 {
		// Governor responses due before anything in flight is answered.
		err := sess.sendToClient(sess.synthOut)
		sess.synthOut = sess.synthOut[:0]
		if err != nil {
			return err
		}
	}
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
	sess.answered.Store(false) // the next request starts an attachment
	check := sess.checkDueLocked()
	if check {
		sess.startCheckLocked(srv) // verified before it is released (verify.go)
	}
	draining := sess.draining
	sess.wmu.Lock() // ordering: nothing from the next server before this flush
	sess.mu.Unlock()
	if !sess.clientDead {
		if err := sess.cw.Flush(); err != nil {
			sess.clientDead = true
		}
	}
	sess.wmu.Unlock()
	if check {
		sess.sendCheck(srv)
		return
	}
	sess.srv.pool.Release(srv)
	if draining {
		sess.terminate(fatalf(codeAdminShutdown, "terminating connection due to administrator command").withDetail("pggovernor is shutting down"))
	}
}

// unnamedLinger is how long a connection stays linked to a client whose
// unnamed statement awaits its Bind after a Sync (lib/pq sends it as soon
// as it has read the ReadyForQuery). After that the connection is
// released; the Bind then prepares the statement again where it lands,
// checked against the shape the client was told (resolve).
const unnamedLinger = 50 * time.Millisecond

// armLinger starts the linger timer. Called with mu held.
func (sess *session) armLinger() {
	if sess.lingerTimer == nil {
		sess.lingerTimer = time.AfterFunc(unnamedLinger, sess.lingerExpired)
		return
	}
	sess.lingerTimer.Reset(unnamedLinger)
}

// lingerExpired releases a connection linked for an unnamed statement
// whose Bind did not come in time. Runs on the timer's goroutine.
func (sess *session) lingerExpired() {
	sess.mu.Lock()
	srv := sess.server
	if !sess.linger || srv == nil || !sess.q.empty() {
		sess.mu.Unlock()
		return
	}
	sess.linger = false
	sess.mu.Unlock()
	sess.srv.stats.lingerExpiries.Add(1)
	sess.afterIdle(srv)
}

// releasableLocked reports whether the connection can leave the client now:
// at a safe point, with no session state, or with state only a
// verification can tell is gone.
func (sess *session) releasableLocked() bool {
	return sess.txMode && sess.q.empty() && sess.tx == 'I' && !sess.linger && sess.wd.cancelling == nil &&
		(sess.pins == 0 || sess.checkDueLocked())
}

// afterIdle runs when the attached server connection became idle with
// nothing in flight: in session mode, a draining client is disconnected;
// in transaction mode the connection is released if the client is at a
// safe point.
func (sess *session) afterIdle(srv *pool.Server) {
	sess.mu.Lock()
	drainNow := sess.draining && !sess.txMode && sess.q.empty()
	sess.mu.Unlock()
	if drainNow {
		sess.wmu.Lock()
		if !sess.clientDead {
			_ = sess.cw.Flush()
		}
		sess.wmu.Unlock()
		sess.terminate(fatalf(codeAdminShutdown, "terminating connection due to administrator command").withDetail("pggovernor is shutting down"))
		return
	}
	sess.tryRelease(srv)
}

// terminate sends a final error (at a message boundary only) and closes
// the client connection; the pump then ends the session. It gives up
// writing after a second.
func (sess *session) terminate(ce *clientError) {
	sess.terminateBy(ce, time.Now().Add(time.Second))
}

// terminateBy is terminate with a deadline for the writes. The deadline is
// set before taking wmu, so that a writer blocked on a client that does not
// read gives up instead of holding terminate (and its caller) up. The
// notifications already queued go first.
func (sess *session) terminateBy(ce *clientError, by time.Time) {
	sess.quitOnce.Do(func() { close(sess.quit) })
	_ = sess.conn.SetWriteDeadline(by)
	sess.wmu.Lock()
	if !sess.clientDead {
		if !sess.midFrame {
			var err error
			if sess.nq.pending.Load() {
				err = sess.writeNotificationsLocked()
			}
			if err == nil {
				buf := sess.srv.appendError(nil, ce, sess.user)
				if _, err = sess.cw.Write(buf); err == nil {
					_ = sess.cw.Flush()
				}
			}
		}
		sess.clientDead = true
	}
	sess.wmu.Unlock()
	_ = sess.conn.Close()
}

// closeClient closes the client connection after what was already
// forwarded to it (a server's FATAL), adding nothing of the governor's.
func (sess *session) closeClient() {
	sess.quitOnce.Do(func() { close(sess.quit) })
	_ = sess.conn.SetWriteDeadline(time.Now().Add(time.Second))
	sess.wmu.Lock()
	if !sess.clientDead {
		if !sess.midFrame {
			_ = sess.cw.Flush()
		}
		sess.clientDead = true
	}
	sess.wmu.Unlock()
	_ = sess.conn.Close()
}

// drain is called at shutdown: it reports whether the client is idle, to
// be disconnected now (terminateAll); one in a transaction is disconnected
// when it finishes.
func (sess *session) drain() (idle bool) {
	sess.mu.Lock()
	defer sess.mu.Unlock()
	sess.draining = true
	return (sess.txMode && sess.server == nil) || (!sess.txMode && sess.q.empty() && sess.tx == 'I')
}

// drainNow disconnects the client at the forced end of a drain, giving up
// writing at by.
func (sess *session) drainNow(by time.Time) {
	sess.mu.Lock()
	sess.draining = true
	sess.mu.Unlock()
	sess.terminateBy(errShuttingDown(), by)
}

// errShuttingDown is the error that ends a client's session at shutdown.
func errShuttingDown() *clientError {
	return fatalf(codeAdminShutdown, "terminating connection due to administrator command").withDetail("pggovernor is shutting down")
}

// sendError writes an ErrorResponse to the client.
func (sess *session) sendError(ce *clientError) {
	_ = sess.sendToClient(sess.srv.appendError(nil, ce, sess.user))
}

// sendToClient writes governor-made bytes to the client and flushes. The
// notifications queued before go first: an UNLISTEN is answered after
// those received before it, as Postgres does.
func (sess *session) sendToClient(b []byte) error {
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	if sess.clientDead {
		return net.ErrClosed
	}
	if !sess.midFrame && sess.nq.pending.Load() {
		if err := sess.writeNotificationsLocked(); err != nil {
			sess.clientDead = true
			return err
		}
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
	defer func() {
		// A departed client is pinned no more (its state was discarded).
		sess.mu.Lock()
		sess.pins = 0
		sess.countPinned()
		sess.mu.Unlock()
	}()
	// A verification in flight decides whether the connection comes back
	// to this client, to be reset below.
	_ = sess.awaitCheck()
	sess.mu.Lock()
	srv := sess.server
	if srv == nil {
		sess.mu.Unlock()
		return
	}
	if sess.srv.forced.Load() {
		// The end of a forced drain: closed, not cleaned.
		sess.detachLocked()
		sess.mu.Unlock()
		sess.finishForced(srv)
		return
	}
	if sess.unsynced {
		// The client left in the middle of an extended-protocol batch:
		// Postgres would abort its implicit transaction (the backend
		// exits at the client's EOF), and a Sync sent in its place would
		// commit what it had executed. Closed, never completed.
		srv.MarkBroken()
	}
	if srv.Broken() {
		// Part of a frame reached it (the client left in the middle of
		// one), or it cannot be written: nothing it answers can make it
		// clean, so it is closed now rather than waited for.
		sess.detachLocked()
		sess.mu.Unlock()
		sess.srv.pool.Release(srv)
		return
	}
	// Complete what the client left half-done so the server comes back
	// to ReadyForQuery: end a COPY FROM STDIN (an unsynced batch was
	// closed above).
	var tail []byte
	if sess.copyIn {
		msg := "client disconnected during COPY"
		tail = wire.AppendHeader(tail, 'f', len(msg)+1)
		tail = append(append(tail, msg...), 0)
	}
	var wait chan struct{}
	if !sess.q.empty() {
		wait = make(chan struct{})
		sess.qEmpty = wait
	}
	sess.mu.Unlock()
	// A forced drain cuts the cleanup short: the connection is closed.
	ctx, cancel := context.WithTimeout(sess.srv.forceCtx, cleanupTimeout)
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
	if sess.server != srv && sess.vs.checking == srv {
		// Idle now, and under verification: its outcome decides.
		sess.mu.Unlock()
		_ = sess.awaitCheck()
		sess.mu.Lock()
	}
	if sess.server != srv { // released by the reader, or lost
		sess.vs.abandoned = true
		sess.mu.Unlock()
		return
	}
	sess.server = nil
	sess.vs.abandoned = true
	tx, pins, opaque := srv.TxStatus, sess.pins, sess.vs.opaque
	sess.mu.Unlock()
	if pins&pinLoad != 0 {
		srv.MarkBroken() // a loaded library cannot be unloaded
	}
	var queries []string
	if tx != 'I' {
		queries = append(queries, "ROLLBACK")
	}
	// After opaque code, custom parameters may be set that no check sees:
	// DISCARD ALL resets them too.
	discard := pins != 0 || opaque || !sess.txMode
	if discard {
		queries = append(queries, "DISCARD ALL")
	}
	if srv.Broken() || len(queries) == 0 {
		sess.srv.pool.Release(srv)
		return
	}
	if discard {
		// DISCARD ALL drops every prepared statement: the connection's
		// cache starts empty (it is closed if the reset fails).
		if ss, ok := srv.State.(*serverState); ok {
			ss.reset()
			ss.check = connCheck{} // DISCARD ALL includes RESET ALL
		}
		srv.Settings = map[string]string{}
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
			if canon == "default_transaction_read_only" && !sess.hasSetting(canon) {
				// The client did not ask for it: it gets the server's
				// (RESET), never a value that overrides a server made
				// read-only since the client logged in.
				add(canon, "", true)
				continue
			}
			add(canon, want, false)
		}
	}
	return b.String()
}

// hasSetting reports whether the client set the parameter name at startup.
func (sess *session) hasSetting(name string) bool {
	for k := range sess.settings {
		if strings.EqualFold(k, name) {
			return true
		}
	}
	return false
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
