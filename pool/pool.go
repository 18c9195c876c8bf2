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
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
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
	// Now is the clock (time.Now when nil).
	Now func() time.Time
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

	mu       sync.Mutex
	limit    int
	limitSet bool
	limitErr error // why the limit is not known yet
	total    int   // open + connecting + closing
	routes   map[Route]*routeState
	waiters  waitQueue
	closed   bool
	stats    Stats

	done     chan struct{}
	loopDone chan struct{}
	// drained is closed and replaced whenever a connection goes away or
	// total drops, for Wait and CloseRoutes.
	drained chan struct{}
}

type routeState struct {
	idle     []*Server // most recently used last
	retiring bool      // CloseRoutes: released connections are closed
	open     int       // connections of this route (idle or in use)
	inUse    int
	welcome  map[string]string
}

// Stats are cumulative and current figures, read at scrape time.
type Stats struct {
	// Limit is the budget.
	Limit int
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
	// Connects counts connections opened; ConnectErrors failed attempts.
	Connects, ConnectErrors int64
}

// New returns a pool with an unknown (zero) budget: Acquire waits until
// SetLimit. The caller must call Close.
func New(opts Options) *Pool {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	p := &Pool{
		opts:     opts,
		logger:   opts.Logger,
		now:      opts.Now,
		routes:   map[Route]*routeState{},
		done:     make(chan struct{}),
		loopDone: make(chan struct{}),
		limitErr: errors.New("the budget is not known yet"),
		drained:  make(chan struct{}),
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
	defer p.mu.Unlock()
	p.limit, p.limitSet, p.limitErr = n, true, nil
	for p.total < p.limit && p.waiters.len() > 0 {
		p.total++
		p.grantLocked(grant{})
	}
	p.shrinkLocked()
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

// Limit returns the budget and whether it is known.
func (p *Pool) Limit() (int, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.limit, p.limitSet
}

// shrinkLocked closes idle connections, oldest first, while more are open
// than the budget allows.
func (p *Pool) shrinkLocked() {
	for p.total-p.closingLocked() > p.limit {
		s := p.oldestIdleLocked(Route{}, false)
		if s == nil {
			return
		}
		p.removeIdleLocked(s)
		s.close()
	}
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
	st.Limit, st.Open, st.Waiting = p.limit, p.total, p.waiters.len()
	for _, rs := range p.routes {
		st.Idle += len(rs.idle)
		st.InUse += rs.inUse
	}
	return st
}

// RouteStats returns per-route open, idle and in-use counts.
func (p *Pool) RouteStats() map[Route][3]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[Route][3]int, len(p.routes))
	for r, rs := range p.routes {
		out[r] = [3]int{rs.open, len(rs.idle), rs.inUse}
	}
	return out
}

func (p *Pool) route(r Route) *routeState {
	rs := p.routes[r]
	if rs == nil {
		rs = &routeState{}
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
}

func (e *WaitError) Error() string {
	switch {
	case !e.LimitKnown:
		return fmt.Sprintf("no server connection after waiting %s: %v", e.Waited.Round(time.Millisecond), e.Cause)
	case e.Cause != nil:
		return fmt.Sprintf("no server connection after waiting %s: connecting to the server failed: %v", e.Waited.Round(time.Millisecond), e.Cause)
	}
	return fmt.Sprintf("no server connection after waiting %s: all %d connections of the budget are in use", e.Waited.Round(time.Millisecond), e.Limit)
}

func (e *WaitError) Unwrap() error { return e.Cause }

// ErrClosed is returned by Acquire once the pool is closed.
var ErrClosed = errors.New("the server connection pool is shut down")

// Acquire returns a connection for route, opening one within the budget or
// waiting in FIFO order for one. ctx bounds the wait (the caller applies
// timeouts.query_wait); the caller must Release the connection. params
// are the startup parameters for a connection opened for this request.
func (p *Pool) Acquire(ctx context.Context, r Route, params map[string]string) (*Server, error) {
	start := p.now()
	var lastErr error
	for attempt := 0; ; attempt++ {
		g, err := p.acquireGrant(ctx, r, start, lastErr)
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
				werr = p.waitError(start, err)
			}
			return nil, werr
		}
		lastErr = err
		backoff := time.Duration(10<<min(attempt, 7)) * time.Millisecond // 10ms .. 1.28s
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, p.waitError(start, lastErr)
		case <-t.C:
		}
	}
}

// TryAcquire returns an idle connection of route at once, or nil when
// none is idle (or clients are already waiting). It needs no timer, so it
// is the first thing a client tries.
func (p *Pool) TryAcquire(r Route) *Server {
	p.mu.Lock()
	rs := p.routes[r]
	if rs == nil || len(rs.idle) == 0 || p.waiters.len() > 0 || p.closed {
		p.mu.Unlock()
		return nil
	}
	n := len(rs.idle)
	s := rs.idle[n-1]
	rs.idle = rs.idle[:n-1]
	rs.inUse++
	p.mu.Unlock()
	if s.Broken() || (p.opts.ServerCheckDelay > 0 && p.now().Sub(s.lastUsed) >= p.opts.ServerCheckDelay) {
		// Let Acquire close it or check it.
		p.Release(s)
		return nil
	}
	return s
}

func (p *Pool) waitError(start time.Time, cause error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stats.WaitTimeouts++
	if !p.limitSet {
		cause = p.limitErr
	}
	return &WaitError{Waited: p.now().Sub(start), Limit: p.limit, LimitKnown: p.limitSet, Cause: cause}
}

// retryable says whether a connect error may go away by itself: the server
// is full, starting, unreachable for now; or the error says so itself with
// a Retryable method (a credential source that may recover, such as RDS IAM
// token minting).
func retryable(err error) bool {
	var self interface{ Retryable() bool }
	if errors.As(err, &self) {
		return self.Retryable()
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "53300", "57P03", "53400", "08006", "08001", "08004":
			return true
		}
		return false
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	msg := err.Error()
	return strings.Contains(msg, "connection refused") || strings.Contains(msg, "no such file") ||
		strings.Contains(msg, "connection reset") || strings.Contains(msg, "EOF") || strings.Contains(msg, "timeout")
}

// grant is what a waiter receives: an idle connection of its route, or a
// budget slot to open one with (server nil).
type grant struct{ server *Server }

type waiter struct {
	route Route
	ch    chan grant
}

func (p *Pool) acquireGrant(ctx context.Context, r Route, start time.Time, lastErr error) (grant, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return grant{}, ErrClosed
	}
	rs := p.route(r)
	if n := len(rs.idle); n > 0 && p.waiters.len() == 0 {
		s := rs.idle[n-1]
		rs.idle = rs.idle[:n-1]
		rs.inUse++
		p.mu.Unlock()
		return grant{server: s}, nil
	}
	if p.waiters.len() == 0 && p.total < p.limit {
		p.total++
		p.mu.Unlock()
		return grant{}, nil
	}
	w := &waiter{route: r, ch: make(chan grant, 1)}
	p.waiters.push(w)
	p.stats.WaitCount++
	// Free a slot for this route by closing another route's idle
	// connection, so that no route starves while others sit idle.
	if p.total >= p.limit && len(rs.idle) == 0 {
		if victim := p.oldestIdleLocked(r, true); victim != nil {
			p.removeIdleLocked(victim)
			victim.close()
		}
	}
	p.mu.Unlock()

	select {
	case g := <-w.ch:
		p.addWait(start)
		return g, nil
	case <-ctx.Done():
		p.mu.Lock()
		removed := p.waiters.remove(w)
		p.mu.Unlock()
		if !removed { // granted meanwhile: give it back
			g := <-w.ch
			if g.server != nil {
				p.Release(g.server)
			} else {
				p.slotFreed()
			}
		}
		p.addWait(start)
		return grant{}, p.waitError(start, lastErr)
	case <-p.done:
		return grant{}, ErrClosed
	}
}

func (p *Pool) addWait(start time.Time) {
	p.mu.Lock()
	p.stats.WaitDuration += p.now().Sub(start)
	p.mu.Unlock()
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
	// The connection outlives this request, so its setup is not cut short
	// by the requester giving up; only by the connect timeout.
	hc, err := p.opts.Connector.Connect(context.WithoutCancel(ctx), r, params)
	if err != nil {
		p.mu.Lock()
		p.stats.ConnectErrors++
		p.mu.Unlock()
		p.slotFreed()
		return nil, err
	}
	now := p.now()
	s := &Server{
		pool:      p,
		route:     r,
		conn:      hc.Conn,
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
	rs.open++
	rs.inUse++
	p.stats.Connects++
	if rs.welcome == nil {
		w := make(map[string]string, len(hc.ParameterStatuses))
		for k, v := range hc.ParameterStatuses {
			w[k] = v
		}
		rs.welcome = w
	}
	p.mu.Unlock()
	go s.readLoop(p.getBuf()) // owner: s; exits when the connection closes
	p.logger.Debug("server connection opened", zap.Uint64("server_id", s.id), zap.String("db", r.Database),
		zap.String("user", r.User), zap.Uint32("backend_pid", s.pid))
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
	if err := p.Exec(ctx, s, ""); err != nil {
		p.logger.Info("idle server connection failed its check; closing it", zap.Uint64("server_id", s.id), zap.Error(err))
		s.MarkBroken()
		p.Release(s)
		return false
	}
	return true
}

// Release returns a connection the caller no longer uses. The caller must
// have left it at a safe point (ReadyForQuery idle, nothing in flight) or
// marked it broken; a broken, closing, expired or over-budget connection is
// closed instead of being reused.
func (p *Pool) Release(s *Server) {
	s.SetHandler(nil)
	s.cancelMu.Lock() // a cancel in flight must land before anyone else uses s
	s.cancelMu.Unlock()
	now := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	rs := p.route(s.route)
	rs.inUse--
	s.lastUsed = now
	expired := !s.expires.IsZero() && now.After(s.expires)
	switch {
	case s.Broken() || p.closed || s.TxStatus != 'I':
		s.close()
	case expired:
		p.stats.ClosedLifetime++
		s.close()
	case rs.retiring:
		s.close()
	case p.total > p.limit:
		s.close()
	case p.waiters.len() > 0:
		if p.waiters.peek().route == s.route {
			p.grantLocked(grant{server: s})
		} else {
			// The head waiter wants another route: this connection's
			// slot goes to it once the connection is gone.
			s.close()
		}
	default:
		rs.idle = append(rs.idle, s)
	}
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
	p.removeIdleLocked(s)
	p.broadcastLocked()
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
	p.broadcastLocked()
}

// broadcastLocked wakes everyone waiting for connections to go away.
func (p *Pool) broadcastLocked() {
	close(p.drained)
	p.drained = make(chan struct{})
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
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, rs := range p.routes {
		for i := 0; i < len(rs.idle); {
			s := rs.idle[i]
			idleTooLong := p.opts.ServerIdle > 0 && now.Sub(s.lastUsed) > p.opts.ServerIdle
			expired := !s.expires.IsZero() && now.After(s.expires)
			if idleTooLong || expired {
				rs.idle = append(rs.idle[:i], rs.idle[i+1:]...)
				if idleTooLong {
					p.stats.ClosedIdle++
				} else {
					p.stats.ClosedLifetime++
				}
				s.close()
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
		open, changed := 0, p.drained
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
	for {
		p.mu.Lock()
		n, changed := p.total, p.drained
		p.mu.Unlock()
		if n == 0 {
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
