// Package pool owns the server connections: per-route pools of connections
// to the upstream Postgres server sharing one budget, a FIFO queue of
// clients waiting for one, idle and lifetime reaping, and the reset of a
// connection before another client may use it.
//
// A Route is a (database, user) pair. The budget counts every connection
// that is open, being opened, or closing but not yet confirmed gone, over
// all routes; it is set by SetLimit (from the live server or budget.max).
package pool

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/wire"
)

// Route identifies a pool: the upstream database and user.
type Route struct {
	Database string
	User     string
}

func (r Route) String() string { return r.User + "@" + r.Database }

// Connector opens authenticated upstream connections and hands them over
// raw. The pool declares it so tests can substitute their own.
type Connector interface {
	Connect(ctx context.Context, route Route, params map[string]string) (*pgconn.HijackedConn, error)
}

// Options configure a Pool.
type Options struct {
	// Connector opens upstream connections.
	Connector Connector
	// Logger receives the pool's logs.
	Logger *zap.Logger
	// ServerIdle closes connections unused for this long.
	ServerIdle time.Duration
	// ServerLifetime closes connections older than this (±10% jitter) at
	// their next release.
	ServerLifetime time.Duration
	// ServerCheckDelay: a connection idle longer than this is checked with
	// a round trip before reuse.
	ServerCheckDelay time.Duration
	// RouteIdleTimeout forgets a route (its figures, its row in Routes)
	// once it has had no connection, no waiting request and no client
	// (AddClient) for this long; 0 keeps routes for ever.
	RouteIdleTimeout time.Duration
	// Now is the clock (time.Now when nil).
	Now func() time.Time
	// Events receives measurements as they happen (the metrics package
	// turns them into histograms); nil fields are skipped.
	Events Events
	// Target is the upstream URL's target_session_attrs: a connection
	// whose server stops being what it asks for is retired (upstream.go).
	// "" is any.
	Target Target
	// LoadBalance is the upstream URL's load_balance_hosts=random:
	// connections spread over the hosts on purpose, so a connection opened
	// to another address than the last one's is not a switch.
	LoadBalance bool
	// HoldOnSwitch is set when the limit is leases held on the server
	// (budget.cluster): a retirement for a role change sets the limit to 0
	// at once, under the pool's lock, so that no connection opens on the
	// next server under leases taken on the last; the lease manager sets
	// it again once it holds leases where new connections go.
	HoldOnSwitch bool
}

// Events are callbacks for measurements that a scrape-time snapshot cannot
// give. They are called outside the pool's lock, on paths that already
// wait or do I/O (never on the idle-connection fast path), and must not
// block. Nil fields are skipped.
type Events struct {
	// Waited is called when a client's wait for a server connection ends:
	// in the FIFO queue or behind a PAUSE. d is how long it waited;
	// timedOut is true when the wait ended without a connection.
	Waited func(d time.Duration, timedOut bool)
	// Connected is called after each attempt to open a server connection,
	// with how long the attempt took and its error (nil on success).
	Connected func(r Route, d time.Duration, err error)
	// Checked is called after each round trip that checks a connection
	// (an idle connection's check before reuse, or Probe), with its
	// duration and error.
	Checked func(d time.Duration, err error)
	// Queued is called when a client joins the wait queue (the budget is
	// in use): the cluster lease manager asks for more leases at once
	// instead of at its next heartbeat.
	Queued func()
	// Retired is called when the connections to an upstream address were
	// retired (its server no longer fits target_session_attrs, or stopped
	// answering): the governor moves its control connection too.
	Retired func(addr string)
}

// Pool is the set of server connections. All methods are safe for
// concurrent use.
type Pool struct {
	opts   Options
	logger *zap.Logger
	now    func() time.Time
	bufs   sync.Pool
	nextID atomic.Uint64
	// closingN counts connections between close and serverGone.
	closingN atomic.Int64

	mu        sync.Mutex
	limit     int
	limitSet  bool
	limitErr  error  // why the limit is not known yet
	limitNote string // what the limit is, for WaitError (SetLimitNote)
	total     int    // open + connecting + closing
	routes    map[Route]*routeState
	waiters   waitQueue
	closed    bool
	stats     Stats
	// Pause state: every database (pauseAll) or some; resumed is closed
	// and replaced at every Resume; pausedWaiting counts clients held.
	pauseAll      bool
	pausedDBs     map[string]bool
	resumed       chan struct{}
	pausedWaiting int
	// up is what the pool knows of the upstream servers (upstream.go).
	up upstreamState

	done     chan struct{}
	loopDone chan struct{}
	// changed is closed and replaced whenever a connection closes or a
	// slot is freed, for Wait, WaitQuiet and WaitClose.
	changed chan struct{}
}

// routeState is a route's pool. It exists while a request for the route is
// in flight; it is shown (Routes, RouteStats) only once accepted: a server
// connection of the route was opened, so the server knows its database and
// user. One never accepted is forgotten as soon as nothing uses it, an
// accepted one RouteIdleTimeout after that.
type routeState struct {
	accepted bool
	// unusedSince is when the reaper first saw the route unused (zero
	// while it is used).
	unusedSince time.Time
	// clients counts the clients logged in for the route (AddClient).
	clients  int
	idle     []*Server // most recently used last
	retiring bool      // CloseRoutes: released connections are closed
	open     int       // connections of this route (idle or in use)
	inUse    int
	opening  int // connections being opened for this route
	welcome  map[string]string
	servers  map[*Server]struct{} // every open connection of the route
	// waiting counts clients waiting for this route (queued or paused);
	// pausedSince is when the first client still held by a PAUSE began.
	waiting     int
	pausedSince time.Time
	counters    RouteCounters
}

// RouteCounters are a route's cumulative figures.
type RouteCounters struct {
	// WaitCount counts waits for a connection (queued or behind a PAUSE).
	WaitCount int64
	// WaitDuration sums the time those waits took.
	WaitDuration time.Duration
	// WaitTimeouts counts waits that ended in a timeout.
	WaitTimeouts int64
	// ClosedIdle counts connections closed after timeouts.server_idle
	// unused (database/sql's MaxIdleTimeClosed).
	ClosedIdle int64
	// ClosedSurplus counts idle connections closed because they were not
	// needed: the budget shrank, or another route needed the slot
	// (database/sql's MaxIdleClosed).
	ClosedSurplus int64
	// ClosedLifetime counts connections closed after
	// timeouts.server_lifetime (database/sql's MaxLifetimeClosed).
	ClosedLifetime int64
	// Connects counts connections opened.
	Connects int64
}

// Stats are cumulative and current figures, read at scrape time.
type Stats struct {
	// Limit is the budget, and LimitKnown whether it is known yet.
	Limit      int
	LimitKnown bool
	// Open counts connections open, opening or closing.
	Open int
	// Idle counts idle connections.
	Idle int
	// InUse counts connections held by clients.
	InUse int
	// Waiting counts clients waiting for a connection.
	Waiting int
	// WaitCount counts waits that had to queue.
	WaitCount int64
	// WaitDuration sums the time spent queueing.
	WaitDuration time.Duration
	// WaitTimeouts counts waits that ended in a timeout.
	WaitTimeouts int64
	// ClosedIdle counts connections closed for idleness.
	ClosedIdle int64
	// ClosedLifetime counts connections closed for age.
	ClosedLifetime int64
	// ClosedSurplus counts idle connections closed because they were not
	// needed (the budget shrank, or another route needed the slot).
	ClosedSurplus int64
	// Connects counts connections opened; ConnectErrors failed attempts.
	Connects, ConnectErrors int64
	// Opening counts connections being opened; Closing those asked to
	// close whose backend has not exited yet. Both hold budget slots.
	Opening, Closing int
	// Paused is true while a PAUSE holds at least one database.
	Paused bool
	// UpstreamAddr is the address the last server connection was opened
	// to ("" before any): the server new connections go to.
	UpstreamAddr string
	// UpstreamSwitches counts the times new server connections went to
	// another server than before: after the connections to a server that
	// stopped fitting target_session_attrs were retired, or when the
	// server used before did not take a new connection and another did.
	UpstreamSwitches int64
}

// New returns a pool with an unknown (zero) budget: Acquire waits until
// SetLimit. The caller must call Close.
func New(opts Options) *Pool {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	p := &Pool{
		opts:      opts,
		logger:    opts.Logger,
		now:       opts.Now,
		routes:    map[Route]*routeState{},
		done:      make(chan struct{}),
		loopDone:  make(chan struct{}),
		limitErr:  errors.New("the budget is not known yet"),
		changed:   make(chan struct{}),
		resumed:   make(chan struct{}),
		pausedDBs: map[string]bool{},
	}
	p.bufs.New = func() any { b := make([]byte, wire.BufferSize); return &b }
	go p.reapLoop()
	return p
}

func (p *Pool) getBuf() []byte  { return *(p.bufs.Get().(*[]byte)) }
func (p *Pool) putBuf(b []byte) { b = b[:cap(b)]; p.bufs.Put(&b) }

// SetLimit sets the budget. Waiters are served if it grew; idle
// connections are closed if it shrank below what is open.
func (p *Pool) SetLimit(n int) {
	if n < 0 {
		n = 0
	}
	p.mu.Lock()
	p.limit, p.limitSet, p.limitErr = n, true, nil
	for p.total < p.limit && p.waiters.len() > 0 {
		p.total++
		p.grantLocked(grant{})
	}
	retired := p.shrinkLocked()
	p.mu.Unlock()
	terminateAll(retired)
}

// SetLimitError records why the budget cannot be known (shown to clients
// that time out waiting) without changing a limit already known.
func (p *Pool) SetLimitError(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.limitSet {
		p.limitErr = err
	}
}

// SetLimitNote records what the limit is, for the message of a wait that
// times out ("this replica's share of the cluster budget", say); "" is the
// budget itself.
func (p *Pool) SetLimitNote(note string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.limitNote = note
}

// Changed returns a channel that is closed at the next change of the
// pool's connections: one closed, or a budget slot freed.
func (p *Pool) Changed() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.changed
}

// Sever closes every server connection at once, idle or held by a client,
// and returns how many it closed. A held connection's socket is closed
// under its client, who learns that the server connection was lost
// (08006). It is the last resort of the cluster lease manager when the
// leases covering these connections are about to pass to other replicas.
func (p *Pool) Sever(cause error) int {
	p.mu.Lock()
	var idle, held []*Server
	for _, rs := range p.routes {
		isIdle := make(map[*Server]bool, len(rs.idle))
		for _, s := range rs.idle {
			isIdle[s] = true
		}
		for s := range rs.servers {
			switch {
			case s.closing.Load(): // on its way out already
			case isIdle[s]:
				idle = append(idle, s)
			default:
				held = append(held, s)
			}
		}
		rs.idle = nil
	}
	p.mu.Unlock()
	for _, s := range idle {
		s.close()
	}
	for _, s := range held {
		s.MarkBroken()
		_ = s.conn.Close() // the reader fails and tells the holder
	}
	if n := len(idle) + len(held); n > 0 {
		p.logger.Warn("closing every server connection", zap.Int("idle", len(idle)), zap.Int("held", len(held)), zap.Error(cause))
	}
	return len(idle) + len(held)
}

// Limit returns the budget and whether it is known.
func (p *Pool) Limit() (int, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.limit, p.limitSet
}

// shrinkLocked retires idle connections, oldest first, while more are
// open than the budget allows; the caller terminates them after unlocking.
func (p *Pool) shrinkLocked() (retired []*Server) {
	for p.total-p.closingLocked() > p.limit {
		s := p.oldestIdleLocked(Route{}, false)
		if s == nil {
			return retired
		}
		p.removeIdleLocked(s)
		p.countSurplusLocked(s.route)
		if s.retire() {
			retired = append(retired, s)
		}
	}
	return retired
}

// closingLocked counts connections asked to close whose backend has not
// exited yet: they still hold a slot, but no longer serve anyone.
func (p *Pool) closingLocked() int { return int(p.closingN.Load()) }

// Welcome returns the parameters the first connection of a route reported
// at startup, or nil when no connection of the route was opened yet.
func (p *Pool) Welcome(r Route) map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if rs := p.routes[r]; rs != nil && rs.welcome != nil {
		return rs.welcome
	}
	return nil
}

// Stats returns the pool's figures.
func (p *Pool) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.stats
	st.Limit, st.LimitKnown, st.Open, st.Waiting = p.limit, p.limitSet, p.total, p.waiters.len()+p.pausedWaiting
	for _, rs := range p.routes {
		st.Idle += len(rs.idle)
		st.InUse += rs.inUse
		st.Opening += rs.opening
	}
	st.Closing = p.closingLocked()
	st.Paused = p.pauseAll || len(p.pausedDBs) > 0
	st.UpstreamAddr, st.UpstreamSwitches = p.up.current, p.up.switches
	return st
}

// RouteStats returns per-route open, idle and in-use counts, of the routes
// Routes shows.
func (p *Pool) RouteStats() map[Route][3]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[Route][3]int, len(p.routes))
	for r, rs := range p.routes {
		if rs.accepted {
			out[r] = [3]int{rs.open, len(rs.idle), rs.inUse}
		}
	}
	return out
}

// RouteStat is one route's figures, for the admin console and the
// metrics.
type RouteStat struct {
	Route Route
	// Open counts the route's connections (idle, in use or closing);
	// Idle, InUse and Opening those idle, held by clients, being opened.
	Open, Idle, InUse, Opening int
	// Waiting counts clients waiting for a connection of the route.
	Waiting int
	// MaxWait is how long the longest-waiting of them has waited.
	MaxWait time.Duration
	// Paused is true while a PAUSE holds the route's database.
	Paused bool
	RouteCounters
}

// Routes returns the figures of every route the server accepted (one of
// its connections was opened) and that was used within RouteIdleTimeout,
// sorted by database then user.
func (p *Pool) Routes() []RouteStat {
	now := p.now()
	p.mu.Lock()
	out := make([]RouteStat, 0, len(p.routes))
	for r, rs := range p.routes {
		if !rs.accepted {
			continue
		}
		st := RouteStat{Route: r, Open: rs.open, Idle: len(rs.idle), InUse: rs.inUse, Opening: rs.opening,
			Waiting: rs.waiting, Paused: p.pausedLocked(r), RouteCounters: rs.counters}
		if !rs.pausedSince.IsZero() {
			st.MaxWait = now.Sub(rs.pausedSince)
		}
		out = append(out, st)
	}
	for _, w := range p.waiters.items {
		for i := range out {
			if out[i].Route == w.route {
				out[i].MaxWait = max(out[i].MaxWait, now.Sub(w.since))
			}
		}
	}
	p.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Route.Database != out[j].Route.Database {
			return out[i].Route.Database < out[j].Route.Database
		}
		return out[i].Route.User < out[j].Route.User
	})
	return out
}

// ServerInfo describes one server connection, for SHOW SERVERS.
type ServerInfo struct {
	ID    uint64
	Route Route
	// PID is the backend's process ID.
	PID uint32
	// Created is when it was opened; LastUsed when it was last released
	// (or opened).
	Created, LastUsed time.Time
	// Idle is true while it sits in the pool; false while a client (or
	// the pool's own check) holds it.
	Idle bool
	// CloseNeeded is true when it will be closed instead of reused: it is
	// closing, broken, or past timeouts.server_lifetime.
	CloseNeeded bool
	// LocalAddr and RemoteAddr are the TCP endpoints.
	LocalAddr, RemoteAddr net.Addr
	// TLS is true when the connection is encrypted.
	TLS bool
}

// Servers lists every open server connection, oldest first.
func (p *Pool) Servers() []ServerInfo {
	now := p.now()
	p.mu.Lock()
	var out []ServerInfo
	for _, rs := range p.routes {
		idle := make(map[*Server]bool, len(rs.idle))
		for _, s := range rs.idle {
			idle[s] = true
		}
		for s := range rs.servers {
			_, isTLS := s.conn.(*tls.Conn)
			out = append(out, ServerInfo{ID: s.id, Route: s.route, PID: s.pid, Created: s.created, LastUsed: s.lastUsed,
				Idle: idle[s], CloseNeeded: p.closeNeeded(s, now), LocalAddr: s.conn.LocalAddr(),
				RemoteAddr: s.conn.RemoteAddr(), TLS: isTLS})
		}
	}
	p.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// closeNeeded reports whether s will be closed rather than reused.
func (p *Pool) closeNeeded(s *Server, now time.Time) bool {
	return s.Broken() || s.retired.Load() || (!s.expires.IsZero() && now.After(s.expires))
}

// AddClient counts a client logged in for r, until RemoveClient: a route
// with clients is not forgotten (RouteIdleTimeout). It does not make the
// route shown; only an opened connection does.
func (p *Pool) AddClient(r Route) {
	p.mu.Lock()
	p.route(r).clients++
	p.mu.Unlock()
}

// RemoveClient undoes AddClient.
func (p *Pool) RemoveClient(r Route) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if rs := p.routes[r]; rs != nil && rs.clients > 0 {
		rs.clients--
		p.forgetUnacceptedLocked(r)
	}
}

// unused reports whether nothing uses the route: no connection (open,
// opening, held), no waiting request, no client.
func (rs *routeState) unused() bool {
	return rs.open == 0 && rs.opening == 0 && rs.inUse == 0 && rs.waiting == 0 && rs.clients == 0
}

// forgetUnacceptedLocked forgets r if the server never accepted it and
// nothing uses it: a login to a database that does not exist leaves
// nothing behind.
func (p *Pool) forgetUnacceptedLocked(r Route) {
	if rs := p.routes[r]; rs != nil && !rs.accepted && rs.unused() {
		delete(p.routes, r)
	}
}

func (p *Pool) route(r Route) *routeState {
	rs := p.routes[r]
	if rs == nil {
		rs = &routeState{servers: map[*Server]struct{}{}}
		p.routes[r] = rs
	}
	return rs
}

// WaitError is returned by Acquire when no connection became available in
// time. Its fields describe what ran out, for the message sent to the
// client.
type WaitError struct {
	// Waited is how long the client waited.
	Waited time.Duration
	// Limit is the budget, and LimitKnown whether it was known.
	Limit      int
	LimitKnown bool
	// Cause is why the budget is unknown or the last connect failure, if any.
	Cause error
	// Paused is true when the wait ended while the database was paused.
	Paused bool
	// Note says what the limit is when it is not the budget itself (see
	// SetLimitNote); "" otherwise.
	Note string
}

func (e *WaitError) Error() string {
	switch {
	case e.Paused:
		return fmt.Sprintf("no server connection after waiting %s: the database is paused", e.Waited.Round(time.Millisecond))
	case !e.LimitKnown:
		return fmt.Sprintf("no server connection after waiting %s: %v", e.Waited.Round(time.Millisecond), e.Cause)
	case e.Cause != nil:
		return fmt.Sprintf("no server connection after waiting %s: connecting to the server failed: %v", e.Waited.Round(time.Millisecond), e.Cause)
	}
	if e.Note != "" {
		return fmt.Sprintf("no server connection after waiting %s: all %d connections of %s are in use", e.Waited.Round(time.Millisecond), e.Limit, e.Note)
	}
	return fmt.Sprintf("no server connection after waiting %s: all %d connections of the budget are in use", e.Waited.Round(time.Millisecond), e.Limit)
}

func (e *WaitError) Unwrap() error { return e.Cause }

// ErrClosed is returned by Acquire once the pool is closed.
var ErrClosed = errors.New("the server connection pool is shut down")

// errPaused is returned inside the pool when a route's database is paused:
// the caller waits for Resume and tries again.
var errPaused = errors.New("the database is paused")

// Acquire returns a connection for route, opening one within the budget or
// waiting in FIFO order for one. ctx bounds the wait (the caller applies
// timeouts.query_wait); the caller must Release the connection. params
// are the startup parameters for a connection opened for this request.
//
// While the route's database is paused (Pause), Acquire waits for Resume
// and the time spent paused does not count against ctx's deadline: the
// deadline is moved later by as long as the pause held the request, so a
// PAUSE longer than timeouts.query_wait loses no client. Cancelling ctx
// still ends the wait, and so does its deadline if ctx is marked with
// PauseCounts.
func (p *Pool) Acquire(ctx context.Context, r Route, params map[string]string) (*Server, error) {
	start := p.now()
	var lastErr error
	var undo []func()
	defer func() {
		for _, f := range undo {
			f()
		}
	}()
	for attempt := 0; ; attempt++ {
		paused, err := p.waitResumed(ctx, r)
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, p.waitError(r, start, lastErr)
		}
		if err != nil {
			return nil, err
		}
		if paused > 0 && ctx.Value(pauseCountsKey{}) == nil {
			var stop func()
			ctx, stop = extendDeadline(ctx, paused)
			undo = append(undo, stop)
		}
		g, err := p.acquireGrant(ctx, r, start, lastErr)
		if errors.Is(err, errPaused) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if g.server != nil {
			if p.check(ctx, g.server) {
				return g.server, nil
			}
			continue
		}
		s, err := p.connect(ctx, r, params)
		if err == nil {
			return s, nil
		}
		if !retryable(err) || ctx.Err() != nil {
			var werr error = err
			if ctx.Err() != nil {
				werr = p.waitError(r, start, err)
			}
			return nil, werr
		}
		lastErr = err
		backoff := time.Duration(10<<min(attempt, 7)) * time.Millisecond // 10ms .. 1.28s
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, p.waitError(r, start, lastErr)
		case <-t.C:
		}
	}
}

// extendDeadline returns ctx with its deadline moved later by d, still
// cancelled when ctx is cancelled (but not when ctx's own deadline passes).
// The caller must call stop.
func extendDeadline(ctx context.Context, d time.Duration) (_ context.Context, stop func()) {
	dl, ok := ctx.Deadline()
	if !ok {
		return ctx, func() {}
	}
	ext, cancel := context.WithDeadline(context.WithoutCancel(ctx), dl.Add(d))
	stopAfter := context.AfterFunc(ctx, func() {
		if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			cancel()
		}
	})
	return ext, func() { stopAfter(); cancel() }
}

// TryAcquire returns an idle connection of route at once, or nil when
// none is idle (or clients are already waiting, or the database is
// paused). It needs no timer, so it is the first thing a client tries.
func (p *Pool) TryAcquire(r Route) *Server {
	p.mu.Lock()
	rs := p.routes[r]
	if rs == nil || len(rs.idle) == 0 || p.waiters.len() > 0 || p.closed || p.pausedLocked(r) {
		p.mu.Unlock()
		return nil
	}
	s := p.popIdleLocked(rs)
	if s == nil {
		p.mu.Unlock()
		return nil
	}
	rs.inUse++
	p.mu.Unlock()
	if s.Broken() || (p.opts.ServerCheckDelay > 0 && p.now().Sub(s.lastUsed) >= p.opts.ServerCheckDelay) {
		// Let Acquire close it or check it.
		p.Release(s)
		return nil
	}
	return s
}

func (p *Pool) waitError(r Route, start time.Time, cause error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stats.WaitTimeouts++
	if rs := p.routes[r]; rs != nil { // not made again once forgotten
		rs.counters.WaitTimeouts++
	}
	if !p.limitSet {
		cause = p.limitErr
	}
	return &WaitError{Waited: p.now().Sub(start), Limit: p.limit, LimitKnown: p.limitSet, Cause: cause, Paused: p.pausedLocked(r),
		Note: p.limitNote}
}

// retryableSQLStates are the server's answers to a connection attempt
// that say it cannot take one now, not that it refuses this one: too many
// connections, a configured limit, starting up or shutting down, a
// connection lost or refused during startup, terminated by an
// administrator or after a crash.
var retryableSQLStates = map[string]bool{
	"53300": true, // too_many_connections
	"53400": true, // configuration_limit_exceeded
	"57P01": true, // admin_shutdown
	"57P02": true, // crash_shutdown
	"57P03": true, // cannot_connect_now
	"08001": true, // sqlclient_unable_to_establish_sqlconnection
	"08004": true, // sqlserver_rejected_establishment_of_sqlconnection
	"08006": true, // connection_failure
}

// retryable says whether a connect error may go away by itself, judged by
// the error's type, never its text: the error says so itself (a Retryable
// method: a credential source that may recover, such as RDS IAM token
// minting); the server answered with a SQLSTATE of retryableSQLStates; the
// network failed (a net.Error: refused, reset, unreachable, a name not
// resolved, a timeout; a Unix socket not there yet); the server closed the
// connection during startup (EOF); pgconn timed out or says nothing was
// sent (pgconn.Timeout, pgconn.SafeToRetry); the servers answered but none
// is what target_session_attrs asks for (during a failover, the one that
// fits is about to be promoted). A file pggovernor could not
// read (a certificate, a key: an *fs.PathError) is not retried: waiting
// does not make it appear. Anything else (a refused password, an unknown
// database, a certificate that does not verify) is final.
func retryable(err error) bool {
	var self interface{ Retryable() bool }
	if errors.As(err, &self) {
		return self.Retryable()
	}
	if wrongRole(err) {
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return retryableSQLStates[pgErr.Code]
	}
	var pathErr *fs.PathError
	if errors.As(err, &pathErr) {
		return false
	}
	var netErr net.Error
	return errors.As(err, &netErr) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err) || pgconn.SafeToRetry(err)
}

// Unavailable reports whether a connect error says the server cannot be
// reached or cannot take connections now (as opposed to a refusal of this
// one request, such as an unknown database).
func Unavailable(err error) bool { return err != nil && retryable(err) }

// grant is what a waiter receives: an idle connection of its route, or a
// budget slot to open one with (server nil), or word that its database was
// paused (paused; no slot).
type grant struct {
	server *Server
	paused bool
}

type waiter struct {
	route Route
	since time.Time
	ch    chan grant
}

func (p *Pool) acquireGrant(ctx context.Context, r Route, start time.Time, lastErr error) (grant, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return grant{}, ErrClosed
	}
	if p.pausedLocked(r) {
		p.mu.Unlock()
		return grant{}, errPaused
	}
	rs := p.route(r)
	if p.waiters.len() == 0 {
		if s := p.popIdleLocked(rs); s != nil {
			rs.inUse++
			p.mu.Unlock()
			return grant{server: s}, nil
		}
	}
	if p.waiters.len() == 0 && p.total < p.limit {
		p.total++
		p.mu.Unlock()
		return grant{}, nil
	}
	queued := p.now()
	w := &waiter{route: r, since: queued, ch: make(chan grant, 1)}
	p.waiters.push(w)
	p.stats.WaitCount++
	rs.counters.WaitCount++
	rs.waiting++
	// Free a slot for this route by closing another route's idle
	// connection, so that no route starves while others sit idle.
	var victim *Server
	if p.total >= p.limit && len(rs.idle) == 0 {
		if victim = p.oldestIdleLocked(r, true); victim != nil {
			p.removeIdleLocked(victim)
			p.countSurplusLocked(victim.route)
			if !victim.retire() {
				victim = nil
			}
		}
	}
	p.mu.Unlock()
	if victim != nil {
		victim.terminate()
	}
	if f := p.opts.Events.Queued; f != nil {
		f()
	}

	select {
	case g := <-w.ch:
		p.endWait(r, queued, false)
		if g.paused { // taken out of the queue by Pause: wait for Resume
			return grant{}, errPaused
		}
		return g, nil
	case <-ctx.Done():
		p.mu.Lock()
		removed := p.waiters.remove(w)
		p.mu.Unlock()
		if !removed { // granted meanwhile: give it back
			p.giveBack(<-w.ch)
		}
		p.endWait(r, queued, true)
		return grant{}, p.waitError(r, start, lastErr)
	case <-p.done:
		p.endWait(r, queued, true)
		return grant{}, ErrClosed
	}
}

// giveBack returns a grant its waiter does not use.
func (p *Pool) giveBack(g grant) {
	switch {
	case g.paused: // no slot came with it
	case g.server != nil:
		p.Release(g.server)
	default:
		p.slotFreed()
	}
}

// endWait accounts for a wait in the queue that began at since.
func (p *Pool) endWait(r Route, since time.Time, timedOut bool) {
	d := p.now().Sub(since)
	p.mu.Lock()
	p.stats.WaitDuration += d
	rs := p.route(r)
	rs.counters.WaitDuration += d
	rs.waiting--
	p.forgetUnacceptedLocked(r)
	p.mu.Unlock()
	if f := p.opts.Events.Waited; f != nil {
		f(d, timedOut)
	}
}

// grantLocked hands g to the first waiter. The caller has accounted for
// the slot.
func (p *Pool) grantLocked(g grant) {
	w := p.waiters.pop()
	if g.server != nil {
		p.route(w.route).inUse++
	}
	w.ch <- g
}

// connect opens a connection on a slot already counted in total.
func (p *Pool) connect(ctx context.Context, r Route, params map[string]string) (*Server, error) {
	p.mu.Lock()
	p.route(r).opening++
	p.mu.Unlock()
	began := p.now()
	// The connection outlives this request, so its setup is not cut short
	// by the requester giving up; only by the connect timeout.
	hc, err := p.opts.Connector.Connect(context.WithoutCancel(ctx), r, params)
	if f := p.opts.Events.Connected; f != nil {
		f(r, p.now().Sub(began), err)
	}
	if err != nil {
		p.mu.Lock()
		p.stats.ConnectErrors++
		p.route(r).opening--
		p.forgetUnacceptedLocked(r)
		p.mu.Unlock()
		p.slotFreed()
		return nil, err
	}
	now := p.now()
	addr := ""
	if a := hc.Conn.RemoteAddr(); a != nil {
		addr = a.String()
	}
	s := &Server{
		pool:      p,
		route:     r,
		conn:      hc.Conn,
		addr:      addr,
		opened:    RoleFromParams(hc.ParameterStatuses),
		id:        p.nextID.Add(1),
		pid:       hc.PID,
		secretKey: hc.SecretKey,
		created:   now,
		lastUsed:  now,
		Params:    hc.ParameterStatuses,
		Settings:  map[string]string{},
		TxStatus:  hc.TxStatus,
		readDone:  make(chan struct{}),
	}
	for k, v := range params {
		s.Settings[k] = v
	}
	if lt := p.opts.ServerLifetime; lt > 0 {
		jitter := time.Duration(rand.Int64N(int64(lt)/5+1)) - lt/10 //nolint:gosec // jitter, not security
		s.expires = now.Add(lt + jitter)
	}
	p.mu.Lock()
	rs := p.route(r)
	rs.accepted = true
	rs.opening--
	rs.open++
	rs.inUse++
	rs.servers[s] = struct{}{}
	rs.counters.Connects++
	p.stats.Connects++
	if rs.welcome == nil {
		w := make(map[string]string, len(hc.ParameterStatuses))
		for k, v := range hc.ParameterStatuses {
			w[k] = v
		}
		rs.welcome = w
	}
	switched := p.noteConnectedLocked(addr, now)
	p.mu.Unlock()
	go s.readLoop(p.getBuf()) // owner: s; exits when the connection closes
	if switched != nil {
		p.logger.Warn("upstream switched: new server connections go to another server", switched...)
	}
	p.logger.Debug("server connection opened", zap.Uint64("server_id", s.id), zap.String("db", r.Database),
		zap.String("user", r.User), zap.Uint32("backend_pid", s.pid), zap.String("address", addr), zap.Stringer("role", s.opened))
	return s, nil
}

// check verifies a connection that sat idle for a while with a round trip.
// A connection that fails it is closed and false is returned.
func (p *Pool) check(ctx context.Context, s *Server) bool {
	if s.Broken() {
		p.Release(s)
		return false
	}
	if p.opts.ServerCheckDelay <= 0 || p.now().Sub(s.lastUsed) < p.opts.ServerCheckDelay {
		return true
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := p.roundTrip(ctx, s); err != nil {
		p.logger.Info("idle server connection failed its check; closing it", zap.Uint64("server_id", s.id), zap.Error(err))
		s.MarkBroken()
		p.Release(s)
		return false
	}
	return true
}

// roundTrip runs an empty query on a held connection and reports its
// duration to Events.Checked.
func (p *Pool) roundTrip(ctx context.Context, s *Server) error {
	began := p.now()
	err := p.Exec(ctx, s, "")
	if f := p.opts.Events.Checked; f != nil {
		f(p.now().Sub(began), err)
	}
	return err
}

// Probe checks that the upstream server answers, and is still what
// target_session_attrs asks for (RoleQuery), on the least recently used
// idle connection, if it has been idle for at least minIdle (a busier pool
// proves the server's health with its own traffic; a change of its role
// shows in its traffic too: ObserveError, ObserveParameter). A server that
// no longer fits has its connections retired. The probe does not count as
// a use: the connection is still closed after timeouts.server_idle. probed
// is false when no connection qualified.
func (p *Pool) Probe(ctx context.Context, minIdle time.Duration) (rtt time.Duration, probed bool, err error) {
	now := p.now()
	p.mu.Lock()
	s := p.oldestIdleLocked(Route{}, false)
	if p.closed || s == nil || now.Sub(s.lastUsed) < minIdle {
		p.mu.Unlock()
		return 0, false, nil
	}
	p.removeIdleLocked(s)
	p.route(s.route).inUse++
	p.mu.Unlock()
	began := p.now()
	row, err := p.QueryRow(ctx, s, RoleQuery)
	rtt = p.now().Sub(began)
	if f := p.opts.Events.Checked; f != nil {
		f(rtt, err)
	}
	var role Role
	if err == nil {
		role, err = RoleFromRow(row)
	}
	if err != nil {
		s.MarkBroken()
	}
	p.release(s, false)
	if err == nil && !p.opts.Target.Fits(s.opened, role) {
		p.retire(s.addr, fmt.Sprintf("the probe found a %s, target_session_attrs is %s", role, p.opts.Target), true)
	}
	return rtt, true, err
}

// Release returns a connection the caller no longer uses. The caller must
// have left it at a safe point (ReadyForQuery idle, nothing in flight) or
// marked it broken; a broken, closing, expired or over-budget connection is
// closed instead of being reused, and so is one whose database is paused.
func (p *Pool) Release(s *Server) { p.release(s, true) }

// release is Release; used says whether the holder used the connection
// (its idle time starts again) or only probed it.
func (p *Pool) release(s *Server, used bool) {
	s.SetHandler(nil)
	s.cancelMu.Lock() // a cancel in flight must land before anyone else uses s
	s.cancelMu.Unlock()
	now := p.now()
	p.mu.Lock()
	closeIt := p.releaseLocked(s, used, now)
	p.mu.Unlock()
	if closeIt {
		s.terminate()
	}
}

// releaseLocked puts s back (or hands it to the head waiter), or retires
// it; true means the caller must terminate it after unlocking.
func (p *Pool) releaseLocked(s *Server, used bool, now time.Time) (terminate bool) {
	rs := p.route(s.route)
	rs.inUse--
	if used {
		s.lastUsed = now
	}
	expired := !s.expires.IsZero() && now.After(s.expires)
	switch {
	case s.Broken() || p.closed || s.TxStatus != 'I':
		return s.retire()
	case expired:
		p.stats.ClosedLifetime++
		rs.counters.ClosedLifetime++
		return s.retire()
	case p.pausedLocked(s.route):
		// A paused database keeps no connection: maintenance or a
		// failover may follow.
		return s.retire()
	case rs.retiring, s.retired.Load():
		return s.retire()
	case p.total > p.limit:
		p.countSurplusLocked(s.route)
		return s.retire()
	case p.checkOnReleaseLocked(s, rs):
		// Its address is suspect: this connection checks the server.
	case p.suspectLocked(s.addr):
		// Kept aside until the check of its server ends (serveIdleOf).
		rs.idle = append(rs.idle, s)
	case p.waiters.len() > 0:
		if p.waiters.peek().route == s.route {
			p.grantLocked(grant{server: s})
			return false
		}
		// The head waiter wants another route: this connection's slot
		// goes to it once the connection is gone.
		p.countSurplusLocked(s.route)
		return s.retire()
	case !used:
		// Back where it was in the idle stack's order: least recently
		// used first.
		rs.idle = append([]*Server{s}, rs.idle...)
	default:
		rs.idle = append(rs.idle, s)
	}
	return false
}

// countSurplusLocked counts an idle connection of r closed because it was
// not needed.
func (p *Pool) countSurplusLocked(r Route) {
	p.stats.ClosedSurplus++
	p.route(r).counters.ClosedSurplus++
}

// serverGone is called by a connection's reader when it has closed.
func (p *Pool) serverGone(s *Server) {
	s.lifeMu.Lock()
	s.gone = true
	if s.closing.Load() {
		p.closingN.Add(-1)
	}
	s.lifeMu.Unlock()
	p.mu.Lock()
	rs := p.route(s.route)
	rs.open--
	delete(rs.servers, s)
	p.removeIdleLocked(s)
	p.notifyLocked()
	p.mu.Unlock()
	p.slotFreed()
}

// slotFreed returns a budget slot: to the first waiter, or to the budget.
func (p *Pool) slotFreed() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.waiters.len() > 0 && p.total <= p.limit && !p.closed {
		// Prefer an idle connection of the head waiter's route (none
		// usually exists, or it would have been granted).
		p.grantLocked(grant{})
		return
	}
	p.total--
	p.notifyLocked()
}

// notifyLocked wakes everyone waiting for the pool's connections to change.
func (p *Pool) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

func (p *Pool) removeIdleLocked(s *Server) {
	rs := p.routes[s.route]
	if rs == nil {
		return
	}
	for i, x := range rs.idle {
		if x == s {
			rs.idle = append(rs.idle[:i], rs.idle[i+1:]...)
			return
		}
	}
}

// popIdleLocked removes and returns the route's most recently used idle
// connection whose server is not under check (suspect), nil if none.
func (p *Pool) popIdleLocked(rs *routeState) *Server {
	for i := len(rs.idle) - 1; i >= 0; i-- {
		s := rs.idle[i]
		if p.suspectLocked(s.addr) {
			continue
		}
		rs.idle = append(rs.idle[:i], rs.idle[i+1:]...)
		return s
	}
	return nil
}

// oldestIdleLocked finds the least recently used idle connection, of any
// route (or, with otherRoutes, of any route but r).
func (p *Pool) oldestIdleLocked(r Route, otherRoutes bool) *Server {
	var oldest *Server
	for rt, rs := range p.routes {
		if otherRoutes && rt == r {
			continue
		}
		if len(rs.idle) > 0 && (oldest == nil || rs.idle[0].lastUsed.Before(oldest.lastUsed)) {
			oldest = rs.idle[0]
		}
	}
	return oldest
}

// reapLoop closes connections idle longer than ServerIdle or older than
// ServerLifetime, once a second, until Close.
func (p *Pool) reapLoop() {
	defer close(p.loopDone)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-p.done:
			return
		case <-t.C:
			p.reap()
		}
	}
}

func (p *Pool) reap() {
	now := p.now()
	var retired []*Server
	defer func() { terminateAll(retired) }() // after the unlock below
	p.mu.Lock()
	defer p.mu.Unlock()
	for r, rs := range p.routes {
		switch {
		case !rs.unused():
			rs.unusedSince = time.Time{}
		case !rs.accepted:
			delete(p.routes, r)
			continue
		case rs.unusedSince.IsZero():
			rs.unusedSince = now
		case p.opts.RouteIdleTimeout > 0 && now.Sub(rs.unusedSince) >= p.opts.RouteIdleTimeout:
			p.logger.Debug("route unused for pool.route_idle_timeout: forgotten", zap.String("db", r.Database), zap.String("user", r.User))
			delete(p.routes, r)
			continue
		}
		for i := 0; i < len(rs.idle); {
			s := rs.idle[i]
			idleTooLong := p.opts.ServerIdle > 0 && now.Sub(s.lastUsed) > p.opts.ServerIdle
			expired := !s.expires.IsZero() && now.After(s.expires)
			if idleTooLong || expired {
				rs.idle = append(rs.idle[:i], rs.idle[i+1:]...)
				if idleTooLong {
					p.stats.ClosedIdle++
					rs.counters.ClosedIdle++
				} else {
					p.stats.ClosedLifetime++
					rs.counters.ClosedLifetime++
				}
				if s.retire() {
					retired = append(retired, s)
				}
				continue
			}
			i++
		}
	}
}

// CloseIdle closes the idle connections of the routes for which match
// returns true (DROP DATABASE needs the governor's own connections to a
// database gone) and returns how many it closed. It waits until they are
// gone or ctx ends.
func (p *Pool) CloseIdle(ctx context.Context, match func(Route) bool) int {
	var closing []*Server
	p.mu.Lock()
	for r, rs := range p.routes {
		if !match(r) {
			continue
		}
		closing = append(closing, rs.idle...)
		rs.idle = nil
	}
	p.mu.Unlock()
	for _, s := range closing {
		s.close()
	}
	for _, s := range closing {
		select {
		case <-s.readDone:
		case <-ctx.Done():
			return len(closing)
		}
	}
	return len(closing)
}

// CloseRoutes closes every connection of the routes match selects: idle
// ones now, busy ones when they are released. It waits until they are all
// gone or ctx ends, and returns how many there were.
func (p *Pool) CloseRoutes(ctx context.Context, match func(Route) bool) int {
	p.mu.Lock()
	var idle []*Server
	var retiring []*routeState
	n := 0
	for r, rs := range p.routes {
		if !match(r) {
			continue
		}
		rs.retiring = true
		retiring = append(retiring, rs)
		idle = append(idle, rs.idle...)
		rs.idle = nil
		n += rs.open
	}
	p.mu.Unlock()
	for _, s := range idle {
		s.close()
	}
	defer func() {
		p.mu.Lock()
		for _, rs := range retiring {
			rs.retiring = false
		}
		p.mu.Unlock()
	}()
	for {
		p.mu.Lock()
		open, changed := 0, p.changed
		for _, rs := range retiring {
			open += rs.open
		}
		p.mu.Unlock()
		if open == 0 {
			return n
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return n
		}
	}
}

// Close closes idle connections, fails waiters with ErrClosed, and closes
// the connections in use as they are released. It waits for the idle ones
// to be gone or ctx to end.
func (p *Pool) Close(ctx context.Context) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	close(p.done)
	var idle []*Server
	for _, rs := range p.routes {
		idle = append(idle, rs.idle...)
		rs.idle = nil
	}
	p.mu.Unlock()
	<-p.loopDone
	for _, s := range idle {
		s.close()
	}
	for _, s := range idle {
		select {
		case <-s.readDone:
		case <-ctx.Done():
			return
		}
	}
}

// Wait blocks until every connection is gone or ctx ends.
func (p *Pool) Wait(ctx context.Context) error {
	return p.waitUntil(ctx, func() bool { return p.total == 0 })
}

// waitUntil blocks until cond, evaluated under the lock after every change
// of the pool's connections, holds or ctx ends.
func (p *Pool) waitUntil(ctx context.Context, cond func() bool) error {
	for {
		p.mu.Lock()
		ok, changed := cond(), p.changed
		p.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

// waitQueue is a FIFO of waiters.
type waitQueue struct{ items []*waiter }

func (q *waitQueue) len() int       { return len(q.items) }
func (q *waitQueue) push(w *waiter) { q.items = append(q.items, w) }
func (q *waitQueue) peek() *waiter  { return q.items[0] }
func (q *waitQueue) pop() *waiter   { w := q.items[0]; q.items[0] = nil; q.items = q.items[1:]; return w }
func (q *waitQueue) remove(w *waiter) bool {
	for i, x := range q.items {
		if x == w {
			q.items = append(q.items[:i], q.items[i+1:]...)
			return true
		}
	}
	return false
}
