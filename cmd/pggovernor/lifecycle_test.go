package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// governorBackends lists the backend PIDs of a governor's server
// connections (the control connection excluded).
func governorBackends(t *testing.T, c *pgtest.Cluster, user string) []string {
	t.Helper()
	rows, err := c.Exec(context.Background(), fmt.Sprintf(
		"SELECT pid FROM pg_stat_activity WHERE usename = '%s' AND application_name <> 'pggovernor-control' ORDER BY pid", user))
	if err != nil {
		t.Fatal(err)
	}
	var pids []string
	for _, r := range rows {
		pids = append(pids, r[0])
	}
	return pids
}

// TestUnixSocketListener: the socket serves clients; only pggovernor's
// user and group may connect by default (0770), unix_socket_mode sets
// other permissions; its clients are throttled as TCP clients are (as the
// address [local]), and their correct password is never delayed.
func TestUnixSocketListener(t *testing.T) {
	for _, c := range []struct {
		mode string
		want os.FileMode
	}{{"", 0o770}, {"0700", 0o700}} {
		t.Run(fmt.Sprintf("%04o", c.want), func(t *testing.T) {
			dir := t.TempDir()
			g := startGov(t, nil, func(cfg *config.Config) {
				cfg.UnixSocketDir = dir
				cfg.Budget.Max = 2
				if c.mode != "" {
					cfg.UnixSocketMode = c.mode
				}
			})
			_, port, _ := strings.Cut(g.addr, ":")
			fi, err := os.Stat(filepath.Join(dir, ".s.PGSQL."+port))
			if err != nil {
				t.Fatal(err)
			}
			if got := fi.Mode().Perm(); got != c.want {
				t.Fatalf("socket permissions: want = %04o, got = %04o", c.want, got)
			}
			ctx := context.Background()
			dsn := func(pw string) string {
				return fmt.Sprintf("host=%s port=%s user=alice password=%s dbname=appdb", dir, port, pw)
			}
			conn, err := pgx.Connect(ctx, dsn(userPass))
			if err != nil {
				t.Fatal(err)
			}
			var n int
			if err := conn.QueryRow(ctx, "SELECT 7").Scan(&n); err != nil || n != 7 {
				t.Fatalf("over the unix socket: want = 7, got = %d (%v)", n, err)
			}
			conn.Close(ctx)
			if c.mode != "" {
				return
			}
			for i := 0; i <= auth.DefaultFreeFailures; i++ {
				_, err := pgx.Connect(ctx, dsn("wrong"))
				assertCode(t, err, "28P01")
			}
			if got := mustValue(t, g.scrape(t), "pggovernor_login_throttle_delays_total", nil); got != 1 {
				t.Fatalf("failures over the socket beyond the free ones: want = 1 answered late, got = %v", got)
			}
			conn, err = pgx.Connect(ctx, dsn(userPass))
			if err != nil {
				t.Fatalf("the correct password after failures: want = logged in, got = %v", err)
			}
			conn.Close(ctx)
			if got := mustValue(t, g.scrape(t), "pggovernor_login_throttle_delays_total", nil); got != 1 {
				t.Fatalf("a correct password: want = not delayed, got = %v delayed answers", got)
			}
		})
	}
	t.Run("invalid mode", func(t *testing.T) {
		cfg := config.Default()
		cfg.UnixSocketMode = "0999"
		if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "unix_socket_mode") {
			t.Fatalf("want = an error naming unix_socket_mode, got = %v", err)
		}
	})
}

// TestIdleAndLifetimeReaping: idle connections close after server_idle;
// a connection in steady use is replaced after server_lifetime.
func TestIdleAndLifetimeReaping(t *testing.T) {
	ctx := context.Background()
	t.Run("idle", func(t *testing.T) {
		g := startGov(t, nil, func(c *config.Config) { c.Budget.Max = 2; c.Timeouts.ServerIdle = time.Second })
		conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		mustExec(t, conn, "SELECT 1")
		if st := g.g.pool.Stats(); st.Open != 1 {
			t.Fatalf("open server connections after a query: want = 1, got = %d", st.Open)
		}
		waitFor(t, 10*time.Second, "the idle connection to be closed", func() bool { return g.g.pool.Stats().Open == 0 })
		if got := g.g.pool.Stats().ClosedIdle; got != 1 {
			t.Fatalf("connections closed for idleness: want = 1, got = %d", got)
		}
		mustExec(t, conn, "SELECT 1") // a new one is opened on demand
	})
	t.Run("lifetime", func(t *testing.T) {
		if err := shared.CreateRole(ctx, "lifer", "lifer-pw", false); err != nil {
			t.Fatal(err)
		}
		g := startGov(t, nil, func(c *config.Config) {
			c.Upstream.URL = shared.URL("lifer", "", "appdb")
			c.Upstream.Password = "lifer-pw"
			c.Budget.Max = 1
			c.Timeouts.ServerLifetime = time.Second
		})
		conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		var first, pid int
		if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&first); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "a new backend after server_lifetime", func() bool {
			if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
				t.Fatal(err)
			}
			return pid != first
		})
		if got := g.g.pool.Stats().ClosedLifetime; got < 1 {
			t.Fatalf("connections closed for age: want >= 1, got = %d", got)
		}
	})
}

// TestTerminatedIdleConnectionIsNotHandedOut: pg_terminate_backend on the
// governor's idle connections; the next queries succeed on new ones.
func TestTerminatedIdleConnectionIsNotHandedOut(t *testing.T) {
	ctx := context.Background()
	if err := shared.CreateRole(ctx, "victim", "victim-pw", false); err != nil {
		t.Fatal(err)
	}
	g := startGov(t, nil, func(c *config.Config) {
		c.Upstream.URL = shared.URL("victim", "", "appdb")
		c.Upstream.Password = "victim-pw"
		c.Budget.Max = 2
	})
	conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	mustExec(t, conn, "SELECT 1")
	before := governorBackends(t, shared, "victim")
	if len(before) != 1 {
		t.Fatalf("want one server connection, got %v", before)
	}
	if _, err := shared.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'victim'"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the pool to drop the terminated connection", func() bool { return g.g.pool.Stats().Open == 0 })
	for i := 0; i < 5; i++ {
		mustExec(t, conn, "SELECT 1")
	}
}

// TestSessionModeResetsOnRelease: in session mode a server connection is
// reset with DISCARD ALL when its client leaves.
func TestSessionModeResetsOnRelease(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) { c.PoolMode = config.PoolModeSession; c.Budget.Max = 1 })
	ctx := context.Background()
	a, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, a, "SET statement_timeout = 12345")
	mustExec(t, a, "CREATE TEMP TABLE session_secret (v int)")
	mustExec(t, a, "PREPARE leftover AS SELECT 1")
	var pidA int
	if err := a.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pidA); err != nil {
		t.Fatal(err)
	}
	a.Close(ctx)
	b, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close(ctx)
	var pidB int
	var timeout string
	var temp *string
	var prepared int
	if err := b.QueryRow(ctx, `SELECT pg_backend_pid(), current_setting('statement_timeout'), to_regclass('pg_temp.session_secret')::text,
		(SELECT count(*) FROM pg_prepared_statements WHERE name = 'leftover')`).Scan(&pidB, &timeout, &temp, &prepared); err != nil {
		t.Fatal(err)
	}
	if pidB != pidA {
		t.Fatalf("budget 1: want the same server connection, got pids %d and %d", pidA, pidB)
	}
	if timeout != "0" || temp != nil || prepared != 0 {
		t.Fatalf("the next session saw the previous one's state: statement_timeout=%s temp=%v prepared=%d", timeout, temp, prepared)
	}
}

// TestBudgetFollowsServerRestart: the budget is re-read periodically; after
// the server restarts with another max_connections it changes, the change
// is logged, and clients carry on.
func TestBudgetFollowsServerRestart(t *testing.T) {
	ctx := context.Background()
	c := privateCluster(t, pgtest.Options{MaxConnections: 30})
	g := startGov(t, c, func(cfg *config.Config) { cfg.Budget.RefreshInterval = time.Second; cfg.Budget.Reserve = 2 })
	if n, _ := g.g.pool.Limit(); n != 30-3-2-1 {
		t.Fatalf("budget: want = %d, got = %d", 30-3-2-1, n)
	}
	conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	mustExec(t, conn, "SELECT 1")
	if err := c.Restart(ctx, map[string]string{"max_connections": "40"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the budget to follow max_connections = 40", func() bool {
		n, _ := g.g.pool.Limit()
		return n == 40-3-2-1
	})
	if g.logs.FilterMessage("connection budget set from the server").FilterField(zapInt("previous", 24)).Len() != 1 {
		t.Fatal("the budget change was not logged with the previous value")
	}
	// The old server connection died with the restart; the client's next
	// transaction runs on a new one.
	waitFor(t, 30*time.Second, "a query to succeed after the restart", func() bool {
		_, err := conn.Exec(ctx, "SELECT 1")
		return err == nil
	})
}

// TestSIGHUPReloadsUsersFile sends a real SIGHUP to the process.
func TestSIGHUPReloadsUsersFile(t *testing.T) {
	users := usersFile(t)
	p := startProcess(t, []string{"PGGOVERNOR_UPSTREAM_PASSWORD=" + appPass},
		"--upstream-url="+shared.URL("app", "", "appdb"), "--clients.users-file="+users, "--budget.max=2", "--log.level=info")
	ctx := context.Background()
	_, err := pgx.Connect(ctx, p.url("erin", "erinpass", "appdb"))
	assertCode(t, err, "28P01")
	f, err := os.OpenFile(users, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "%q %q\n", "erin", "erinpass")
	f.Close()
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the reload to be logged", func() bool { return strings.Contains(p.stderr.String(), "users file reloaded") })
	conn, err := pgx.Connect(ctx, p.url("erin", "erinpass", "appdb"))
	if err != nil {
		t.Fatalf("after SIGHUP: %v", err)
	}
	conn.Close(ctx)
}
