// Package cluster shares one connection budget among every pggovernor
// replica pointed at the same server, with no coordinator but Postgres.
//
// Each replica keeps one control connection (counted in the budget) and
// holds its share as session-level advisory locks on it, in the key space
// (budget.cluster.namespace, slot) for slot in [0, budget): one lock, a
// lease, per server connection it may open. Postgres makes a lease
// exclusive, and frees it when the session ends. Each replica also holds a
// membership lock (namespace, -1-id), whose id numbers its cancel keys, and
// keeps a row in a small table: its address for forwarded cancel requests,
// the leases it holds (published before they are used), its demand and
// waiting clients, and a heartbeat on the server's clock.
//
// A replica's pool limit is the number of leases it holds, so it never
// opens a server connection without one. Leases a vanished replica's row
// still lists stay reserved until the row is member_timeout old; the
// replica itself stops opening connections as soon as a heartbeat fails,
// and closes those it still holds before three quarters of member_timeout
// since its last successful one — so its connections are gone before
// anyone else may take its leases. docs/architecture.md states the
// algorithm and its bounds.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/pool"
)

// Pool is what the manager steers: *pool.Pool.
type Pool interface {
	// SetLimit sets how many server connections may be open.
	SetLimit(n int)
	// SetLimitError says why the limit is not known yet.
	SetLimitError(err error)
	// SetLimitNote says what the limit is, for clients that time out.
	SetLimitNote(note string)
	// Stats gives the open, in-use, opening and waiting counts.
	Stats() pool.Stats
	// Servers lists the open connections (their backend PIDs).
	Servers() []pool.ServerInfo
	// Sever closes every connection at once.
	Sever(cause error) int
	// Changed is closed at the next change of the connections.
	Changed() <-chan struct{}
}

// Options configure a Manager.
type Options struct {
	// Store opens control sessions.
	Store Store
	// Pool is the replica's server connection pool.
	Pool Pool
	// Max is budget.max (0: derive the budget from the server).
	Max int
	// Reserve is budget.reserve.
	Reserve int
	// CountForeign is budget.cluster.count_foreign.
	CountForeign bool
	// Heartbeat is budget.cluster.heartbeat_interval.
	Heartbeat time.Duration
	// MemberTimeout is budget.cluster.member_timeout.
	MemberTimeout time.Duration
	// MaxID is the largest replica number cancel keys can encode.
	MaxID int
	// Name says which process this is (host and PID), for people.
	Name string
	// Addr returns the address peers forward cancel requests to. One
	// that CheckAddr refuses is published as "" (no forwarded cancel
	// requests), with a warning.
	Addr func() string
	// PeerAllowed reports whether an IP address may receive forwarded
	// cancel requests (budget.cluster.peer_cidrs): a row whose cancel
	// address is outside is ignored. Nil allows all.
	PeerAllowed func(netip.Addr) bool
	// Logger receives the manager's logs.
	Logger *zap.Logger
	// Now is the clock (time.Now when nil).
	Now func() time.Time
	// Events receive measurements; nil fields are skipped.
	Events Events
}

// Events are callbacks for measurements, called from the manager's
// goroutine; they must not block.
type Events struct {
	// RoundTrip reports each heartbeat: its duration and error (evidence
	// of the upstream's health).
	RoundTrip func(d time.Duration, err error)
	// Acquired reports how long clients waited for leases: from when the
	// manager first saw clients waiting with fewer leases than it may hold,
	// to when it got more.
	Acquired func(d time.Duration)
}

// Stats is the manager's state, for metrics, the admin console and logs.
type Stats struct {
	// ID is this replica's number (0 before it joined).
	ID int
	// Connected is true while the control connection is up.
	Connected bool
	// Known is true once a heartbeat has succeeded.
	Known bool
	// Budget is the cluster budget as last computed.
	Budget Budget
	// Share is this replica's fair share of it; Target what it should hold
	// now given everyone's demand; Leases what it holds; Borrowed the
	// leases held beyond Share.
	Share, Target, Leases, Borrowed int
	// Members are the live replicas, in replica-number order.
	Members []Member
	// Targets are the members' targets, in the same order.
	Targets []int
	// Rebalances counts the times this replica gave leases back because
	// another had waiting clients.
	Rebalances uint64
	// Losses counts the times the control connection was lost.
	Losses uint64
	// Ignored counts the rows of the membership table ignored, by reason
	// (the Ignored* constants): each time a row is read and fails
	// Rules.Check, and once when the heartbeat deletes a row that can
	// never count.
	Ignored map[string]uint64
	// LockHolders are the sessions, seen at two heartbeats in a row, that
	// hold advisory locks of the namespace without being a live member's
	// control connection (nil when none or not looked for: see
	// Manager's probe).
	LockHolders []LockHolder
}

// Manager holds this replica's leases and steers its pool. Run drives it;
// Stats, PeerAddr and ReplicaID may be called from any goroutine.
type Manager struct {
	o    Options
	kick chan struct{}
	// move asks Run to leave the session's server (Move); moving is set
	// from Move until Run has closed that session: meanwhile the pool gets
	// no lease of it.
	move   chan struct{}
	moving atomic.Bool
	// rejoinUntil is set by a Move to a member timeout ahead: until this
	// replica has joined again, or then, Run tries every tenth of a
	// heartbeat instead of at every heartbeat (the server that fits may be
	// a standby being promoted; the others' rows shrink as their
	// connections to the old server close). Owned by Run.
	rejoinUntil time.Time
	// lastOK is when the last successful write of this member's row was
	// sent (UnixNano on o.Now's clock), read by the fence timer.
	lastOK atomic.Int64
	// fenceMu serialises fence with the limit changes of the loop.
	fenceMu sync.Mutex

	// Owned by the goroutine running Run (or the test driving Step).
	sess    Session
	id      int
	held    []int // slots locked on sess, ascending
	claimed []int // slots our row lists (as of the last publish)
	// kept are slots our row lists that we could not lock back when we
	// reconnected (a session that is no replica's took their locks while
	// our row reserved them): listed while our connections need them, so
	// that no replica takes them when that session lets go.
	kept      []int
	keep      int // leases to keep; held beyond it go back as connections close
	joined    time.Time
	demands   [3]int // demand at the last heartbeats (ring)
	di        int
	needSince time.Time
	view      View
	budget    Budget
	known     bool
	failed    map[int]bool // slots that failed to lock since the last heartbeat
	// waitLogged is true once waiting for a first lease was logged.
	waitLogged bool
	// addrWarned is true once an address refused by CheckAddr was
	// logged.
	addrWarned bool
	// probe asks the next heartbeat who holds advisory locks of the
	// namespace without being a member: set when a lock this replica tried
	// was taken, and while the last look found someone (pg_locks is not
	// read at every heartbeat: it is costly on a busy server).
	probe bool
	// holders are the PIDs the last look found.
	holders map[int]bool

	mu    sync.Mutex
	stats Stats
	peers map[int]string
}

// New returns a manager; the caller runs Run.
func New(o Options) *Manager {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Addr == nil {
		o.Addr = func() string { return "" }
	}
	m := &Manager{o: o, kick: make(chan struct{}, 1), move: make(chan struct{}, 1), joined: o.Now(), failed: map[int]bool{}}
	m.stats.Ignored = map[string]uint64{}
	for _, r := range IgnoredReasons() {
		m.stats.Ignored[r] = 0
	}
	return m
}

// Queued is the pool's Events.Queued hook: a client is waiting, so the
// manager looks for a lease at once. It never blocks.
func (m *Manager) Queued() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// Move is told that the server the control connection is on no longer
// fits upstream.url's target_session_attrs (a primary demoted or made
// read-only: the pool retired its connections to it). The leases are
// advisory locks on that server and count nothing on the one new server
// connections go to, so the pool opens none from now (its limit is 0 at
// once) until Run has closed the session and joined the cluster again on
// a new control connection, opened where upstream.url leads now, at once
// and then at every heartbeat until one fits. It never blocks.
func (m *Manager) Move() {
	m.moving.Store(true)
	m.fenceMu.Lock()
	m.o.Pool.SetLimitNote(noteLost)
	m.o.Pool.SetLimit(0)
	m.fenceMu.Unlock()
	select {
	case m.move <- struct{}{}:
	default:
	}
}

// ReplicaID returns this replica's number, 0 before it joined.
func (m *Manager) ReplicaID() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stats.ID
}

// PeerAddr returns where cancel requests for replica id's clients go.
func (m *Manager) PeerAddr(id int) (string, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	a, ok := m.peers[id]
	return a, ok && a != ""
}

// Stats returns the manager's state.
func (m *Manager) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.stats
	st.Members = slices.Clone(st.Members)
	st.Targets = slices.Clone(st.Targets)
	st.Ignored = maps.Clone(st.Ignored)
	st.LockHolders = slices.Clone(st.LockHolders)
	return st
}

var (
	errJoining   = errors.New("joining the cluster (budget.cluster): no lease held yet")
	errFenced    = errors.New("the cluster leases lapsed: no heartbeat reached the server within three quarters of budget.cluster.member_timeout, so other replicas may take them over")
	noteShare    = "this replica's share of the cluster budget"
	noteLost     = "this replica's share of the cluster budget (none while its control connection to the server is down)"
	errNoReplica = errors.New("no replica number is free")
	errMoved     = errors.New("the control connection's server no longer fits upstream.url's target_session_attrs: its leases count nothing where new server connections go")
)

// Run keeps the leases until ctx ends: a heartbeat every o.Heartbeat, a
// quick look for leases when a client queues, leases given back as
// connections close, and a fence timer of its own (a heartbeat blocked on
// a hung connection must not delay it). On the way out it leaves the
// cluster (its row deleted, its leases released) if the pool holds no
// connection any more, or just closes the session otherwise.
func (m *Manager) Run(ctx context.Context) {
	m.o.Pool.SetLimitError(errJoining)
	m.o.Pool.SetLimitNote(noteShare)
	rearm := make(chan time.Time, 1)
	done := make(chan struct{})
	fenceDone := make(chan struct{})
	go m.fenceLoop(rearm, done, fenceDone) // owner: Run; exits when done is closed
	tick := time.NewTimer(0)
	defer func() {
		tick.Stop()
		close(done)
		<-fenceDone
		m.leave()
	}()
	var quick time.Time
	var armed int64
	for {
		var changed <-chan struct{}
		if m.sess != nil && len(m.held) > m.keep {
			changed = m.o.Pool.Changed()
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			m.Step(ctx)
			tick.Reset(m.interval())
		case <-m.kick:
			// At most one quick look per tenth of a heartbeat.
			if now := m.o.Now(); now.Sub(quick) >= m.o.Heartbeat/10 {
				quick = now
				m.Quick(ctx)
			}
		case <-changed:
			m.GiveBack(ctx)
		case <-m.move:
			m.moveNow(ctx)
			tick.Reset(m.interval())
		}
		if ok := m.lastOK.Load(); ok != armed {
			armed = ok
			select { // replace a deadline not taken yet
			case <-rearm:
			default:
			}
			rearm <- time.Unix(0, ok).Add(3 * m.o.MemberTimeout / 4)
		}
	}
}

// moveNow closes the session on the server that no longer fits (Move)
// and joins again on a new one.
func (m *Manager) moveNow(ctx context.Context) {
	if m.sess != nil {
		m.lose(ctx, errMoved)
	}
	m.moving.Store(false) // the session whose leases counted nothing is closed
	m.rejoinUntil = m.o.Now().Add(m.o.MemberTimeout)
	m.Step(ctx)
}

// interval is the time to the next Step: a heartbeat, or a tenth of one
// while rejoining after a Move.
func (m *Manager) interval() time.Duration {
	if m.sess == nil && m.o.Now().Before(m.rejoinUntil) {
		return m.o.Heartbeat / 10
	}
	return m.o.Heartbeat
}

// fenceLoop calls Fence at the deadline last received on rearm.
func (m *Manager) fenceLoop(rearm <-chan time.Time, done <-chan struct{}, exited chan<- struct{}) {
	defer close(exited)
	t := time.NewTimer(time.Hour)
	t.Stop()
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case at := <-rearm:
			t.Reset(max(at.Sub(m.o.Now()), 0))
		case <-t.C:
			m.Fence()
		}
	}
}

// callCtx bounds one exchange with the server to a quarter of the member
// timeout, so a hung control connection is noticed in time.
func (m *Manager) callCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, m.o.MemberTimeout/4)
}

// Step is one heartbeat: (re)join if needed, publish the row, read the
// others', and rebalance.
func (m *Manager) Step(ctx context.Context) {
	st := m.o.Pool.Stats()
	m.demands[m.di%len(m.demands)] = st.InUse + st.Opening + st.Waiting
	m.di++
	m.failed = map[int]bool{}
	cctx, cancel := m.callCtx(ctx)
	defer cancel()
	if m.sess == nil {
		if m.connect(cctx) {
			m.rebalance(cctx, true)
		}
		m.publishStats()
		return
	}
	if m.heartbeat(cctx) {
		m.rebalance(cctx, true)
	}
	m.publishStats()
}

// heartbeat publishes our row and reads the view; false when the session
// was lost.
func (m *Manager) heartbeat(ctx context.Context) bool {
	sent := m.o.Now()
	b := m.beat()
	b.ProbeLocks = m.probe
	v, err := m.sess.Heartbeat(ctx, b)
	if f := m.o.Events.RoundTrip; f != nil && !errors.Is(ctx.Err(), context.Canceled) {
		f(m.o.Now().Sub(sent), err)
	}
	if err != nil {
		m.lose(ctx, err)
		return false
	}
	m.renewed(sent, b.Slots)
	for reason, n := range v.Purged {
		m.ignored(reason, 0, "deleted by the heartbeat: it could never count", n)
	}
	v.Members = m.admit(v.Members, m.id)
	if v.LockHolders != nil {
		m.lockHolders(v.LockHolders)
	}
	m.view = v
	return true
}

// admit checks the rows read (Rules.Check) and returns the members'; the
// others are counted and logged. The row of self, written in the same
// exchange, is ours.
func (m *Manager) admit(rows []Member, self int) []Member {
	rules := Rules{MaxID: m.o.MaxID, Timeout: m.o.MemberTimeout, PeerAllowed: m.o.PeerAllowed}
	out := make([]Member, 0, len(rows))
	for _, r := range rows {
		if self != 0 && r.ID == self {
			out = append(out, r)
			continue
		}
		if reason, detail := rules.Check(&r); reason != "" {
			m.ignored(reason, r.ID, detail, 1)
			continue
		}
		out = append(out, r)
	}
	return out
}

// ignored counts n rows ignored for reason and logs it (repeats are
// limited by log.repeat_interval).
func (m *Manager) ignored(reason string, id int, detail string, n int) {
	m.mu.Lock()
	m.stats.Ignored[reason] += uint64(n)
	m.mu.Unlock()
	m.o.Logger.Warn("ignoring a row of the membership table that no replica wrote as it is (budget.cluster.table; see README, Cluster mode, for who may write it)",
		zap.String("reason", reason), zap.Int("replica_id", id), zap.String("detail", detail), zap.Int("rows", n))
}

// lockHolders records the sessions found holding advisory locks of the
// namespace without being members; one seen at two looks in a row (not a
// replica between taking its number and writing its row) is reported.
func (m *Manager) lockHolders(hs []LockHolder) {
	seen := make(map[int]bool, len(hs))
	var confirmed []LockHolder
	for _, h := range hs {
		seen[h.PID] = true
		if m.holders[h.PID] {
			confirmed = append(confirmed, h)
		}
	}
	m.holders = seen
	m.probe = len(hs) > 0
	m.mu.Lock()
	m.stats.LockHolders = confirmed
	m.mu.Unlock()
	if len(confirmed) > 0 {
		pids := make([]int, len(confirmed))
		leases, members := 0, 0
		for i, h := range confirmed {
			pids[i] = h.PID
			leases += h.Leases
			members += h.Members
		}
		m.o.Logger.Warn("sessions that are not replicas hold advisory locks of the cluster namespace (budget.cluster.namespace): the replicas share the leases left; find them in pg_stat_activity by PID",
			zap.Ints("pids", pids), zap.Int("lease_locks", leases), zap.Int("member_locks", members))
	}
}

// Quick looks for leases with the view of the last heartbeat, when a
// client has just queued.
func (m *Manager) Quick(ctx context.Context) {
	if m.sess == nil || !m.known {
		return
	}
	cctx, cancel := m.callCtx(ctx)
	defer cancel()
	m.rebalance(cctx, false)
	m.publishStats()
}

// GiveBack releases leases beyond what is kept as connections close.
func (m *Manager) GiveBack(ctx context.Context) {
	if m.sess == nil {
		return
	}
	cctx, cancel := m.callCtx(ctx)
	defer cancel()
	m.release(cctx)
	m.publishStats()
}

// validUntil is when our leases may lapse: three quarters of the member
// timeout after the last successful write of our row was sent. Others take
// a vanished member's leases only once its row is a whole member timeout
// old, on the server's clock, which is later.
func (m *Manager) validUntil() time.Time {
	return time.Unix(0, m.lastOK.Load()).Add(3 * m.o.MemberTimeout / 4)
}

// Fence closes every server connection if the leases may have lapsed.
func (m *Manager) Fence() {
	if m.lastOK.Load() == 0 || m.o.Now().Before(m.validUntil()) {
		return
	}
	m.fenceMu.Lock()
	defer m.fenceMu.Unlock()
	m.o.Pool.SetLimit(0)
	m.o.Pool.SetLimitNote(noteLost)
	if m.o.Pool.Stats().Open > 0 {
		m.o.Pool.Sever(errFenced)
	}
}

// setLimit gives the pool the leases kept, less the control connection's
// — none once they may have lapsed.
func (m *Manager) setLimit(leases int, note string) {
	m.fenceMu.Lock()
	defer m.fenceMu.Unlock()
	if !m.o.Now().Before(m.validUntil()) || m.moving.Load() {
		leases, note = 0, noteLost
	}
	m.o.Pool.SetLimitNote(note)
	m.o.Pool.SetLimit(max(leases-1, 0))
}

// connect opens a session, takes a replica number (ours if we had one),
// the leases our row still reserves for us, and, if that leaves none, a
// free lease for the control connection itself. Without one, it publishes
// its row (a request: the others make room for a member below its floor)
// and disconnects, to try again at the next heartbeat: a control
// connection without a lease is only ever open for these few round trips.
func (m *Manager) connect(ctx context.Context) bool {
	sess, err := m.o.Store.Open(ctx)
	if err != nil {
		m.o.Logger.Warn("cannot open the control connection; retrying at the next heartbeat", zap.Error(err))
		return false
	}
	members, err := sess.Members(ctx)
	if err != nil {
		sess.Close()
		m.o.Logger.Warn("cannot read the cluster members; retrying at the next heartbeat", zap.Error(err))
		return false
	}
	members = m.admit(members, 0)
	// Numbers of live members are theirs. A member reconnecting within the
	// member timeout of its last write gets its own number back (nobody
	// may have taken it: its row was live all along); one whose row lapsed
	// is a new member, and a live row with its old number is someone
	// else's — another replica took the number after the row lapsed, and
	// its row reserves the leases of that replica's connections.
	lapsed := m.lastOK.Load() == 0 || !m.o.Now().Before(time.Unix(0, m.lastOK.Load()).Add(m.o.MemberTimeout))
	taken := map[int]bool{}
	for _, mb := range members {
		if (mb.ID != m.id || lapsed) && mb.Age < m.o.MemberTimeout {
			taken[mb.ID] = true
		}
	}
	var ids []int
	if m.id > 0 && !lapsed {
		ids = append(ids, m.id)
	}
	for id := 1; id <= m.o.MaxID; id++ {
		if !taken[id] && id != m.id {
			ids = append(ids, id)
		}
	}
	id, err := sess.Join(ctx, ids)
	if err == nil && id == 0 {
		err = fmt.Errorf("%w: %d replicas hold the numbers 1 to %d", errNoReplica, len(taken), m.o.MaxID)
	}
	if err != nil {
		sess.Close()
		m.o.Logger.Error("cannot join the cluster; retrying at the next heartbeat", zap.Error(err))
		return false
	}
	if id != ids[0] {
		m.probe = true // a number was taken: by whom?
	}
	if m.id > 0 && !lapsed && id != m.id {
		// Our number's lock is held by a session that is no replica's (no
		// replica takes the number of a live row). Our row still reserves
		// the leases of the connections we hold: joining under another
		// number would renew our fence while that row lapses under them.
		// Wait until it lapses (the fence closes them first).
		sess.Close()
		m.o.Logger.Warn("this replica's number is locked by a session that is not a replica; it joins under another once its row is budget.cluster.member_timeout old",
			zap.Int("replica", m.id))
		return false
	}
	rejoin := m.known
	if id != m.id || lapsed {
		m.claimed = nil // no longer reserved for us
	}
	m.id = id
	held, err := sess.Lock(ctx, id, m.claimed, m.o.MemberTimeout)
	if err != nil {
		sess.Close()
		m.o.Logger.Warn("cannot take back the leases; retrying at the next heartbeat", zap.Error(err))
		return false
	}
	m.kept = nil
	for _, s := range m.claimed {
		if !slices.Contains(held, s) {
			m.kept = append(m.kept, s)
			m.probe = true
		}
	}
	slices.Sort(held)
	reserved := len(m.claimed)
	m.sess, m.held = sess, held
	if !m.heartbeat(ctx) {
		return false
	}
	if len(m.held) == 0 {
		p := m.plan()
		var candidates []int
		for s := 0; s < m.budget.Total; s++ {
			if !p.reserved[s] {
				candidates = append(candidates, s)
			}
		}
		for len(m.held) == 0 && len(candidates) > 0 {
			try := candidates[:min(Floor, len(candidates))]
			candidates = candidates[len(try):]
			got, err := m.sess.Lock(ctx, m.id, try, m.o.MemberTimeout)
			if err != nil {
				m.lose(ctx, err)
				return false
			}
			if len(got) < len(try) {
				m.probe = true
			}
			m.held = got
		}
		if len(m.held) == 0 {
			level := zap.InfoLevel
			if m.waitLogged {
				level = zap.DebugLevel
			}
			m.waitLogged = true
			m.o.Logger.Log(level, "waiting for a lease to join the cluster: the budget is in use; the other replicas give one back at their next heartbeat",
				zap.Int("replica", m.id), zap.String("budget", m.budget.String()))
			m.sess.Close()
			m.sess = nil
			return false
		}
		sent := m.o.Now()
		b := m.beat()
		if err := m.sess.Publish(ctx, b); err != nil {
			m.lose(ctx, err)
			return false
		}
		m.renewed(sent, b.Slots)
	}
	m.waitLogged = false
	m.o.Logger.Info("joined the cluster", zap.Int("replica", id), zap.Bool("rejoined", rejoin),
		zap.Int("leases", len(m.held)), zap.Int("leases_reserved", reserved))
	return true
}

// lose ends the session after a failed exchange: no new server
// connections, idle ones closed now and the others at their release; the
// row keeps our leases reserved for a member timeout.
func (m *Manager) lose(ctx context.Context, err error) {
	m.sess.Close()
	m.sess, m.held, m.keep = nil, nil, 0
	m.setLimit(0, noteLost)
	if errors.Is(ctx.Err(), context.Canceled) {
		return // shutting down: the pool is closed already
	}
	m.mu.Lock()
	m.stats.Losses++
	m.stats.Connected = false
	m.mu.Unlock()
	m.o.Logger.Warn("lost the control connection: no new server connections until it is back; idle ones are closed now, the others as their clients release them",
		zap.Error(err), zap.Int("replica", m.id), zap.Int("open", m.o.Pool.Stats().Open))
}

// renewed records a successful write of our row listing slots, sent at
// sent.
func (m *Manager) renewed(sent time.Time, slots []int) {
	m.lastOK.Store(sent.UnixNano())
	m.claimed = slices.Clone(slots)
}

// rowSlots is what our row lists when we hold held: those, and as many of
// the kept slots as our open connections (and the control connection)
// need beyond them.
func (m *Manager) rowSlots(held []int) []int {
	// A kept slot we have since locked (its squatter let go) is held.
	m.kept = slices.DeleteFunc(m.kept, func(s int) bool { return slices.Contains(held, s) })
	need := m.o.Pool.Stats().Open + 1 - len(held)
	if need <= 0 || len(m.kept) == 0 {
		m.kept = nil
		return held
	}
	m.kept = m.kept[:min(need, len(m.kept))]
	out := append(slices.Clone(held), m.kept...)
	slices.Sort(out)
	return out
}

// demand is the server connections wanted at the last heartbeats.
func (m *Manager) demand() int {
	st := m.o.Pool.Stats()
	d := st.InUse + st.Opening + st.Waiting
	for _, x := range m.demands {
		d = max(d, x)
	}
	return d
}

func (m *Manager) beat() Beat {
	st := m.o.Pool.Stats()
	addr := m.o.Addr()
	if err := CheckAddr(addr, m.o.PeerAllowed); err != nil {
		if !m.addrWarned {
			m.addrWarned = true
			m.o.Logger.Warn("this replica publishes no address for forwarded cancel requests: cancel requests for its clients that reach another replica are dropped; set budget.cluster.advertise_address or budget.cluster.peer_cidrs",
				zap.Error(err))
		}
		addr = ""
	}
	b := Beat{ID: m.id, Name: m.o.Name, Addr: addr, Slots: m.rowSlots(m.held), Demand: m.demand(),
		Waiting: st.Waiting, Joined: m.joined, Timeout: m.o.MemberTimeout, CountForeign: m.o.CountForeign}
	if m.o.CountForeign {
		for _, s := range m.o.Pool.Servers() {
			b.ServerPIDs = append(b.ServerPIDs, int(s.PID))
		}
	}
	return b
}

// plan is what the view says this replica should hold, in leases (its
// control connection's included).
type plan struct {
	live     []Member // with our row as of now
	self     int      // our index in live
	targets  []int
	share    int
	reserved map[int]bool // slots listed by other live members
	// needy is true when another member holds fewer leases than its
	// target and has clients waiting (or holds less than the floor).
	needy bool
}

func (m *Manager) plan() plan {
	var p plan
	p.self = -1
	st := m.o.Pool.Stats()
	for _, mb := range m.view.Members {
		if mb.ID == m.id {
			// Our own figures are fresher than the row read.
			mb.Slots, mb.Waiting, mb.Demand = m.held, st.Waiting, m.demand()
			p.self = len(p.live)
		} else if mb.Age >= m.o.MemberTimeout {
			continue
		}
		p.live = append(p.live, mb)
	}
	if p.self < 0 { // our row was missing from the view: count us anyway
		p.live = append(p.live, Member{ID: m.id, Slots: m.held, Waiting: st.Waiting, Demand: m.demand()})
		slices.SortFunc(p.live, func(a, b Member) int { return a.ID - b.ID })
		for i, mb := range p.live {
			if mb.ID == m.id {
				p.self = i
			}
		}
	}
	m.budget = ComputeBudget(m.view.Limits, m.o.Max, m.o.Reserve, len(p.live), m.view.Foreign)
	demands := make([]int, len(p.live))
	for i, mb := range p.live {
		demands[i] = mb.Demand + 1 // the control connection's lease
	}
	p.targets = Targets(m.budget.Total, demands)
	p.share = FairShare(m.budget.Total, len(p.live), p.self)
	p.reserved = map[int]bool{}
	for i, mb := range p.live {
		if i == p.self {
			continue
		}
		for _, s := range mb.Slots {
			p.reserved[s] = true
		}
		if len(mb.Slots) < p.targets[i] && (mb.Waiting > 0 || len(mb.Slots) < Floor) {
			p.needy = true
		}
	}
	return p
}

// rebalance moves this replica's leases toward what the view says:
// take free leases up to the target (or, when nobody else needs them, as
// many as clients wait for), give back what is beyond it when another
// replica needs them, and drop leases beyond a shrunken budget. The
// control connection keeps one lease whatever happens.
func (m *Manager) rebalance(ctx context.Context, heartbeat bool) {
	p := m.plan()
	total := m.budget.Total
	target := p.targets[p.self]
	st := m.o.Pool.Stats()
	inRange := 0
	for _, s := range m.held {
		if s < total {
			inRange++
		}
	}
	goal := target
	if !p.needy {
		// Nobody else needs them: keep borrowed leases, and borrow free
		// ones for clients waiting.
		goal = max(goal, inRange)
		if st.Waiting > 0 {
			goal = max(goal, len(m.held)+st.Waiting)
		}
	}
	goal = min(goal, total)
	if st.Waiting > 0 && len(m.held) < goal {
		if m.needSince.IsZero() {
			m.needSince = m.o.Now()
		}
	} else {
		m.needSince = time.Time{}
	}
	if inRange < goal {
		var candidates []int
		held := map[int]bool{}
		for _, s := range m.held {
			held[s] = true
		}
		for s := 0; s < total; s++ {
			if !held[s] && !p.reserved[s] && !m.failed[s] {
				candidates = append(candidates, s)
			}
		}
		want := goal - inRange
		var got []int
		for len(got) < want && len(candidates) > 0 {
			try := candidates[:min(want-len(got), len(candidates))]
			candidates = candidates[len(try):]
			g, err := m.sess.Lock(ctx, m.id, try, m.o.MemberTimeout)
			if err != nil {
				m.lose(ctx, err)
				return
			}
			for _, s := range try {
				if !slices.Contains(g, s) {
					m.failed[s] = true
					m.probe = true
				}
			}
			got = append(got, g...)
		}
		if len(got) > 0 {
			m.held = append(m.held, got...)
			slices.Sort(m.held)
			sent := m.o.Now()
			b := m.beat()
			if err := m.sess.Publish(ctx, b); err != nil {
				// Not published, so not ours to use: the session is
				// suspect; start again.
				m.lose(ctx, err)
				return
			}
			m.renewed(sent, b.Slots)
			inRange += len(got)
			if !m.needSince.IsZero() {
				if f := m.o.Events.Acquired; f != nil {
					f(m.o.Now().Sub(m.needSince))
				}
				m.needSince = time.Time{}
			}
		}
	}
	keep := max(min(goal, inRange), 1)
	if heartbeat && keep < inRange && p.needy {
		m.mu.Lock()
		m.stats.Rebalances++
		m.mu.Unlock()
		m.o.Logger.Debug("giving leases back to replicas with waiting clients", zap.Int("leases", len(m.held)),
			zap.Int("target", target), zap.Int("keep", keep))
	}
	m.keep = keep
	m.known = true
	m.setLimit(keep, noteShare)
	m.release(ctx)
}

// release unlocks the leases held beyond m.keep that no connection needs
// any more (idle ones were closed by the lower limit; busy ones close at
// their release): out-of-budget slots first, then the highest.
func (m *Manager) release(ctx context.Context) {
	open := m.o.Pool.Stats().Open + 1 // and the control connection
	n := len(m.held) - max(m.keep, open)
	if n <= 0 {
		return
	}
	total := m.budget.Total
	order := slices.Clone(m.held)
	slices.SortFunc(order, func(a, b int) int {
		ao, bo := a >= total, b >= total
		if ao != bo {
			if ao {
				return -1
			}
			return 1
		}
		return b - a
	})
	drop := order[:n]
	rest := make([]int, 0, len(m.held)-n)
	for _, s := range m.held {
		if !slices.Contains(drop, s) {
			rest = append(rest, s)
		}
	}
	b := m.beat()
	b.Slots = m.rowSlots(rest)
	sent := m.o.Now()
	if err := m.sess.Release(ctx, drop, b); err != nil {
		m.lose(ctx, err)
		return
	}
	m.held = rest
	m.renewed(sent, b.Slots)
}

// leave ends membership when Run returns.
func (m *Manager) leave() {
	if m.sess == nil {
		return
	}
	if m.o.Pool.Stats().Open == 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if err := m.sess.Leave(ctx, m.id); err != nil {
			m.o.Logger.Warn("leaving the cluster", zap.Error(err))
		} else {
			m.o.Logger.Info("left the cluster", zap.Int("replica", m.id))
		}
		cancel()
	}
	m.sess.Close()
	m.sess, m.held = nil, nil
}

// publishStats copies the loop's state for readers.
func (m *Manager) publishStats() {
	var p plan
	if m.known {
		p = m.plan()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	st := &m.stats
	st.ID, st.Connected, st.Known = m.id, m.sess != nil, m.known
	st.Budget, st.Leases = m.budget, len(m.held)
	st.Members, st.Targets = p.live, p.targets
	st.Share, st.Target = p.share, 0
	if p.live != nil {
		st.Target = p.targets[p.self]
	}
	st.Borrowed = max(0, st.Leases-st.Share)
	peers := map[int]string{}
	for _, mb := range p.live {
		if mb.ID != m.id {
			peers[mb.ID] = mb.Addr
		}
	}
	m.peers = peers
}
