package main

import (
	"context"
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

// probeLoop checks the upstream every interval until ctx ends: a round trip
// on the control connection when there is one (derived budget), or, with
// budget.max, on a server connection that has sat idle for an interval
// (pool.Probe; none is opened for it, so with no idle connection the
// evidence is the clients' own connection attempts). observe receives the
// control connection's round trips (the pool reports its own).
func (h *upstreamHealth) probeLoop(ctx context.Context, interval, timeout time.Duration, control *pgxpool.Pool,
	p *pool.Pool, observe func(time.Duration)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, timeout)
		if control != nil {
			began := time.Now()
			err := control.Ping(pctx)
			if ctx.Err() != nil {
				cancel()
				return
			}
			if err == nil {
				observe(time.Since(began))
			}
			h.record(err == nil, err)
		} else if _, probed, err := p.Probe(pctx, interval); probed && ctx.Err() == nil {
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
