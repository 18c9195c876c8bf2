package pool

// This file is what the pool knows of the upstream servers behind its
// connections: which address each connection reached and what the server
// was when it was opened (a primary, a read-only primary, a standby), what
// target_session_attrs asks of them, the evidence that a server stopped
// being what it was (a 25006 error, a ParameterStatus, a connection
// terminated by the server), the check of that evidence on the server
// itself, and the retirement of every connection to a server that no
// longer fits: idle ones at once, busy ones at their release. New
// connections then go wherever the upstream URL leads now (its hosts in
// order, DNS resolved again), which is how a failover is followed.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/wire"
)

// Target is libpq's target_session_attrs: which servers a connection may
// use. pgconn applies it when a connection is opened (its ValidateConnect);
// the pool applies it for the connection's life.
type Target string

// The values of target_session_attrs, as libpq's.
const (
	// TargetAny accepts any server. A connection opened on a writable
	// primary is expected to stay writable: its server becoming read-only
	// or a standby (a demoted writer) retires it.
	TargetAny Target = "any"
	// TargetReadWrite accepts servers whose transactions are writable by
	// default: not a standby, default_transaction_read_only off.
	TargetReadWrite Target = "read-write"
	// TargetReadOnly accepts servers whose transactions are read-only by
	// default: standbys, and primaries with default_transaction_read_only.
	TargetReadOnly Target = "read-only"
	// TargetPrimary accepts servers that are not in recovery.
	TargetPrimary Target = "primary"
	// TargetStandby accepts servers in recovery.
	TargetStandby Target = "standby"
	// TargetPreferStandby prefers standbys and accepts a primary when no
	// standby answers. A connection opened on a standby that is promoted
	// is retired, so that a standby is looked for again.
	TargetPreferStandby Target = "prefer-standby"
)

// ParseTarget parses a target_session_attrs value; "" is any.
func ParseTarget(s string) (Target, error) {
	switch t := Target(s); t {
	case "":
		return TargetAny, nil
	case TargetAny, TargetReadWrite, TargetReadOnly, TargetPrimary, TargetStandby, TargetPreferStandby:
		return t, nil
	}
	return "", fmt.Errorf("unknown target_session_attrs value %q: use any, read-write, read-only, primary, standby or prefer-standby", s)
}

// Role is what a server is, as far as target_session_attrs cares.
type Role struct {
	// Known is false when the server did not say (before PostgreSQL 14,
	// servers do not report in_hot_standby and
	// default_transaction_read_only at connection start).
	Known bool
	// Standby is true while the server is in recovery (in_hot_standby).
	Standby bool
	// ReadOnly is true when its transactions are read-only by default: a
	// standby, or default_transaction_read_only on.
	ReadOnly bool
}

// Writable reports whether the server is known to take writes.
func (r Role) Writable() bool { return r.Known && !r.Standby && !r.ReadOnly }

func (r Role) String() string {
	switch {
	case !r.Known:
		return "unknown"
	case r.Standby:
		return "standby"
	case r.ReadOnly:
		return "read-only primary"
	}
	return "primary"
}

// RoleFromParams reads a server's role from the parameters it reports
// (ParameterStatus: in_hot_standby and default_transaction_read_only,
// PostgreSQL 14 and later); unknown when they are missing.
func RoleFromParams(params map[string]string) Role {
	hs, ok := params["in_hot_standby"]
	ro, ok2 := params["default_transaction_read_only"]
	if !ok || !ok2 {
		return Role{}
	}
	return Role{Known: true, Standby: hs == "on", ReadOnly: hs == "on" || ro == "on"}
}

// with is r after the server reported name = value (a ParameterStatus);
// unknown stays unknown.
func (r Role) with(name, value string) Role {
	if !r.Known {
		return r
	}
	switch name {
	case "in_hot_standby":
		r.Standby = value == "on"
		r.ReadOnly = r.ReadOnly || r.Standby
	case "default_transaction_read_only":
		r.ReadOnly = value == "on" || r.Standby
	}
	return r
}

// RoleQuery asks a server what it is: whether it is in recovery, and the
// value of default_transaction_read_only that the server's configuration
// gives this session (pg_settings.reset_val: not what a client SET on the
// connection, which a client may do without the server being read-only).
const RoleQuery = "SELECT pg_catalog.pg_is_in_recovery(), s.reset_val FROM pg_catalog.pg_settings s WHERE s.name = 'default_transaction_read_only'"

// RoleFromRow reads the answer to RoleQuery (its two columns as text).
func RoleFromRow(row []string) (Role, error) {
	if len(row) != 2 {
		return Role{}, fmt.Errorf("the role query returned %d columns, want 2", len(row))
	}
	standby := row[0] == "t" || row[0] == "true"
	return Role{Known: true, Standby: standby, ReadOnly: standby || row[1] == "on"}, nil
}

// Fits reports whether a server now in role now still serves, as t asks,
// a connection opened when it was in role opened. An unknown role fits.
func (t Target) Fits(opened, now Role) bool {
	if !now.Known {
		return true
	}
	switch t {
	case TargetReadWrite:
		return now.Writable()
	case TargetReadOnly:
		return now.ReadOnly
	case TargetPrimary:
		return !now.Standby
	case TargetStandby:
		return now.Standby
	case TargetPreferStandby:
		return !(opened.Known && opened.Standby) || now.Standby
	}
	return !opened.Writable() || now.Writable()
}

// RandomizeHosts puts the hosts of cfg in random order (each with its TLS
// attempts, sslmode prefer's TLS then plaintext, still in order) and makes
// its lookups return a name's addresses in random order: libpq's
// load_balance_hosts=random, which pgconn does not implement. Call it on a
// copy of the configuration, after the TLS configurations were applied.
func RandomizeHosts(cfg *pgconn.Config) {
	all := append([]*pgconn.FallbackConfig{{Host: cfg.Host, Port: cfg.Port, TLSConfig: cfg.TLSConfig}}, cfg.Fallbacks...)
	var groups [][]*pgconn.FallbackConfig
	for _, fb := range all {
		if n := len(groups); n > 0 && groups[n-1][0].Host == fb.Host && groups[n-1][0].Port == fb.Port {
			groups[n-1] = append(groups[n-1], fb)
			continue
		}
		groups = append(groups, []*pgconn.FallbackConfig{fb})
	}
	rand.Shuffle(len(groups), func(i, j int) { groups[i], groups[j] = groups[j], groups[i] })
	flat := make([]*pgconn.FallbackConfig, 0, len(all))
	for _, g := range groups {
		flat = append(flat, g...)
	}
	cfg.Host, cfg.Port, cfg.TLSConfig = flat[0].Host, flat[0].Port, flat[0].TLSConfig
	cfg.Fallbacks = flat[1:]
	if look := cfg.LookupFunc; look != nil {
		cfg.LookupFunc = func(ctx context.Context, host string) ([]string, error) {
			addrs, err := look(ctx, host)
			rand.Shuffle(len(addrs), func(i, j int) { addrs[i], addrs[j] = addrs[j], addrs[i] })
			return addrs, err
		}
	}
}

// wrongRole reports whether a connect error says that the servers answered
// but none is what target_session_attrs asks for (pgconn's ValidateConnect
// errors): during a failover, the one that fits may be promoted any moment.
func wrongRole(err error) bool {
	return errors.Is(err, pgconn.ErrReadOnlyConnection) || errors.Is(err, pgconn.ErrReadWriteConnection) ||
		errors.Is(err, pgconn.ErrPrimaryConnection) || errors.Is(err, pgconn.ErrStandbyConnection)
}

// upstreamState is the pool's view of the servers (guarded by Pool.mu).
type upstreamState struct {
	// current is the address the last connection was opened to.
	current string
	// switches counts the times new connections went to another server.
	switches int64
	// pending is a retirement for a role change, waiting for the next
	// connection opened (which completes the switch, even to the same
	// address: a proxy or a DNS name whose address did not change).
	pending *pendingSwitch
	// suspects are the addresses with evidence under check.
	suspects map[string]*suspicion
}

type pendingSwitch struct {
	from, reason string
	at           time.Time
}

// suspicion is evidence that the server at an address changed, waiting
// for the check: meanwhile its idle connections are not handed out.
type suspicion struct {
	reason   string
	checking bool // a connection of the address is running RoleQuery
	// evidence is the connection the evidence came on, which the check
	// runs on at its release (nil: any connection of the address). It has
	// seen the change; another connection's backend may not have yet (a
	// configuration reload reaches each backend at its next command, after
	// the postmaster signalled it).
	evidence *Server
	since    time.Time
}

// verifyFallback is how long a check waits for the connection the
// evidence came on before it runs on another connection of the address.
const verifyFallback = time.Second

// ObserveError is told, by the holder of s, of every ErrorResponse frame
// the server sent on it (header included). A 25006 (read-only transaction)
// on a connection expected to take writes, or a termination by the server
// (57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
// which Postgres sends only to a connection starting up but a pooler in
// between may send on an established one), is evidence that the server
// changed: it is checked on the server, and every connection to it
// retired if it no longer fits or does not answer. Allocation-free when it
// is not such an error; no I/O.
func (s *Server) ObserveError(frame []byte) {
	code := errorField(frame, 'C')
	switch {
	case string(code) == "25006":
		if !s.pool.opts.Target.Fits(s.opened, Role{Known: true, ReadOnly: true}) {
			s.pool.suspect(s, "a write was refused as read-only (SQLSTATE 25006)", true)
		}
	case string(code) == "57P01" || string(code) == "57P02" || string(code) == "57P03":
		s.pool.suspect(s, "the server terminated a connection (SQLSTATE "+string(code)+")", false)
	}
}

// ObserveParameter is told, by the holder of s, of every ParameterStatus
// the server sent on it, after it was recorded in s.Params. A change of
// in_hot_standby or default_transaction_read_only that makes the server no
// longer fit is evidence, checked as for ObserveError (a client may SET
// default_transaction_read_only itself). No I/O.
func (s *Server) ObserveParameter(name, value string) {
	if name != "in_hot_standby" && name != "default_transaction_read_only" {
		return
	}
	if now := RoleFromParams(s.Params); !s.pool.opts.Target.Fits(s.opened, now) {
		s.pool.suspect(s, fmt.Sprintf("the server reported %s = %s", name, value), true)
	}
}

// Retired reports whether the connection's server was retired: it is
// closed at its release.
func (s *Server) Retired() bool { return s.retired.Load() }

// Addr is the address the connection reached (IP and port, or the Unix
// socket's path).
func (s *Server) Addr() string { return s.addr }

// errorField returns a field of an ErrorResponse frame without decoding
// the rest (nil when absent).
func errorField(frame []byte, field byte) []byte {
	if len(frame) < wire.HeaderLen {
		return nil
	}
	b := frame[wire.HeaderLen:]
	for len(b) > 0 && b[0] != 0 {
		end := bytes.IndexByte(b[1:], 0)
		if end < 0 {
			return nil
		}
		if b[0] == field {
			return b[1 : 1+end]
		}
		b = b[2+end:]
	}
	return nil
}

// verifyTimeout bounds the check of a suspect server.
const verifyTimeout = 5 * time.Second

// suspect records evidence against the server of s and has it checked:
// with onSelf (s itself is healthy and has seen the change), on s at its
// release, or after verifyFallback on another connection of the address;
// else (s is lost) at once on an idle connection of the address, or on the
// next one released. Until the verdict, idle connections of the address
// are not handed out, so that a client that got the evidence does not get
// it again on another connection.
func (p *Pool) suspect(s *Server, reason string, onSelf bool) {
	logIt := false
	p.mu.Lock()
	if s.retired.Load() || p.closed {
		p.mu.Unlock()
		return
	}
	sus := p.up.suspects[s.addr]
	if sus == nil {
		if p.up.suspects == nil {
			p.up.suspects = map[string]*suspicion{}
		}
		sus = &suspicion{reason: reason, since: p.now()}
		if onSelf {
			sus.evidence = s
			addr := s.addr
			time.AfterFunc(verifyFallback, func() { p.checkIdleOf(addr, sus) })
		}
		p.up.suspects[s.addr] = sus
		logIt = true
	}
	var check *Server
	if !sus.checking && sus.evidence == nil {
		if check = p.takeIdleOfLocked(s.addr); check != nil {
			sus.checking = true
			p.route(check.route).inUse++
		}
	}
	p.mu.Unlock()
	if logIt {
		p.logger.Info("checking the upstream server: "+reason, zap.String("address", s.addr), zap.Uint64("server_id", s.id))
	}
	if check != nil {
		go p.verify(check, sus) // owner: the pool; exits after one round trip
	}
}

// checkIdleOf runs the check of sus on an idle connection of addr when it
// has not started on the connection the evidence came on.
func (p *Pool) checkIdleOf(addr string, sus *suspicion) {
	p.mu.Lock()
	if p.up.suspects[addr] != sus || sus.checking || p.closed {
		p.mu.Unlock()
		return
	}
	sus.evidence = nil // any connection of the address now
	check := p.takeIdleOfLocked(addr)
	if check != nil {
		sus.checking = true
		p.route(check.route).inUse++
	}
	p.mu.Unlock()
	if check != nil {
		go p.verify(check, sus) // owner: the pool; exits after one round trip
	}
}

// takeIdleOfLocked removes and returns the least recently used idle
// connection to addr, nil if none.
func (p *Pool) takeIdleOfLocked(addr string) *Server {
	var best *Server
	for _, rs := range p.routes {
		for _, s := range rs.idle {
			if s.addr == addr && !s.Broken() && (best == nil || s.lastUsed.Before(best.lastUsed)) {
				best = s
			}
		}
	}
	if best != nil {
		p.removeIdleLocked(best)
	}
	return best
}

// checkOnReleaseLocked starts the check of a suspect address on s, which is
// being released healthy, when no check of it is running; s stays in use
// by the check. It reports whether it did.
func (p *Pool) checkOnReleaseLocked(s *Server, rs *routeState) bool {
	sus := p.up.suspects[s.addr]
	if sus == nil || sus.checking || (sus.evidence != nil && sus.evidence != s) {
		return false
	}
	sus.checking = true
	rs.inUse++
	go p.verify(s, sus) // owner: the pool; exits after one round trip
	return true
}

// suspectLocked reports whether addr has evidence under check.
func (p *Pool) suspectLocked(addr string) bool {
	return len(p.up.suspects) > 0 && p.up.suspects[addr] != nil
}

// verify runs RoleQuery on s, a connection to a suspect address the caller
// took out of the pool, and acts on the answer: the server no longer fits
// (or does not answer) → every connection to it is retired; it fits → the
// evidence was the client's own (a read-only transaction, a SET), and its
// idle connections serve again. s is released.
func (p *Pool) verify(s *Server, sus *suspicion) {
	ctx, cancel := context.WithTimeout(context.Background(), verifyTimeout)
	row, err := p.QueryRow(ctx, s, RoleQuery)
	cancel()
	var role Role
	if err == nil {
		role, err = RoleFromRow(row)
	}
	p.mu.Lock()
	if p.up.suspects[s.addr] == sus {
		delete(p.up.suspects, s.addr)
	}
	p.mu.Unlock()
	switch {
	case err != nil:
		s.MarkBroken()
		p.retire(s.addr, sus.reason+"; the check failed: "+err.Error(), false)
	case !p.opts.Target.Fits(s.opened, role):
		p.retire(s.addr, fmt.Sprintf("%s; it is a %s now, target_session_attrs is %s", sus.reason, role, p.opts.Target), true)
	default:
		p.logger.Info("the upstream server still fits: the evidence was a client's own", zap.String("address", s.addr),
			zap.String("role", role.String()), zap.String("evidence", sus.reason))
	}
	p.release(s, false)
	p.serveIdleOf(s.addr)
}

// serveIdleOf hands the idle connections to addr, skipped while it was
// suspect, to the clients that queued meanwhile.
func (p *Pool) serveIdleOf(addr string) {
	var out []*Server
	p.mu.Lock()
	for _, rs := range p.routes {
		for _, s := range rs.idle {
			if s.addr == addr && p.waiters.len() > len(out) {
				out = append(out, s)
			}
		}
	}
	for _, s := range out {
		p.removeIdleLocked(s)
		p.route(s.route).inUse++
	}
	p.mu.Unlock()
	for _, s := range out {
		p.release(s, false)
	}
}

// RetireAddr retires every connection to addr, opened until now: idle ones
// are closed at once, busy ones at their release; new connections go
// wherever the upstream URL leads now. For evidence of a role change seen
// elsewhere (the control connection's probe); reason says what it was.
func (p *Pool) RetireAddr(addr, reason string) { p.retire(addr, reason, true) }

// retire is RetireAddr; roleChange says the server changed what it is (a
// switch, counted when the next connection opens) rather than went away.
func (p *Pool) retire(addr, reason string, roleChange bool) {
	now := p.now()
	var idle []*Server
	n := 0
	p.mu.Lock()
	for _, rs := range p.routes {
		kept := rs.idle[:0]
		for _, s := range rs.idle {
			if s.addr == addr {
				idle = append(idle, s)
				continue
			}
			kept = append(kept, s)
		}
		clear(rs.idle[len(kept):])
		rs.idle = kept
		for s := range rs.servers {
			if s.addr == addr && !s.created.After(now) && !s.closing.Load() && !s.retired.Swap(true) {
				n++
			}
		}
	}
	delete(p.up.suspects, addr)
	if roleChange && (n > 0 || p.up.pending == nil) {
		p.up.pending = &pendingSwitch{from: addr, reason: reason, at: now}
	}
	var surplus []*Server
	if roleChange && p.opts.HoldOnSwitch {
		p.limit = 0
		surplus = p.shrinkLocked()
	}
	p.mu.Unlock()
	for _, s := range idle {
		s.close()
	}
	terminateAll(surplus)
	if n > 0 {
		p.logger.Warn("upstream server retired: "+reason+"; idle connections to it are closed now, busy ones when their transaction ends; new ones go where upstream.url leads now",
			zap.String("address", addr), zap.Int("connections", n), zap.Int("idle_closed", len(idle)))
	}
	if f := p.opts.Events.Retired; f != nil && (n > 0 || roleChange) {
		f(addr)
	}
}

// noteConnected records where a new connection went: a switch when it is
// the first after a retirement for a role change, or (without
// load balancing, where connections spread on purpose) an address other
// than the last one's. Called with mu held; returns the log line's fields
// for the caller to write after unlocking, nil when nothing switched.
func (p *Pool) noteConnectedLocked(addr string, now time.Time) []zap.Field {
	u := &p.up
	prev := u.current
	u.current = addr
	switch {
	case u.pending != nil:
		ps := u.pending
		u.pending = nil
		u.switches++
		return []zap.Field{zap.String("from", ps.from), zap.String("to", addr), zap.String("reason", ps.reason),
			zap.Duration("after", now.Sub(ps.at))}
	case prev != "" && prev != addr && !p.opts.LoadBalance:
		u.switches++
		return []zap.Field{zap.String("from", prev), zap.String("to", addr),
			zap.String("reason", "the server it used before did not take the connection")}
	}
	return nil
}
