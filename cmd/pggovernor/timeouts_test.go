package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/config"
)

const clientTimeoutsMetric = "pggovernor_client_timeouts_total"

// TestClientWriteTimeout: a client that sends a query with a 100 MB result
// and never reads it holds the only server connection of the budget; after
// timeouts.client_write it is disconnected, counted and logged once, and
// its server connection (cancelled, back at ReadyForQuery) serves the
// client that waited for it instead of leaving it to 53300.
func TestClientWriteTimeout(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 1
		c.Timeouts.ClientWrite = time.Second
		c.Timeouts.QueryWait = 20 * time.Second
	})
	ctx := context.Background()
	stalled := stallAfterQuery(t, g.addr, bigResult)
	waitFor(t, 30*time.Second, "the stalled client's backend to block writing its result", func() bool {
		return countBackends(t, "SELECT repeat", "ClientWrite") == 1
	})

	conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var got int
	if err := conn.QueryRow(ctx, "SELECT 42").Scan(&got); err != nil || got != 42 {
		t.Fatalf("a query waiting for the stalled client's server connection: want = 42, got = %d, %v", got, err)
	}
	if n := g.g.proxy.Stats().ClientWriteTimeouts; n != 1 {
		t.Fatalf("client_write timeouts: want = 1, got = %d", n)
	}
	if v := mustValue(t, g.scrape(t), clientTimeoutsMetric, map[string]string{"timeout": "client_write"}); v != 1 {
		t.Fatalf("%s{timeout=client_write}: want = 1, got = %v", clientTimeoutsMetric, v)
	}
	if n := g.logs.FilterMessageSnippet("timeouts.client_write").Len(); n != 1 {
		t.Fatalf("log lines about timeouts.client_write: want = 1, got = %d", n)
	}
	// The stalled client's socket was closed: after what was written to
	// it, it reads EOF.
	_ = stalled.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64<<10)
	for {
		if _, err := stalled.Read(buf); err != nil {
			if isTimeout(err) {
				t.Fatal("the stalled client's connection was not closed")
			}
			break
		}
	}
	// The server connection went back to the pool (cancelled and clean),
	// not closed: the budget's one connection is the same backend.
	if st := g.g.pool.Stats(); st.Connects != 1 {
		t.Fatalf("server connections opened: want = 1 (the stalled client's, reused), got = %d", st.Connects)
	}
}

func isTimeout(err error) bool {
	var ne interface{ Timeout() bool }
	return errors.As(err, &ne) && ne.Timeout()
}

// TestIdleInTransactionTimeout: 20 clients open a transaction, write, and
// go idle, holding the whole budget. With timeouts.idle_in_transaction
// they are disconnected with FATAL 25P03 (Postgres' message), counted and
// logged; their transactions are rolled back and their server connections
// returned, so the clients that were waiting get connections instead of
// 53300.
func TestIdleInTransactionTimeout(t *testing.T) {
	const idlers = 20
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = idlers
		c.Timeouts.IdleInTransaction = time.Second
		c.Timeouts.QueryWait = 5 * time.Second
	})
	ctx := context.Background()
	if _, err := shared.ExecIn(ctx, "appdb", "DROP TABLE IF EXISTS idle_tx; CREATE TABLE idle_tx (client int); GRANT ALL ON idle_tx TO app"); err != nil {
		t.Fatal(err)
	}
	var idle []pgx.Tx
	for i := 0; i < idlers; i++ {
		conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		tx, err := conn.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		mustExecTx(t, tx, fmt.Sprintf("INSERT INTO idle_tx VALUES (%d)", i))
		idle = append(idle, tx)
	}

	// The others: each waits for a server connection held by an idle
	// transaction.
	errs := make([]error, 5)
	var wg sync.WaitGroup
	for i := range errs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
			if err != nil {
				errs[i] = err
				return
			}
			defer conn.Close(ctx)
			_, errs[i] = conn.Exec(ctx, "SELECT 1")
		}(i)
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("client %d waiting behind idle transactions: %v", i, err)
		}
	}

	waitFor(t, 30*time.Second, "every idle transaction to be cut", func() bool {
		return g.g.proxy.Stats().IdleInTransactionTimeouts == idlers
	})
	for i, tx := range idle {
		_, err := tx.Exec(ctx, "SELECT 1")
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "25P03" || pgErr.Severity != "FATAL" ||
			pgErr.Message != "terminating connection due to idle-in-transaction timeout" ||
			!strings.Contains(pgErr.Detail, "timeouts.idle_in_transaction") {
			t.Fatalf("idle client %d's next statement: want = FATAL 25P03 %q naming timeouts.idle_in_transaction, got = %v (%+v)",
				i, "terminating connection due to idle-in-transaction timeout", err, pgErr)
		}
	}
	rows, err := shared.ExecIn(ctx, "appdb", "SELECT count(*) FROM idle_tx")
	if err != nil {
		t.Fatal(err)
	}
	if rows[0][0] != "0" {
		t.Fatalf("rows of the idle transactions: want = 0 (rolled back), got = %s", rows[0][0])
	}
	if n := g.g.proxy.Stats().IdleInTransactionTimeouts; n != idlers {
		t.Fatalf("idle_in_transaction timeouts: want = %d, got = %d", idlers, n)
	}
	if v := mustValue(t, g.scrape(t), clientTimeoutsMetric, map[string]string{"timeout": "idle_in_transaction"}); v != idlers {
		t.Fatalf("%s{timeout=idle_in_transaction}: want = %d, got = %v", clientTimeoutsMetric, idlers, v)
	}
	if n := g.logs.FilterMessageSnippet("timeouts.idle_in_transaction").Len(); n != idlers {
		t.Fatalf("log lines about timeouts.idle_in_transaction: want = %d, got = %d", idlers, n)
	}
	// Rolled back and returned, not closed: no connection was opened for
	// the waiting clients, and none is idle in a transaction.
	if st := g.g.pool.Stats(); st.Connects != idlers {
		t.Fatalf("server connections opened: want = %d (reused after the rollback), got = %d", idlers, st.Connects)
	}
	rows, err = shared.Exec(ctx, "SELECT count(*) FROM pg_stat_activity WHERE datname = 'appdb' AND state LIKE 'idle in transaction%'")
	if err != nil {
		t.Fatal(err)
	}
	if rows[0][0] != "0" {
		t.Fatalf("backends idle in a transaction: want = 0, got = %s", rows[0][0])
	}
}

// TestQueryTimeout: a request running longer than timeouts.query is
// cancelled: the client gets 57014 with Postgres' statement-timeout message
// and a hint naming the setting, in the simple and the extended protocol,
// inside a transaction (which is then aborted, as with statement_timeout)
// and outside; the connection goes on serving, and what comes next is not
// cancelled. A client's own cancel is reported as the server words it.
func TestQueryTimeout(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 2
		c.Timeouts.Query = time.Second
	})
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	timedOut := func(what string, err error) {
		t.Helper()
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "57014" || pgErr.Message != "canceling statement due to statement timeout" ||
			!strings.Contains(pgErr.Hint, "timeouts.query") {
			t.Fatalf("%s: want = 57014 %q with a hint naming timeouts.query, got = %v (%+v)", what, "canceling statement due to statement timeout", err, pgErr)
		}
	}
	quick := func(what string) {
		t.Helper()
		for i := 0; i < 20; i++ {
			var n int
			if err := conn.QueryRow(ctx, "SELECT $1::int", i).Scan(&n); err != nil || n != i {
				t.Fatalf("%s, query %d: want = %d, got = %d, %v", what, i, i, n, err)
			}
		}
	}

	_, err = conn.Exec(ctx, "SELECT pg_sleep(10)")
	timedOut("extended protocol", err)
	quick("after the timeout")
	_, err = conn.Exec(ctx, "SELECT pg_sleep(10)", pgx.QueryExecModeSimpleProtocol)
	timedOut("simple protocol", err)
	quick("after the timeout (simple protocol)")

	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, err = tx.Exec(ctx, "SELECT pg_sleep(10)")
	timedOut("inside a transaction", err)
	if _, err := tx.Exec(ctx, "SELECT 1"); err == nil || !strings.Contains(err.Error(), "25P02") {
		t.Fatalf("the transaction after the timeout: want = 25P02 (aborted), got = %v", err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	quick("after the rollback")
	if _, err := conn.Exec(ctx, "SELECT pg_sleep(0.2)"); err != nil {
		t.Fatalf("a request shorter than timeouts.query: %v", err)
	}

	uctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	_, err = conn.Exec(uctx, "SELECT pg_sleep(10)")
	cancel()
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57014" || pgErr.Message != "canceling statement due to user request" {
		// pgx may close the connection instead of waiting for the answer
		// to its cancel; then nothing is to be seen here.
		if !pgconn.Timeout(err) {
			t.Fatalf("the client's own cancel: want = 57014 %q, got = %v", "canceling statement due to user request", err)
		}
	}
	if n := g.g.proxy.Stats().QueryTimeouts; n != 3 {
		t.Fatalf("query timeouts: want = 3, got = %d", n)
	}
	if v := mustValue(t, g.scrape(t), clientTimeoutsMetric, map[string]string{"timeout": "query"}); v != 3 {
		t.Fatalf("%s{timeout=query}: want = 3, got = %v", clientTimeoutsMetric, v)
	}
}
