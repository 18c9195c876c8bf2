package pool

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/internal/rawsock"
)

// PasswordFunc returns the password for a new connection of route; "" keeps
// whatever the upstream URL (or PGPASSWORD, or .pgpass) gives.
type PasswordFunc func(ctx context.Context, route Route) (string, error)

// UpstreamConnector opens connections with pgconn, which implements
// libpq's sslmode, SCRAM, md5 and cleartext authentication, then takes
// them over with Hijack.
type UpstreamConnector struct {
	// Base is the parsed upstream URL; each connection uses a copy with the
	// route's database and user.
	Base *pgconn.Config
	// Password supplies the password per connection; may be nil.
	Password PasswordFunc
	// Timeout bounds one connection attempt.
	Timeout time.Duration
	// Prepare, if set, adjusts the copied config before connecting (TLS
	// certificates reloaded from disk, say).
	Prepare func(ctx context.Context, cfg *pgconn.Config) error
	// LoadBalance tries the hosts, and the addresses of each name, in
	// random order (libpq's load_balance_hosts=random; RandomizeHosts).
	// Without it they are tried in the order of the URL, as pgconn does:
	// every connection resolves the names again (Base.LookupFunc, the
	// system's resolver), so a DNS name that moved is followed.
	LoadBalance bool
}

// Connect opens and hijacks one connection.
func (c *UpstreamConnector) Connect(ctx context.Context, route Route, params map[string]string) (*pgconn.HijackedConn, error) {
	cfg := c.Base.Copy()
	cfg.Database = route.Database
	cfg.User = route.User
	if c.Timeout > 0 {
		cfg.ConnectTimeout = c.Timeout
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.Timeout)
		defer cancel()
	}
	if c.Password != nil {
		pw, err := c.Password(ctx, route)
		if err != nil {
			return nil, err
		}
		if pw != "" {
			cfg.Password = pw
		}
	}
	rp := make(map[string]string, len(cfg.RuntimeParams)+len(params))
	for k, v := range cfg.RuntimeParams {
		rp[k] = v
	}
	for k, v := range params {
		rp[k] = v
	}
	cfg.RuntimeParams = rp
	// The governor reads every message itself after Hijack; pgconn must not
	// react to notices or notifications meanwhile.
	cfg.OnNotice, cfg.OnNotification = nil, nil
	if c.Prepare != nil {
		if err := c.Prepare(ctx, cfg); err != nil {
			return nil, err
		}
	}
	if c.LoadBalance {
		RandomizeHosts(cfg)
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	// pgconn may still have a background read in flight or bytes buffered:
	// SyncConn stops it, or the first response would go to pgconn, not us.
	if err := conn.SyncConn(ctx); err != nil {
		_ = conn.Close(ctx)
		return nil, fmt.Errorf("taking over the server connection: %w", err)
	}
	hc, err := conn.Hijack()
	if err != nil {
		_ = conn.Close(ctx)
		return nil, fmt.Errorf("taking over the server connection: %w", err)
	}
	hc.Conn = rawsock.Wrap(hc.Conn) // the relay's reads and writes, as raw system calls
	return hc, nil
}
