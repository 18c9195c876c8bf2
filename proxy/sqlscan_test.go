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

const allButLoad = pinListen | pinGUC | pinAdvisory | pinTemp | pinPrepare | pinCursor | pinRole

func runScanCases(t *testing.T, cases []scanCase) {
	t.Helper()
	for _, tc := range cases {
		got := scanSQL([]byte(tc.sql))
		if got != tc.want {
			t.Errorf("scanSQL(%q) =\n\t%s\nwant\n\t%s", tc.sql, fmtEffects(got), fmtEffects(tc.want))
		}
	}
}

func fmtEffects(e sqlEffects) string {
	var b strings.Builder
	b.WriteString("pin=[" + e.pin.String() + "] unpin=[" + e.unpin.String() + "]")
	if e.advisory != 0 {
		b.WriteString(" advisory=")
		b.WriteString(itoa(e.advisory))
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
		{"SET myapp.tenant = 42", pinned(pinGUC)},
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
		{"SET standard_conforming_strings = on", sqlEffects{}},
		{"SET default_transaction_read_only = on", sqlEffects{}},
		{`SET "application_name" = 'x'`, sqlEffects{}},
		// Role changes.
		{"SET SESSION AUTHORIZATION bob", pinned(pinRole)},
		{"SET SESSION AUTHORIZATION DEFAULT", pinned(pinRole)},
		{"SET ROLE bob", pinned(pinRole)},
		{"set role none", pinned(pinRole)},
		{"SET role = 'bob'", pinned(pinRole)},
		// RESET.
		{"RESET ALL", unpinned(pinGUC)},
		{"reset all", unpinned(pinGUC)},
		{"RESET search_path", sqlEffects{}},
		{"RESET ROLE", sqlEffects{}},
	})
}

func TestScanSQLListen(t *testing.T) {
	runScanCases(t, []scanCase{
		{"LISTEN foo", listenCmd(pinned(pinListen))},
		{`listen "Foo Bar"`, listenCmd(pinned(pinListen))},
		{"UNLISTEN *", listenCmd(unpinned(pinListen))},
		{"unlisten *;", listenCmd(unpinned(pinListen))},
		{"UNLISTEN foo", listenCmd(sqlEffects{})},
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
		{"EXECUTE s", sqlEffects{}},
		{"DEALLOCATE s", sqlEffects{dealloc: true}},
		{"DEALLOCATE PREPARE s", sqlEffects{dealloc: true}},
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
		{"CLOSE c", sqlEffects{}},
		{"FETCH 10 FROM c", sqlEffects{}},
	})
}

func TestScanSQLTemporaryObjects(t *testing.T) {
	runScanCases(t, []scanCase{
		{"CREATE TEMP TABLE t(a int)", pinned(pinTemp)},
		{"create temporary table t (a int)", pinned(pinTemp)},
		{"CREATE GLOBAL TEMPORARY TABLE t(a int)", pinned(pinTemp)},
		{"CREATE LOCAL TEMP TABLE t(a int)", pinned(pinTemp)},
		{"CREATE TEMP SEQUENCE s", pinned(pinTemp)},
		{"CREATE TEMPORARY VIEW v AS SELECT 1", pinned(pinTemp)},
		{"CREATE TEMP TABLE t AS SELECT 1", pinned(pinTemp)},
		{"CREATE TEMP TABLE t(a int) ON COMMIT DELETE ROWS", pinned(pinTemp)},
		{"CREATE TEMP TABLE t(a int) ON COMMIT PRESERVE ROWS", pinned(pinTemp)},
		{"CREATE TEMP TABLE t(a int) ON COMMIT DROP", sqlEffects{}},
		{"create temp table t(a int) on commit drop", sqlEffects{}},
		{"CREATE TABLE t(a int)", sqlEffects{}},
		{"CREATE TABLE temp(a int)", sqlEffects{}},
		{"CREATE UNLOGGED TABLE t(a int)", sqlEffects{}},
		{"SELECT 1 INTO TEMP t", pinned(pinTemp)},
		{"SELECT * INTO TEMPORARY TABLE t FROM u", pinned(pinTemp)},
		{"select a into temp t from u where b", pinned(pinTemp)},
		{"SELECT 1 INTO t", sqlEffects{}},
		{"SELECT temp FROM t", sqlEffects{}},
		{"DISCARD TEMP", unpinned(pinTemp)},
		{"DISCARD TEMPORARY", unpinned(pinTemp)},
		{"DROP TABLE t", sqlEffects{}},
	})
}

func TestScanSQLDiscardAndLoad(t *testing.T) {
	runScanCases(t, []scanCase{
		{"DISCARD ALL", sqlEffects{unpin: allButLoad, discardAll: true}},
		{"discard all;", sqlEffects{unpin: allButLoad, discardAll: true}},
		{"DISCARD PLANS", sqlEffects{}},
		{"DISCARD SEQUENCES", sqlEffects{}},
		{"LOAD 'auto_explain'", pinned(pinLoad)},
		{"load '$libdir/plugins/auto_explain'", pinned(pinLoad)},
	})
	if e := scanSQL([]byte("DISCARD ALL")); e.unpin&pinLoad != 0 || e.unpin&pinProtocol != 0 {
		t.Errorf("DISCARD ALL unpins %s, but LOAD cannot be undone and protocol statements are tracked apart", e.unpin)
	}
}

func TestScanSQLAdvisoryLocks(t *testing.T) {
	lock := sqlEffects{pin: pinAdvisory, advisory: 1}
	runScanCases(t, []scanCase{
		{"SELECT pg_advisory_lock(1)", lock},
		{"select pg_catalog.pg_try_advisory_lock_shared(1,2)", lock},
		{"SELECT pg_try_advisory_lock(1)", lock},
		{"SELECT PG_ADVISORY_LOCK_SHARED(1)", lock},
		{"SELECT pg_advisory_lock (hashtext('job'))", lock},
		{"SELECT x FROM t WHERE pg_try_advisory_lock(t.id)", lock},
		{"SELECT pg_advisory_lock(1), pg_advisory_lock(2)", sqlEffects{pin: pinAdvisory, advisory: 2}},
		{"SELECT pg_advisory_xact_lock(1)", sqlEffects{}},
		{"SELECT pg_try_advisory_xact_lock_shared(1)", sqlEffects{}},
		{"SELECT pg_advisory_unlock(1)", sqlEffects{advisory: -1}},
		{"SELECT pg_advisory_unlock_shared(1)", sqlEffects{advisory: -1}},
		{"SELECT pg_advisory_unlock_all()", unpinned(pinAdvisory)},
		{"SELECT pg_advisory_lock(1); SELECT pg_advisory_unlock(1)", sqlEffects{pin: pinAdvisory}},
		{"SELECT pg_advisory_lock", sqlEffects{}}, // a column, not a call
		{"SELECT my_pg_advisory_lock(1)", sqlEffects{}},
	})
}

func TestScanSQLSetConfig(t *testing.T) {
	runScanCases(t, []scanCase{
		{"SELECT set_config('a.b', 'x', false)", pinned(pinGUC)},
		{"SELECT set_config('a.b','x', true)", sqlEffects{}},
		{"SELECT set_config('a.b', 'x', TRUE)", sqlEffects{}},
		{"SELECT set_config('a.b', 'x', 'true')", sqlEffects{}},
		{"SELECT set_config('a.b', 'x', 't')", sqlEffects{}},
		{"SELECT set_config('a.b', 'x', 'on')", sqlEffects{}},
		{"SELECT set_config('a.b', 'x', 'false')", pinned(pinGUC)},
		{"SELECT pg_catalog.set_config('search_path', '', false)", pinned(pinGUC)},
		{"SELECT set_config('a.b', lower('X'), true)", sqlEffects{}},
		{"SELECT set_config('a.b', concat('x', 'y'), false)", pinned(pinGUC)},
		{"SELECT set_config($1, $2, $3)", pinned(pinGUC)}, // unknown: pin
		{"SELECT set_config('a.b', 'x', true), set_config('c.d', 'y', false)", pinned(pinGUC)},
		{"SELECT set_config('a.b', 'true', false)", pinned(pinGUC)},
		{"SELECT set_config(", pinned(pinGUC)}, // truncated: conservative
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
		{"SET search_path = x; LISTEN a; SELECT pg_advisory_lock(1)", listenCmd(sqlEffects{pin: pinGUC | pinListen | pinAdvisory, advisory: 1})},
		{"LISTEN a;UNLISTEN *", listenCmd(sqlEffects{pin: pinListen, unpin: pinListen})},
		{"SELECT 1; SET LOCAL work_mem = '1GB'; SELECT 2;", sqlEffects{}},
		{";;; LISTEN a ;;", listenCmd(pinned(pinListen))},
		{"SELECT 1\n;\nPREPARE p AS SELECT 2", pinned(pinPrepare)},
		{"DISCARD ALL; LOAD 'x'", sqlEffects{pin: pinLoad, unpin: allButLoad, discardAll: true}},
		// Words before the ';' do not leak into the next statement.
		{"SELECT 1 INTO t; CREATE TEMP TABLE u(a int) ON COMMIT DROP", sqlEffects{}},
		{"DECLARE c CURSOR WITH HOLD FOR SELECT 1; DECLARE d CURSOR FOR SELECT 1", pinned(pinCursor)},
		{"SELECT 'a' INTO x; SELECT temp FROM t", sqlEffects{}},
		{"CREATE TEMP TABLE t(a int) ON COMMIT DROP; CREATE TEMP TABLE u(a int)", pinned(pinTemp)},
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
		{"DO $fn$ BEGIN LISTEN a; PERFORM pg_advisory_lock(1); END $fn$", sqlEffects{}},
		{"SELECT $fn$ LISTEN a $fn$", sqlEffects{}},
		{"SELECT $a$ $b$ LISTEN x $b$ $a$", sqlEffects{}},
		{"SELECT $fn$ $$ ; LISTEN a $fn$", sqlEffects{}},
		{"SELECT $_x1$ LISTEN a $_x1$", sqlEffects{}},
		{"CREATE FUNCTION f() RETURNS void AS $body$ SET search_path = x $body$ LANGUAGE sql", sqlEffects{}},
		{"SELECT $1; LISTEN y", listenCmd(pinned(pinListen))},
		{"SELECT $1, $2 FROM t WHERE a = $3; LISTEN y", listenCmd(pinned(pinListen))},
		// Quoted identifiers.
		{`SELECT "set" FROM t`, sqlEffects{}},
		{`SELECT 1 AS "LISTEN"`, sqlEffects{}},
		{`SELECT "a;LISTEN b" FROM t`, sqlEffects{}},
		{`SELECT "a""; LISTEN b" FROM t`, sqlEffects{}},
		{`SELECT "pg_advisory_lock" FROM t`, sqlEffects{}},
		{`CREATE TABLE "temp"(a int)`, sqlEffects{}},
		// Comments.
		{"-- SET x = 1\nSELECT 1", sqlEffects{}},
		{"SELECT 1 -- ; LISTEN a", sqlEffects{}},
		{"SELECT 1 -- SET x\n; LISTEN a", listenCmd(pinned(pinListen))},
		{"/* LISTEN /* nested */ y */ SELECT 1", sqlEffects{}},
		{"/* a /* b /* c */ LISTEN */ SET x */ SELECT 1", sqlEffects{}},
		{"/* LISTEN a */ LISTEN b", listenCmd(pinned(pinListen))},
		{"SELECT 1 /* unterminated; LISTEN a", sqlEffects{}},
		{"/**/LISTEN a", listenCmd(pinned(pinListen))},
		{"SELECT pg_advisory_lock/* c */(1)", sqlEffects{pin: pinAdvisory, advisory: 1}},
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
		{"Create Temp Table t(a int)", pinned(pinTemp)},
		{"DeClArE c CuRsOr WiTh HoLd FoR sElEcT 1", pinned(pinCursor)},
		{"Discard All", sqlEffects{unpin: allButLoad, discardAll: true}},
		{"SELECT PG_ADVISORY_UNLOCK_ALL()", unpinned(pinAdvisory)},
		{"SELECT Set_Config('a.b', 'x', False)", pinned(pinGUC)},
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
		if e := scanSQL([]byte(q)); e.pin != 0 || e.unpin != 0 || e.advisory != 0 || e.discardAll || e.deallocAll {
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
		{"CREATE OR REPLACE TEMP VIEW v AS SELECT 1", pinned(pinTemp),
			"OR REPLACE is not skipped before TEMP"},
		{"WITH q AS (SELECT 1) SELECT * INTO TEMP t FROM q", pinned(pinTemp),
			"SELECT INTO TEMP is only recognised when the statement starts with SELECT"},
		{`SELECT "pg_advisory_lock"(1)`, sqlEffects{pin: pinAdvisory, advisory: 1},
			"a quoted function name is still a call; only unquoted names are recognised"},
		{`SELECT pg_catalog."pg_advisory_lock"(1)`, sqlEffects{pin: pinAdvisory, advisory: 1},
			"a schema-qualified quoted function name is still a call"},
	}
	for _, g := range gaps {
		t.Run(g.sql, func(t *testing.T) {
			if got := scanSQL([]byte(g.sql)); got != g.want {
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
		{"SELECT pg_advisory_lock(1); SELECT pg_advisory_unlock_all()", "SELECT pg_advisory_unlock_all(); SELECT pg_advisory_lock(1)", pinAdvisory},
		{"CREATE TEMP TABLE t(a int); DISCARD ALL", "DISCARD ALL; CREATE TEMP TABLE t(a int)", pinTemp},
	}
	for _, p := range pairs {
		if e := scanSQL([]byte(p.clean)); e.unpin&p.kind == 0 {
			t.Errorf("%q: want = unpin %s at the end, got = %s", p.clean, p.kind, fmtEffects(e))
		}
		if e := scanSQL([]byte(p.pinned)); e.pin&p.kind == 0 || e.unpin&p.kind != 0 {
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
	}
	for _, tc := range tests {
		if got := tc.k.String(); got != tc.want {
			t.Errorf("pinKind(%#x).String() = %q, want %q", uint16(tc.k), got, tc.want)
		}
	}
	if len(pinNames) != 9 || pinProtocol != 1<<8 {
		t.Errorf("pinNames has %d names for %d kinds", len(pinNames), 9)
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
		_ = scanSQL([]byte(q))
	}
}

func TestScanSQLDoesNotAllocate(t *testing.T) {
	queries := []string{
		"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
		"UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 12345;",
		"BEGIN; SET search_path = x; SELECT pg_advisory_lock(1); SELECT set_config('a.b', 'x', false); COMMIT",
		"SELECT $$ body $$, E'x\\'y', \"q\" /* c /* d */ */ -- e",
	}
	for _, q := range queries {
		b := []byte(q)
		if n := testing.AllocsPerRun(1000, func() { _ = scanSQL(b) }); n != 0 {
			t.Errorf("scanSQL(%q) allocates %v times per run, want 0", q, n)
		}
	}
}

func BenchmarkScanSQLPgbenchSelect(b *testing.B) {
	q := []byte("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
	b.ReportAllocs()
	b.SetBytes(int64(len(q)))
	for b.Loop() {
		_ = scanSQL(q)
	}
}

func BenchmarkScanSQLMixed(b *testing.B) {
	q := []byte("BEGIN; UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 12345; " +
		"SELECT abalance FROM pgbench_accounts WHERE aid = 12345; /* note */ SELECT set_config('app.user', 'x', true); END;")
	b.ReportAllocs()
	b.SetBytes(int64(len(q)))
	for b.Loop() {
		_ = scanSQL(q)
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
		e := scanSQL(q)
		if e.discardAll && e.unpin&allButLoad != allButLoad {
			t.Fatalf("discardAll without unpinning everything: %s", fmtEffects(e))
		}
		if e.deallocAll && e.unpin&pinPrepare == 0 {
			t.Fatalf("deallocAll without unpinning PREPARE: %s", fmtEffects(e))
		}
		if e.pin&pinProtocol != 0 || e.unpin&(pinProtocol|pinLoad) != 0 {
			t.Fatalf("scanSQL set a bit only the session may set: %s", fmtEffects(e))
		}
		if e.advisory > 0 && e.pin&pinAdvisory == 0 {
			t.Fatalf("advisory locks taken without pinning: %s", fmtEffects(e))
		}
		// Inside a dollar quote whose tag cannot occur in q nothing counts.
		if !strings.Contains(string(q), "$zz9q$") {
			wrapped := append(append([]byte("SELECT $zz9q$"), q...), "$zz9q$"...)
			if w := scanSQL(wrapped); w != (sqlEffects{}) {
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
		if e := scanSQL([]byte(c.sql)); !e.databaseDDL {
			t.Errorf("scanSQL(%q): want = databaseDDL, got = %s", c.sql, fmtEffects(e))
		}
		got, _ := parseDatabaseDDL([]byte(c.sql))
		if got != c.target {
			t.Errorf("parseDatabaseDDL(%q): want = %q, got = %q", c.sql, c.target, got)
		}
	}
}
