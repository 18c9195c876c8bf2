package main

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/lib/pq"

	"github.com/pggovernor/pggovernor/config"
)

// The three clients the issue names drive the governor in both modes:
// queries, transactions, an error inside a transaction then ROLLBACK, COPY
// both ways, a 100 MB value, and a cancelled pg_sleep.

func modes() []string { return []string{config.PoolModeTransaction, config.PoolModeSession} }

func TestPgxThroughGovernor(t *testing.T) {
	for _, mode := range modes() {
		t.Run(mode, func(t *testing.T) {
			g := startGov(t, nil, func(c *config.Config) { c.PoolMode = mode; c.Budget.Max = 4 })
			ctx := context.Background()
			conn := connectPgx(t, g.url("alice", userPass, "appdb"))
			table := "pgx_" + mode
			mustExec(t, conn, "DROP TABLE IF EXISTS "+table)
			mustExec(t, conn, "CREATE TABLE "+table+" (id int PRIMARY KEY, v text)")

			// A transaction that commits.
			tx, err := conn.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES ($1, $2)", 1, "one"); err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			// An error inside a transaction, then ROLLBACK.
			tx, err = conn.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES ($1, $2)", 2, "two"); err != nil {
				t.Fatal(err)
			}
			_, err = tx.Exec(ctx, "INSERT INTO "+table+" VALUES ($1, $2)", 1, "dup")
			assertCode(t, err, "23505")
			_, err = tx.Exec(ctx, "SELECT 1")
			assertCode(t, err, "25P02") // in failed transaction
			if err := tx.Rollback(ctx); err != nil {
				t.Fatal(err)
			}
			var count int
			if err := conn.QueryRow(ctx, "SELECT count(*) FROM "+table).Scan(&count); err != nil {
				t.Fatal(err)
			}
			if count != 1 {
				t.Fatalf("rows after rollback: want = 1, got = %d", count)
			}

			// COPY FROM STDIN and COPY TO STDOUT.
			rows := make([][]any, 1000)
			for i := range rows {
				rows[i] = []any{int32(100 + i), fmt.Sprintf("row %d", i)}
			}
			n, err := conn.CopyFrom(ctx, pgx.Identifier{table}, []string{"id", "v"}, pgx.CopyFromRows(rows))
			if err != nil || n != 1000 {
				t.Fatalf("CopyFrom: want = 1000 rows, got = %d (%v)", n, err)
			}
			var out bytes.Buffer
			tag, err := conn.PgConn().CopyTo(ctx, &out, "COPY (SELECT id, v FROM "+table+" ORDER BY id) TO STDOUT")
			if err != nil || tag.RowsAffected() != 1001 {
				t.Fatalf("CopyTo: want = 1001 rows, got = %d (%v)", tag.RowsAffected(), err)
			}
			if !strings.HasPrefix(out.String(), "1\tone\n100\trow 0\n") {
				t.Fatalf("CopyTo output starts with %q", out.String()[:30])
			}

			// A 100 MB value each way: a parameter and a result.
			big := strings.Repeat("x", 100<<20)
			var length int
			if err := conn.QueryRow(ctx, "SELECT length($1::text)", big).Scan(&length); err != nil {
				t.Fatal(err)
			}
			if length != len(big) {
				t.Fatalf("length of the 100 MB parameter: want = %d, got = %d", len(big), length)
			}
			var back string
			if err := conn.QueryRow(ctx, "SELECT repeat('y', 100*1024*1024)").Scan(&back); err != nil {
				t.Fatal(err)
			}
			if len(back) != 100<<20 || back[0] != 'y' {
				t.Fatalf("100 MB result: want = %d bytes, got = %d", 100<<20, len(back))
			}
			big, back = "", ""

			// A cancelled pg_sleep(10): pgx sends a CancelRequest when the
			// context ends.
			cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			start := time.Now()
			_, err = conn.Exec(cctx, "SELECT pg_sleep(10)")
			cancel()
			if elapsed := time.Since(start); elapsed > 5*time.Second {
				t.Fatalf("the cancel did not stop pg_sleep(10): it took %s", elapsed)
			}
			assertCode(t, err, "57014")
		})
	}
}

func TestLibpqThroughGovernor(t *testing.T) {
	for _, mode := range modes() {
		t.Run(mode, func(t *testing.T) {
			g := startGov(t, nil, func(c *config.Config) { c.PoolMode = mode; c.Budget.Max = 4 })
			ctx := context.Background()
			db := openPq(t, g.url("alice", userPass, "appdb"), 3)
			table := "pq_" + mode
			if _, err := db.Exec("DROP TABLE IF EXISTS " + table); err != nil {
				t.Fatal(err)
			}
			if _, err := db.Exec("CREATE TABLE " + table + " (id int PRIMARY KEY, v text)"); err != nil {
				t.Fatal(err)
			}
			// Parameterised queries (Parse+Describe+Sync, then Bind+Execute+Sync).
			for i := 1; i <= 20; i++ {
				if _, err := db.Exec("INSERT INTO "+table+" VALUES ($1, $2)", i, fmt.Sprint("v", i)); err != nil {
					t.Fatal(err)
				}
			}
			var v string
			if err := db.QueryRow("SELECT v FROM "+table+" WHERE id = $1", 7).Scan(&v); err != nil || v != "v7" {
				t.Fatalf("want = v7, got = %q (%v)", v, err)
			}
			// Error inside a transaction, then ROLLBACK.
			tx, err := db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec("INSERT INTO "+table+" VALUES ($1, $2)", 100, "x"); err != nil {
				t.Fatal(err)
			}
			_, err = tx.Exec("INSERT INTO "+table+" VALUES ($1, $2)", 1, "dup")
			assertCode(t, err, "23505")
			if err := tx.Rollback(); err != nil {
				t.Fatal(err)
			}
			var count int
			if err := db.QueryRow("SELECT count(*) FROM " + table).Scan(&count); err != nil || count != 20 {
				t.Fatalf("rows after rollback: want = 20, got = %d (%v)", count, err)
			}
			// COPY FROM STDIN with pq.CopyIn.
			tx, err = db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			stmt, err := tx.Prepare(pq.CopyIn(table, "id", "v"))
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 500; i++ {
				if _, err := stmt.Exec(1000+i, fmt.Sprint("c", i)); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := stmt.Exec(); err != nil {
				t.Fatal(err)
			}
			if err := stmt.Close(); err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			if err := db.QueryRow("SELECT count(*) FROM " + table).Scan(&count); err != nil || count != 520 {
				t.Fatalf("rows after COPY: want = 520, got = %d (%v)", count, err)
			}
			// COPY TO STDOUT: lib/pq has no API for it; a plain query of
			// the same rows stands in, and psql covers COPY TO STDOUT.
			// A 100 MB value each way.
			big := strings.Repeat("z", 100<<20)
			var length int
			if err := db.QueryRow("SELECT length($1::text)", big).Scan(&length); err != nil || length != len(big) {
				t.Fatalf("100 MB parameter: want = %d, got = %d (%v)", len(big), length, err)
			}
			var back []byte
			if err := db.QueryRow("SELECT repeat('w', 100*1024*1024)").Scan(&back); err != nil || len(back) != 100<<20 {
				t.Fatalf("100 MB result: want = %d, got = %d (%v)", 100<<20, len(back), err)
			}
			big, back = "", nil
			// Cancellation: lib/pq sends a CancelRequest when the context ends.
			cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			_, err = db.ExecContext(cctx, "SELECT pg_sleep(10)")
			cancel()
			var pqErr *pq.Error
			if !errors.As(err, &pqErr) || pqErr.Code != "57014" {
				t.Fatalf("cancelled pg_sleep: want = SQLSTATE 57014, got = %v", err)
			}
		})
	}
}

func TestPsqlThroughGovernor(t *testing.T) {
	psql, err := exec.LookPath("psql")
	if err != nil {
		t.Fatalf("psql is required (apt-get install postgresql-client): %v", err)
	}
	for _, mode := range modes() {
		t.Run(mode, func(t *testing.T) {
			g := startGov(t, nil, func(c *config.Config) { c.PoolMode = mode; c.Budget.Max = 4 })
			table := "psql_" + mode
			run := func(stdin string, args ...string) (string, error) {
				cmd := exec.Command(psql, append([]string{"-X", "-v", "ON_ERROR_STOP=1", "-At", g.url("alice", userPass, "appdb")}, args...)...)
				cmd.Stdin = strings.NewReader(stdin)
				var out bytes.Buffer
				cmd.Stdout, cmd.Stderr = &out, &out
				err := cmd.Run()
				return out.String(), err
			}
			script := fmt.Sprintf(`DROP TABLE IF EXISTS %[1]s;
CREATE TABLE %[1]s (id int PRIMARY KEY, v text);
BEGIN;
INSERT INTO %[1]s VALUES (1, 'one');
COMMIT;
\set ON_ERROR_STOP 0
BEGIN;
INSERT INTO %[1]s VALUES (1, 'dup');
ROLLBACK;
\set ON_ERROR_STOP 1
\copy %[1]s FROM STDIN
2	two
3	three
\.
COPY (SELECT id, v FROM %[1]s ORDER BY id) TO STDOUT;
SELECT length(repeat('q', 100*1024*1024));
`, table)
			out, err := run(script)
			if err != nil {
				t.Fatalf("psql: %v\n%s", err, out)
			}
			for _, want := range []string{"duplicate key value", "1\tone\n2\ttwo\n3\tthree\n", "104857600"} {
				if !strings.Contains(out, want) {
					t.Fatalf("psql output lacks %q:\n%s", want, out)
				}
			}
			// A 100 MB value fetched through the governor.
			cmd := exec.Command(psql, "-X", "-At", "-c", "SELECT repeat('r', 100*1024*1024)", g.url("alice", userPass, "appdb"))
			var big bytes.Buffer
			cmd.Stdout = &big
			if err := cmd.Run(); err != nil || big.Len() != 100<<20+1 {
				t.Fatalf("psql 100 MB result: want = %d bytes, got = %d (%v)", 100<<20+1, big.Len(), err)
			}
			// psql sends a CancelRequest on SIGINT.
			cmd = exec.Command(psql, "-X", "-c", "SELECT pg_sleep(10)", g.url("alice", userPass, "appdb"))
			var sleepOut bytes.Buffer
			cmd.Stdout, cmd.Stderr = &sleepOut, &sleepOut
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 10*time.Second, "pg_sleep to run", func() bool {
				rows, err := shared.Exec(context.Background(), "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'")
				return err == nil && rows[0][0] == "1"
			})
			_ = cmd.Process.Signal(syscall.SIGINT)
			_ = cmd.Wait()
			if !strings.Contains(sleepOut.String(), "canceling statement due to user request") {
				t.Fatalf("psql after SIGINT: want the 57014 message, got:\n%s", sleepOut.String())
			}
		})
	}
}

// TestCancelReachesTheRightBackend runs two sleeps through the governor and
// cancels one: it stops with 57014 while the other finishes normally.
func TestCancelReachesTheRightBackend(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) { c.Budget.Max = 4 })
	ctx := context.Background()
	a := connectPgx(t, g.url("alice", userPass, "appdb"))
	b := connectPgx(t, g.url("alice", userPass, "appdb"))
	var wg sync.WaitGroup
	var bErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, bErr = b.Exec(ctx, "SELECT pg_sleep(1.5)")
	}()
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err := a.Exec(cctx, "SELECT pg_sleep(10)")
	cancel()
	assertCode(t, err, "57014")
	wg.Wait()
	if bErr != nil {
		t.Fatalf("the other client's query was hit by the cancel: %v", bErr)
	}
}

// openPq opens a database/sql pool on lib/pq (coderd's driver) for url,
// with at most maxOpen connections, closed at cleanup.
func openPq(t testing.TB, url string, maxOpen int) *sql.DB {
	t.Helper()
	db, err := sql.Open("postgres", url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	db.SetMaxOpenConns(maxOpen)
	return db
}

// connectPgx connects with pgx configured to send a CancelRequest when a
// query's context ends (pgx's default only sets a deadline).
func connectPgx(t testing.TB, url string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	cfg.BuildContextWatcherHandler = func(pc *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: pc, CancelRequestDelay: 0, DeadlineDelay: 5 * time.Second}
	}
	conn, err := pgx.ConnectConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func mustExec(t *testing.T, conn *pgx.Conn, sql string, args ...any) {
	t.Helper()
	if _, err := conn.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// assertCode checks that err is a Postgres error with SQLSTATE code.
func assertCode(t testing.TB, err error, code string) *pgconn.PgError {
	t.Helper()
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		var pqErr *pq.Error
		if errors.As(err, &pqErr) && string(pqErr.Code) == code {
			return nil
		}
		t.Fatalf("want = SQLSTATE %s, got = %v", code, err)
	}
	if pgErr.Code != code {
		t.Fatalf("want = SQLSTATE %s, got = %s: %s", code, pgErr.Code, pgErr.Message)
	}
	return pgErr
}

var _ = io.Discard
