package proxy

import (
	"sync/atomic"
	"time"
)

// Observer receives one measurement; a prometheus.Histogram is one.
type Observer interface{ Observe(float64) }

// Counter counts events; a prometheus.Counter is one.
type Counter interface{ Inc() }

// Metrics are the handles through which the proxy reports what only it
// sees as it happens. The proxy does not import Prometheus: the metrics
// package builds the handles, resolved once (no label lookup on the
// relay), and the command passes them in Options. Every field may be nil.
//
// Figures that can be read at scrape time instead (clients by state, bytes,
// totals per database) are not pushed here: see Server.ClientStates and
// Server.Totals.
type Metrics struct {
	// QueryDuration observes, in seconds, each query (a simple Query, or
	// an extended-protocol batch up to its Sync) from its first message to
	// the server's ReadyForQuery.
	QueryDuration Observer
	// TransactionDuration observes, in seconds, each transaction from its
	// first message to the ReadyForQuery that says it ended; a statement
	// outside BEGIN/COMMIT is a transaction of its own.
	TransactionDuration Observer
	// ErrorSent is called with the SQLSTATE of every error the governor
	// itself sends to a client (errors the server sends pass through and
	// are not counted). SQLSTATEs are a bounded set.
	ErrorSent func(sqlstate string)
	// LoginFailed is called once per failed login with its reason, one of
	// the LoginFailure* constants.
	LoginFailed func(reason string)
	// CancelRequest is called once per CancelRequest a client (or a peer
	// replica) sent, when it has been dealt with, with one of the Cancel*
	// results.
	CancelRequest func(result string)
	// PreparedStatementHit and PreparedStatementMiss count, in transaction
	// mode, the client's prepared statements found already prepared on the
	// server connection it landed on, or prepared again there.
	//
	// TODO: fed by the prepared-statement tracking of transaction mode,
	// which is not in this version.
	PreparedStatementHit, PreparedStatementMiss Counter
	// CancelForwarded is called with the result (a Forward* constant) of
	// every cancel request for another replica's client (budget.cluster).
	CancelForwarded func(result string)
	// CancelReceived is called with the result (a Received* constant) of
	// every cancel request forwarded by another replica.
	CancelReceived func(result string)
}

// Reasons passed to Metrics.LoginFailed.
const (
	LoginFailureAuth           = "auth_failed"       // wrong password or unknown user (28P01)
	LoginFailureTimeout        = "timeout"           // timeouts.client_login passed
	LoginFailureProtocol       = "protocol"          // malformed or unsupported startup
	LoginFailureTooMany        = "too_many_clients"  // clients.max_connections reached
	LoginFailureNoServer       = "no_server"         // no server connection within timeouts.query_wait
	LoginFailureServer         = "server_refused"    // the server refused the login's settings or database
	LoginFailureShutdown       = "shutdown"          // pggovernor is shutting down
	LoginFailureConsoleUser    = "console_forbidden" // not in admin.users
	LoginFailureHBA            = "hba_rejected"      // clients.hba_file: no line matched, or a reject line (28000)
	LoginFailureTooManyPending = "too_many_pending"  // dropped: clients.max_pending_logins connections were logging in
	LoginFailureOther          = "other"
	loginFailureReasonsCount   = 11
)

// Results passed to Metrics.CancelRequest.
const (
	CancelSent      = "sent"      // passed to the server connection running the client's query
	CancelForwarded = "forwarded" // passed to the replica that issued the key (budget.cluster)
	CancelIdle      = "idle"      // the client had no query running
	CancelDropped   = "dropped"   // unknown key, wrong secret, unknown replica, or sending it failed
)

// CancelResults lists every CancelRequest result, so that a counter can
// start each at zero.
func CancelResults() []string {
	return []string{CancelSent, CancelForwarded, CancelIdle, CancelDropped}
}

// LoginFailureReasons lists every reason, so that a counter can start each
// at zero.
func LoginFailureReasons() [loginFailureReasonsCount]string {
	return [...]string{LoginFailureAuth, LoginFailureTimeout, LoginFailureProtocol, LoginFailureTooMany,
		LoginFailureNoServer, LoginFailureServer, LoginFailureShutdown, LoginFailureConsoleUser, LoginFailureHBA,
		LoginFailureTooManyPending, LoginFailureOther}
}

func (m *Metrics) errorSent(code string) {
	if m.ErrorSent != nil {
		m.ErrorSent(code)
	}
}

func (m *Metrics) cancelForwarded(result string) {
	if m.CancelForwarded != nil {
		m.CancelForwarded(result)
	}
}

func (m *Metrics) cancelReceived(result string) {
	if m.CancelReceived != nil {
		m.CancelReceived(result)
	}
}

func (m *Metrics) loginFailed(reason string) {
	if m.LoginFailed != nil {
		m.LoginFailed(reason)
	}
}

func (m *Metrics) cancelRequest(result string) {
	if m.CancelRequest != nil {
		m.CancelRequest(result)
	}
}

// preparedStatement counts a prepared statement found on the server
// connection (hit) or prepared again there (miss). For the
// prepared-statement tracking of transaction mode to call.
func (m *Metrics) preparedStatement(hit bool) {
	c := m.PreparedStatementMiss
	if hit {
		c = m.PreparedStatementHit
	}
	if c != nil {
		c.Inc()
	}
}

func observe(o Observer, d time.Duration) {
	if o != nil {
		o.Observe(d.Seconds())
	}
}

// sessionStats are one client session's figures, for SHOW CLIENTS and
// SHOW STATS and the metrics.
type sessionStats struct {
	// Guarded by session.mu: when the batch in flight and the transaction
	// in progress began, and when the client last sent a request.
	batchStart, txStart, lastRequest time.Time

	// Read at any time.
	queries, xacts        atomic.Int64
	queryNanos, xactNanos atomic.Int64
	waitNanos             atomic.Int64
	// waitingSince is when the client began waiting for a server
	// connection (Unix nanoseconds), 0 when it is not waiting.
	waitingSince atomic.Int64
}

// beginWait and endWait bracket a wait for a server connection.
func (st *sessionStats) beginWait() { st.waitingSince.Store(time.Now().UnixNano()) }

func (st *sessionStats) endWait() {
	if t := st.waitingSince.Swap(0); t != 0 {
		st.waitNanos.Add(time.Now().UnixNano() - t)
	}
}

// noteRequestLocked records a client message sent to the server: the
// start of a query, and of a transaction when none is in progress. The
// caller holds sess.mu. It allocates nothing.
func (sess *session) noteRequestLocked() {
	st := &sess.stats
	if !st.batchStart.IsZero() {
		return
	}
	now := time.Now()
	st.batchStart, st.lastRequest = now, now
	if st.txStart.IsZero() {
		st.txStart = now
	}
	sess.watchRequestLocked(now)
}

// noteReadyLocked records a ReadyForQuery forwarded to the client, with
// the transaction status it carries: a query ended, and a transaction if
// the status is idle. The caller holds sess.mu. It allocates nothing.
func (sess *session) noteReadyLocked(status byte) {
	st := &sess.stats
	if st.batchStart.IsZero() {
		return
	}
	now := time.Now()
	d := now.Sub(st.batchStart)
	st.queries.Add(1)
	st.queryNanos.Add(int64(d))
	observe(sess.srv.opts.Metrics.QueryDuration, d)
	pipelined := !sess.q.empty() // the next query is already in flight
	st.batchStart = time.Time{}
	if pipelined {
		st.batchStart = now
	}
	if status == 'I' && !st.txStart.IsZero() {
		d := now.Sub(st.txStart)
		st.xacts.Add(1)
		st.xactNanos.Add(int64(d))
		observe(sess.srv.opts.Metrics.TransactionDuration, d)
		st.txStart = time.Time{}
		if pipelined {
			st.txStart = now
		}
	}
	sess.watchReadyLocked(status, now, pipelined)
}

// Totals are cumulative figures of the client sessions of one database,
// ended and live.
type Totals struct {
	// BytesIn counts bytes received from clients; BytesOut bytes sent to
	// them.
	BytesIn, BytesOut int64
	// Queries and Transactions count those completed; QueryTime and
	// TransactionTime sum their durations.
	Queries, Transactions      int64
	QueryTime, TransactionTime time.Duration
	// WaitTime sums the time clients waited for a server connection.
	WaitTime time.Duration
}

func (t *Totals) add(sess *session) {
	t.BytesIn += sess.bytesIn.Load()
	t.BytesOut += sess.bytesOut.Load()
	t.Queries += sess.stats.queries.Load()
	t.Transactions += sess.stats.xacts.Load()
	t.QueryTime += time.Duration(sess.stats.queryNanos.Load())
	t.TransactionTime += time.Duration(sess.stats.xactNanos.Load())
	t.WaitTime += time.Duration(sess.stats.waitNanos.Load())
}

// Totals returns the cumulative figures of every database's client
// sessions, ended and live (the admin console's excluded). They only
// grow, so they suit Prometheus counters.
func (s *Server) Totals() map[string]Totals {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]Totals, len(s.ended))
	for db, t := range s.ended {
		out[db] = *t
	}
	for sess := range s.sessions {
		if sess.console != nil {
			continue
		}
		t := out[sess.database]
		t.add(sess)
		out[sess.database] = t
	}
	return out
}

// ClientStates counts logged-in clients (the admin console's excluded).
type ClientStates struct {
	// Active clients hold a server connection for a transaction (or, in
	// session mode, for their session).
	Active int
	// Pinned clients hold a server connection because of session state
	// they created (transaction mode).
	Pinned int
	// Waiting clients wait for a server connection.
	Waiting int
	// Idle clients hold none and wait for none.
	Idle int
}

// ClientStates counts the logged-in clients by state.
func (s *Server) ClientStates() ClientStates {
	var cs ClientStates
	for _, sess := range s.liveSessions() {
		if sess.console != nil {
			continue
		}
		switch clientState(sess) {
		case stateActive:
			cs.Active++
		case statePinned:
			cs.Pinned++
		case stateWaiting:
			cs.Waiting++
		default:
			cs.Idle++
		}
	}
	return cs
}

type sessionState int

const (
	stateIdle sessionState = iota
	stateActive
	statePinned
	stateWaiting
)

func clientState(sess *session) sessionState {
	if sess.stats.waitingSince.Load() != 0 {
		return stateWaiting
	}
	sess.mu.Lock()
	defer sess.mu.Unlock()
	switch {
	case sess.server != nil && sess.pins != 0 && sess.txMode:
		return statePinned
	case sess.server != nil:
		return stateActive
	}
	return stateIdle
}

// liveSessions returns the registered sessions.
func (s *Server) liveSessions() []*session {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*session, 0, len(s.sessions))
	for sess := range s.sessions {
		out = append(out, sess)
	}
	return out
}
