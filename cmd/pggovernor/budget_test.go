package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// sampler counts the governor's server connections in pg_stat_activity
// every interval until stopped, and keeps the maximum seen.
type sampler struct {
	max     atomic.Int64
	samples atomic.Int64
	stop    chan struct{}
	done    chan struct{}
}

func sampleConnections(t *testing.T, c *pgtest.Cluster, user string, interval time.Duration) *sampler {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), c.SuperuserDSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	s := &sampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer conn.Close(context.Background())
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			var n int64
			if err := conn.QueryRow(context.Background(),
				"SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND application_name <> 'pggovernor-control'", user).Scan(&n); err == nil {
				s.samples.Add(1)
				for {
					cur := s.max.Load()
					if n <= cur || s.max.CompareAndSwap(cur, n) {
						break
					}
				}
			}
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

func (s *sampler) finish() (max, samples int64) {
	close(s.stop)
	<-s.done
	return s.max.Load(), s.samples.Load()
}

// TestBudgetHoldsUnderLoad: Postgres with max_connections = 20, 200 clients
// each running 50 transactions through the governor in transaction mode.
// Every transaction succeeds, the governor's connections never exceed the
// budget derived from the server, and no client ever sees "too many clients".
func TestBudgetHoldsUnderLoad(t *testing.T) {
	ctx := context.Background()
	c := privateCluster(t, pgtest.Options{MaxConnections: 20})
	if _, err := c.ExecIn(ctx, "appdb", "CREATE TABLE load (client int, n int); GRANT ALL ON load TO app"); err != nil {
		t.Fatal(err)
	}
	g := startGov(t, c, func(cfg *config.Config) { cfg.Clients.MaxConnections = 500 })
	budget, _ := g.g.pool.Limit()
	if want := 20 - 3 - 1; budget != want { // max_connections − superuser_reserved − control
		t.Fatalf("derived budget: want = %d, got = %d", want, budget)
	}
	s := sampleConnections(t, c, "app", 50*time.Millisecond)

	const clients, txPerClient = 200, 50
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
			if err != nil {
				errs <- fmt.Errorf("client %d connect: %w", i, err)
				return
			}
			defer conn.Close(ctx)
			for j := 0; j < txPerClient; j++ {
				err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
					_, err := tx.Exec(ctx, "INSERT INTO load VALUES ($1, $2)", i, j)
					return err
				})
				if err != nil {
					errs <- fmt.Errorf("client %d tx %d: %w", i, j, err)
					return
				}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	max, samples := s.finish()
	for err := range errs {
		if strings.Contains(err.Error(), "too many clients") {
			t.Errorf("a client saw Postgres refuse a connection: %v", err)
		} else {
			t.Error(err)
		}
	}
	rows, err := c.ExecIn(ctx, "appdb", "SELECT count(*) FROM load")
	if err != nil {
		t.Fatal(err)
	}
	if got := rows[0][0]; got != strconv.Itoa(clients*txPerClient) {
		t.Fatalf("committed rows: want = %d, got = %s", clients*txPerClient, got)
	}
	if samples < 5 {
		t.Fatalf("only %d samples of pg_stat_activity were taken", samples)
	}
	if max > int64(budget) {
		t.Fatalf("server connections seen in pg_stat_activity: want <= %d (the budget), got = %d", budget, max)
	}
	t.Logf("%d transactions, max %d server connections over %d samples (budget %d)", clients*txPerClient, max, samples, budget)
}

// TestQueueTimeoutAndFIFO: budget 2, both connections held by open
// transactions: a third client waits and gets 53300 after query_wait with a
// message naming the budget; then (budget 1, a long query_wait) waiting
// clients are served in the order they asked.
func TestQueueTimeoutAndFIFO(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 2
		c.Timeouts.QueryWait = 700 * time.Millisecond
	})
	ctx := context.Background()
	setup, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, setup, "DROP TABLE IF EXISTS fifo")
	mustExec(t, setup, "CREATE TABLE fifo (seq serial, client int)")
	setup.Close(ctx)

	holders := make([]pgx.Tx, 2)
	for i := range holders {
		conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		holders[i], err = conn.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		mustExecTx(t, holders[i], "SELECT 1")
	}

	// A third client waits, then gets 53300 with the documented message.
	third, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close(ctx)
	start := time.Now()
	_, err = third.Exec(ctx, "SELECT 1")
	waited := time.Since(start)
	pgErr := assertCode(t, err, "53300")
	if waited < 700*time.Millisecond {
		t.Fatalf("the error came before query_wait: after %s", waited)
	}
	for _, want := range []string{"timeouts.query_wait (700ms)", "all 2 server connections of the budget are in use"} {
		if !strings.Contains(pgErr.Message, want) {
			t.Fatalf("53300 message: want it to contain %q, got %q", want, pgErr.Message)
		}
	}
	if !strings.Contains(pgErr.Hint, "budget.max") {
		t.Fatalf("53300 hint: want it to name budget.max, got %q", pgErr.Hint)
	}
	// The client is still usable after the error.
	if err := holders[0].Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := third.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("client after a wait timeout: %v (pool %+v)", err, g.g.pool.Stats())
	}

	if err := holders[1].Commit(ctx); err != nil {
		t.Fatal(err)
	}

	// FIFO, on a governor of its own with a budget of 1 and a query_wait
	// no login under load comes near (the six waiters log in and queue one
	// after the other): the only connection is held; waiters queue one by
	// one and are served one at a time, in the order they asked.
	fg := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 1
		c.Timeouts.QueryWait = time.Minute
	})
	const waiters = 6
	var wg sync.WaitGroup
	results := make([]error, waiters)
	first, err := pgx.Connect(ctx, fg.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close(ctx)
	blocker, err := first.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mustExecTx(t, blocker, "SELECT 1") // now the only connection is held
	for i := 0; i < waiters; i++ {
		conn, err := pgx.Connect(ctx, fg.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			// One request per waiter (the simple protocol): FIFO orders
			// requests, and pgx's statement cache would make two.
			_, results[i] = conn.Exec(context.Background(), "INSERT INTO fifo (client) VALUES ($1)", pgx.QueryExecModeSimpleProtocol, i)
		}(i)
		waitFor(t, 5*time.Second, fmt.Sprintf("waiter %d to queue", i), func() bool { return fg.g.pool.Stats().Waiting == i+1 })
	}
	if err := blocker.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for i, err := range results {
		if err != nil {
			t.Fatalf("waiter %d: %v", i, err)
		}
	}
	check, err := pgx.Connect(ctx, shared.SuperuserDSN("appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer check.Close(ctx)
	rows, err := check.Query(ctx, "SELECT client FROM fifo ORDER BY seq")
	if err != nil {
		t.Fatal(err)
	}
	order, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range order {
		if c != i {
			t.Fatalf("service order: want = [0 1 2 3 4 5], got = %v", order)
		}
	}
}

// TestRoutesShareTheBudget: two databases compete for a budget of 3 under
// load; both make progress because idle connections of one route are
// closed to serve the other. The clients run until both routes have done
// 20 transactions (a starved route never gets there).
func TestRoutesShareTheBudget(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) { c.Budget.Max = 3 })
	ctx := context.Background()
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	var done [2]atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := 0; i < 16; i++ {
		db := []string{"appdb", "otherdb"}[i%2]
		wg.Add(1)
		go func(route int) {
			defer wg.Done()
			conn, err := pgx.Connect(ctx, g.url("alice", userPass, db))
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close(ctx)
			for runCtx.Err() == nil {
				if _, err := conn.Exec(ctx, "SELECT pg_sleep(0.005)"); err != nil {
					errs <- err
					return
				}
				done[route].Add(1)
			}
		}(i % 2)
	}
	progressed := func() bool { return done[0].Load() >= 20 && done[1].Load() >= 20 }
	deadline := time.Now().Add(30 * time.Second)
	for !progressed() && time.Now().Before(deadline) && len(errs) == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	a, b := done[0].Load(), done[1].Load()
	if a < 20 || b < 20 {
		t.Fatalf("both routes must progress: appdb %d, otherdb %d transactions", a, b)
	}
	t.Logf("appdb %d, otherdb %d transactions on a budget of 3", a, b)
}

func mustExecTx(t *testing.T, tx pgx.Tx, sql string, args ...any) {
	t.Helper()
	if _, err := tx.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}
