package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/lib/pq"

	"github.com/pggovernor/pggovernor/config"
)

// Transaction pooling that drivers cannot tell from Postgres: the default
// setting of these tests is the issue's: transaction mode, a pool of 2,
// 20 concurrent clients.

func txGov(t *testing.T, mutate func(*config.Config)) *gov {
	t.Helper()
	return startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 2
		c.Clients.MaxConnections = 500
		if mutate != nil {
			mutate(c)
		}
	})
}

// parallel runs fn for n clients at once and fails on the first error.
func parallel(t *testing.T, n int, fn func(i int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if err := fn(i); err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
}

// TestPgxStatementCache: pgx's default mode prepares named statements and
// reuses them; 20 clients on 2 server connections never see a missing or
// wrong statement, and nobody is pinned.
func TestPgxStatementCache(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	parallel(t, 20, func(i int) error {
		conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			return err
		}
		defer conn.Close(ctx)
		for j := 0; j < 30; j++ {
			var a, b int
			// A statement shared by all clients and one of its own.
			if err := conn.QueryRow(ctx, "SELECT $1::int * 2", j).Scan(&a); err != nil {
				return err
			}
			if err := conn.QueryRow(ctx, fmt.Sprintf("SELECT $1::int + %d", i), j).Scan(&b); err != nil {
				return err
			}
			if a != 2*j || b != j+i {
				return fmt.Errorf("want = %d and %d, got = %d and %d", 2*j, j+i, a, b)
			}
		}
		return nil
	})
	st := g.g.proxy.Stats()
	if st.Pinned != 0 {
		t.Fatalf("pinned clients: want = 0, got = %d", st.Pinned)
	}
	if st.PrepareHits == 0 {
		t.Fatalf("statements reused on server connections: want > 0, got = %d (misses %d)", st.PrepareHits, st.PrepareMisses)
	}
	// Every client's own Parse reaches the server (20 clients × 2
	// statements, so that its answer is the server's of the moment); beyond
	// those, a statement is prepared again at most once per server
	// connection for Binds of other clients: two connections, 21 distinct
	// statements.
	if st.PrepareMisses > 40+42 {
		t.Fatalf("statements prepared on the server: want <= 82, got = %d", st.PrepareMisses)
	}
	t.Logf("prepare hits %d, misses %d", st.PrepareHits, st.PrepareMisses)
}

// TestPgxExecModes covers DescribeExec (Parse+Describe+Sync, then
// Bind+Execute+Sync on the unnamed statement, like lib/pq), Exec and
// CacheDescribe, with clients far more numerous than connections.
func TestPgxExecModes(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeDescribeExec, pgx.QueryExecModeExec, pgx.QueryExecModeCacheDescribe, pgx.QueryExecModeSimpleProtocol} {
		t.Run(mode.String(), func(t *testing.T) {
			parallel(t, 20, func(i int) error {
				cfg, err := pgx.ParseConfig(g.url("alice", userPass, "appdb"))
				if err != nil {
					return err
				}
				cfg.DefaultQueryExecMode = mode
				conn, err := pgx.ConnectConfig(ctx, cfg)
				if err != nil {
					return err
				}
				defer conn.Close(ctx)
				for j := 0; j < 25; j++ {
					var s string
					var n int
					if err := conn.QueryRow(ctx, "SELECT $1::text, $2::int + 1", fmt.Sprint("c", i), j).Scan(&s, &n); err != nil {
						return err
					}
					if s != fmt.Sprint("c", i) || n != j+1 {
						return fmt.Errorf("want = c%d %d, got = %s %d", i, j+1, s, n)
					}
				}
				return nil
			})
		})
	}
}

// TestPgxBatchPipelines sends several Parse/Bind/Execute before one Sync,
// with an error in the middle: the results before it arrive, the error is
// reported once, the rest is skipped, and the connection goes on.
func TestPgxBatchPipelines(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	parallel(t, 20, func(i int) error {
		conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			return err
		}
		defer conn.Close(ctx)
		for round := 0; round < 5; round++ {
			b := &pgx.Batch{}
			for k := 0; k < 10; k++ {
				b.Queue("SELECT $1::int", k)
			}
			results := conn.SendBatch(ctx, b)
			for k := 0; k < 10; k++ {
				var v int
				if err := results.QueryRow().Scan(&v); err != nil || v != k {
					return fmt.Errorf("batch item %d: want = %d, got = %d (%v)", k, k, v, err)
				}
			}
			if err := results.Close(); err != nil {
				return err
			}
			// An error in the middle of a pipeline.
			b = &pgx.Batch{}
			b.Queue("SELECT 1")
			b.Queue("SELECT 1/0")
			b.Queue("SELECT 3")
			results = conn.SendBatch(ctx, b)
			var v int
			if err := results.QueryRow().Scan(&v); err != nil || v != 1 {
				return fmt.Errorf("before the error: want = 1, got = %d (%v)", v, err)
			}
			err := results.QueryRow().Scan(&v)
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "22012" {
				return fmt.Errorf("want = division by zero, got = %v", err)
			}
			_ = results.Close()
			if err := conn.QueryRow(ctx, "SELECT 42").Scan(&v); err != nil || v != 42 {
				return fmt.Errorf("after the failed batch: want = 42, got = %d (%v)", v, err)
			}
		}
		return nil
	})
}

// TestPgxpoolOnTinyBudget: a pgxpool of 50 connections against a budget of
// 2, all busy at once.
func TestPgxpoolOnTinyBudget(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 50
	p, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	parallel(t, 50, func(i int) error {
		for j := 0; j < 20; j++ {
			var n int
			if err := p.QueryRow(ctx, "SELECT $1::int", i*100+j).Scan(&n); err != nil {
				return err
			}
			if n != i*100+j {
				return fmt.Errorf("want = %d, got = %d", i*100+j, n)
			}
		}
		return nil
	})
	if got := g.g.pool.Stats().Open; got > 2 {
		t.Fatalf("server connections: want <= 2, got = %d", got)
	}
}

// TestLibpqUnnamedAcrossSync: lib/pq sends Parse(unnamed)+Describe+Sync,
// then Bind+Execute+Sync after ReadyForQuery; with 20 clients on 2 server
// connections. By default the connection stays linked from the Parse to
// the Execute, so the statement is never prepared twice; with replay the
// Bind often lands elsewhere, where the statement is prepared again.
func TestLibpqUnnamedAcrossSync(t *testing.T) {
	for _, mode := range []string{"link", "replay"} {
		t.Run(mode, func(t *testing.T) {
			var opts []option
			if mode == "replay" {
				opts = append(opts, withReplayUnnamed())
			}
			g := startGov(t, nil, func(c *config.Config) {
				c.Budget.Max = 2
				c.Clients.MaxConnections = 500
			}, opts...)
			db := openPq(t, g.url("alice", userPass, "appdb"), 20)
			db.SetMaxIdleConns(20)
			parallel(t, 20, func(i int) error {
				for j := 0; j < 40; j++ {
					var s string
					var n int
					// Different texts per client, so a wrong statement shows.
					q := fmt.Sprintf("SELECT $1::text || '-%d', $2::int * %d", i, i+1)
					if err := db.QueryRow(q, "v", j).Scan(&s, &n); err != nil {
						return err
					}
					if s != fmt.Sprintf("v-%d", i) || n != j*(i+1) {
						return fmt.Errorf("want = v-%d %d, got = %s %d", i, j*(i+1), s, n)
					}
				}
				return nil
			})
			st := g.g.proxy.Stats()
			// Linked, the statement is prepared again only after a
			// linger expired: lib/pq's Bind came more than the linger
			// after its Parse's Sync, which a loaded machine does now
			// and then.
			if mode == "link" && st.PrepareMisses > st.UnnamedLingerExpired {
				t.Fatalf("linked: want the unnamed statement prepared again only after a linger expired, got %d misses, %d expiries (%+v)", st.PrepareMisses, st.UnnamedLingerExpired, st)
			}
			t.Logf("prepare misses %d, linger expiries %d", st.PrepareMisses, st.UnnamedLingerExpired)
			if mode == "replay" && st.PrepareMisses == 0 {
				t.Fatalf("replay: want the unnamed statement prepared again at least once, got %+v", st)
			}
		})
	}
}

// TestUnnamedStatementOutlivesTheLink: a client describes its unnamed
// statement and binds it only after the connection was released (longer
// than the link lasts), after a schema change of another application in
// between; it gets what Postgres says (the statement's result type
// changed), and without the change its rows.
func TestUnnamedStatementOutlivesTheLink(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1 })
	ctx := context.Background()
	admin := connectPgx(t, shared.URL("app", appPass, "appdb"))
	run := func(url string, alter bool) string {
		if _, err := admin.Exec(ctx, "DROP TABLE IF EXISTS linger_t; CREATE TABLE linger_t (a int); INSERT INTO linger_t VALUES (7)"); err != nil {
			t.Fatal(err)
		}
		conn, err := pgconn.Connect(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		if _, err := conn.Prepare(ctx, "", "SELECT * FROM linger_t", nil); err != nil {
			t.Fatal(err)
		}
		if alter {
			if _, err := admin.Exec(ctx, "ALTER TABLE linger_t ADD COLUMN b int DEFAULT 8"); err != nil {
				t.Fatal(err)
			}
		}
		if url != shared.URL("app", appPass, "appdb") {
			waitFor(t, 5*time.Second, "the linked connection to be released", func() bool { return g.g.pool.Stats().InUse == 0 })
		}
		res := conn.ExecPrepared(ctx, "", nil, nil, nil).Read()
		if res.Err != nil {
			return "error " + res.Err.Error()
		}
		return fmt.Sprint(len(res.FieldDescriptions), " columns: ", res.Rows)
	}
	direct, via := shared.URL("app", appPass, "appdb"), g.url("alice", userPass, "appdb")
	for _, alter := range []bool{false, true} {
		want, got := run(direct, alter), run(via, alter)
		if want != got {
			t.Fatalf("schema changed = %v: want = %s (Postgres), got = %s", alter, want, got)
		}
		t.Logf("schema changed = %v: %s", alter, got)
	}
}

// TestLibpqTransactionsAndRetries: database/sql + lib/pq transactions,
// SERIALIZABLE with retries on 40001 and pg_advisory_xact_lock (coderd's
// pattern), on a budget of 2.
func TestLibpqTransactionsAndRetries(t *testing.T) {
	g := txGov(t, nil)
	db := openPq(t, g.url("alice", userPass, "appdb"), 10)
	if _, err := db.Exec("DROP TABLE IF EXISTS counters; CREATE TABLE counters (id int PRIMARY KEY, n int); INSERT INTO counters VALUES (1, 0)"); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	retries := 0
	var mu sync.Mutex
	parallel(t, 10, func(i int) error {
		for j := 0; j < 10; j++ {
			for attempt := 0; ; attempt++ {
				err := func() error {
					tx, err := db.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelSerializable})
					if err != nil {
						return err
					}
					defer tx.Rollback() //nolint:errcheck
					if _, err := tx.Exec("SELECT pg_advisory_xact_lock($1)", 7); err != nil {
						return err
					}
					var n int
					if err := tx.QueryRow("SELECT n FROM counters WHERE id = $1", 1).Scan(&n); err != nil {
						return err
					}
					if _, err := tx.Exec("UPDATE counters SET n = $1 WHERE id = $2", n+1, 1); err != nil {
						return err
					}
					return tx.Commit()
				}()
				var pqErr *pq.Error
				// Each serialization failure is another client's commit
				// (the lock's holder), so a client fails at most about
				// as often as there are increments: 200 never runs out,
				// however the clients are scheduled.
				if errors.As(err, &pqErr) && pqErr.Code == "40001" && attempt < 200 {
					mu.Lock()
					retries++
					mu.Unlock()
					continue
				}
				if err != nil {
					return err
				}
				break
			}
		}
		return nil
	})
	var n int
	if err := db.QueryRow("SELECT n FROM counters WHERE id = 1").Scan(&n); err != nil || n != 100 {
		t.Fatalf("counter after 100 serialized increments: want = 100, got = %d (%v)", n, err)
	}
	if st := g.g.proxy.Stats(); st.Pinned != 0 {
		t.Fatalf("pg_advisory_xact_lock must not pin: %d pinned", st.Pinned)
	}
	t.Logf("%d serialization retries", retries)
}

// TestStatementErrorsAndClose: a failing Parse is reported once, in its
// place, and leaves no statement; Close and DEALLOCATE forget a statement;
// re-preparing a name that exists fails as on Postgres.
func TestStatementErrorsAndClose(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	conn, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// A failing Parse, then the same name prepared correctly.
	_, err = conn.Prepare(ctx, "s1", "SELECT FROM nosuchtable", nil)
	assertCode(t, err, "42P01")
	if _, err := conn.Prepare(ctx, "s1", "SELECT $1::int + 1", nil); err != nil {
		t.Fatalf("the name of a failed Parse must be free: %v", err)
	}
	res := conn.ExecPrepared(ctx, "s1", [][]byte{[]byte("41")}, nil, nil).Read()
	if res.Err != nil || string(res.Rows[0][0]) != "42" {
		t.Fatalf("want = 42, got = %v (%v)", res.Rows, res.Err)
	}
	// Preparing an existing name fails as on Postgres.
	_, err = conn.Prepare(ctx, "s1", "SELECT 2", nil)
	assertCode(t, err, "42P05")
	// Close (Deallocate) forgets it; the name can be reused.
	if err := conn.Deallocate(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	res = conn.ExecPrepared(ctx, "s1", nil, nil, nil).Read()
	assertCode(t, res.Err, "26000")
	if _, err := conn.Prepare(ctx, "s1", "SELECT 'again'", nil); err != nil {
		t.Fatal(err)
	}
	// SQL DEALLOCATE of a protocol-level statement.
	if _, err := conn.Exec(ctx, "DEALLOCATE s1").ReadAll(); err != nil {
		t.Fatalf("DEALLOCATE of a protocol-level statement: %v", err)
	}
	res = conn.ExecPrepared(ctx, "s1", nil, nil, nil).Read()
	assertCode(t, res.Err, "26000")
	// DEALLOCATE ALL.
	if _, err := conn.Prepare(ctx, "s2", "SELECT 2", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "DEALLOCATE ALL").ReadAll(); err != nil {
		t.Fatal(err)
	}
	res = conn.ExecPrepared(ctx, "s2", nil, nil, nil).Read()
	assertCode(t, res.Err, "26000")
	// Everything still works afterwards, on either connection.
	for i := 0; i < 5; i++ {
		if _, err := conn.Prepare(ctx, fmt.Sprint("p", i), "SELECT 2", nil); err != nil {
			t.Fatal(err)
		}
		res := conn.ExecPrepared(ctx, fmt.Sprint("p", i), nil, nil, nil).Read()
		if res.Err != nil || string(res.Rows[0][0]) != "2" {
			t.Fatalf("after DEALLOCATE ALL: want = 2, got = %v (%v)", res.Rows, res.Err)
		}
	}
}

// TestPreparedStatementLRU: more statements than pool.max_prepared_statements
// are evicted with Close; results stay right; the server never holds more.
func TestPreparedStatementLRU(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1; c.Pool.MaxPreparedStatements = 3 })
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for round := 0; round < 3; round++ {
		for k := 0; k < 10; k++ {
			var v int
			if err := conn.QueryRow(ctx, fmt.Sprintf("SELECT $1::int + %d", k), round).Scan(&v); err != nil || v != round+k {
				t.Fatalf("want = %d, got = %d (%v)", round+k, v, err)
			}
		}
	}
	var onServer int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgg_%'").Scan(&onServer); err != nil {
		t.Fatal(err)
	}
	if onServer > 3 {
		t.Fatalf("statements on the server: want <= 3, got = %d", onServer)
	}
}

// TestStaleCachedPlan: a schema change makes a cached plan unusable
// ("cached plan must not change result type"); pgx re-prepares and the
// governor follows instead of looping on the stale statement.
func TestStaleCachedPlan(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1 })
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	mustExec(t, conn, "DROP TABLE IF EXISTS shape")
	mustExec(t, conn, "CREATE TABLE shape (a int)")
	mustExec(t, conn, "INSERT INTO shape VALUES (1)")
	var rows []map[string]any
	get := func() error {
		r, err := conn.Query(ctx, "SELECT * FROM shape WHERE $1::int = 1", 1)
		if err != nil {
			return err
		}
		rows, err = pgx.CollectRows(r, pgx.RowToMap)
		return err
	}
	if err := get(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, conn, "ALTER TABLE shape ADD COLUMN b int DEFAULT 2")
	// pgx reports the stale plan once, then re-prepares.
	if err := get(); err != nil {
		if !strings.Contains(err.Error(), "cached plan must not change result type") {
			t.Fatal(err)
		}
		if err := get(); err != nil {
			t.Fatalf("after the stale plan: %v", err)
		}
	}
	if len(rows) != 1 || rows[0]["b"] != int32(2) {
		t.Fatalf("want the new column, got %v", rows)
	}
}

// TestFlushKeepsTheServer: Parse+Describe+Flush (no Sync) keeps the
// server connection attached until the Sync.
func TestFlushKeepsTheServer(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1 })
	ctx := context.Background()
	conn, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// pgconn's Prepare sends Parse, Describe, Sync; ExecParams sends the
	// extended sequence. Here: a multi-statement simple query, then a
	// prepared statement used twice, all while another client waits.
	other, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(ctx)
	results, err := conn.Exec(ctx, "SELECT 1; SELECT 2; SELECT 3").ReadAll()
	if err != nil || len(results) != 3 || string(results[2].Rows[0][0]) != "3" {
		t.Fatalf("multi-statement query: %v %v", results, err)
	}
	res := other.ExecParams(ctx, "SELECT $1::int", [][]byte{[]byte("5")}, nil, nil, nil).Read()
	if res.Err != nil || string(res.Rows[0][0]) != "5" {
		t.Fatalf("want = 5, got = %v (%v)", res.Rows, res.Err)
	}
	_ = time.Second
}

// TestSkippedPrepareIsForgotten: after an error, the server skips the rest
// of the pipeline up to Sync, including a Parse the governor added there
// to re-prepare a statement for a Bind; the governor must not believe the
// connection has it. One connection, an LRU of one statement.
func TestSkippedPrepareIsForgotten(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1; c.Pool.MaxPreparedStatements = 1 })
	ctx := context.Background()
	conn, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Prepare(ctx, "x", "SELECT 100", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Prepare(ctx, "y", "SELECT 200", nil); err != nil { // evicts x from the connection
		t.Fatal(err)
	}
	batch := &pgconn.Batch{}
	batch.ExecParams("SELECT 1/0", nil, nil, nil, nil) // fails at Execute
	batch.ExecPrepared("x", nil, nil, nil)             // its re-prepare is skipped by the server
	if _, err := conn.ExecBatch(ctx, batch).ReadAll(); err == nil {
		t.Fatal("want = division by zero, got = nil")
	}
	res := conn.ExecPrepared(ctx, "x", nil, nil, nil).Read()
	if res.Err != nil || string(res.Rows[0][0]) != "100" {
		t.Fatalf("statement x after the skipped re-prepare: want = 100, got = %v (%v)", res.Rows, res.Err)
	}
}
