package main

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/internal/pgtest"
	"github.com/pggovernor/pggovernor/pool"
)

// TestPrepareOnControlWhenItCannotConnect: a client that only prepares
// while no server connection is idle is answered on the control
// connection; when the control connection cannot be opened because the
// server refuses it (here: too many clients, 53300; in a failover: "the
// database system is shutting down", 57P03), that refusal is not the
// statement's: the client waits for a server connection as any other, and
// its prepare succeeds once the server takes connections again. It used
// to get the refusal, FATAL, as the answer to its Parse, and pgx closed
// its connection.
func TestPrepareOnControlWhenItCannotConnect(t *testing.T) {
	pg := privateCluster(t, pgtest.Options{MaxConnections: 6}) // 3 for ordinary roles: budget 2 and the control connection
	g := startGov(t, pg, nil)
	ctx := context.Background()
	conn := connectPgx(t, g.url("app", appPass, "appdb"))
	g.g.pool.CloseIdle(ctx, func(pool.Route) bool { return true }) // the one the login opened
	if n := len(g.g.pool.Servers()); n != 0 {
		t.Fatalf("server connections before the test: want = 0, got = %d", n)
	}
	// The control connection goes; direct connections of app take every
	// slot an ordinary role may use, so that it cannot come back.
	if _, err := pg.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pggovernor-control'"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the control connection to be gone", func() bool {
		rows, err := pg.Exec(ctx, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pggovernor-control'")
		return err == nil && rows[0][0] == "0"
	})
	var hogs []*pgx.Conn
	for i := 0; i < 3; i++ {
		h, err := pgx.Connect(ctx, pg.URL("app", appPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		hogs = append(hogs, h)
	}
	// Two clients prepare: the first on the control connection's dead
	// session (its FATAL 57P01), the second once pgxpool dropped it, on a
	// new control connection the server refuses (53300).
	conn2 := connectPgx(t, g.url("app", appPass, "appdb"))
	g.g.pool.CloseIdle(ctx, func(pool.Route) bool { return true })
	errorsBefore := g.g.pool.Stats().ConnectErrors
	done := make(chan error, 2)
	go func() {
		_, err := conn.Prepare(ctx, "s1", "SELECT $1::int + 1")
		done <- err
	}()
	// The prepares wait while the pool's attempts are refused (53300 is
	// retried) rather than failing.
	waitFor(t, 10*time.Second, "the pool's connection attempts to be refused", func() bool {
		select {
		case err := <-done:
			t.Fatalf("the prepare returned while the server refused every connection: %v", err)
		default:
		}
		return g.g.pool.Stats().ConnectErrors >= errorsBefore+2
	})
	go func() {
		_, err := conn2.Prepare(ctx, "s1", "SELECT $1::int + 1")
		done <- err
	}()
	waitFor(t, 10*time.Second, "the second client to wait", func() bool {
		select {
		case err := <-done:
			t.Fatalf("the second prepare returned while the server refused every connection: %v", err)
		default:
		}
		return g.g.proxy.ClientStates().Waiting >= 2
	})
	for _, h := range hogs {
		h.Close(ctx)
	}
	for i := 0; i < 2; i++ {
		if err := <-done; err != nil {
			t.Fatalf("a prepare: want = success once the server takes connections, got = %v", err)
		}
	}
	var n int
	if err := conn.QueryRow(ctx, "s1", 41).Scan(&n); err != nil || n != 42 {
		t.Fatalf("executing the statement: want = 42, got = %d, %v", n, err)
	}
}
