package main

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/config"
)

// TestPauseResumeUnder50Clients: 50 clients run transactions on a budget
// of 5. PAUSE returns once the transactions in flight have finished and the
// governor holds no connection to the database; while paused nothing runs,
// clients wait well past timeouts.query_wait without an error, /readyz says
// not ready; RESUME releases them in order and every transaction of every
// client commits: none is lost.
func TestPauseResumeUnder50Clients(t *testing.T) {
	// Long enough that, before the pause, a client behind nine others on
	// a loaded 2-core machine under -race is served within it (300ms was
	// not: a wait timed out before PAUSE), short enough that the pause
	// visibly outlasts it.
	const queryWait = time.Second
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 5
		c.Timeouts.QueryWait = queryWait
		c.Admin.Users = []string{"alice"}
	})
	ctx := context.Background()
	if _, err := shared.ExecIn(ctx, "appdb", "DROP TABLE IF EXISTS paused_tx; CREATE TABLE paused_tx (client int, n int, PRIMARY KEY (client, n)); GRANT ALL ON paused_tx TO app"); err != nil {
		t.Fatal(err)
	}
	count := func() int {
		rows, err := shared.ExecIn(ctx, "appdb", "SELECT count(*) FROM paused_tx")
		if err != nil {
			t.Fatal(err)
		}
		n, _ := strconv.Atoi(rows[0][0])
		return n
	}
	const clients, perClient = 50, 40
	var commits atomic.Int64
	errs := make(chan error, clients)
	var wg sync.WaitGroup
	// The clients stop, and are awaited, before their connections close
	// (cleanups run last first), also when the test fails early.
	clientCtx, stopClients := context.WithCancel(ctx)
	for i := 0; i < clients; i++ {
		conn := connectPgx(t, g.url("app", appPass, "appdb")+"&default_query_exec_mode=simple_protocol")
		wg.Add(1)
		go func(i int, conn *pgx.Conn) {
			defer wg.Done()
			for n := 0; n < perClient; n++ {
				err := pgx.BeginFunc(clientCtx, conn, func(tx pgx.Tx) error {
					if _, err := tx.Exec(clientCtx, "INSERT INTO paused_tx VALUES ($1, $2)", i, n); err != nil {
						return err
					}
					_, err := tx.Exec(clientCtx, "SELECT pg_sleep(0.001)")
					return err
				})
				if err != nil {
					errs <- fmt.Errorf("client %d transaction %d: %w", i, n, err)
					return
				}
				commits.Add(1)
			}
		}(i, conn)
	}
	t.Cleanup(func() { stopClients(); wg.Wait() })
	waitFor(t, 30*time.Second, "transactions to run before the pause", func() bool { return commits.Load() >= 200 })

	console := connectPgx(t, g.consoleURL("alice", userPass))
	if _, err := console.Exec(ctx, "PAUSE appdb"); err != nil {
		t.Fatalf("PAUSE: %v", err)
	}
	// PAUSE returned: nothing in flight, no server connection left.
	if pids := governorBackends(t, shared, "app"); len(pids) != 0 {
		t.Fatalf("after PAUSE returned: want no server connection, got backends %v", pids)
	}
	atPause := count()
	if atPause == clients*perClient {
		t.Fatal("every transaction ran before the pause: the test proves nothing")
	}
	if code, body := g.adminGet(t, "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "paused") {
		t.Fatalf("/readyz while paused: want = 503 naming the pause, got = %d %s", code, body)
	}
	// Clients queue behind the pause longer than query_wait, without an
	// error: the paused time does not count.
	waitFor(t, 10*time.Second, "clients to be held longer than 3 × query_wait", func() bool {
		for _, r := range g.g.pool.Routes() {
			if r.Route.Database == "appdb" && r.Waiting > 0 && r.MaxWait > 3*queryWait {
				return true
			}
		}
		return false
	})
	select {
	case err := <-errs:
		t.Fatalf("a client failed while paused: %v", err)
	default:
	}
	_, rows := consoleRows(t, console, "SHOW DATABASES", pgx.QueryExecModeSimpleProtocol)
	if len(rows) != 1 || rows[0][11] != int32(1) {
		t.Fatalf("SHOW DATABASES while paused: want paused = 1, got %v", rows)
	}
	if got := count(); got != atPause {
		t.Fatalf("transactions committed while paused: %d before, %d now", atPause, got)
	}
	if _, err := console.Exec(ctx, "RESUME appdb"); err != nil {
		t.Fatalf("RESUME: %v", err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := count(); got != clients*perClient {
		t.Fatalf("committed transactions: want = %d, got = %d", clients*perClient, got)
	}
	if code, body := g.adminGet(t, "/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz after RESUME: want = 200, got = %d %s", code, body)
	}
	// RESUME of what is not paused is an error; so is KILL without a name.
	_, err := console.Exec(ctx, "RESUME appdb")
	assertCode(t, err, "55000")
	_, err = console.Exec(ctx, "KILL")
	assertCode(t, err, "42601")
	t.Logf("%d transactions before PAUSE, all %d committed after RESUME", atPause, clients*perClient)
}
