package main

import (
	"context"
	"database/sql"
	"fmt"
	"net/url"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/config"
)

// Session state that one client leaves on a shared server connection must
// never reach the next client (issue 11, part 2). These tests run with a
// budget of 1 (2 for the mutual-exclusion test), so that the second client
// lands on the connection the first one used whenever the governor lets it
// go: the owner creates state, then (while it is still connected if the
// governor released its connection, or after it left if it was pinned)
// another client probes the server connection and must find it clean.

// stateFixturesOnce creates, once per test run, the functions, tables,
// roles and schemas the session-state cases use.
var stateFixturesOnce sync.Once

func stateFixtures(t testing.TB) {
	t.Helper()
	var err error
	stateFixturesOnce.Do(func() {
		ctx := context.Background()
		stmts := []string{
			`CREATE ROLE reader NOLOGIN`,
			`GRANT reader TO app`,
			`CREATE SCHEMA s1 AUTHORIZATION app`,
			`CREATE SCHEMA s2 AUTHORIZATION app`,
			`CREATE FUNCTION sv_set_timeout() RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM set_config('statement_timeout', '4343', false); END $$`,
			`CREATE FUNCTION sv_lock_sql(int) RETURNS void LANGUAGE sql AS $$ SELECT pg_advisory_lock($1) $$`,
			`CREATE FUNCTION sv_take_lock(int) RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_advisory_lock($1); END $$`,
			`CREATE FUNCTION sv_set_role() RETURNS void LANGUAGE plpgsql AS $$ BEGIN SET ROLE reader; END $$`,
			`CREATE FUNCTION sv_session_auth() RETURNS void LANGUAGE plpgsql AS $$ BEGIN SET SESSION AUTHORIZATION reader; END $$`,
			`CREATE FUNCTION sv_make_temp() RETURNS void LANGUAGE plpgsql AS $$ BEGIN CREATE TEMP TABLE sv_fn_temp(x int); END $$`,
			`CREATE FUNCTION sv_listen() RETURNS void LANGUAGE plpgsql AS $$ BEGIN LISTEN sv_channel; END $$`,
			`CREATE FUNCTION sv_hold() RETURNS void LANGUAGE sql AS $$ DECLARE sv_hc CURSOR WITH HOLD FOR SELECT 1 $$`,
			`CREATE FUNCTION sv_pure(int) RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT $1 + 1 $$`,
			`CREATE PROCEDURE sv_proc_path() LANGUAGE plpgsql AS $$ BEGIN PERFORM set_config('search_path', 's2', false); END $$`,
			`CREATE TABLE sv_audit(x int)`,
			`CREATE FUNCTION sv_audit_trg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM set_config('work_mem', '4321kB', false); RETURN NEW; END $$`,
			`CREATE TRIGGER sv_audit_t BEFORE INSERT ON sv_audit FOR EACH ROW EXECUTE FUNCTION sv_audit_trg()`,
			`CREATE VIEW sv_locking_view AS SELECT CASE WHEN pg_try_advisory_lock(88) THEN 1 END AS locked`,
			`GRANT ALL ON ALL TABLES IN SCHEMA public TO app`,
		}
		for _, s := range stmts {
			if _, err = shared.ExecIn(ctx, "appdb", s); err != nil {
				err = fmt.Errorf("%s: %w", s, err)
				return
			}
		}
		err = shared.CreateRole(ctx, "sessauth", "sessauth-pw", true)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// stateCase is one way a client can leave state on its server connection.
type stateCase struct {
	name string
	// ownerURL connects the owner (default: alice through the governor).
	ownerURL string
	// setup are the owner's simple queries, in order.
	setup []string
	// ownerCheck, when set, is a query whose answer the owner must still
	// get afterwards (ownerWant), as on a direct connection.
	ownerCheck, ownerWant string
	// pinned says whether the owner must be pinned after setup.
	pinned bool
	// probeURL connects the other client (default: app through the
	// governor: another users-file user of the same upstream role).
	probeURL string
	// probe is the other client's query; it must answer clean.
	probe, clean string
}

func runStateCases(t *testing.T, g *gov, cases []stateCase) {
	t.Helper()
	ctx := context.Background()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// The previous case's owner may still be leaving.
			waitFor(t, 10*time.Second, "no client pinned", func() bool { return g.g.proxy.Stats().Pinned == 0 })
			ownerURL, probeURL := c.ownerURL, c.probeURL
			if ownerURL == "" {
				ownerURL = g.url("alice", userPass, "appdb")
			}
			if probeURL == "" {
				probeURL = g.url("app", appPass, "appdb")
			}
			// pgconn, not pgx: pgx refuses simple queries while
			// standard_conforming_strings is off, which some cases need.
			owner, err := pgconn.Connect(ctx, ownerURL)
			if err != nil {
				t.Fatal(err)
			}
			defer owner.Close(ctx)
			for _, s := range c.setup {
				if _, err := owner.Exec(ctx, s).ReadAll(); err != nil {
					t.Fatalf("owner: %s: %v", s, err)
				}
			}
			ownerSees := func(when string) {
				t.Helper()
				if c.ownerCheck == "" {
					return
				}
				got, err := queryOne(ctx, owner, c.ownerCheck)
				if err != nil || got != c.ownerWant {
					t.Fatalf("the owner %s: want %s = %q, got = %q (%v)", when, c.ownerCheck, c.ownerWant, got, err)
				}
			}
			ownerSees("after its setup")
			// The owner's next message waits for a verification in flight.
			if _, err := owner.Exec(ctx, "SELECT 1").ReadAll(); err != nil {
				t.Fatal(err)
			}
			pinned := g.g.proxy.Stats().Pinned
			if c.pinned && pinned != 1 {
				t.Errorf("pinned clients after the owner's setup: want = 1, got = %d", pinned)
			}
			if !c.pinned && pinned != 0 {
				t.Errorf("pinned clients after the owner's setup: want = 0 (nothing to pin), got = %d", pinned)
			}
			if pinned != 0 {
				// The budget is 1: the other client can have the
				// connection only once the owner left.
				owner.Close(ctx)
			}
			probe, err := pgconn.Connect(ctx, probeURL)
			if err != nil {
				t.Fatal(err)
			}
			defer probe.Close(ctx)
			pctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			got, err := queryOne(pctx, probe, c.probe)
			if err != nil {
				t.Fatalf("the other client: %s: %v", c.probe, err)
			}
			if got != c.clean {
				t.Fatalf("the other client sees the owner's state: %s: want = %q, got = %q", c.probe, c.clean, got)
			}
			if pinned == 0 {
				ownerSees("after the other client's query")
			}
		})
	}
}

// queryOne runs a simple query and returns the first column of the first
// row of its last result.
func queryOne(ctx context.Context, c *pgconn.PgConn, query string) (string, error) {
	res, err := c.Exec(ctx, query).ReadAll()
	if err != nil {
		return "", err
	}
	if len(res) == 0 || len(res[len(res)-1].Rows) == 0 {
		return "", fmt.Errorf("%s: no row", query)
	}
	return string(res[len(res)-1].Rows[0][0]), nil
}

const (
	advisoryHeld = "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
	tempTables   = "SELECT count(*)::text FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
	timeoutIs    = "SELECT current_setting('statement_timeout')"
)

// TestSessionStateCannotLeak covers every case of the issue and more: each
// leaves state on the server connection in a way the governor must either
// detect (and pin) or find at release by verification.
func TestSessionStateCannotLeak(t *testing.T) {
	stateFixtures(t)
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1 })
	host, port := splitAddr(g.addr)
	startupURL := func(user, pass, options string) string {
		return fmt.Sprintf("postgres://%s:%s@%s:%s/appdb?sslmode=disable&options=%s", user, pass, host, port, strings.ReplaceAll(url.QueryEscape(options), "+", "%20"))
	}
	opts := "-c statement_timeout=1234 -c search_path=s1"
	runStateCases(t, g, []stateCase{
		// The cases.
		{name: "advisory lock, unlock of another key",
			setup:      []string{"SELECT pg_advisory_lock(42)", "SELECT pg_advisory_unlock(43)"},
			ownerCheck: advisoryHeld, ownerWant: "1", pinned: true,
			probe: advisoryHeld, clean: "0"},
		{name: "advisory lock, unlock of another key in one query",
			setup:      []string{"SELECT pg_advisory_lock(42); SELECT pg_advisory_unlock(43)"},
			ownerCheck: advisoryHeld, ownerWant: "1", pinned: true,
			probe: advisoryHeld, clean: "0"},
		{name: "CREATE TABLE pg_temp.t",
			setup:      []string{"CREATE TABLE pg_temp.t(x int)"},
			ownerCheck: "SELECT (to_regclass('pg_temp.t') IS NOT NULL)::text", ownerWant: "true", pinned: true,
			probe: tempTables, clean: "0"},
		{name: "EXPLAIN ANALYZE CREATE TEMP TABLE AS",
			setup:      []string{"EXPLAIN ANALYZE CREATE TEMP TABLE t2 AS SELECT 1"},
			ownerCheck: "SELECT (to_regclass('pg_temp.t2') IS NOT NULL)::text", ownerWant: "true", pinned: true,
			probe: tempTables, clean: "0"},
		{name: "set_config in a DO block",
			setup:      []string{"DO $$ BEGIN PERFORM set_config('statement_timeout', '4242', false); END $$"},
			ownerCheck: timeoutIs, ownerWant: "4242ms", pinned: true,
			probe: timeoutIs, clean: "0"},
		{name: "set_config in a function",
			setup:      []string{"SELECT sv_set_timeout()"},
			ownerCheck: timeoutIs, ownerWant: "4343ms", pinned: true,
			probe: timeoutIs, clean: "0"},
		{name: "search_path in a DO block",
			setup:      []string{"DO $$ BEGIN PERFORM set_config('search_path', 's2', false); END $$"},
			ownerCheck: "SELECT current_setting('search_path')", ownerWant: "s2", pinned: true,
			probe: "SELECT current_setting('search_path')", clean: `"$user", public`},
		{name: "startup options, RESET ALL",
			ownerURL: startupURL("alice", userPass, opts), probeURL: startupURL("app", appPass, opts),
			setup:      []string{"RESET ALL"},
			ownerCheck: "SELECT current_setting('statement_timeout') || ' ' || current_setting('search_path')", ownerWant: "1234ms s1",
			probe: "SELECT current_setting('statement_timeout') || ' ' || current_setting('search_path')", clean: "1234ms s1"},
		{name: "startup options, DISCARD ALL",
			ownerURL: startupURL("alice", userPass, opts), probeURL: startupURL("app", appPass, opts),
			setup:      []string{"DISCARD ALL"},
			ownerCheck: "SELECT current_setting('statement_timeout') || ' ' || current_setting('search_path')", ownerWant: "1234ms s1",
			probe: "SELECT current_setting('statement_timeout') || ' ' || current_setting('search_path')", clean: "1234ms s1"},
		{name: "startup options, RESET statement_timeout",
			ownerURL: startupURL("alice", userPass, opts), probeURL: startupURL("app", appPass, opts),
			setup:      []string{"RESET statement_timeout"},
			ownerCheck: "SELECT current_setting('statement_timeout') || ' ' || current_setting('search_path')", ownerWant: "1234ms s1",
			probe: "SELECT current_setting('statement_timeout') || ' ' || current_setting('search_path')", clean: "1234ms s1"},
		{name: "SET ROLE in a function",
			setup:      []string{"SELECT sv_set_role()"},
			ownerCheck: "SELECT current_user::text", ownerWant: "reader", pinned: true,
			probe: "SELECT current_user::text", clean: "app"},
		{name: "SET ROLE in a DO block",
			setup:      []string{"DO $$ BEGIN SET ROLE reader; END $$"},
			ownerCheck: "SELECT current_user::text", ownerWant: "reader", pinned: true,
			probe: "SELECT current_user::text", clean: "app"},
		{name: "temp table in a function",
			setup:      []string{"SELECT sv_make_temp()"},
			ownerCheck: "SELECT (to_regclass('pg_temp.sv_fn_temp') IS NOT NULL)::text", ownerWant: "true", pinned: true,
			probe: tempTables, clean: "0"},
		{name: "temp table in a DO block",
			setup:      []string{"DO $$ BEGIN CREATE TEMP TABLE sv_do_temp(x int); END $$"},
			ownerCheck: "SELECT (to_regclass('pg_temp.sv_do_temp') IS NOT NULL)::text", ownerWant: "true", pinned: true,
			probe: tempTables, clean: "0"},
		{name: "advisory lock in a DO block",
			setup:      []string{"DO $$ BEGIN PERFORM pg_advisory_lock(44); END $$"},
			ownerCheck: advisoryHeld, ownerWant: "1", pinned: true,
			probe: advisoryHeld, clean: "0"},
		{name: "LISTEN in a function",
			setup:      []string{"SELECT sv_listen()"},
			ownerCheck: "SELECT count(*)::text FROM pg_listening_channels()", ownerWant: "1", pinned: true,
			probe: "SELECT count(*)::text FROM pg_listening_channels()", clean: "0"},
		{name: "standard_conforming_strings off hides a SET",
			setup:      []string{"SET standard_conforming_strings = off", `SELECT '\''; SET statement_timeout = 1111; SELECT ''''`},
			ownerCheck: timeoutIs, ownerWant: "1111ms", pinned: true,
			probe: timeoutIs, clean: "0"},

		// More of our own.
		{name: "set_config with is_local an expression",
			setup:      []string{"SELECT set_config('work_mem', '2345kB', NOT true)"},
			ownerCheck: "SHOW work_mem", ownerWant: "2345kB", pinned: true,
			probe: "SHOW work_mem", clean: "4MB"},
		{name: "set_config inside a CTE",
			setup:      []string{"WITH x AS (SELECT set_config('work_mem', '3456kB', false) AS v) SELECT v FROM x"},
			ownerCheck: "SHOW work_mem", ownerWant: "3456kB", pinned: true,
			probe: "SHOW work_mem", clean: "4MB"},
		{name: "advisory lock in an SQL function",
			setup:      []string{"SELECT sv_lock_sql(77)"},
			ownerCheck: advisoryHeld, ownerWant: "1", pinned: true,
			probe: advisoryHeld, clean: "0"},
		{name: "unlock_all that does not run",
			setup:      []string{"SELECT pg_advisory_lock(45)", "SELECT pg_advisory_unlock_all() WHERE false"},
			ownerCheck: advisoryHeld, ownerWant: "1", pinned: true,
			probe: advisoryHeld, clean: "0"},
		{name: "EXPLAIN with options",
			setup:      []string{"EXPLAIN (ANALYZE, COSTS OFF) CREATE TEMP TABLE t3 AS SELECT 1"},
			ownerCheck: "SELECT (to_regclass('pg_temp.t3') IS NOT NULL)::text", ownerWant: "true", pinned: true,
			probe: tempTables, clean: "0"},
		{name: "CREATE VIEW pg_temp.v",
			setup:      []string{"CREATE VIEW pg_temp.v2 AS SELECT 1 AS one"},
			ownerCheck: "SELECT one::text FROM pg_temp.v2", ownerWant: "1", pinned: true,
			probe: tempTables, clean: "0"},
		{name: "CREATE SEQUENCE pg_temp.s",
			setup:      []string{"CREATE SEQUENCE pg_temp.s"},
			ownerCheck: "SELECT nextval('pg_temp.s')::text", ownerWant: "1", pinned: true,
			probe: tempTables, clean: "0"},
		{name: `CREATE TABLE "pg_temp".t`,
			setup:      []string{`CREATE TABLE "pg_temp".qt (x int)`},
			ownerCheck: "SELECT (to_regclass('pg_temp.qt') IS NOT NULL)::text", ownerWant: "true", pinned: true,
			probe: tempTables, clean: "0"},
		{name: "SELECT INTO pg_temp",
			setup:      []string{"SELECT 1 AS x INTO pg_temp.sel"},
			ownerCheck: "SELECT count(*)::text FROM pg_temp.sel", ownerWant: "1", pinned: true,
			probe: tempTables, clean: "0"},
		{name: "cursor WITH HOLD declared in a function",
			setup:      []string{"SELECT sv_hold()"},
			ownerCheck: "SELECT count(*)::text FROM pg_cursors", ownerWant: "1", pinned: true,
			probe: "SELECT count(*)::text FROM pg_cursors", clean: "0"},
		{name: "PREPARE inside DO via EXECUTE",
			setup:      []string{"DO $$ BEGIN EXECUTE 'PREPARE sv_pp AS SELECT 1'; END $$"},
			ownerCheck: "SELECT count(*)::text FROM pg_prepared_statements WHERE name = 'sv_pp'", ownerWant: "1", pinned: true,
			probe: "SELECT count(*)::text FROM pg_prepared_statements WHERE from_sql", clean: "0"},
		{name: "CALL of a procedure that sets search_path",
			setup:      []string{"CALL sv_proc_path()"},
			ownerCheck: "SELECT current_setting('search_path')", ownerWant: "s2", pinned: true,
			probe: "SELECT current_setting('search_path')", clean: `"$user", public`},
		{name: "custom parameter in a DO block",
			setup: []string{"DO $$ BEGIN PERFORM set_config('app.tenant', '42', false); END $$"},
			probe: "SELECT coalesce(current_setting('app.tenant', true), '')", clean: ""},
		{name: "RESET ALL in a DO block with startup options",
			ownerURL: startupURL("alice", userPass, opts), probeURL: startupURL("app", appPass, opts),
			setup:      []string{"DO $$ BEGIN RESET ALL; END $$"},
			ownerCheck: "SELECT current_setting('statement_timeout') || ' ' || current_setting('search_path')", ownerWant: "1234ms s1",
			probe: "SELECT current_setting('statement_timeout') || ' ' || current_setting('search_path')", clean: "1234ms s1"},
		{name: "standard_conforming_strings off at startup",
			ownerURL: startupURL("alice", userPass, "-c standard_conforming_strings=off"),
			// With the setting off, '\'' is one string: the SET is real,
			// though a scanner that assumes it on sees it inside a string.
			setup:      []string{`SELECT '\''; SET work_mem = 5678; SELECT `},
			ownerCheck: "SHOW work_mem", ownerWant: "5678kB", pinned: true,
			probe: "SHOW work_mem", clean: "4MB"},
		{name: "standard_conforming_strings toggled inside one query",
			setup:      []string{`SET standard_conforming_strings = off; SELECT 'x\'; SET work_mem = '6MB'; SELECT 'y'`, "SET standard_conforming_strings = on"},
			ownerCheck: "SHOW work_mem", ownerWant: "6MB", pinned: true,
			probe: "SHOW work_mem", clean: "4MB"},
		{name: "E-string and Unicode escapes",
			setup:      []string{`SELECT E'\'', U&'\0027'; SET work_mem = '7MB'`},
			ownerCheck: "SHOW work_mem", ownerWant: "7MB", pinned: true,
			probe: "SHOW work_mem", clean: "4MB"},
		{name: "dollar quotes with a tag inside",
			setup:      []string{"SELECT $a$ $b$ $a$; SET work_mem = '3MB'; SELECT $b$x$b$"},
			ownerCheck: "SHOW work_mem", ownerWant: "3MB", pinned: true,
			probe: "SHOW work_mem", clean: "4MB"},
		{name: "a SET inside a nested comment does not run",
			setup:      []string{"/* /* */ SET work_mem = '3MB'; */ SELECT 1"},
			ownerCheck: "SHOW work_mem", ownerWant: "4MB",
			probe: "SHOW work_mem", clean: "4MB"},
		{name: "ALTER ROLE SET is not session state",
			setup: []string{"ALTER ROLE app IN DATABASE appdb SET work_mem = '8MB'", "ALTER ROLE app IN DATABASE appdb RESET work_mem"},
			probe: "SHOW work_mem", clean: "4MB"},
		{name: "a function without side effects does not pin",
			setup:      []string{"SELECT sv_pure(1)"},
			ownerCheck: "SELECT sv_pure(2)::text", ownerWant: "3",
			probe: "SELECT sv_pure(3)::text", clean: "4"},
	})
}

// TestSessionStateExtendedProtocol: state created through the extended
// protocol (pgx with arguments, lib/pq, psql) is found the same way.
func TestSessionStateExtendedProtocol(t *testing.T) {
	stateFixtures(t)
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1 })
	ctx := context.Background()
	probe := func(t *testing.T, query, clean string) {
		t.Helper()
		c, err := pgx.Connect(ctx, g.url("app", appPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		var got string
		if err := c.QueryRow(ctx, query).Scan(&got); err != nil || got != clean {
			t.Fatalf("the other client: %s: want = %q, got = %q (%v)", query, clean, got, err)
		}
	}
	t.Run("pgx prepared", func(t *testing.T) {
		owner, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		defer owner.Close(ctx)
		if _, err := owner.Exec(ctx, "SELECT sv_lock_sql($1)", 79); err != nil {
			t.Fatal(err)
		}
		var held int
		if err := owner.QueryRow(ctx, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()").Scan(&held); err != nil || held != 1 {
			t.Fatalf("the owner: want its lock, got %d locks (%v)", held, err)
		}
		if got := g.g.proxy.Stats().Pinned; got != 1 {
			t.Fatalf("pinned after a function took a lock: want = 1, got = %d", got)
		}
		owner.Close(ctx)
		probe(t, advisoryHeld, "0")
	})
	t.Run("lib/pq", func(t *testing.T) {
		db, err := sql.Open("postgres", g.dsn("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		db.SetMaxOpenConns(1)
		var got string
		if err := db.QueryRow("SELECT set_config('search_path', $1, $2)", "s2", false).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if err := db.QueryRow("SELECT current_setting('search_path')").Scan(&got); err != nil || got != "s2" {
			t.Fatalf("the owner: want search_path = s2, got = %q (%v)", got, err)
		}
		if got := g.g.proxy.Stats().Pinned; got != 1 {
			t.Fatalf("pinned after set_config with a parameter for is_local: want = 1, got = %d", got)
		}
		db.Close()
		probe(t, "SELECT current_setting('search_path')", `"$user", public`)
	})
	t.Run("psql", func(t *testing.T) {
		psql, err := exec.LookPath("psql")
		if err != nil {
			t.Fatalf("psql is required: %v", err)
		}
		out, err := exec.Command(psql, "-X", "-v", "ON_ERROR_STOP=1", "-At", g.url("alice", userPass, "appdb"),
			"-c", "DO $$ BEGIN PERFORM set_config('statement_timeout', '4545', false); END $$",
			"-c", "SHOW statement_timeout").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "4545ms") {
			t.Fatalf("psql: %s (%v)", out, err)
		}
		probe(t, timeoutIs, "0")
	})
}

// TestAdvisoryMutualExclusion: a lock taken inside a function stays with
// its client, so two clients never both hold it: the other client's
// pg_try_advisory_xact_lock fails while the owner's succeeds.
func TestAdvisoryMutualExclusion(t *testing.T) {
	stateFixtures(t)
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 2 })
	ctx := context.Background()
	owner, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer owner.Close(ctx)
	other, err := pgx.Connect(ctx, g.url("app", appPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(ctx)
	mustExec(t, owner, "SELECT sv_take_lock(7)")
	// Both in a transaction at the same moment.
	xtx, err := other.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer xtx.Rollback(ctx)
	otx, err := owner.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer otx.Rollback(ctx)
	// The other client asks first: it gets the most recently used idle
	// connection, the owner's if the governor let it go.
	var mine, theirs bool
	if err := xtx.QueryRow(ctx, "SELECT pg_try_advisory_xact_lock(7)").Scan(&theirs); err != nil {
		t.Fatal(err)
	}
	if err := otx.QueryRow(ctx, "SELECT pg_try_advisory_xact_lock(7)").Scan(&mine); err != nil {
		t.Fatal(err)
	}
	if !mine || theirs {
		t.Fatalf("pg_try_advisory_xact_lock(7) while the owner holds lock 7: want owner = true, other = false, got owner = %v, other = %v", mine, theirs)
	}
}

// TestSessionAuthorizationInFunction: SET SESSION AUTHORIZATION (a
// superuser upstream) inside a function stays with its client.
func TestSessionAuthorizationInFunction(t *testing.T) {
	stateFixtures(t)
	g := txGov(t, func(c *config.Config) {
		c.Budget.Max = 1
		c.Upstream.URL = shared.URL("sessauth", "", "appdb")
		c.Upstream.Password = "sessauth-pw"
	})
	runStateCases(t, g, []stateCase{
		{name: "SET SESSION AUTHORIZATION in a function",
			setup:      []string{"SELECT sv_session_auth()"},
			ownerCheck: "SELECT session_user::text", ownerWant: "reader", pinned: true,
			probe: "SELECT session_user::text || ' ' || current_user::text", clean: "sessauth sessauth"},
		{name: "SET ROLE in a DO block",
			setup:      []string{"DO $$ BEGIN SET ROLE reader; END $$"},
			ownerCheck: "SELECT current_user::text", ownerWant: "reader", pinned: true,
			probe: "SELECT current_user::text", clean: "sessauth"},
	})
}

func splitAddr(addr string) (string, string) {
	i := strings.LastIndexByte(addr, ':')
	return addr[:i], addr[i+1:]
}

// TestVerificationUnpins: a client pinned by state a verification found is
// verified again after a transaction that may have dropped it, and
// released once the state is gone.
func TestVerificationUnpins(t *testing.T) {
	stateFixtures(t)
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1 })
	ctx := context.Background()
	for _, c := range []struct{ name, create, drop string }{
		{"advisory lock", "DO $$ BEGIN PERFORM pg_advisory_lock(61); END $$", "SELECT pg_advisory_unlock(61)"},
		{"temp table", "SELECT sv_make_temp()", "DROP TABLE sv_fn_temp"},
		{"SET ROLE", "SELECT sv_set_role()", "RESET ROLE"},
		{"parameter", "DO $$ BEGIN PERFORM set_config('work_mem', '9MB', false); END $$", "RESET work_mem"},
		{"cursor", "SELECT sv_hold()", "CLOSE sv_hc"},
	} {
		t.Run(c.name, func(t *testing.T) {
			waitFor(t, 10*time.Second, "no client pinned", func() bool { return g.g.proxy.Stats().Pinned == 0 })
			owner, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
			if err != nil {
				t.Fatal(err)
			}
			defer owner.Close(ctx)
			for _, q := range []string{c.create, "SELECT 1"} {
				if _, err := owner.Exec(ctx, q).ReadAll(); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
			}
			if got := g.g.proxy.Stats().Pinned; got != 1 {
				t.Fatalf("pinned after %q: want = 1, got = %d", c.create, got)
			}
			for _, q := range []string{c.drop, "SELECT 1"} {
				if _, err := owner.Exec(ctx, q).ReadAll(); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
			}
			if got := g.g.proxy.Stats().Pinned; got != 0 {
				t.Fatalf("pinned after %q: want = 0, got = %d", c.drop, got)
			}
			// The connection serves another client while the owner stays.
			other, err := pgconn.Connect(ctx, g.url("app", appPass, "appdb"))
			if err != nil {
				t.Fatal(err)
			}
			defer other.Close(ctx)
			if _, err := queryOne(ctx, other, "SELECT 1"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestSessionStateCheckAlways: with pool.session_state_check = always,
// state created by code no query text shows (a trigger, a view) is found
// too; a transaction without state is released as before.
func TestSessionStateCheckAlways(t *testing.T) {
	stateFixtures(t)
	g := txGov(t, func(c *config.Config) {
		c.Budget.Max = 1
		c.Pool.SessionStateCheck = config.SessionStateCheckAlways
	})
	runStateCases(t, g, []stateCase{
		{name: "plain transaction",
			setup: []string{"SELECT 1"},
			probe: "SELECT 1::text", clean: "1"},
		{name: "trigger that calls set_config",
			setup:      []string{"INSERT INTO sv_audit VALUES (1)"},
			ownerCheck: "SHOW work_mem", ownerWant: "4321kB", pinned: true,
			probe: "SHOW work_mem", clean: "4MB"},
		{name: "view that takes an advisory lock",
			setup:      []string{"SELECT * FROM sv_locking_view"},
			ownerCheck: advisoryHeld, ownerWant: "1", pinned: true,
			probe: advisoryHeld, clean: "0"},
	})
}

// TestPipelinedStandardConformingStrings: a text pipelined behind a change
// of standard_conforming_strings is lexed both ways: the server parses it
// under the new setting before the governor hears of the change.
func TestPipelinedStandardConformingStrings(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1 })
	ctx := context.Background()
	owner, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer owner.Close(ctx)
	// Under standard_conforming_strings off, '\'' is one string and the
	// call is real; under on, the call is inside a string.
	p := owner.StartPipeline(ctx)
	p.SendQueryParams("SET standard_conforming_strings = off", nil, nil, nil, nil)
	p.SendQueryParams(`SELECT '\'', set_config('work_mem', '5432kB', false), ''''`, nil, nil, nil, nil)
	if err := p.Sync(); err != nil {
		t.Fatal(err)
	}
	for {
		r, err := p.GetResults()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := r.(*pgconn.PipelineSync); ok {
			break
		}
		if rr, ok := r.(*pgconn.ResultReader); ok {
			if _, err := rr.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if got, err := queryOne(ctx, owner, "SHOW work_mem"); err != nil || got != "5432kB" {
		t.Fatalf("the owner: want work_mem = 5432kB, got = %q (%v)", got, err)
	}
	if got := g.g.proxy.Stats().Pinned; got != 1 {
		t.Fatalf("pinned: want = 1, got = %d", got)
	}
	owner.Close(ctx)
	probe, err := pgconn.Connect(ctx, g.url("app", appPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close(ctx)
	if got, err := queryOne(ctx, probe, "SHOW work_mem"); err != nil || got != "4MB" {
		t.Fatalf("the other client: want work_mem = 4MB, got = %q (%v)", got, err)
	}
}

// TestStartupSettingsSurviveReset: after RESET ALL, reported startup
// parameters (application_name) come back too, on the server and in what
// the client was told, whether the connection was released in between or
// the client stayed in its transaction.
func TestStartupSettingsSurviveReset(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1 })
	ctx := context.Background()
	host, port := splitAddr(g.addr)
	c, err := pgconn.Connect(ctx, fmt.Sprintf("postgres://alice:%s@%s:%s/appdb?sslmode=disable&application_name=startup-app&options=%s",
		userPass, host, port, "-c%20statement_timeout%3D2345"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	want := func(when string) {
		t.Helper()
		got, err := queryOne(ctx, c, "SELECT current_setting('application_name') || ' ' || current_setting('statement_timeout')")
		if err != nil || got != "startup-app 2345ms" {
			t.Fatalf("%s: want = %q, got = %q (%v)", when, "startup-app 2345ms", got, err)
		}
		if ps := c.ParameterStatus("application_name"); ps != "startup-app" {
			t.Fatalf("%s: the client was told application_name = %q, want startup-app", when, ps)
		}
	}
	want("at login")
	for _, q := range []string{"RESET ALL", "DISCARD ALL", "SET application_name = 'x'; RESET application_name"} {
		if _, err := c.Exec(ctx, q).ReadAll(); err != nil {
			t.Fatal(err)
		}
		want("after " + q)
	}
	// Inside a transaction block: restored before the next statement.
	if _, err := c.Exec(ctx, "BEGIN").ReadAll(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "RESET ALL").ReadAll(); err != nil {
		t.Fatal(err)
	}
	want("after RESET ALL in a transaction block")
	if _, err := c.Exec(ctx, "COMMIT").ReadAll(); err != nil {
		t.Fatal(err)
	}
	want("after COMMIT")
	if p := g.g.proxy.Stats().Pinned; p != 0 {
		t.Fatalf("pinned: want = 0, got = %d", p)
	}
}
