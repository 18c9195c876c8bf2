package proxy

import (
	"strings"
	"testing"
)

type scanCase struct {
	sql  string
	want sqlEffects
}

func pinned(k pinKind) sqlEffects   { return sqlEffects{pin: k} }
func unpinned(k pinKind) sqlEffects { return sqlEffects{unpin: k} }

// opaqueEff is the effect of code the scanner cannot see into.
func opaqueEff() sqlEffects { return sqlEffects{verify: true, opaque: true, scs: true} }

// created marks a CREATE or SELECT INTO.
func created(e sqlEffects) sqlEffects { e.creates = true; return e }

const allButLoad = pinListen | pinGUC | pinAdvisory | pinTemp | pinPrepare | pinCursor | pinRole | pinCustom

var (
	resetAll      = sqlEffects{unpin: pinGUC | pinCustom, resetAll: true, scs: true}
	discardAllEff = sqlEffects{unpin: allButLoad, discardAll: true, resetAll: true, scs: true}
)

func runScanCases(t *testing.T, cases []scanCase) {
	t.Helper()
	for _, tc := range cases {
		got := scanSQL([]byte(tc.sql), 0)
		if got != tc.want {
			t.Errorf("scanSQL(%q) =\n\t%s\nwant\n\t%s", tc.sql, fmtEffects(got), fmtEffects(tc.want))
		}
	}
}

func fmtEffects(e sqlEffects) string {
	var b strings.Builder
	b.WriteString("pin=[" + e.pin.String() + "] unpin=[" + e.unpin.String() + "]")
	if e.resetReported != 0 {
		b.WriteString(" resetReported=" + itoa(int(e.resetReported)))
	}
	if e.recheck != 0 {
		b.WriteString(" recheck=[" + e.recheck.String() + "]")
	}
	for _, f := range []struct {
		on   bool
		name string
	}{{e.verify, "verify"}, {e.opaque, "opaque"}, {e.resetAll, "resetAll"}, {e.scs, "scs"}, {e.creates, "creates"}} {
		if f.on {
			b.WriteString(" " + f.name)
		}
	}
	if e.discardAll {
		b.WriteString(" discardAll")
	}
	if e.deallocAll {
		b.WriteString(" deallocAll")
	}
	if e.dealloc {
		b.WriteString(" dealloc")
	}
	if e.listen {
		b.WriteString(" listen")
	}
	if e.databaseDDL {
		b.WriteString(" databaseDDL")
	}
	if e.transaction {
		b.WriteString(" transaction")
	}
	return b.String()
}

func itoa(n int) string {
	if n < 0 {
		return "-" + itoa(-n)
	}
	if n < 10 {
		return string(rune('0' + n))
	}
	return itoa(n/10) + string(rune('0'+n%10))
}

func TestScanSQLSet(t *testing.T) {
	runScanCases(t, []scanCase{
		{"SET search_path = x", pinned(pinGUC)},
		{"SET search_path TO x, public", pinned(pinGUC)},
		{"SET SESSION search_path = x", pinned(pinGUC)},
		{"SET work_mem = '64MB'", pinned(pinGUC)},
		{"SET myapp.tenant = 42", pinned(pinCustom)},
		{`SET "search_path" = x`, pinned(pinGUC)},
		{"SET SCHEMA 'x'", pinned(pinGUC)},
		{"SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", pinned(pinGUC)},
		// Transaction-scoped: nothing outlives the transaction.
		{"SET LOCAL search_path = x", sqlEffects{}},
		{"set local work_mem = '1GB'", sqlEffects{}},
		{"set transaction isolation level serializable", sqlEffects{}},
		{"SET TRANSACTION READ ONLY", sqlEffects{}},
		{"SET LOCAL ROLE bob", sqlEffects{}},
		// Parameters Postgres reports with ParameterStatus.
		{"SET application_name = 'x'", sqlEffects{}},
		{"SET SESSION application_name = 'x'", sqlEffects{}},
		{"SET TIME ZONE 'UTC'", sqlEffects{}},
		{"SET NAMES 'UTF8'", sqlEffects{}},
		{"SET timezone TO 'UTC'", sqlEffects{}},
		{"SET TimeZone = 'Europe/Paris'", sqlEffects{}},
		{"SET client_encoding = 'UTF8'", sqlEffects{}},
		{"SET DateStyle = ISO, MDY", sqlEffects{}},
		{"SET IntervalStyle = postgres", sqlEffects{}},
		{"SET standard_conforming_strings = on", sqlEffects{scs: true}},
		{"SET default_transaction_read_only = on", sqlEffects{}},
		{`SET "application_name" = 'x'`, sqlEffects{}},
		// Role changes.
		{"SET SESSION AUTHORIZATION bob", pinned(pinRole)},
		{"SET SESSION AUTHORIZATION DEFAULT", sqlEffects{recheck: pinRole}},
		{"SET ROLE bob", pinned(pinRole)},
		{"set role none", sqlEffects{recheck: pinRole}},
		{"SET ROLE TO DEFAULT", sqlEffects{recheck: pinRole}},
		{"SET role = 'bob'", pinned(pinRole)},
		// RESET.
		{"RESET ALL", resetAll},
		{"reset all", resetAll},
		// RESET of one parameter: verified (it may be a startup setting to
		// restore, or the last state pinning the client).
		{"RESET search_path", sqlEffects{recheck: pinGUC, verify: true}},
		{"SET search_path TO DEFAULT", sqlEffects{recheck: pinGUC | pinCustom, verify: true}},
		{"SET work_mem = DEFAULT", sqlEffects{recheck: pinGUC | pinCustom, verify: true}},
		{"RESET standard_conforming_strings", sqlEffects{resetReported: 1 << 5, scs: true}},
		// RESET of a reported parameter: a startup value is restored.
		{"RESET application_name", sqlEffects{resetReported: 1 << 0}},
		{"RESET TIME ZONE", sqlEffects{resetReported: 1 << 4}},
		{"SET TimeZone TO DEFAULT", sqlEffects{resetReported: 1 << 4}},
		{"RESET ROLE", sqlEffects{recheck: pinRole}},
		{"RESET SESSION AUTHORIZATION", sqlEffects{recheck: pinRole}},
		{"SET CONSTRAINTS ALL DEFERRED", sqlEffects{}},
	})
}

func TestScanSQLListen(t *testing.T) {
	runScanCases(t, []scanCase{
		{"LISTEN foo", listenCmd(pinned(pinListen))},
		{`listen "Foo Bar"`, listenCmd(pinned(pinListen))},
		{"UNLISTEN *", listenCmd(unpinned(pinListen))},
		{"unlisten *;", listenCmd(unpinned(pinListen))},
		{"UNLISTEN foo", listenCmd(sqlEffects{recheck: pinListen})},
		{"NOTIFY foo, 'LISTEN bar'", sqlEffects{}},
		{"SELECT pg_notify('foo', 'x')", sqlEffects{}},
	})
}

func TestScanSQLPrepareAndDeallocate(t *testing.T) {
	runScanCases(t, []scanCase{
		{"PREPARE s AS SELECT 1", pinned(pinPrepare)},
		{"prepare s(int) as select $1", pinned(pinPrepare)},
		{"PREPARE TRANSACTION 'x'", sqlEffects{}},
		{"COMMIT PREPARED 'x'", sqlEffects{transaction: true}},
		{"EXECUTE s", opaqueEff()},
		{"EXECUTE s(1, 2)", opaqueEff()},
		{"DEALLOCATE s", sqlEffects{dealloc: true, recheck: pinPrepare}},
		{"DEALLOCATE PREPARE s", sqlEffects{dealloc: true, recheck: pinPrepare}},
		{"DEALLOCATE ALL", sqlEffects{unpin: pinPrepare, deallocAll: true}},
		{"DEALLOCATE PREPARE ALL", sqlEffects{unpin: pinPrepare, deallocAll: true}},
		{"deallocate all", sqlEffects{unpin: pinPrepare, deallocAll: true}},
	})
}

func TestScanSQLCursors(t *testing.T) {
	runScanCases(t, []scanCase{
		{"DECLARE c CURSOR WITH HOLD FOR SELECT 1", pinned(pinCursor)},
		{"declare c binary no scroll cursor with hold for select 1", pinned(pinCursor)},
		{"DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", sqlEffects{}},
		{"DECLARE c CURSOR FOR SELECT 1", sqlEffects{}},
		{"DECLARE c SCROLL CURSOR FOR SELECT 'WITH HOLD'", sqlEffects{}},
		{"CLOSE ALL", unpinned(pinCursor)},
		{"CLOSE c", sqlEffects{recheck: pinCursor}},
		{"FETCH 10 FROM c", sqlEffects{}},
	})
}

func TestScanSQLTemporaryObjects(t *testing.T) {
	runScanCases(t, []scanCase{
		{"CREATE TEMP TABLE t(a int)", created(pinned(pinTemp))},
		{"create temporary table t (a int)", created(pinned(pinTemp))},
		{"CREATE GLOBAL TEMPORARY TABLE t(a int)", created(pinned(pinTemp))},
		{"CREATE LOCAL TEMP TABLE t(a int)", created(pinned(pinTemp))},
		{"CREATE TEMP SEQUENCE s", created(pinned(pinTemp))},
		{"CREATE TEMPORARY VIEW v AS SELECT 1", created(pinned(pinTemp))},
		{"CREATE TEMP TABLE t AS SELECT 1", created(pinned(pinTemp))},
		{"CREATE TEMP TABLE t(a int) ON COMMIT DELETE ROWS", created(pinned(pinTemp))},
		{"CREATE TEMP TABLE t(a int) ON COMMIT PRESERVE ROWS", created(pinned(pinTemp))},
		{"CREATE TEMP TABLE t(a int) ON COMMIT DROP", created(sqlEffects{})},
		{"create temp table t(a int) on commit drop", created(sqlEffects{})},
		{"CREATE TABLE t(a int)", created(sqlEffects{})},
		{"CREATE TABLE temp(a int)", created(sqlEffects{})},
		{"CREATE UNLOGGED TABLE t(a int)", created(sqlEffects{})},
		{"SELECT 1 INTO TEMP t", created(pinned(pinTemp))},
		{"SELECT * INTO TEMPORARY TABLE t FROM u", created(pinned(pinTemp))},
		{"select a into temp t from u where b", created(pinned(pinTemp))},
		{"SELECT 1 INTO t", created(sqlEffects{})},
		{"SELECT temp FROM t", sqlEffects{}},
		{"DISCARD TEMP", unpinned(pinTemp)},
		{"DISCARD TEMPORARY", unpinned(pinTemp)},
		{"DROP TABLE t", sqlEffects{recheck: pinTemp}},
	})
}

func TestScanSQLDiscardAndLoad(t *testing.T) {
	runScanCases(t, []scanCase{
		{"DISCARD ALL", discardAllEff},
		{"discard all;", discardAllEff},
		{"DISCARD PLANS", sqlEffects{}},
		{"DISCARD SEQUENCES", sqlEffects{}},
		{"LOAD 'auto_explain'", pinned(pinLoad)},
		{"load '$libdir/plugins/auto_explain'", pinned(pinLoad)},
	})
	if e := scanSQL([]byte("DISCARD ALL"), 0); e.unpin&pinLoad != 0 || e.unpin&pinProtocol != 0 {
		t.Errorf("DISCARD ALL unpins %s, but LOAD cannot be undone and protocol statements are tracked apart", e.unpin)
	}
}

func TestScanSQLAdvisoryLocks(t *testing.T) {
	lock := pinned(pinAdvisory)
	try := sqlEffects{pin: pinAdvisory, recheck: pinAdvisory}
	unlock := sqlEffects{recheck: pinAdvisory}
	runScanCases(t, []scanCase{
		{"SELECT pg_advisory_lock(1)", lock},
		{"select pg_catalog.pg_try_advisory_lock_shared(1,2)", try},
		{"SELECT pg_try_advisory_lock(1)", try},
		{"SELECT PG_ADVISORY_LOCK_SHARED(1)", lock},
		{"SELECT pg_advisory_lock (hashtext('job'))", lock},
		{"SELECT x FROM t WHERE pg_try_advisory_lock(t.id)", try},
		{"SELECT pg_advisory_lock(1), pg_advisory_lock(2)", lock},
		{"SELECT pg_advisory_xact_lock(1)", sqlEffects{}},
		{"SELECT pg_try_advisory_xact_lock_shared(1)", sqlEffects{}},
		// An unlock never unpins by itself: the server tells what is held.
		{"SELECT pg_advisory_unlock(1)", unlock},
		{"SELECT pg_advisory_unlock_shared(1)", unlock},
		{"SELECT pg_advisory_unlock_all()", unlock},
		{"SELECT pg_advisory_unlock_all() WHERE false", unlock},
		{"SELECT pg_advisory_lock(1); SELECT pg_advisory_unlock(1)", sqlEffects{pin: pinAdvisory, recheck: pinAdvisory}},
		{"SELECT pg_advisory_lock(42); SELECT pg_advisory_unlock(43)", sqlEffects{pin: pinAdvisory, recheck: pinAdvisory}},
		{"SELECT pg_advisory_lock", sqlEffects{}}, // a column, not a call
		// Not the built-in: opaque.
		{"SELECT my_pg_advisory_lock(1)", opaqueEff()},
		{"SELECT myschema.pg_advisory_lock(1)", opaqueEff()},
	})
}

func TestScanSQLSetConfig(t *testing.T) {
	runScanCases(t, []scanCase{
		{"SELECT set_config('a.b', 'x', false)", pinned(pinCustom)},
		{"SELECT set_config('a.b','x', true)", sqlEffects{}},
		{"SELECT set_config('a.b', 'x', TRUE)", sqlEffects{}},
		{"SELECT set_config('a.b', 'x', 'true')", sqlEffects{}},
		{"SELECT set_config('a.b', 'x', 't')", sqlEffects{}},
		{"SELECT set_config('a.b', 'x', 'on')", sqlEffects{}},
		{"SELECT set_config('a.b', 'x', 'false')", pinned(pinCustom)},
		{"SELECT pg_catalog.set_config('search_path', '', false)", pinned(pinGUC)},
		{"SELECT set_config('a.b', lower('X'), true)", sqlEffects{}},
		{"SELECT set_config('a.b', concat('x', 'y'), false)", pinned(pinCustom)},
		{"SELECT set_config($1, $2, $3)", opaqueEff()}, // unknown: the server tells
		{"SELECT set_config('a.b', 'x', true), set_config('c.d', 'y', false)", pinned(pinCustom)},
		{"SELECT set_config('a.b', 'true', false)", pinned(pinCustom)},
		{"SELECT set_config(", opaqueEff()}, // truncated: conservative
		{"SELECT current_setting('a.b')", sqlEffects{}},
	})
}

func TestScanSQLTransactionKeywords(t *testing.T) {
	tx := sqlEffects{transaction: true}
	runScanCases(t, []scanCase{
		{"BEGIN", tx},
		{"START TRANSACTION", tx},
		{"COMMIT", tx},
		{"END", tx},
		{"ROLLBACK", tx},
		{"ABORT", tx},
		{"begin isolation level serializable", tx},
		{"SELECT 1", sqlEffects{}},
	})
}

func TestScanSQLMultiStatement(t *testing.T) {
	runScanCases(t, []scanCase{
		{"BEGIN; SET search_path = x; COMMIT", sqlEffects{pin: pinGUC, transaction: true}},
		{"SET search_path = x; LISTEN a; SELECT pg_advisory_lock(1)", listenCmd(sqlEffects{pin: pinGUC | pinListen | pinAdvisory})},
		{"LISTEN a;UNLISTEN *", listenCmd(sqlEffects{pin: pinListen, unpin: pinListen})},
		{"SELECT 1; SET LOCAL work_mem = '1GB'; SELECT 2;", sqlEffects{}},
		{";;; LISTEN a ;;", listenCmd(pinned(pinListen))},
		{"SELECT 1\n;\nPREPARE p AS SELECT 2", pinned(pinPrepare)},
		{"DISCARD ALL; LOAD 'x'", sqlEffects{pin: pinLoad, unpin: allButLoad, discardAll: true, resetAll: true, scs: true}},
		// Words before the ';' do not leak into the next statement.
		{"SELECT 1 INTO t; CREATE TEMP TABLE u(a int) ON COMMIT DROP", created(sqlEffects{})},
		{"DECLARE c CURSOR WITH HOLD FOR SELECT 1; DECLARE d CURSOR FOR SELECT 1", pinned(pinCursor)},
		{"SELECT 'a' INTO x; SELECT temp FROM t", created(sqlEffects{})},
		{"CREATE TEMP TABLE t(a int) ON COMMIT DROP; CREATE TEMP TABLE u(a int)", created(pinned(pinTemp))},
	})
}

// TestScanSQLIgnoresQuotedAndCommentedText checks that keywords inside
// literals, quoted identifiers, dollar quotes and comments do not count.
func TestScanSQLIgnoresQuotedAndCommentedText(t *testing.T) {
	runScanCases(t, []scanCase{
		// Plain strings, with doubled quotes.
		{"SELECT 'SET search_path = x'", sqlEffects{}},
		{"SELECT 'it''s; LISTEN y'", sqlEffects{}},
		{"SELECT ''; LISTEN y", listenCmd(pinned(pinListen))},
		{"INSERT INTO log VALUES ('pg_advisory_lock(1)')", sqlEffects{}},
		{"SELECT 'x'; SELECT 'DISCARD ALL'", sqlEffects{}},
		// E'' strings with backslash escapes.
		{`SELECT E'it\'s; LISTEN y'`, sqlEffects{}},
		{`SELECT e'\\'; LISTEN y`, listenCmd(pinned(pinListen))},
		{`SELECT E'\\\'; LISTEN y'`, sqlEffects{}},
		{`SELECT E'a''b; SET x = 1'`, sqlEffects{}},
		// A backslash in a standard string is not an escape.
		{`SELECT 'a\'; LISTEN y`, listenCmd(pinned(pinListen))},
		// Dollar quotes.
		{"SELECT $$ SET x = 1 $$", sqlEffects{}},
		{"SELECT $$ SET x = 1; LISTEN a $$; SELECT 1", sqlEffects{}},
		{"DO $fn$ BEGIN LISTEN a; PERFORM pg_advisory_lock(1); END $fn$", opaqueEff()},
		{"SELECT $fn$ LISTEN a $fn$", sqlEffects{}},
		{"SELECT $a$ $b$ LISTEN x $b$ $a$", sqlEffects{}},
		{"SELECT $fn$ $$ ; LISTEN a $fn$", sqlEffects{}},
		{"SELECT $_x1$ LISTEN a $_x1$", sqlEffects{}},
		{"CREATE FUNCTION f() RETURNS void AS $body$ SET search_path = x $body$ LANGUAGE sql", created(sqlEffects{})},
		{"SELECT $1; LISTEN y", listenCmd(pinned(pinListen))},
		{"SELECT $1, $2 FROM t WHERE a = $3; LISTEN y", listenCmd(pinned(pinListen))},
		// Quoted identifiers.
		{`SELECT "set" FROM t`, sqlEffects{}},
		{`SELECT 1 AS "LISTEN"`, sqlEffects{}},
		{`SELECT "a;LISTEN b" FROM t`, sqlEffects{}},
		{`SELECT "a""; LISTEN b" FROM t`, sqlEffects{}},
		{`SELECT "pg_advisory_lock" FROM t`, sqlEffects{}},
		{`CREATE TABLE "temp"(a int)`, created(sqlEffects{})},
		// Comments.
		{"-- SET x = 1\nSELECT 1", sqlEffects{}},
		{"SELECT 1 -- ; LISTEN a", sqlEffects{}},
		{"SELECT 1 -- SET x\n; LISTEN a", listenCmd(pinned(pinListen))},
		{"/* LISTEN /* nested */ y */ SELECT 1", sqlEffects{}},
		{"/* a /* b /* c */ LISTEN */ SET x */ SELECT 1", sqlEffects{}},
		{"/* LISTEN a */ LISTEN b", listenCmd(pinned(pinListen))},
		{"SELECT 1 /* unterminated; LISTEN a", sqlEffects{}},
		{"/**/LISTEN a", listenCmd(pinned(pinListen))},
		{"SELECT pg_advisory_lock/* c */(1)", sqlEffects{pin: pinAdvisory}},
		{"SELECT 2-1; LISTEN a", listenCmd(pinned(pinListen))},
		{"SELECT 4/2; LISTEN a", listenCmd(pinned(pinListen))},
		// Leading comments before the statement keyword.
		{"/* app=x */ SET search_path = y", pinned(pinGUC)},
		{"-- pgbench\nLISTEN a", listenCmd(pinned(pinListen))},
	})
}

func TestScanSQLCaseInsensitive(t *testing.T) {
	runScanCases(t, []scanCase{
		{"set SEARCH_PATH = x", pinned(pinGUC)},
		{"SeT sEaRcH_pAtH = x", pinned(pinGUC)},
		{"SET Application_Name = 'x'", sqlEffects{}},
		{"set local Search_Path = x", sqlEffects{}},
		{"Listen foo", listenCmd(pinned(pinListen))},
		{"UnListen *", listenCmd(unpinned(pinListen))},
		{"Create Temp Table t(a int)", created(pinned(pinTemp))},
		{"DeClArE c CuRsOr WiTh HoLd FoR sElEcT 1", pinned(pinCursor)},
		{"Discard All", discardAllEff},
		{"SELECT PG_ADVISORY_UNLOCK_ALL()", sqlEffects{recheck: pinAdvisory}},
		{"SELECT Set_Config('a.b', 'x', False)", pinned(pinCustom)},
		{"SELECT Set_Config('work_mem', '1MB', False)", pinned(pinGUC)},
		{"SELECT Set_Config('a.b', 'x', True)", sqlEffects{}},
	})
}

// TestScanSQLNoPinForOrdinaryQueries covers the queries pgbench and
// typical ORMs send: none may pin.
func TestScanSQLNoPinForOrdinaryQueries(t *testing.T) {
	for _, q := range []string{
		"",
		";",
		"   \n\t",
		"-- only a comment",
		"/* only a comment */",
		"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
		"UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 12345;",
		"UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
		"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP);",
		"SELECT t.id, t.name FROM tasks t WHERE t.created_at > now() - interval '1 day' ORDER BY 1 LIMIT 10",
		"WITH x AS (SELECT 1) SELECT * FROM x",
		"INSERT INTO settings(key, value) VALUES ('listen', 'set') ON CONFLICT (key) DO UPDATE SET value = excluded.value",
		"SELECT 1.5e10, .5, 1e-3, 0x1F",
		"SELECT U&'d\\0061t\\+000061'",
		"SELECT B'1010', X'1F'",
		"SELECT a::text FROM t",
		"COPY t FROM STDIN",
		"VACUUM ANALYZE t",
		"SHOW search_path",
		"EXPLAIN SELECT 1",
	} {
		if e := scanSQL([]byte(q), 0); e != (sqlEffects{}) {
			t.Errorf("scanSQL(%q) = %s, want no effects", q, fmtEffects(e))
		}
	}
}

// TestScanSQLEdgeCases covers forms that were once misread: role changes
// in every spelling (RESET ALL does not reset them), OR REPLACE, WITH …
// INTO TEMP, quoted function names.
func TestScanSQLEdgeCases(t *testing.T) {
	gaps := []struct {
		sql  string
		want sqlEffects
		why  string
	}{
		{"SET SESSION ROLE bob", pinned(pinRole),
			"SET SESSION ROLE is SET ROLE; it is classified pinGUC, which RESET ALL then unpins although RESET ALL does not reset role (GUC_NO_RESET_ALL)"},
		{"SET SESSION SESSION AUTHORIZATION bob", pinned(pinRole),
			"same as SET SESSION AUTHORIZATION; classified pinGUC, which RESET ALL unpins although session_authorization is GUC_NO_RESET_ALL"},
		{"SET session_authorization = 'bob'", pinned(pinRole),
			"the GUC behind SET SESSION AUTHORIZATION; classified pinGUC (RESET ALL unpins it)"},
		{"SELECT set_config('role', 'bob', false)", pinned(pinRole),
			"set_config of role is SET ROLE; classified pinGUC (RESET ALL unpins it)"},
		{"SET SESSION TIME ZONE 'UTC'", sqlEffects{},
			"TimeZone is reported; only the form without SESSION is recognised (over-pins, harmless)"},
		{"CREATE OR REPLACE TEMP VIEW v AS SELECT 1", created(pinned(pinTemp)),
			"OR REPLACE is not skipped before TEMP"},
		{"WITH q AS (SELECT 1) SELECT * INTO TEMP t FROM q", created(pinned(pinTemp)),
			"SELECT INTO TEMP is only recognised when the statement starts with SELECT"},
		{`SELECT "pg_advisory_lock"(1)`, sqlEffects{pin: pinAdvisory},
			"a quoted function name is still a call; only unquoted names are recognised"},
		{`SELECT pg_catalog."pg_advisory_lock"(1)`, sqlEffects{pin: pinAdvisory},
			"a schema-qualified quoted function name is still a call"},
	}
	for _, g := range gaps {
		t.Run(g.sql, func(t *testing.T) {
			if got := scanSQL([]byte(g.sql), 0); got != g.want {
				t.Fatalf("scanSQL(%q): want = %s, got = %s (%s)", g.sql, fmtEffects(g.want), fmtEffects(got), g.why)
			}
		})
	}
}

// TestScanSQLKeepsStatementOrder: a pin followed by its unpin leaves the
// session clean; an unpin followed by a pin leaves it pinned.
func TestScanSQLKeepsStatementOrder(t *testing.T) {
	pairs := []struct {
		clean, pinned string
		kind          pinKind
	}{
		{"SET search_path = x; RESET ALL", "RESET ALL; SET search_path = x", pinGUC},
		{"LISTEN a; UNLISTEN *", "UNLISTEN *; LISTEN a", pinListen},
		{"CREATE TEMP TABLE t(a int); DISCARD ALL", "DISCARD ALL; CREATE TEMP TABLE t(a int)", pinTemp},
	}
	for _, p := range pairs {
		if e := scanSQL([]byte(p.clean), 0); e.unpin&p.kind == 0 {
			t.Errorf("%q: want = unpin %s at the end, got = %s", p.clean, p.kind, fmtEffects(e))
		}
		if e := scanSQL([]byte(p.pinned), 0); e.pin&p.kind == 0 || e.unpin&p.kind != 0 {
			t.Errorf("%q: want = pinned %s, got = %s", p.pinned, p.kind, fmtEffects(e))
		}
	}
}

func TestPinKindString(t *testing.T) {
	tests := []struct {
		k    pinKind
		want string
	}{
		{0, ""},
		{pinListen, "LISTEN"},
		{pinGUC | pinRole, "SET, SET ROLE"},
		{pinProtocol, "named prepared statement"},
		{pinTemp | pinAdvisory | pinLoad, "advisory lock, temporary table, LOAD"},
		{pinCustom | pinUnverified, "custom parameter, unverified state"},
	}
	for _, tc := range tests {
		if got := tc.k.String(); got != tc.want {
			t.Errorf("pinKind(%#x).String() = %q, want %q", uint16(tc.k), got, tc.want)
		}
	}
	if len(pinNames) != 11 || pinUnverified != 1<<10 {
		t.Errorf("pinNames has %d names for %d kinds", len(pinNames), 11)
	}
}

// TestScanSQLLexerTerminatesOnTruncatedInput covers unterminated
// constructs at the very end of the text.
func TestScanSQLLexerTerminatesOnTruncatedInput(t *testing.T) {
	for _, q := range []string{
		"'", "E'", "e'\\", "E'\\'", `"`, `"a`, "$", "$$", "$a", "$a$", "$a$ b $", "$1", "/*", "/*/", "/* /* */", "--", "-", "/",
		"SELECT 'unterminated; LISTEN a",
		"SELECT $$ unterminated; LISTEN a",
		`SELECT "unterminated; LISTEN a`,
		"SELECT pg_advisory_lock(",
		"SELECT set_config('a', 'b',",
		"SET", "SET SESSION", "DEALLOCATE PREPARE", "UNLISTEN", "CREATE GLOBAL", "DISCARD",
		"\x00\xff\xfe",
	} {
		_ = scanSQL([]byte(q), 0)
	}
}

func TestScanSQLDoesNotAllocate(t *testing.T) {
	queries := []string{
		"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
		"UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 12345;",
		"BEGIN; SET search_path = x; SELECT pg_advisory_lock(1); SELECT set_config('a.b', 'x', false); COMMIT",
		"SELECT $$ body $$, E'x\\'y', \"q\" /* c /* d */ */ -- e",
	}
	queries = append(queries,
		"SELECT now(), lower(a), my_fn(b), pg_catalog.coalesce(c, 0), \"Quoted\"(d) FROM t JOIN u USING (id) WHERE e IN (1, 2)",
		"EXPLAIN (ANALYZE, BUFFERS) CREATE TABLE pg_temp.t AS SELECT 1; DO $$ BEGIN NULL; END $$",
		`SELECT '\''; SET work_mem = 1; SELECT ''''`)
	for _, q := range queries {
		b := []byte(q)
		for _, mode := range []scanMode{0, scanBackslashQuotes} {
			if n := testing.AllocsPerRun(1000, func() { _ = scanSQL(b, mode) }); n != 0 {
				t.Errorf("scanSQL(%q, %d) allocates %v times per run, want 0", q, mode, n)
			}
		}
	}
}

func BenchmarkScanSQLPgbenchSelect(b *testing.B) {
	q := []byte("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
	b.ReportAllocs()
	b.SetBytes(int64(len(q)))
	for b.Loop() {
		_ = scanSQL(q, 0)
	}
}

func BenchmarkScanSQLMixed(b *testing.B) {
	q := []byte("BEGIN; UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 12345; " +
		"SELECT abalance FROM pgbench_accounts WHERE aid = 12345; /* note */ SELECT set_config('app.user', 'x', true); END;")
	b.ReportAllocs()
	b.SetBytes(int64(len(q)))
	for b.Loop() {
		_ = scanSQL(q, 0)
	}
}

// FuzzScanSQL checks that scanSQL terminates without panicking on any
// input, that its results are consistent, and that wrapping the text in a
// comment or a string hides every effect.
func FuzzScanSQL(f *testing.F) {
	for _, s := range []string{
		"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
		"BEGIN; SET search_path = x; COMMIT",
		"SELECT $fn$ LISTEN a $fn$; LISTEN b",
		"/* LISTEN /* nested */ y */ SELECT pg_advisory_lock(1)",
		"SELECT set_config('a.b', f(g(1), 2), true)",
		`SELECT E'\'' , "q""q" -- x`,
		"DISCARD ALL; DEALLOCATE PREPARE ALL; CLOSE ALL; UNLISTEN *",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, q []byte) {
		if e := scanSQL(q, scanBackslashQuotes); e.opaque && !e.verify {
			t.Fatalf("opaque code without verification (backslash quotes): %s", fmtEffects(e))
		}
		e := scanSQL(q, 0)
		if e.discardAll && e.unpin&allButLoad != allButLoad {
			t.Fatalf("discardAll without unpinning everything: %s", fmtEffects(e))
		}
		if e.deallocAll && e.unpin&pinPrepare == 0 {
			t.Fatalf("deallocAll without unpinning PREPARE: %s", fmtEffects(e))
		}
		if e.pin&pinProtocol != 0 || e.unpin&(pinProtocol|pinLoad) != 0 {
			t.Fatalf("scanSQL set a bit only the session may set: %s", fmtEffects(e))
		}
		if e.opaque && !e.verify {
			t.Fatalf("opaque code without verification: %s", fmtEffects(e))
		}
		if e.discardAll && !e.resetAll {
			t.Fatalf("DISCARD ALL without resetting the startup settings: %s", fmtEffects(e))
		}
		// Inside a dollar quote whose tag cannot occur in q nothing counts.
		if !strings.Contains(string(q), "$zz9q$") {
			wrapped := append(append([]byte("SELECT $zz9q$"), q...), "$zz9q$"...)
			if w := scanSQL(wrapped, 0); w != (sqlEffects{}) {
				t.Fatalf("scanSQL(%q) = %s, want no effects", wrapped, fmtEffects(w))
			}
		}
	})
}

func listenCmd(e sqlEffects) sqlEffects { e.listen = true; return e }

func TestParseListenAndDatabaseDDL(t *testing.T) {
	listens := []struct {
		sql, cmd, channel string
		ok                bool
	}{
		{"LISTEN foo", "LISTEN", "foo", true},
		{`listen "Foo ""Bar"""`, "LISTEN", `Foo "Bar"`, true},
		{"LISTEN Foo;", "LISTEN", "foo", true},
		{"UNLISTEN *", "UNLISTEN", "", true},
		{"unlisten x ; ", "UNLISTEN", "x", true},
		{"LISTEN a; LISTEN b", "", "", false},
		{"LISTEN *", "", "", false},
		{"SELECT 1", "", "", false},
	}
	for _, c := range listens {
		cmd, ch, ok := parseListen([]byte(c.sql))
		if cmd != c.cmd || ch != c.channel || ok != c.ok {
			t.Errorf("parseListen(%q): want = %q %q %v, got = %q %q %v", c.sql, c.cmd, c.channel, c.ok, cmd, ch, ok)
		}
	}
	ddl := []struct{ sql, target string }{
		{"DROP DATABASE foo", "foo"},
		{"drop database if exists \"Foo\"", "Foo"},
		{"DROP DATABASE Foo WITH (FORCE)", "foo"},
		{"ALTER DATABASE old RENAME TO new", "old"},
		{"CREATE DATABASE copy TEMPLATE orig", "orig"},
		{"CREATE DATABASE copy WITH OWNER app TEMPLATE = \"Orig\" ENCODING 'UTF8'", "Orig"},
		{"CREATE DATABASE plain", "template1"},
		{"ALTER DATABASE x SET work_mem = '1MB'", ""},
	}
	for _, c := range ddl {
		if e := scanSQL([]byte(c.sql), 0); !e.databaseDDL {
			t.Errorf("scanSQL(%q): want = databaseDDL, got = %s", c.sql, fmtEffects(e))
		}
		got, _ := parseDatabaseDDL([]byte(c.sql))
		if got != c.target {
			t.Errorf("parseDatabaseDDL(%q): want = %q, got = %q", c.sql, c.target, got)
		}
	}
}

func runScanCasesMode(t *testing.T, mode scanMode, cases []scanCase) {
	t.Helper()
	for _, tc := range cases {
		if got := scanSQL([]byte(tc.sql), mode); got != tc.want {
			t.Errorf("scanSQL(%q, %d) =\n\t%s\nwant\n\t%s", tc.sql, mode, fmtEffects(got), fmtEffects(tc.want))
		}
	}
}

// TestScanSQLStandardConformingStringsOff: with the setting off, a
// backslash escapes in every string, as the server lexes it.
func TestScanSQLStandardConformingStringsOff(t *testing.T) {
	hidden := `SELECT '\''; SET work_mem = 1; SELECT ''''`
	runScanCasesMode(t, scanBackslashQuotes, []scanCase{
		{hidden, pinned(pinGUC)},
		{`SELECT 'a\'; LISTEN y'`, sqlEffects{}},
		{`SELECT 'a\\'; LISTEN y`, listenCmd(pinned(pinListen))},
		{`SELECT E'\''; SET work_mem = 1`, pinned(pinGUC)},
		{`SELECT N'\''; SET work_mem = 1; SELECT ''''`, pinned(pinGUC)},
	})
	runScanCasesMode(t, 0, []scanCase{
		{hidden, sqlEffects{}}, // what a scanner that assumes "on" sees
		{`SELECT 'a\'; LISTEN y`, listenCmd(pinned(pinListen))},
	})
	// Both readings: what either creates, and a verification.
	e := either(scanSQL([]byte(hidden), 0), scanSQL([]byte(hidden), scanBackslashQuotes))
	if e.pin&pinGUC == 0 || !e.verify {
		t.Errorf("either reading of %q: want pinned SET and verify, got %s", hidden, fmtEffects(e))
	}
	if e := either(scanSQL([]byte("SELECT 1"), 0), scanSQL([]byte("SELECT 1"), scanBackslashQuotes)); e != (sqlEffects{}) {
		t.Errorf("either reading of SELECT 1: want nothing, got %s", fmtEffects(e))
	}
}

// TestScanSQLTempSchema: objects created in pg_temp by name are temporary.
func TestScanSQLTempSchema(t *testing.T) {
	temp := created(pinned(pinTemp))
	runScanCases(t, []scanCase{
		{"CREATE TABLE pg_temp.t(x int)", temp},
		{`CREATE TABLE "pg_temp".t(x int)`, temp},
		{`CREATE TABLE pg_temp."T"(x int)`, temp},
		{`CREATE TABLE pg_temp . t(x int)`, temp},
		{"CREATE TABLE PG_TEMP.t(x int)", temp},
		{"CREATE TABLE pg_temp_3.t(x int)", temp},
		{"CREATE TABLE pg_temp.t AS SELECT 1", temp},
		{"CREATE VIEW pg_temp.v AS SELECT 1", temp},
		{"CREATE OR REPLACE VIEW pg_temp.v AS SELECT 1", temp},
		{"CREATE SEQUENCE pg_temp.s", temp},
		{"CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", temp},
		{"SELECT 1 INTO pg_temp.x", temp},
		{`SELECT 1 INTO "pg_temp".x`, temp},
		{"WITH q AS (SELECT 1) SELECT * INTO pg_temp.x FROM q", temp},
		{"CREATE TABLE pg_tempx.t(x int)", created(sqlEffects{})},
		{"CREATE TABLE pg_temp_x.t(x int)", created(sqlEffects{})},
		{"INSERT INTO pg_temp.t VALUES (1)", sqlEffects{}},
		{"SELECT * FROM pg_temp.t", sqlEffects{}},
		{"SELECT 'pg_temp.t'", sqlEffects{}},
	})
}

// TestScanSQLExplain: the statement EXPLAIN explains is analysed; it runs
// with ANALYZE, may run with an option list (verified), and does not run
// without (verified if it would create state).
func TestScanSQLExplain(t *testing.T) {
	runScanCases(t, []scanCase{
		{"EXPLAIN ANALYZE CREATE TEMP TABLE t2 AS SELECT 1", created(pinned(pinTemp))},
		{"explain analyse verbose create temp table t2 as select 1", created(pinned(pinTemp))},
		{"EXPLAIN ANALYZE SELECT pg_advisory_lock(1)", pinned(pinAdvisory)},
		{"EXPLAIN (ANALYZE, BUFFERS) CREATE TEMP TABLE t AS SELECT 1", sqlEffects{pin: pinTemp, creates: true, verify: true}},
		{"EXPLAIN (ANALYZE false) SELECT 1 INTO TEMP t", sqlEffects{pin: pinTemp, creates: true, verify: true}},
		{"EXPLAIN CREATE TEMP TABLE t AS SELECT 1", sqlEffects{creates: true, verify: true}},
		{"EXPLAIN VERBOSE SELECT pg_advisory_lock(1)", sqlEffects{verify: true}},
		{"EXPLAIN SELECT my_fn(1)", opaqueEff()},
		{"EXPLAIN ANALYZE EXECUTE p(1)", opaqueEff()},
		{"EXPLAIN SELECT 1", sqlEffects{}},
		{"EXPLAIN (FORMAT JSON) SELECT * FROM t WHERE a = $1", sqlEffects{}},
		{"EXPLAIN ANALYZE SELECT 1; CREATE TEMP TABLE u(a int)", created(pinned(pinTemp))},
	})
}

// TestScanSQLOpaqueCalls: code the scanner cannot see into is verified;
// known built-ins, keywords and relation names before a parenthesis are
// not.
func TestScanSQLOpaqueCalls(t *testing.T) {
	opaque := opaqueEff()
	runScanCases(t, []scanCase{
		{"DO $$ BEGIN PERFORM set_config('a', 'b', false); END $$", opaque},
		{"do language plpgsql $$ begin null; end $$", opaque},
		{"CALL p()", opaque},
		{"CALL myschema.p(1, 2)", opaque},
		{"EXECUTE q", opaque},
		{"SELECT my_function(1)", opaque},
		{"SELECT * FROM my_table_function(1)", opaque},
		{"SELECT app.lower(x) FROM t", opaque},
		{`SELECT "Lower"(x) FROM t`, opaque},
		{`SELECT "public"."lower"(x) FROM t`, opaque},
		{`SELECT public."lower"(x) FROM t`, opaque},
		{"SELECT x FROM t JOIN LATERAL my_fn(t.a) f ON true", opaque},
		{"CREATE EXTENSION hstore", created(opaque)},
		{"ALTER EXTENSION hstore UPDATE", opaque},
		{"REFRESH MATERIALIZED VIEW mv", opaque},
		{"INSERT INTO t (a) VALUES (my_default())", opaque},
		{"SELECT setseed(0.5)", opaque},
		{"SELECT query_to_xml('SELECT set_config(''a'',''b'',false)', true, true, '')", opaque},
	})
	for _, q := range []string{
		"SELECT now(), lower('X'), pg_catalog.upper('x'), count(*) OVER (PARTITION BY a ORDER BY b) FROM t",
		`SELECT pg_catalog."lower"('X'), "pg_catalog"."upper"('x')`,
		"SELECT coalesce(a, 0), nullif(b, 1), greatest(1, 2), least(1, 2) FROM t",
		"SELECT EXTRACT(epoch FROM now()), CAST(x AS numeric(10, 2)), x::varchar(20) FROM t",
		"SELECT jsonb_build_object('a', 1), array_agg(x) FILTER (WHERE x > 0), string_agg(y, ',') WITHIN GROUP (ORDER BY y) FROM t",
		"SELECT * FROM generate_series(1, 10) AS g(n)",
		"SELECT ARRAY(SELECT 1), ROW(1, 2), EXISTS (SELECT 1), 1 IN (1, 2), 2 = ANY($1)",
		"INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT (a) DO UPDATE SET b = excluded.b RETURNING (a)",
		"INSERT INTO public.t (a) SELECT gen_random_uuid()",
		"UPDATE t SET (a, b) = (1, 2) WHERE c IN (SELECT c FROM u)",
		"WITH q (a) AS (SELECT 1), r AS MATERIALIZED (SELECT 2) SELECT * FROM q, r",
		"WITH RECURSIVE n(i) AS (VALUES (1) UNION ALL SELECT i + 1 FROM n WHERE i < 5) SELECT * FROM n",
		"SELECT pg_advisory_xact_lock(hashtext('job')), pg_try_advisory_xact_lock(1)",
		"SELECT set_config('a.b', 'x', true), current_setting('a.b', true)",
		"SELECT nextval('s'), currval('s'), pg_notify('c', 'p'), txid_current()",
		"SELECT x FROM t TABLESAMPLE SYSTEM (10) REPEATABLE (1)",
		"SELECT trim(both 'x' FROM y), substring(y FROM 2 FOR 3), position('a' IN y), overlay(y PLACING 'a' FROM 1) FROM t",
		"COPY t (a, b) FROM STDIN",
		"COPY (SELECT 1) TO STDOUT",
		"PREPARE s(int) AS SELECT $1",
		"DECLARE c CURSOR FOR SELECT 1",
		"VACUUM (VERBOSE, ANALYZE) t",
		"SELECT count(*) FROM t AS x(a, b)",
		"DELETE FROM t WHERE a = $1 RETURNING *",
	} {
		e := scanSQL([]byte(q), 0)
		e.creates, e.pin = false, e.pin&^(pinPrepare) // PREPARE pins by itself
		if e != (sqlEffects{}) {
			t.Errorf("scanSQL(%q) = %s, want no effects", q, fmtEffects(e))
		}
	}
	// DDL: a parenthesis after a relation, type or signature is no call.
	for _, q := range []string{
		"CREATE TABLE t (a int, b numeric(10, 2) CHECK (b > 0), PRIMARY KEY (a))",
		"CREATE TABLE IF NOT EXISTS t (a int REFERENCES u (a))",
		"CREATE INDEX i ON t USING btree (lower(a))",
		"CREATE INDEX ON t (a) INCLUDE (b) WITH (fillfactor = 70)",
		"CREATE VIEW v (a) AS SELECT 1",
		"CREATE FUNCTION f(int) RETURNS TABLE (a int) LANGUAGE sql AS $$ SELECT 1 $$",
		"DROP FUNCTION IF EXISTS f(int)",
		"ALTER FUNCTION f(int) OWNER TO app",
		"CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
		"CREATE TYPE ty AS (a int, b text)",
		"CREATE TYPE e AS ENUM ('a', 'b')",
		"CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (1) TO (10)",
		"CREATE AGGREGATE a (int) (sfunc = int4pl, stype = int)",
		"CREATE STATISTICS s (ndistinct) ON a, b FROM t",
	} {
		if e := scanSQL([]byte(q), 0); e.verify || e.opaque || e.pin != 0 {
			t.Errorf("scanSQL(%q) = %s, want no verification", q, fmtEffects(e))
		}
	}
}

// TestScanSQLSetConfigScope: set_config's scope, when it is not a literal,
// is left to verification; custom parameters pin for good.
func TestScanSQLSetConfigScope(t *testing.T) {
	runScanCases(t, []scanCase{
		{"SELECT set_config('work_mem', '1MB', NOT true)", sqlEffects{verify: true, opaque: true}},
		{"SELECT set_config('work_mem', '1MB', 1 = 0)", sqlEffects{verify: true, opaque: true}},
		{"SELECT set_config('work_mem', '1MB', $3)", sqlEffects{verify: true, opaque: true}},
		{"SELECT set_config('work_mem', '1MB', 'no')", pinned(pinGUC)},
		{"SELECT set_config('work_mem', '1MB', '1')", sqlEffects{}},
		{"SELECT set_config('work_mem' || '', '1MB', false)", sqlEffects{pin: pinGUC | pinCustom, verify: true, scs: true}},
		{"SELECT set_config(E'role', 'bob', false)", pinned(pinRole)},
		{"SELECT set_config('standard_conforming_strings', 'off', false)", sqlEffects{pin: pinGUC, scs: true}},
		{"SELECT set_config('app.tenant', '42', false)", pinned(pinCustom)},
		{"SET app.tenant = 42", pinned(pinCustom)},
		{"WITH x AS (SELECT set_config('work_mem', '1MB', false)) SELECT * FROM x", pinned(pinGUC)},
	})
}

// TestBuiltinFunctionsList: the generated list is sorted, lower case,
// unique, and holds none of the functions that change session state or run
// SQL given as text.
func TestBuiltinFunctionsList(t *testing.T) {
	for _, l := range []struct {
		name string
		list []string
	}{{"builtinFunctions", builtinFunctions[:]}, {"sqlKeywords", sqlKeywords[:]}} {
		for i, n := range l.list {
			if n != strings.ToLower(n) || (i > 0 && l.list[i-1] >= n) {
				t.Fatalf("%s is not sorted, unique and lower case at %q", l.name, n)
			}
		}
	}
	sessionStateFunctions := []string{"set_config", "setseed", "pg_advisory_lock", "pg_advisory_lock_shared", "pg_advisory_unlock",
		"pg_advisory_unlock_shared", "pg_advisory_unlock_all", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
		"pg_backup_start", "pg_backup_stop", "pg_replication_origin_session_setup", "pg_replication_origin_xact_setup",
		"query_to_xml", "cursor_to_xml", "table_to_xml", "ts_stat", "ts_rewrite", "plpgsql_inline_handler",
		"binary_upgrade_set_next_pg_type_oid", "pg_logical_emit_message", "pg_create_logical_replication_slot"}
	for _, f := range sessionStateFunctions {
		if inSorted(builtinFunctions[:], []byte(f)) {
			t.Errorf("builtinFunctions holds %s, which changes session state or runs SQL", f)
		}
	}
	for _, f := range []string{"now", "lower", "count", "coalesce", "jsonb_build_object", "pg_advisory_xact_lock", "current_setting", "nextval"} {
		if !inSorted(builtinFunctions[:], []byte(f)) && !inSorted(sqlKeywords[:], []byte(f)) {
			t.Errorf("%s is missing from builtinFunctions", f)
		}
	}
}

func TestIsTempSchema(t *testing.T) {
	for s, want := range map[string]bool{"pg_temp": true, "PG_TEMP": true, "pg_temp_12": true, "pg_temp_": false, "pg_tempx": false, "pg_temp_1x": false, "pg_tem": false, "pg_toast_temp_1": false} {
		if got := isTempSchema([]byte(s)); got != want {
			t.Errorf("isTempSchema(%q) = %v, want %v", s, got, want)
		}
	}
}

// coderLike is a query shaped like the sqlc-generated ones coderd sends.
const coderLike = `-- name: GetWorkspaces :many
SELECT workspaces.*, COUNT(*) OVER () AS count FROM workspaces
LEFT JOIN users ON workspaces.owner_id = users.id
WHERE workspaces.deleted = $1
  AND CASE WHEN $2 :: uuid != '00000000-0000-0000-0000-000000000000'::uuid THEN owner_id = $2 ELSE true END
  AND CASE WHEN $3 :: text != '' THEN LOWER(name) LIKE '%' || LOWER($3) || '%' ELSE true END
  AND ($4 :: timestamptz IS NULL OR last_used_at >= $4) AND coalesce(array_length($5 :: uuid[], 1), 0) = 0 OR id = ANY($5)
ORDER BY LOWER(users.username) ASC, LOWER(name) ASC
LIMIT CASE WHEN $6 :: integer > 0 THEN $6 END OFFSET $7`

func BenchmarkScanSQLCoderLike(b *testing.B) {
	q := []byte(coderLike)
	b.ReportAllocs()
	b.SetBytes(int64(len(q)))
	for b.Loop() {
		_ = scanSQL(q, 0)
	}
}
func TestScanSQLCoderLikeIsClean(t *testing.T) {
	if e := scanSQL([]byte(coderLike), 0); e != (sqlEffects{}) {
		t.Fatalf("coderLike: %s", fmtEffects(e))
	}
}
