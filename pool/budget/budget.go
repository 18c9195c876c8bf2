// Package budget derives the connection budget from the live server over
// pggovernor's own control connection (a pgxpool of one connection, which
// the budget counts), re-reads it periodically, and hands it to the pool.
package budget

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// ControlConnections is the number of connections the control plane holds,
// subtracted from the budget.
const ControlConnections = 1

// Limits are the server's connection settings.
type Limits struct {
	// ServerVersion is server_version.
	ServerVersion string
	// MaxConnections is max_connections.
	MaxConnections int
	// SuperuserReserved is superuser_reserved_connections.
	SuperuserReserved int
	// Reserved is reserved_connections (PostgreSQL 16 and later; 0 before).
	Reserved int
}

// Querier is what ReadLimits needs from a connection or pool: a
// *pgxpool.Pool, *pgxpool.Conn or *pgx.Conn.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// LimitsSQL reads server_version, max_connections,
// superuser_reserved_connections and reserved_connections (0 before
// PostgreSQL 16), in that order.
const LimitsSQL = `SELECT current_setting('server_version'),
	current_setting('max_connections')::int,
	current_setting('superuser_reserved_connections')::int,
	coalesce(current_setting('reserved_connections', true), '0')::int`

// ReadLimits reads the connection settings from the server.
func ReadLimits(ctx context.Context, q Querier) (Limits, error) {
	var l Limits
	err := q.QueryRow(ctx, LimitsSQL).Scan(&l.ServerVersion, &l.MaxConnections, &l.SuperuserReserved, &l.Reserved)
	if err != nil {
		return Limits{}, fmt.Errorf("reading max_connections from the server: %w", err)
	}
	return l, nil
}

// Compute is the budget for these limits: max_connections minus the
// superuser and other reserved slots, minus reserve (budget.reserve), minus
// the control connection.
func Compute(l Limits, reserve int) int {
	return l.MaxConnections - l.SuperuserReserved - l.Reserved - reserve - ControlConnections
}

// DefaultReadTimeout bounds one read of the limits when Options.Timeout
// is not set.
const DefaultReadTimeout = 10 * time.Second

// Options configure Run.
type Options struct {
	// Control is the control-plane pool (one connection): a
	// *pgxpool.Pool.
	Control Querier
	// Timeout bounds each read of the limits, connecting included
	// (timeouts.server_connect); DefaultReadTimeout when zero. A server
	// that stops answering fails the read, which is retried, instead of
	// holding Run (and the control connection) for ever.
	Timeout time.Duration
	// Reserve is budget.reserve.
	Reserve int
	// Interval is how often the limits are re-read (budget.refresh_interval).
	Interval time.Duration
	// Apply receives each new budget.
	Apply func(n int)
	// Unknown receives the reason while the budget cannot be read.
	Unknown func(err error)
	// Logger receives budget changes.
	Logger *zap.Logger
}

// Run reads the limits now and every Interval until ctx ends, applying the
// budget when it changes; each read is bounded by Timeout. Failures are
// retried sooner, with backoff.
func Run(ctx context.Context, o Options) {
	if o.Timeout <= 0 {
		o.Timeout = DefaultReadTimeout
	}
	last := -1
	delay := o.Interval
	backoff := 100 * time.Millisecond
	for {
		rctx, cancel := context.WithTimeout(ctx, o.Timeout)
		l, err := ReadLimits(rctx, o.Control)
		cancel()
		switch {
		case err != nil && ctx.Err() != nil:
			return
		case err != nil:
			if last < 0 {
				o.Unknown(err)
			}
			o.Logger.Warn("cannot read the server's connection limits; the budget stays as it was", zap.Error(err))
			delay = backoff
			backoff = min(2*backoff, o.Interval)
		default:
			backoff = 100 * time.Millisecond
			delay = o.Interval
			n := Compute(l, o.Reserve)
			if n != last {
				fields := []zap.Field{
					zap.Int("budget", n), zap.Int("max_connections", l.MaxConnections),
					zap.Int("superuser_reserved_connections", l.SuperuserReserved),
					zap.Int("reserved_connections", l.Reserved), zap.Int("budget_reserve", o.Reserve),
					zap.Int("control_connections", ControlConnections),
				}
				if last >= 0 {
					fields = append(fields, zap.Int("previous", last))
				}
				if n <= 0 {
					o.Logger.Error("the budget derived from the server is not positive: no client can be served; lower budget.reserve or raise max_connections", fields...)
				} else {
					o.Logger.Info("connection budget set from the server", fields...)
				}
				last = n
				o.Apply(max(n, 0))
			}
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// ErrNoBudget is reported when the derived budget is not positive.
var ErrNoBudget = errors.New("the connection budget is not positive")
