package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/lib/pq"

	"github.com/pggovernor/pggovernor/config"
)

// Schema changes under prepared statements. Each scenario runs twice, once
// directly against Postgres and once through the governor, with the same
// clients; what every step returns (rows, or the error text) must be the
// same. The schema is changed by "another application" (a direct
// connection the governor cannot see) or by a client through the governor.

// stepClient is one client of a scenario: pgx in one of its query exec
// modes, or lib/pq through database/sql.
type stepClient interface {
	// query runs sql and returns its rows as text, or the error.
	query(ctx context.Context, sql string, args ...any) (string, error)
	close()
}

type pgxStepClient struct{ c *pgx.Conn }

func (p pgxStepClient) query(ctx context.Context, q string, args ...any) (string, error) {
	rows, err := p.c.Query(ctx, q, args...)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			return "", err
		}
		out = append(out, fmt.Sprint(vals...))
	}
	return strings.Join(out, "|"), rows.Err()
}

func (p pgxStepClient) close() { p.c.Close(context.Background()) }

type pqStepClient struct{ db *sql.DB }

func (p pqStepClient) query(ctx context.Context, q string, args ...any) (_ string, err error) {
	defer func() {
		// lib/pq panics on a row that does not match its description.
		if r := recover(); r != nil {
			err = fmt.Errorf("driver panic: %v", r)
		}
	}()
	rows, err := p.db.QueryContext(ctx, q, args...)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	cols, err := rows.Columns()
	if err != nil {
		return "", err
	}
	var out []string
	for rows.Next() {
		vals := make([]any, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			return "", err
		}
		for i, v := range vals {
			if b, ok := v.([]byte); ok {
				vals[i] = string(b)
			}
		}
		out = append(out, fmt.Sprint(vals...))
	}
	return strings.Join(out, "|"), rows.Err()
}

func (p pqStepClient) close() { _ = p.db.Close() }

// clientKinds are the drivers and modes the scenarios run with.
var clientKinds = []struct {
	name string
	open func(t *testing.T, url string) stepClient
}{
	{"pgx-cache-statement", pgxKind(pgx.QueryExecModeCacheStatement)},
	{"pgx-cache-describe", pgxKind(pgx.QueryExecModeCacheDescribe)},
	{"pgx-describe-exec", pgxKind(pgx.QueryExecModeDescribeExec)},
	{"pgx-exec", pgxKind(pgx.QueryExecModeExec)},
	{"pgx-simple", pgxKind(pgx.QueryExecModeSimpleProtocol)},
	{"pgx-stdlib", func(t *testing.T, url string) stepClient {
		cfg, err := pgx.ParseConfig(url)
		if err != nil {
			t.Fatal(err)
		}
		db := stdlib.OpenDB(*cfg)
		db.SetMaxOpenConns(1)
		db.SetMaxIdleConns(1)
		return pqStepClient{db}
	}},
	{"libpq", func(t *testing.T, url string) stepClient {
		db, err := sql.Open("postgres", url)
		if err != nil {
			t.Fatal(err)
		}
		db.SetMaxOpenConns(1)
		db.SetMaxIdleConns(1)
		return pqStepClient{db}
	}},
}

func pgxKind(mode pgx.QueryExecMode) func(t *testing.T, url string) stepClient {
	return func(t *testing.T, url string) stepClient {
		cfg, err := pgx.ParseConfig(url)
		if err != nil {
			t.Fatal(err)
		}
		cfg.DefaultQueryExecMode = mode
		c, err := pgx.ConnectConfig(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		return pgxStepClient{c}
	}
}

// step is one action of a scenario: who runs what. "admin" is a direct
// connection (another application); any other name is a client of the
// target, opened at its first step ("fresh" clients start after the DDL).
type step struct {
	who  string
	sql  string
	args []any
}

type ddlScenario struct {
	name  string
	setup string // run directly before each run
	steps []step
}

var ddlScenarios = []ddlScenario{
	{
		// A table known on the route is dropped by another application,
		// then created and rolled back inside a client's transaction.
		name:  "table dropped",
		setup: "DROP TABLE IF EXISTS ddl_t1; CREATE TABLE ddl_t1 (x int); INSERT INTO ddl_t1 VALUES (1)",
		steps: []step{
			{who: "a", sql: "SELECT count(*) FROM ddl_t1"},
			{who: "admin", sql: "DROP TABLE ddl_t1"},
			{who: "b", sql: "SELECT count(*) FROM ddl_t1"},
			{who: "b", sql: "SELECT count(*) FROM ddl_t1"},
			{who: "a", sql: "SELECT count(*) FROM ddl_t1"},
			{who: "c", sql: "BEGIN"},
			{who: "c", sql: "CREATE TABLE ddl_t1 (x int)"},
			{who: "c", sql: "SELECT count(*) FROM ddl_t1"},
			{who: "c", sql: "ROLLBACK"},
			{who: "c", sql: "SELECT count(*) FROM ddl_t1"},
			{who: "d", sql: "SELECT count(*) FROM ddl_t1"},
		},
	},
	{
		// A column is added: the result type of a prepared statement
		// changes; a client preparing it afresh must see the new shape,
		// one holding it gets what Postgres says of a stale plan.
		name:  "result type changed",
		setup: "DROP TABLE IF EXISTS ddl_s2; CREATE TABLE ddl_s2 (a int); INSERT INTO ddl_s2 VALUES (1)",
		steps: []step{
			{who: "a", sql: "SELECT * FROM ddl_s2 WHERE a = $1", args: []any{1}},
			{who: "admin", sql: "ALTER TABLE ddl_s2 ADD COLUMN b int DEFAULT 2"},
			{who: "b", sql: "SELECT * FROM ddl_s2 WHERE a = $1", args: []any{1}},
			{who: "b", sql: "SELECT * FROM ddl_s2 WHERE a = $1", args: []any{1}},
			{who: "a", sql: "SELECT * FROM ddl_s2 WHERE a = $1", args: []any{1}},
			{who: "a", sql: "SELECT * FROM ddl_s2 WHERE a = $1", args: []any{1}},
			{who: "b", sql: "ALTER TABLE ddl_s2 ALTER COLUMN b TYPE text"},
			{who: "b", sql: "SELECT * FROM ddl_s2 WHERE a = $1", args: []any{1}},
			{who: "b", sql: "SELECT * FROM ddl_s2 WHERE a = $1", args: []any{1}},
			{who: "c", sql: "SELECT * FROM ddl_s2 WHERE a = $1", args: []any{1}},
		},
	},
	{
		// An enum type is dropped and created again under the same name.
		name: "type recreated",
		setup: "DROP TABLE IF EXISTS ddl_m3; DROP TYPE IF EXISTS ddl_mood; CREATE TYPE ddl_mood AS ENUM ('sad', 'ok'); " +
			"CREATE TABLE ddl_m3 (x ddl_mood); INSERT INTO ddl_m3 VALUES ('ok')",
		steps: []step{
			{who: "a", sql: "SELECT x::text FROM ddl_m3 WHERE x = $1::ddl_mood", args: []any{"ok"}},
			{who: "a", sql: "SELECT $1::ddl_mood::text", args: []any{"sad"}},
			{who: "admin", sql: "DROP TABLE ddl_m3; DROP TYPE ddl_mood; CREATE TYPE ddl_mood AS ENUM ('sad', 'ok', 'happy'); " +
				"CREATE TABLE ddl_m3 (x ddl_mood); INSERT INTO ddl_m3 VALUES ('happy')"},
			{who: "b", sql: "SELECT x::text FROM ddl_m3 WHERE x = $1::ddl_mood", args: []any{"happy"}},
			{who: "b", sql: "SELECT $1::ddl_mood::text", args: []any{"happy"}},
			{who: "a", sql: "SELECT x::text FROM ddl_m3 WHERE x = $1::ddl_mood", args: []any{"happy"}},
			{who: "a", sql: "SELECT x::text FROM ddl_m3 WHERE x = $1::ddl_mood", args: []any{"happy"}},
			{who: "c", sql: "SELECT $1::ddl_mood::text", args: []any{"happy"}},
		},
	},
	{
		// A composite type is recreated with another shape, through the
		// governor this time.
		name: "composite recreated",
		setup: "DROP TABLE IF EXISTS ddl_c4; DROP TYPE IF EXISTS ddl_pair; CREATE TYPE ddl_pair AS (l int, r int); " +
			"CREATE TABLE ddl_c4 (p ddl_pair); INSERT INTO ddl_c4 VALUES (ROW(1, 2))",
		steps: []step{
			{who: "a", sql: "SELECT (p).l, (p).r FROM ddl_c4 WHERE (p).l = $1", args: []any{1}},
			{who: "b", sql: "DROP TABLE ddl_c4"},
			{who: "b", sql: "DROP TYPE ddl_pair"},
			{who: "b", sql: "CREATE TYPE ddl_pair AS (l text, r int)"},
			{who: "b", sql: "CREATE TABLE ddl_c4 (p ddl_pair)"},
			{who: "b", sql: "INSERT INTO ddl_c4 VALUES (ROW('one', 2))"},
			{who: "c", sql: "SELECT (p).l, (p).r FROM ddl_c4 WHERE (p).r = $1", args: []any{2}},
			{who: "a", sql: "SELECT (p).l, (p).r FROM ddl_c4 WHERE (p).l = $1", args: []any{1}},
			{who: "a", sql: "SELECT (p).l, (p).r FROM ddl_c4 WHERE (p).r = $1", args: []any{2}},
		},
	},
}

var oidInMessage = regexp.MustCompile(`(type|relation|OID) \d+`)

// runDDLScenario runs sc with clients of kind open against url (admin
// steps on a direct connection) and returns what every step returned.
func runDDLScenario(t *testing.T, sc ddlScenario, open func(*testing.T, string) stepClient, url string) []string {
	ctx := context.Background()
	admin := connectPgx(t, shared.URL("app", appPass, "appdb"))
	if _, err := admin.Exec(ctx, sc.setup); err != nil {
		t.Fatalf("setup: %v", err)
	}
	clients := map[string]stepClient{}
	defer func() {
		for _, c := range clients {
			c.close()
		}
	}()
	var out []string
	for i, s := range sc.steps {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		var res string
		var err error
		if s.who == "admin" {
			_, err = admin.Exec(sctx, s.sql)
		} else {
			c := clients[s.who]
			if c == nil {
				c = open(t, url)
				clients[s.who] = c
			}
			res, err = c.query(sctx, s.sql, s.args...)
		}
		hung := errors.Is(sctx.Err(), context.DeadlineExceeded)
		cancel()
		switch {
		case hung:
			out = append(out, fmt.Sprintf("%d %s: no answer within 10s (%v)", i, s.who, err))
			return out // the client is stuck; the rest says nothing
		case err != nil:
			// Object IDs differ between runs; nothing else may.
			msg := oidInMessage.ReplaceAllString(err.Error(), "$1 N")
			out = append(out, fmt.Sprintf("%d %s: error %s", i, s.who, msg))
		default:
			out = append(out, fmt.Sprintf("%d %s: %s", i, s.who, res))
		}
	}
	return out
}

// TestSchemaChangesUnderPreparedStatements: after DDL, through the governor
// every driver and mode gets exactly what it gets from Postgres: no hang,
// no error Postgres would not give, no stale plan for a dropped table or
// type. One server connection, so every client's statements meet on it.
func TestSchemaChangesUnderPreparedStatements(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1 })
	direct := shared.URL("app", appPass, "appdb")
	via := g.url("alice", userPass, "appdb")
	for _, kind := range clientKinds {
		t.Run(kind.name, func(t *testing.T) {
			for _, sc := range ddlScenarios {
				want := runDDLScenario(t, sc, kind.open, direct)
				got := runDDLScenario(t, sc, kind.open, via)
				if strings.Join(want, "\n") != strings.Join(got, "\n") {
					t.Errorf("%s: through the governor the steps differ from Postgres\nwant (direct):\n  %s\ngot (governor):\n  %s",
						sc.name, strings.Join(want, "\n  "), strings.Join(got, "\n  "))
				}
			}
		})
	}
}

// TestDDLChurn: tables and types are dropped and created again, and
// columns added and removed, under 20 clients of every driver and mode for
// 10 s, through the governor (budget 2) and, at the same moments, directly
// against Postgres in a database of their own. No client may hang, and no
// error may reach a client through the governor that the same workload
// does not get from Postgres: the same SQLSTATEs, and no driver-level
// error (a protocol mix-up, a row that does not decode) of its own.
func TestDDLChurn(t *testing.T) {
	ctx := context.Background()
	const duration = 10 * time.Second
	dbs := []string{"churn_direct", "churn_gov"}
	for _, db := range dbs {
		if _, err := shared.Exec(ctx, "DROP DATABASE IF EXISTS "+db); err != nil {
			t.Fatal(err)
		}
		if _, err := shared.Exec(ctx, "CREATE DATABASE "+db+" OWNER app"); err != nil {
			t.Fatal(err)
		}
	}
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 2 })
	urls := map[string]string{
		"churn_direct": shared.URL("app", appPass, "churn_direct"),
		"churn_gov":    g.url("alice", userPass, "churn_gov"),
	}
	admins := map[string]*pgx.Conn{}
	for _, db := range dbs {
		admins[db] = connectPgx(t, shared.URL("app", appPass, db))
		if _, err := admins[db].Exec(ctx, churnSetup); err != nil {
			t.Fatal(err)
		}
	}
	stop := make(chan struct{})
	churnDone := make(chan error, 1)
	go func() { // owner: this test; exits at stop
		for i := 0; ; i++ {
			select {
			case <-stop:
				churnDone <- nil
				return
			case <-time.After(15 * time.Millisecond):
			}
			ddl := churnDDL[i%len(churnDDL)]
			for _, db := range dbs {
				if _, err := admins[db].Exec(ctx, ddl); err != nil {
					churnDone <- fmt.Errorf("%s: %v", ddl, err)
					return
				}
			}
		}
	}()
	type tally struct {
		mu      sync.Mutex
		classes map[string]int
		ops     int
		hung    []string
	}
	results := map[string]*tally{}
	var wg sync.WaitGroup
	for _, db := range dbs {
		tl := &tally{classes: map[string]int{}}
		results[db] = tl
		for i := 0; i < 20; i++ {
			kind := clientKinds[i%len(clientKinds)]
			c := kind.open(t, urls[db])
			wg.Add(1)
			go func() { // owner: this test; exits at stop
				defer wg.Done()
				defer c.close()
				for j := 0; ; j++ {
					select {
					case <-stop:
						return
					default:
					}
					q := churnQueries[j%len(churnQueries)]
					octx, cancel := context.WithTimeout(ctx, 5*time.Second)
					_, err := c.query(octx, q.sql, q.args...)
					hung := errors.Is(octx.Err(), context.DeadlineExceeded)
					cancel()
					tl.mu.Lock()
					tl.ops++
					if hung {
						tl.hung = append(tl.hung, fmt.Sprintf("%s: %s: %v", kind.name, q.sql, err))
					} else if err != nil {
						tl.classes[kind.name+": "+errorClass(err)]++
					}
					tl.mu.Unlock()
					if hung {
						return
					}
				}
			}()
		}
	}
	time.Sleep(duration) // the workload's length: what is measured is what happens meanwhile
	close(stop)
	wg.Wait()
	if err := <-churnDone; err != nil {
		t.Fatal(err)
	}
	direct, via := results["churn_direct"], results["churn_gov"]
	t.Logf("operations: direct %d, through the governor %d", direct.ops, via.ops)
	for class, n := range via.classes {
		t.Logf("governor: %5d × %s (direct: %d)", n, class, direct.classes[class])
	}
	if len(via.hung) > 0 {
		t.Errorf("clients hung through the governor: %v", via.hung)
	}
	if len(direct.hung) > 0 {
		t.Logf("clients hung directly (the workload's own): %v", direct.hung)
	}
	for class, n := range via.classes {
		if _, ok := direct.classes[class]; !ok {
			t.Errorf("through the governor, %d × an error the same workload never got from Postgres: %s", n, class)
		}
	}
}

// errorClass names an error without what varies between runs: the
// SQLSTATE of a server error, or a driver's own error with numbers
// removed.
func errorClass(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return "SQLSTATE " + pgErr.Code
	}
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		return "SQLSTATE " + string(pqErr.Code)
	}
	return "driver: " + digits.ReplaceAllString(err.Error(), "N")
}

var digits = regexp.MustCompile(`\d+`)

const churnSetup = `DROP TABLE IF EXISTS churn_t; DROP TYPE IF EXISTS churn_mood;
CREATE TYPE churn_mood AS ENUM ('sad', 'ok');
CREATE TABLE churn_t (id int, m churn_mood, v int);
INSERT INTO churn_t SELECT g, 'ok', g FROM generate_series(1, 10) g`

// churnDDL is applied in turn, one statement every 15 ms.
var churnDDL = []string{
	"ALTER TABLE churn_t ADD COLUMN extra text DEFAULT 'x'",
	"ALTER TABLE churn_t DROP COLUMN extra",
	"ALTER TABLE churn_t ALTER COLUMN v TYPE bigint",
	"ALTER TABLE churn_t ALTER COLUMN v TYPE int",
	"DROP TABLE churn_t; CREATE TABLE churn_t (id int, m churn_mood, v int); INSERT INTO churn_t SELECT g, 'ok', g FROM generate_series(1, 10) g",
	"DROP TABLE churn_t; DROP TYPE churn_mood; CREATE TYPE churn_mood AS ENUM ('sad', 'ok'); " +
		"CREATE TABLE churn_t (id int, m churn_mood, v int); INSERT INTO churn_t SELECT g, 'ok', g FROM generate_series(1, 10) g",
}

var churnQueries = []struct {
	sql  string
	args []any
}{
	{"SELECT * FROM churn_t WHERE id = $1", []any{3}},
	{"SELECT id, v FROM churn_t WHERE m = $1::churn_mood ORDER BY id LIMIT 2", []any{"ok"}},
	{"SELECT $1::churn_mood::text", []any{"sad"}},
	{"SELECT count(*) FROM churn_t", nil},
	{"UPDATE churn_t SET v = v + 1 WHERE id = $1", []any{5}},
}

// TestPrepareWhileEveryConnectionIsHeld: a client that holds no server
// connection prepares (Parse, Describe, Sync) while another client holds
// the whole budget inside a transaction: the governor's control connection
// parses it at once, and the answer (the description, or the error) is the
// server's, exactly as a direct connection gets it; the statement then runs
// on a pooled connection.
func TestPrepareWhileEveryConnectionIsHeld(t *testing.T) {
	ctx := context.Background()
	// Budget derived from the server: 60 − 3 reserved − the control
	// connection − a reserve of 55 = 1.
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 0; c.Budget.Reserve = 55 })
	if limit, _ := g.g.pool.Limit(); limit != 1 {
		t.Fatalf("budget: want = 1, got = %d", limit)
	}
	holder := connectPgx(t, g.url("alice", userPass, "appdb"))
	tx, err := holder.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	describe := func(url string) []string {
		conn, err := pgconn.Connect(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		var out []string
		for _, q := range []string{"SELECT * FROM no_such_table", "SELECT $1::int + 1 AS x, 'a'::text AS y", "SELECT $1 = $2"} {
			// Well within timeouts.query_wait (10 s): the holder keeps its
			// connection throughout.
			pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			sd, err := conn.Prepare(pctx, "s", q, nil)
			cancel()
			if err != nil {
				out = append(out, "error "+err.Error())
				continue
			}
			var cols []string
			for _, f := range sd.Fields {
				cols = append(cols, fmt.Sprintf("%s:%d:%d", f.Name, f.DataTypeOID, f.TypeModifier))
			}
			out = append(out, fmt.Sprintf("params %v columns %v", sd.ParamOIDs, cols))
			if err := conn.Exec(ctx, "DEALLOCATE s").Close(); err != nil {
				t.Fatal(err)
			}
		}
		return out
	}
	want := describe(shared.URL("app", appPass, "appdb"))
	// DEALLOCATE through the governor is answered by the governor.
	got := describe(g.url("alice", userPass, "appdb"))
	if strings.Join(want, "\n") != strings.Join(got, "\n") {
		t.Fatalf("want (Postgres):\n%s\ngot (governor):\n%s", strings.Join(want, "\n"), strings.Join(got, "\n"))
	}
	// The statement runs once a connection is free, prepared there.
	conn, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Prepare(ctx, "later", "SELECT $1::int * 3", nil); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	res := conn.ExecPrepared(ctx, "later", [][]byte{[]byte("5")}, nil, nil).Read()
	if res.Err != nil || string(res.Rows[0][0]) != "15" {
		t.Fatalf("want = 15, got = %v (%v)", res.Rows, res.Err)
	}
}

// ddlNobodyPass is the password of the role that may not drop databases
// (in testSecrets).
const ddlNobodyPass = "ddl-nobody-pw-4e2"

// TestDatabaseDDLByUnprivilegedClient: a client whose role may not drop
// or rename a database that others use through the governor sends DROP
// DATABASE and ALTER DATABASE … RENAME 150 times: it gets the server's
// 42501 each time, and the governor's connections to that database are
// not closed — another user's running load keeps its server connection
// (its backends stay), and the governor opens none for each statement. The owner's DROP
// still succeeds while the governor holds an idle connection to the
// database.
func TestDatabaseDDLByUnprivilegedClient(t *testing.T) {
	ctx := context.Background()
	if err := shared.CreateRole(ctx, "ddl_nobody", ddlNobodyPass, false); err != nil {
		t.Fatal(err)
	}
	if _, err := shared.Exec(ctx, "ALTER ROLE app CREATEDB"); err != nil {
		t.Fatal(err)
	}
	if _, err := shared.Exec(ctx, "CREATE DATABASE ddl_shared OWNER app"); err != nil {
		t.Fatal(err)
	}
	// Multi-role: each client's own role goes upstream.
	g := startGov(t, nil, func(c *config.Config) {
		c.Upstream.URL = fmt.Sprintf("host=%s port=%d dbname=appdb sslmode=disable", shared.Host, shared.Port)
		c.Upstream.Password = ""
		c.Budget.Max = 4
		c.Clients.UsersFile = usersFile(t, fmt.Sprintf("%q %q", "app", appPass), fmt.Sprintf("%q %q", "ddl_nobody", ddlNobodyPass))
	})
	// Another user's load on the database, through the governor.
	user, err := pgx.Connect(ctx, g.url("app", appPass, "ddl_shared"))
	if err != nil {
		t.Fatal(err)
	}
	defer user.Close(ctx)
	backends := func() map[string]bool {
		t.Helper()
		rows, err := shared.Exec(ctx, "SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND datname = 'ddl_shared'")
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]bool{}
		for _, r := range rows {
			m[r[0]] = true
		}
		return m
	}
	mustExec(t, user, "SELECT 1")
	stop := make(chan struct{})
	loadDone := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				loadDone <- nil
				return
			default:
			}
			if _, err := user.Exec(ctx, "SELECT 1"); err != nil {
				loadDone <- err
				return
			}
		}
	}()
	connects := func() float64 { return mustValue(t, g.scrape(t), "pggovernor_server_connects_total", nil) }
	connectsBefore := connects()
	before := backends()

	nobody, err := pgx.Connect(ctx, g.url("ddl_nobody", ddlNobodyPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer nobody.Close(ctx)
	for i := 0; i < 150; i++ {
		stmt := "DROP DATABASE ddl_shared"
		want := "must be owner of database ddl_shared"
		if i%2 == 1 {
			stmt, want = "ALTER DATABASE ddl_shared RENAME TO ddl_stolen", "must be owner of database ddl_shared"
		}
		_, err := nobody.Exec(ctx, stmt)
		if e := assertCode(t, err, "42501"); e.Message != want {
			t.Fatalf("%s: want = the server's %q, got = %q", stmt, want, e.Message)
		}
	}
	after := backends()
	close(stop)
	if err := <-loadDone; err != nil {
		t.Fatalf("the other user's load: %v", err)
	}
	for pid := range before {
		if !after[pid] {
			t.Fatalf("the other user's server connections: want = all of %v still there, got = %v (closed by another client's refused DDL)", before, after)
		}
	}
	// The pool may open a connection or two as the clients' turns
	// overlap, never one per statement.
	if n := connects() - connectsBefore; n > 4 {
		t.Fatalf("server connections opened during the 150 refused statements: want <= the budget (4), got = %v", n)
	}

	// The owner may: its DROP succeeds though the governor holds an idle
	// connection to the database.
	owner, err := pgx.Connect(ctx, g.url("app", appPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer owner.Close(ctx)
	if _, err := owner.Exec(ctx, "DROP DATABASE ddl_shared"); err != nil {
		t.Fatalf("the owner's DROP DATABASE: want = done, got = %v", err)
	}

	// In session mode the owner holds its connection: the check runs on
	// another, and the governor's idle connection to the database (left by
	// a client that logged out) is closed for the DROP.
	if _, err := shared.Exec(ctx, "CREATE DATABASE ddl_shared OWNER app"); err != nil {
		t.Fatal(err)
	}
	sg := startGov(t, nil, func(c *config.Config) { c.PoolMode = config.PoolModeSession; c.Budget.Max = 4 })
	left, err := pgx.Connect(ctx, sg.url("alice", userPass, "ddl_shared"))
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, left, "SELECT 1")
	left.Close(ctx)
	sowner, err := pgx.Connect(ctx, sg.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer sowner.Close(ctx)
	if _, err := sowner.Exec(ctx, "DROP DATABASE ddl_shared"); err != nil {
		t.Fatalf("session mode, the owner's DROP DATABASE: want = done, got = %v", err)
	}
}
