package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/pool"
)

// upstreamHealth is what pggovernor knows of the upstream server's
// reachability, for /readyz and pggovernor_upstream_up. Evidence comes from
// the probe (probeLoop, every admin.probe_interval) and from every attempt
// to open a server connection: a success says up; a failure that says the
// server cannot be reached or cannot take connections (pool.Unavailable)
// says down. Other failures (an unknown database, say) concern one request
// and say nothing.
type upstreamHealth struct {
	logger *zap.Logger

	mu    sync.Mutex
	known bool
	up    bool
	err   error
}

// record notes one piece of evidence and logs changes.
func (h *upstreamHealth) record(up bool, err error) {
	h.mu.Lock()
	changed := h.known && h.up != up
	h.known, h.up, h.err = true, up, err
	h.mu.Unlock()
	switch {
	case changed && up:
		h.logger.Info("upstream server reachable again")
	case changed:
		h.logger.Warn("upstream server unreachable; /readyz reports not ready until it answers", zap.Error(err))
	}
}

// state returns the last evidence; known is false before any.
func (h *upstreamHealth) state() (up, known bool, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.up, h.known, h.err
}

// connected is the pool's Events.Connected hook.
func (h *upstreamHealth) connected(_ pool.Route, _ time.Duration, err error) {
	switch {
	case err == nil:
		h.record(true, nil)
	case pool.Unavailable(err):
		h.record(false, err)
	}
}

// probeOptions are what probeLoop needs.
type probeOptions struct {
	// interval is admin.probe_interval; timeout bounds one probe.
	interval, timeout time.Duration
	// control is the control connection's pool (nil with budget.max).
	control *pgxpool.Pool
	// pool is the server connections' pool.
	pool *pool.Pool
	// target is the upstream's target_session_attrs.
	target pool.Target
	// observe receives the control connection's round trips (the pool
	// reports its own).
	observe func(time.Duration)
}

// probeLoop checks the upstream every interval until ctx ends: what the
// server is (pool.RoleQuery) on the control connection when there is one
// (derived budget), or, with budget.max, on a server connection that has
// sat idle for an interval (pool.Probe; none is opened for it, so with no
// idle connection the evidence is the clients' own connection attempts).
// A server that no longer fits target_session_attrs (a primary demoted or
// made read-only, a standby promoted) has every connection to it retired,
// the control connection included, which is opened again where
// upstream.url leads now.
func (h *upstreamHealth) probeLoop(ctx context.Context, o probeOptions) {
	t := time.NewTicker(o.interval)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, o.timeout)
		if o.control != nil {
			began := time.Now()
			err := h.probeControl(pctx, o)
			if ctx.Err() != nil {
				cancel()
				return
			}
			if err == nil {
				o.observe(time.Since(began))
			}
			h.record(err == nil, err)
		} else if _, probed, err := o.pool.Probe(pctx, o.interval); probed && ctx.Err() == nil {
			h.record(err == nil, err)
		}
		cancel()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// probeControl asks the control connection's server what it is; one that
// no longer fits target_session_attrs (compared with what it was when the
// connection was opened) is retired in the pool, and the control
// connection closed so that the next use opens one where upstream.url
// leads now.
func (h *upstreamHealth) probeControl(ctx context.Context, o probeOptions) error {
	c, err := o.control.Acquire(ctx)
	if err != nil {
		return err
	}
	var inRecovery bool
	var readOnly string
	if err := c.QueryRow(ctx, pool.RoleQuery).Scan(&inRecovery, &readOnly); err != nil {
		c.Release()
		return err
	}
	now := pool.Role{Known: true, Standby: inRecovery, ReadOnly: inRecovery || readOnly == "on"}
	pg := c.Conn().PgConn()
	opened, _ := pg.CustomData()[controlRoleKey].(pool.Role)
	if o.target.Fits(opened, now) {
		c.Release()
		return nil
	}
	addr := ""
	if ra := pg.Conn().RemoteAddr(); ra != nil {
		addr = ra.String()
	}
	_ = c.Conn().Close(ctx) // the pool destroys a closed connection at Release
	c.Release()
	h.logger.Warn("the control connection's server no longer fits target_session_attrs: reconnecting",
		zap.String("address", addr), zap.Stringer("role", now), zap.String("target_session_attrs", string(o.target)))
	o.pool.RetireAddr(addr, fmt.Sprintf("the probe found a %s, target_session_attrs is %s", now, o.target))
	return nil
}
