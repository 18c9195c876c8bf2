package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/lib/pq"

	"github.com/pggovernor/pggovernor/config"
)

// A server connection lost under a client looks to the client as it would
// from Postgres, so that drivers' own reconnect and retry logic works.

// terminateIdleBackends terminates the governor's server connections to
// appdb that are idle (not the control connection's), the way a DBA, a
// failover or idle_session_timeout does, and returns how many.
func terminateIdleBackends(t *testing.T) int {
	t.Helper()
	rows, err := shared.Exec(context.Background(), `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE usename = 'app' AND datname = 'appdb' AND backend_type = 'client backend' AND state = 'idle'
		AND application_name <> 'pggovernor-control' AND pid <> pg_backend_pid()`)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(rows[0][0])
	return n
}

// TestIdleServerTerminatedBeforeEachQuery: the pooled connection a query
// is about to use is terminated right before it (its FATAL already on the
// wire, nothing of the query executed): the query runs on another
// connection and the client sees nothing — lib/pq (database/sql) and pgx,
// 30 parameterised queries each.
func TestIdleServerTerminatedBeforeEachQuery(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	t.Run("libpq", func(t *testing.T) {
		db := openPq(t, g.url("alice", userPass, "appdb"), 1)
		failures := 0
		for i := 0; i < 30; i++ {
			terminateIdleBackends(t)
			var v int
			if err := db.QueryRowContext(ctx, "SELECT $1::int + 1", i).Scan(&v); err != nil || v != i+1 {
				failures++
				t.Logf("query %d: want = %d, got = %d (%v)", i, i+1, v, err)
			}
		}
		if failures != 0 {
			t.Fatalf("queries failing after their idle server connection was terminated: want = 0 of 30, got = %d", failures)
		}
	})
	t.Run("pgx", func(t *testing.T) {
		conn := connectPgx(t, g.url("alice", userPass, "appdb"))
		failures := 0
		for i := 0; i < 30; i++ {
			terminateIdleBackends(t)
			var v int
			if err := conn.QueryRow(ctx, "SELECT $1::int * 2", i).Scan(&v); err != nil || v != 2*i {
				failures++
				t.Logf("query %d: want = %d, got = %d (%v)", i, 2*i, v, err)
			}
		}
		if failures != 0 {
			t.Fatalf("queries failing after their idle server connection was terminated: want = 0 of 30, got = %d", failures)
		}
	})
	var retried int64
	if st := g.g.proxy.Stats(); st.Retries > 0 {
		retried = st.Retries
	}
	t.Logf("requests moved to another connection: %d", retried)
}

// TestServerTerminatedUnderAQuery: the backend running a client's query is
// terminated. What the client sees (the error, then a closed connection)
// must be what it sees from Postgres, and the driver's pool must carry on
// with a new connection: database/sql with lib/pq, pgx, in and out of a
// transaction.
func TestServerTerminatedUnderAQuery(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 3 })
	ctx := context.Background()
	direct, via := shared.URL("app", appPass, "appdb"), g.url("alice", userPass, "appdb")
	// killRunning terminates the backend running tag's pg_sleep once it
	// runs.
	killRunning := func(tag string) {
		waitFor(t, 10*time.Second, "the query to run", func() bool {
			rows, err := shared.Exec(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
				WHERE query LIKE '%`+tag+`%' AND pid <> pg_backend_pid() AND state = 'active'`)
			return err == nil && rows[0][0] != "0"
		})
	}
	for _, inTx := range []bool{false, true} {
		for _, driver := range []string{"libpq", "pgx"} {
			name := fmt.Sprintf("%s/transaction=%v", driver, inTx)
			t.Run(name, func(t *testing.T) {
				run := func(url, tag string) []string {
					var out []string
					// Only the first run sleeps (a sequence is not rolled
					// back): database/sql runs the query again on a new
					// connection after lib/pq's driver.ErrBadConn.
					seq := strings.NewReplacer("-", "_", "/", "_", "=", "_").Replace(tag)
					if _, err := shared.ExecIn(ctx, "appdb", "DROP SEQUENCE IF EXISTS "+seq+"; CREATE SEQUENCE "+seq+"; GRANT ALL ON SEQUENCE "+seq+" TO app"); err != nil {
						t.Fatal(err)
					}
					q := fmt.Sprintf("SELECT pg_sleep(CASE WHEN nextval('%s') = 1 THEN 30 ELSE 0 END) /* %s */", seq, tag)
					switch driver {
					case "libpq":
						db := openPq(t, url, 1)
						if err := db.PingContext(ctx); err != nil {
							t.Fatal(err)
						}
						var tx *sql.Tx
						errc := make(chan error, 1)
						go func() {
							if inTx {
								var err error
								if tx, err = db.BeginTx(ctx, nil); err != nil {
									errc <- err
									return
								}
								_, err = tx.ExecContext(ctx, q)
								errc <- err
								return
							}
							_, err := db.ExecContext(ctx, q, nil...)
							errc <- err
						}()
						killRunning(tag)
						out = append(out, "query: "+errText(<-errc))
						if tx != nil {
							out = append(out, "rollback: "+errText(tx.Rollback()))
						}
						var v int
						err := db.QueryRowContext(ctx, "SELECT $1::int", 7).Scan(&v)
						out = append(out, fmt.Sprintf("next query: %d %s", v, errText(err)))
					case "pgx":
						conn, err := pgx.Connect(ctx, url)
						if err != nil {
							t.Fatal(err)
						}
						defer conn.Close(ctx)
						errc := make(chan error, 1)
						go func() {
							if inTx {
								if _, err := conn.Exec(ctx, "BEGIN"); err != nil {
									errc <- err
									return
								}
							}
							_, err := conn.Exec(ctx, q)
							errc <- err
						}()
						killRunning(tag)
						out = append(out, "query: "+errText(<-errc))
						out = append(out, fmt.Sprintf("connection closed: %v", conn.IsClosed()))
					}
					return out
				}
				want := run(direct, "direct-"+name)
				got := run(via, "via-"+name)
				if strings.Join(want, "\n") != strings.Join(got, "\n") {
					t.Fatalf("want (Postgres):\n  %s\ngot (governor):\n  %s", strings.Join(want, "\n  "), strings.Join(got, "\n  "))
				}
				t.Logf("%s", strings.Join(got, "; "))
			})
		}
	}
}

func errText(err error) string {
	if err == nil {
		return "ok"
	}
	var pgErr *pgconn.PgError
	var pqErr *pq.Error
	switch {
	case errors.As(err, &pgErr):
		return "server error " + pgErr.Severity + " " + pgErr.Code + " " + pgErr.Message
	case errors.As(err, &pqErr):
		return "server error " + pqErr.Severity + " " + string(pqErr.Code) + " " + pqErr.Message
	}
	return "error " + err.Error()
}

// TestServerLostSendsOnlyTheServersWord: on the wire, a client whose
// backend is terminated under its query receives the server's FATAL and
// then the end of the connection — nothing of the governor's after it
// (lib/pq, given a second error, fails with "unexpected message 'E';
// expected ReadyForQuery" instead of reconnecting).
func TestServerLostSendsOnlyTheServersWord(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	run := func(url, tag string) []string {
		conn, err := pgconn.Connect(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		hj, err := conn.Hijack()
		if err != nil {
			t.Fatal(err)
		}
		defer hj.Conn.Close()
		_ = hj.Conn.SetDeadline(time.Now().Add(20 * time.Second))
		hj.Frontend.Send(&pgproto3.Query{String: "SELECT pg_sleep(30) /* " + tag + " */"})
		if err := hj.Frontend.Flush(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "the query to run", func() bool {
			rows, err := shared.Exec(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
				WHERE query LIKE '%`+tag+`%' AND pid <> pg_backend_pid() AND state = 'active'`)
			return err == nil && rows[0][0] != "0"
		})
		var got []string
		for {
			msg, err := hj.Frontend.Receive()
			if err != nil {
				return append(got, "end of connection")
			}
			switch m := msg.(type) {
			case *pgproto3.ErrorResponse:
				got = append(got, fmt.Sprintf("ErrorResponse %s %s %s", m.Severity, m.Code, m.Message))
			default:
				got = append(got, fmt.Sprintf("%T", msg))
			}
		}
	}
	want := run(shared.URL("app", appPass, "appdb"), "raw-direct")
	got := run(g.url("alice", userPass, "appdb"), "raw-governor")
	if strings.Join(want, "\n") != strings.Join(got, "\n") {
		t.Fatalf("want (Postgres):\n  %s\ngot (governor):\n  %s", strings.Join(want, "\n  "), strings.Join(got, "\n  "))
	}
}

// TestLingeringConnectionLostIsInvisible: between a client's Parse of its
// unnamed statement and its Bind (lib/pq's two round trips) the connection
// linked to it is terminated: the client is between transactions, so the
// Bind runs on another connection (the statement prepared there) and the
// client sees nothing.
func TestLingeringConnectionLostIsInvisible(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	conn, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for i := 0; i < 10; i++ {
		if _, err := conn.Prepare(ctx, "", "SELECT $1::int + 100", nil); err != nil {
			t.Fatal(err)
		}
		if _, err := shared.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
			WHERE usename = 'app' AND datname = 'appdb' AND backend_type = 'client backend'
			AND application_name <> 'pggovernor-control' AND pid <> pg_backend_pid()`); err != nil {
			t.Fatal(err)
		}
		res := conn.ExecPrepared(ctx, "", [][]byte{[]byte(strconv.Itoa(i))}, nil, nil).Read()
		if res.Err != nil || len(res.Rows) != 1 || string(res.Rows[0][0]) != strconv.Itoa(100+i) {
			t.Fatalf("round %d: want = %d, got = %v (%v)", i, 100+i, res.Rows, res.Err)
		}
	}
}

// TestRetriedRequestThatPreparesAndCloses: a request that prepares a
// statement, uses it and closes it (pgx's pipeline of SendPrepare,
// SendQueryPrepared, SendDeallocate) is moved to another connection when
// its pooled one was terminated before reading it, and runs there as on
// Postgres. The governor used to put the closed statement back before
// reading the request again, whose Parse then failed with 42P05 ("prepared
// statement already exists"). Budget 1, so that the terminated connection
// is the one the request gets.
func TestRetriedRequestThatPreparesAndCloses(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1 })
	ctx := context.Background()
	conn, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// Whether the governor sees a termination before it hands the
	// connection out is a race: rounds go on until three requests were
	// moved (or 300 rounds, each a few milliseconds).
	const wantRetried, maxRounds = 3, 300
	failures, rounds := 0, 0
	for i := 0; i < maxRounds && g.g.proxy.Stats().Retries < wantRetried; i++ {
		rounds++
		waitFor(t, 10*time.Second, "the pool's connection to be idle", func() bool { return g.g.pool.Stats().InUse == 0 })
		terminateIdleBackends(t)
		p := conn.StartPipeline(ctx)
		name := fmt.Sprintf("s%d", i)
		p.SendPrepare(name, "SELECT $1::int + 1", nil)
		p.SendQueryPrepared(name, [][]byte{[]byte(strconv.Itoa(i))}, nil, nil)
		p.SendDeallocate(name)
		p.SendPipelineSync()
		var got string
		err := func() error {
			if err := p.Flush(); err != nil {
				return err
			}
			for {
				res, err := p.GetResults()
				if err != nil {
					return err
				}
				switch r := res.(type) {
				case *pgconn.ResultReader:
					res := r.Read()
					if res.Err != nil {
						return res.Err
					}
					if len(res.Rows) == 1 {
						got = string(res.Rows[0][0])
					}
				case *pgconn.PipelineSync:
					return nil
				case nil:
					return errors.New("pipeline ended without its Sync")
				}
			}
		}()
		if cerr := p.Close(); err == nil {
			err = cerr
		}
		if err != nil || got != strconv.Itoa(i+1) {
			failures++
			t.Logf("round %d: want = %d, got = %q (%v)", i, i+1, got, err)
			if conn.IsClosed() {
				t.Fatalf("the connection closed after round %d", i)
			}
		}
	}
	retried := g.g.proxy.Stats().Retries
	t.Logf("requests moved to another connection: %d of %d", retried, rounds)
	if failures != 0 {
		t.Fatalf("pipelines failing after their idle server connection was terminated: want = 0 of %d, got = %d", rounds, failures)
	}
	if retried < wantRetried {
		t.Fatalf("requests moved to another connection in %d rounds: want >= %d, got = %d (the test did not exercise the retry)", rounds, wantRetried, retried)
	}
}

// TestLibpqUnderRandomTerminations: lib/pq clients through database/sql
// run parameterised autocommit INSERTs (Parse, Describe, Sync, then Bind,
// Execute, Sync on the unnamed statement) while server connections are
// terminated at random, as the fault suite's pg_terminate_backend does. A
// client may see its connection lost (57P01, or the reset); it must never
// see a message Postgres would not send at that step of the protocol. The
// governor used to send the Parse's answers again after the Bind when the
// connection lingering for the Bind was terminated (the Parse request,
// answered, was taken for one to retry): lib/pq failed with "unexpected
// Bind response ParseComplete", as in the fault suite; and when that
// connection's FATAL came in the same read as the Parse's answers, it left
// them unsent, and the client waited for ever.
func TestLibpqUnderRandomTerminations(t *testing.T) {
	for _, mode := range []string{"link", "replay"} {
		t.Run(mode, func(t *testing.T) {
			var opts []option
			if mode == "replay" {
				opts = append(opts, withReplayUnnamed())
			}
			libpqUnderTerminations(t, startGov(t, nil, func(c *config.Config) { c.Budget.Max = 4; c.Clients.MaxConnections = 500 }, opts...))
		})
	}
}

func libpqUnderTerminations(t *testing.T, g *gov) {
	ctx := context.Background()
	if _, err := shared.ExecIn(ctx, "appdb", "DROP TABLE IF EXISTS terminated_rows; CREATE TABLE terminated_rows (id int, client int); GRANT ALL ON terminated_rows TO app"); err != nil {
		t.Fatal(err)
	}
	const clients, inserts = 8, 300
	stop := make(chan struct{})
	killerDone := make(chan struct{})
	var terminated atomic.Int64
	go func() { // owner: the test; exits when stop closes
		defer close(killerDone)
		for {
			select {
			case <-stop:
				return
			default:
			}
			rows, err := shared.Exec(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
				WHERE usename = 'app' AND datname = 'appdb' AND backend_type = 'client backend'
				AND application_name <> 'pggovernor-control' AND random() < 0.5`)
			if err == nil {
				n, _ := strconv.Atoi(rows[0][0])
				terminated.Add(int64(n))
			}
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	var mu sync.Mutex
	var violations []string
	lost := 0
	// A client waiting for an answer that cannot come (the governor once
	// left a lingering connection's answers unflushed when its FATAL came
	// in the same read) fails the test here rather than at its timeout.
	watchdog := time.AfterFunc(2*time.Minute, func() {
		panic("lib/pq clients still waiting after 2 minutes: an answer was never sent")
	})
	defer watchdog.Stop()
	parallel(t, clients, func(i int) error {
		db := openPq(t, g.url("alice", userPass, "appdb"), 1)
		for j := 0; j < inserts; j++ {
			_, err := db.ExecContext(ctx, "INSERT INTO terminated_rows VALUES ($1, $2)", j, i)
			if err == nil {
				continue
			}
			mu.Lock()
			if strings.Contains(err.Error(), "unexpected") || strings.Contains(err.Error(), "protocol") {
				violations = append(violations, fmt.Sprintf("client %d insert %d: %v", i, j, err))
			} else {
				lost++
			}
			mu.Unlock()
		}
		return nil
	})
	close(stop)
	<-killerDone
	t.Logf("%d clients × %d inserts, %d server connections terminated: %d inserts lost with theirs, %d requests moved to another, %d protocol violations",
		clients, inserts, terminated.Load(), lost, g.g.proxy.Stats().Retries, len(violations))
	if len(violations) > 0 {
		t.Fatalf("protocol violations seen by lib/pq: %v", violations)
	}
	if terminated.Load() < 10 {
		t.Fatalf("%d server connections terminated: too few for the test to prove anything", terminated.Load())
	}
}
