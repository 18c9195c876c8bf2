package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/pggovernor/pggovernor/config"
)

// PgBouncer's SHOW columns and their types, as PgBouncer 1.18.0 (Debian 12)
// answers them: read with psycopg2's cursor.description against its admin
// console. t is text (OID 25), i int4 (23), n numeric (1700). SHOW STATS
// has one more column here, total_requests (PgBouncer's name for
// total_query_count before 1.8), which older exporters still read.
var pgbouncerColumns = map[string]string{
	"POOLS": "database:t user:t cl_active:i cl_waiting:i cl_active_cancel_req:i cl_waiting_cancel_req:i sv_active:i " +
		"sv_active_cancel:i sv_being_canceled:i sv_idle:i sv_used:i sv_tested:i sv_login:i maxwait:i maxwait_us:i pool_mode:t",
	"CLIENTS": socketColumnsSpec,
	"SERVERS": socketColumnsSpec,
	"STATS": "database:t total_xact_count:n total_query_count:n total_received:n total_sent:n total_xact_time:n " +
		"total_query_time:n total_wait_time:n avg_xact_count:n avg_query_count:n avg_recv:n avg_sent:n avg_xact_time:n " +
		"avg_query_time:n avg_wait_time:n total_requests:n",
	"STATS_TOTALS":   "database:t xact_count:n query_count:n bytes_received:n bytes_sent:n xact_time:n query_time:n wait_time:n",
	"STATS_AVERAGES": "database:t xact_count:n query_count:n bytes_received:n bytes_sent:n xact_time:n query_time:n wait_time:n",
	"CONFIG":         "key:t value:t default:t changeable:t",
	"LISTS":          "list:t items:i",
	"VERSION":        "version:t",
	"DATABASES": "name:t host:t port:i database:t force_user:t pool_size:i min_pool_size:i reserve_pool:i pool_mode:t " +
		"max_connections:i current_connections:i paused:i disabled:i",
	"USERS": "name:t pool_mode:t",
}

const socketColumnsSpec = "type:t user:t database:t state:t addr:t port:i local_addr:t local_port:i connect_time:t " +
	"request_time:t wait:i wait_us:i close_needed:i ptr:t link:t remote_pid:i tls:t application_name:t"

func typeLetter(oid uint32) string {
	switch oid {
	case 25:
		return "t"
	case 23:
		return "i"
	case 1700:
		return "n"
	}
	return fmt.Sprint(oid)
}

// consoleRows runs a SHOW through pgx and returns its column spec (as in
// pgbouncerColumns) and rows, each value as pgx decoded it.
func consoleRows(t *testing.T, conn *pgx.Conn, command string, mode pgx.QueryExecMode) (string, [][]any) {
	t.Helper()
	rows, err := conn.Query(context.Background(), command, mode)
	if err != nil {
		t.Fatalf("%s: %v", command, err)
	}
	defer rows.Close()
	var spec []string
	for _, fd := range rows.FieldDescriptions() {
		spec = append(spec, fd.Name+":"+typeLetter(fd.DataTypeOID))
	}
	var out [][]any
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			t.Fatalf("%s: decoding a row: %v", command, err)
		}
		out = append(out, vals)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("%s: %v", command, err)
	}
	return strings.Join(spec, " "), out
}

// TestAdminConsole: psql and pgx (extended protocol, results in binary,
// and simple protocol) talk to the console; every SHOW has PgBouncer's
// columns and types; its figures match the governor's state; users not in
// admin.users are refused; errors leave the session usable.
func TestAdminConsole(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 4
		c.Admin.Users = []string{"alice"}
	})
	ctx := context.Background()
	// One client holds a transaction open, another is idle.
	busy := connectPgx(t, g.url("app", appPass, "appdb"))
	tx, err := busy.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	mustExecTx(t, tx, "SELECT 1")
	idle := connectPgx(t, g.url("alice", userPass, "appdb"))
	mustExec(t, idle, "SELECT 1")

	// psql: headers and values.
	out := mustPsql(t, g.consoleURL("alice", userPass), "SHOW POOLS")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	wantHeader := "database|user|cl_active|cl_waiting|cl_active_cancel_req|cl_waiting_cancel_req|sv_active|sv_active_cancel|" +
		"sv_being_canceled|sv_idle|sv_used|sv_tested|sv_login|maxwait|maxwait_us|pool_mode"
	if len(lines) != 2 || lines[0] != wantHeader {
		t.Fatalf("SHOW POOLS through psql: want = the header and one pool, got:\n%s", out)
	}
	// 2 clients (not waiting), 1 server connection active, 1 idle.
	if want := "appdb|app|2|0|0|0|1|0|0|1|0|0|0|0|0|transaction"; lines[1] != want {
		t.Fatalf("SHOW POOLS row: want = %s, got = %s", want, lines[1])
	}
	if out := mustPsql(t, g.consoleURL("alice", userPass), "show version;"); !strings.Contains(out, "pggovernor "+version) {
		t.Fatalf("SHOW VERSION: got %s", out)
	}
	out = mustPsql(t, g.consoleURL("alice", userPass), "SHOW CONFIG")
	for _, want := range []string{"key|value|default|changeable", "admin.users|alice||yes", "pool_mode|transaction|transaction|no",
		"upstream.password|********||no", "budget.max|4|0|no", "log.level|debug|info|yes"} {
		if !strings.Contains(out, want) {
			t.Fatalf("SHOW CONFIG lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, appPass) {
		t.Fatal("SHOW CONFIG shows the upstream password")
	}
	// An unknown command is an error, and the console goes on.
	out, err = psql(t, g.consoleURL("alice", userPass), "SELECT 1")
	if err == nil || !strings.Contains(out, `invalid command "SELECT 1", use SHOW HELP;`) {
		t.Fatalf("SELECT on the console: want an error, got %v:\n%s", err, out)
	}
	if out := mustPsql(t, g.consoleURL("alice", userPass), "SHOW HELP"); !strings.Contains(out, "PAUSE [<db>]") {
		t.Fatalf("SHOW HELP: got %s", out)
	}

	// pgx, both protocols: every SHOW has PgBouncer's columns and types.
	conn := connectPgx(t, g.consoleURL("alice", userPass))
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeSimpleProtocol} {
		for cmd, want := range pgbouncerColumns {
			got, _ := consoleRows(t, conn, "SHOW "+cmd, mode)
			if got != want {
				t.Fatalf("SHOW %s (%v) columns:\nwant = %s\ngot  = %s", cmd, mode, want, got)
			}
		}
		// Values decode, binary and text alike.
		_, rows := consoleRows(t, conn, "SHOW POOLS", mode)
		if len(rows) != 1 || rows[0][0] != "appdb" || rows[0][2] != int32(2) || rows[0][6] != int32(1) || rows[0][9] != int32(1) {
			t.Fatalf("SHOW POOLS through pgx (%v): got %v", mode, rows)
		}
		_, rows = consoleRows(t, conn, "SHOW LISTS", mode)
		lists := map[string]int32{}
		for _, r := range rows {
			lists[r[0].(string)] = r[1].(int32)
		}
		if lists["pools"] != 1 || lists["databases"] != 1 || lists["used_servers"] != 2 || lists["used_clients"] != 3 || len(lists) != 12 {
			t.Fatalf("SHOW LISTS (%v): got %v", mode, lists)
		}
		_, rows = consoleRows(t, conn, "SHOW STATS", mode)
		if len(rows) != 1 || rows[0][0] != "appdb" {
			t.Fatalf("SHOW STATS (%v): got %v", mode, rows)
		}
		var xacts, requests int64
		if err := conn.QueryRow(ctx, "SHOW STATS", mode).Scan(new(string), &xacts, nil, nil, nil, nil, nil, nil, nil, nil, nil,
			nil, nil, nil, nil, &requests); err != nil {
			t.Fatalf("scanning SHOW STATS (%v): %v", mode, err)
		}
		if xacts < 1 || requests < 1 {
			t.Fatalf("SHOW STATS (%v): total_xact_count = %d, total_requests = %d; want both >= 1", mode, xacts, requests)
		}
		_, rows = consoleRows(t, conn, "SHOW CLIENTS", mode)
		states := map[string]int{}
		for _, r := range rows {
			states[r[2].(string)+"/"+r[3].(string)]++
		}
		if states["appdb/active"] != 2 || states["pggovernor/active"] < 1 {
			t.Fatalf("SHOW CLIENTS (%v): clients by database/state: %v", mode, states)
		}
		_, rows = consoleRows(t, conn, "SHOW SERVERS", mode)
		if len(rows) != 2 {
			t.Fatalf("SHOW SERVERS (%v): want = 2 server connections, got %v", mode, rows)
		}
		linked := 0
		for _, r := range rows {
			if r[0] != "S" || r[2] != "appdb" || r[15].(int32) == 0 {
				t.Fatalf("SHOW SERVERS row (%v): %v", mode, r)
			}
			if r[3] == "active" && r[14] != "" {
				linked++
			}
		}
		if linked != 1 {
			t.Fatalf("SHOW SERVERS (%v): want = 1 active connection linked to its client, got %d in %v", mode, linked, rows)
		}
	}
	// The backend PIDs SHOW SERVERS gives are the governor's backends.
	_, rows := consoleRows(t, conn, "SHOW SERVERS", pgx.QueryExecModeSimpleProtocol)
	pids := governorBackends(t, shared, "app")
	for _, r := range rows {
		if !strings.Contains(" "+strings.Join(pids, " ")+" ", fmt.Sprintf(" %d ", r[15].(int32))) {
			t.Fatalf("SHOW SERVERS pid %d is not among the governor's backends %v", r[15], pids)
		}
	}
	// An error mid-session (extended protocol) leaves the console usable.
	_, err = conn.Exec(ctx, "SHOW NOTHING")
	assertCode(t, err, "42601")
	if _, rows := consoleRows(t, conn, "SHOW VERSION", pgx.QueryExecModeCacheStatement); len(rows) != 1 {
		t.Fatalf("after an error: SHOW VERSION returned %v", rows)
	}

	// A user not in admin.users, a wrong password, the "pgbouncer" alias.
	_, err = pgx.Connect(ctx, g.consoleURL("app", appPass))
	if pgErr := assertCode(t, err, "42501"); !strings.Contains(pgErr.Hint, "admin.users") {
		t.Fatalf("refused console user: want a hint naming admin.users, got %q", pgErr.Hint)
	}
	_, err = pgx.Connect(ctx, g.consoleURL("alice", "wrong"))
	assertCode(t, err, "28P01")
	alias := connectPgx(t, g.url("alice", userPass, "pgbouncer"))
	if _, rows := consoleRows(t, alias, "SHOW DATABASES", pgx.QueryExecModeSimpleProtocol); len(rows) != 1 || rows[0][0] != "appdb" || rows[0][5] != int32(4) {
		t.Fatalf("SHOW DATABASES through the pgbouncer alias: got %v", rows)
	}
}

// exporterPath is where Debian's package puts the exporter.
const exporterPath = "/usr/bin/prometheus-pgbouncer-exporter"

// pgbouncerExporter returns the exporter's path. `make deps` installs
// Debian's package; the test fails, saying so, when it is missing.
func pgbouncerExporter(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(exporterPath); err != nil {
		t.Fatalf("%s is missing: run `make deps` (it installs Debian's prometheus-pgbouncer-exporter) or apt-get install prometheus-pgbouncer-exporter", exporterPath)
	}
	return exporterPath
}

// TestPgBouncerExporterScrapesTheConsole runs Debian's
// prometheus-pgbouncer-exporter (Python, psycopg2) against the governor's
// admin console, as it would run against PgBouncer, and checks that it
// reports the governor's pools. The exporter reads SHOW STATS (with the
// pre-1.8 column total_requests), SHOW POOLS, SHOW DATABASES and SHOW
// LISTS, and fails to start if any of them fails.
func TestPgBouncerExporterScrapesTheConsole(t *testing.T) {
	exporter := pgbouncerExporter(t)
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 4
		c.Admin.Users = []string{"alice"}
	})
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		conn := connectPgx(t, g.url("app", appPass, "appdb"))
		mustExec(t, conn, "SELECT 1")
	}
	host, govPort, _ := net.SplitHostPort(g.addr)
	port := freeTCPPort(t)
	cmd := exec.Command(exporter, "--host", "127.0.0.1", "--port", strconv.Itoa(port),
		"--pgbouncer-host", host, "--pgbouncer-port", govPort, "--pgbouncer-user", "alice")
	// libpq reads the password from the environment; nothing else of
	// this process's environment (PORT, HOST...) may configure it.
	cmd.Env = []string{"PATH=/usr/bin:/bin", "PGPASSWORD=" + userPass, "PGSSLMODE=disable"}
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Kill()
		<-exited
	}()
	scrape := func() (string, bool) {
		client := &http.Client{Timeout: 5 * time.Second}
		resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
		if err != nil {
			return "", false
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return string(body), resp.StatusCode == http.StatusOK
	}
	var body string
	deadline := time.Now().Add(30 * time.Second)
	for {
		var ok bool
		if body, ok = scrape(); ok {
			break
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("the exporter exited: %v\n%s", err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the exporter did not serve /metrics within 30s:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond) // an external process: no event to wait on
	}
	// A second scrape runs the SHOW commands again on the same console
	// session.
	mustExec(t, connectPgx(t, g.url("app", appPass, "appdb")), "SELECT 1")
	body, ok := scrape()
	if !ok {
		t.Fatalf("second scrape failed:\n%s\n%s", body, out.String())
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parsing the exporter's output: %v\n%s", err, body)
	}
	pool := map[string]string{"database": "appdb", "user": "app"}
	if got := mustValue(t, mfs, "pgbouncer_active_clients", pool); got != 3 {
		t.Fatalf("pgbouncer_active_clients for appdb/app: want = 3, got = %v\n%s", got, body)
	}
	if got := mustValue(t, mfs, "pgbouncer_waiting_clients", pool); got != 0 {
		t.Fatalf("pgbouncer_waiting_clients: want = 0, got = %v", got)
	}
	db := map[string]string{"database": "appdb"}
	if got := mustValue(t, mfs, "pgbouncer_requests_total", db); got < 3 {
		t.Fatalf("pgbouncer_requests_total: want >= 3, got = %v", got)
	}
	if got := mustValue(t, mfs, "pgbouncer_received_bytes_total", db); got <= 0 {
		t.Fatalf("pgbouncer_received_bytes_total: want > 0, got = %v", got)
	}
	if got := mustValue(t, mfs, "pgbouncer_pool_size", db); got != 4 {
		t.Fatalf("pgbouncer_pool_size: want = 4 (the budget), got = %v", got)
	}
	if got := mustValue(t, mfs, "pgbouncer_pools", nil); got != 1 {
		t.Fatalf("pgbouncer_pools: want = 1, got = %v", got)
	}
	_ = ctx
}

// TestFailedLoginLeavesNoSession: a client whose login fails after it was
// registered (an unknown database, found when the welcome needs a server
// connection) leaves nothing behind: the console does not list it, and
// the drain at shutdown does not wait for it.
func TestFailedLoginLeavesNoSession(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 2
		c.Admin.Users = []string{"alice"}
		c.Timeouts.ShutdownDrain = 20 * time.Second
	})
	ctx := context.Background()
	_, err := pgx.Connect(ctx, g.url("alice", userPass, "nosuchdb"))
	assertCode(t, err, "3D000")
	console := connectPgx(t, g.consoleURL("alice", userPass))
	if _, rows := consoleRows(t, console, "SHOW CLIENTS", pgx.QueryExecModeSimpleProtocol); len(rows) != 1 || rows[0][2] != "pggovernor" {
		t.Fatalf("SHOW CLIENTS after a failed login: want only the console, got %v", rows)
	}
	if v := mustValue(t, g.scrape(t), "pggovernor_login_failures_total", map[string]string{"reason": "server_refused"}); v != 1 {
		t.Fatalf("login failures (server_refused): want = 1, got = %v", v)
	}
	console.Close(ctx)
	began := time.Now()
	g.stop()
	if d := time.Since(began); d > 10*time.Second {
		t.Fatalf("shutdown took %s: the drain waited for a session that was gone", d)
	}
}

// TestPauseCanBeCancelled: PAUSE waits for the transactions in flight; a
// cancel request (pgx sends one when the context ends, psql on Ctrl-C)
// ends the wait with 57014 and leaves the pause in effect.
func TestPauseCanBeCancelled(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 2
		c.Admin.Users = []string{"alice"}
	})
	ctx := context.Background()
	client := connectPgx(t, g.url("alice", userPass, "appdb"))
	tx, err := client.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mustExecTx(t, tx, "SELECT 1")
	console := connectPgx(t, g.consoleURL("alice", userPass))
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = console.Exec(cctx, "PAUSE appdb")
	cancel()
	if pgErr := assertCode(t, err, "57014"); !strings.Contains(pgErr.Detail, "RESUME") {
		t.Fatalf("cancelled PAUSE: want a detail saying the pause stays, got %q", pgErr.Detail)
	}
	if !g.g.pool.IsPaused("appdb") {
		t.Fatal("the pause ended with the cancelled command")
	}
	// The transaction in flight finishes; RESUME ends the pause.
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := console.Exec(ctx, "RESUME appdb"); err != nil {
		t.Fatal(err)
	}
	mustExec(t, client, "SELECT 1")
}
