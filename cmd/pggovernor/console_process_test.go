package main

import (
	"context"
	"encoding/json"
	"errors"
	"github.com/jackc/pgx/v5/pgconn"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// logLines parses the process's JSON log lines.
func logLines(t *testing.T, p *process) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(p.stderr.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

func countLogs(lines []map[string]any, msg, level string) int {
	n := 0
	for _, l := range lines {
		if l["msg"] == msg && (level == "" || l["level"] == level) {
			n++
		}
	}
	return n
}

// TestConsoleCommandsOnTheBinary drives the real binary's console with
// psql and pgx: RELOAD applies a new log level and admin.users from the
// configuration file, KILL disconnects a database's clients and holds new
// ones until RESUME, WAIT_CLOSE returns, SHUTDOWN stops the process in
// order. Log lines carry conn_id, client, db, user and mode.
func TestConsoleCommandsOnTheBinary(t *testing.T) {
	ctx := context.Background()
	cfgFile := filepath.Join(t.TempDir(), "pggovernor.yaml")
	writeCfg := func(level string, admins ...string) {
		body := "log:\n  level: " + level + "\nadmin:\n  users: [" + strings.Join(admins, ", ") + "]\n"
		if err := os.WriteFile(cfgFile, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeCfg("info", "alice")
	p := startProcess(t, []string{"PGGOVERNOR_UPSTREAM_PASSWORD=" + appPass}, "--config="+cfgFile,
		"--upstream-url="+shared.URL("app", "", "appdb"), "--clients.users-file="+usersFile(t), "--budget.max=2")
	console := p.url("alice", userPass, "pggovernor")
	if out := mustPsql(t, console, "SHOW CONFIG"); !strings.Contains(out, "log.level|info|info|yes") {
		t.Fatalf("SHOW CONFIG before RELOAD:\n%s", out)
	}
	if out, err := psql(t, p.url("app", appPass, "pggovernor"), "SHOW VERSION"); err == nil || !strings.Contains(out, "admin.users") {
		t.Fatalf("app before RELOAD: want the console refused, got %v:\n%s", err, out)
	}
	client, err := pgx.Connect(ctx, p.url("app", appPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, client, "SELECT 1")
	if n := countLogs(logLines(t, p), "server connection opened", "debug"); n != 0 {
		t.Fatalf("debug lines at level info: %d", n)
	}

	// RELOAD: the new level and admin list apply without a restart.
	writeCfg("debug", "alice", "app")
	if out := mustPsql(t, console, "RELOAD"); !strings.Contains(out, "RELOAD") {
		t.Fatalf("RELOAD: %s", out)
	}
	if out := mustPsql(t, p.url("app", appPass, "pggovernor"), "SHOW CONFIG"); !strings.Contains(out, "log.level|debug|info|yes") ||
		!strings.Contains(out, "admin.users|alice,app||yes") {
		t.Fatalf("SHOW CONFIG after RELOAD (as app, now an admin):\n%s", out)
	}
	if n := countLogs(logLines(t, p), "log level changed", "info"); n != 1 {
		t.Fatalf("'log level changed' lines: want = 1, got = %d\n%s", n, p.stderr)
	}
	// Two transactions at once: a second server connection is opened,
	// which is logged at debug level.
	second, err := pgx.Connect(ctx, p.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close(ctx)
	var txs []pgx.Tx
	for _, c := range []*pgx.Conn{client, second} {
		tx, err := c.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		mustExecTx(t, tx, "SELECT 1")
		txs = append(txs, tx)
	}
	for _, tx := range txs {
		if err := tx.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "a debug line after RELOAD", func() bool {
		return countLogs(logLines(t, p), "server connection opened", "debug") > 0
	})

	// KILL: the database's clients are disconnected; new ones wait.
	if out := mustPsql(t, console, "KILL appdb"); !strings.Contains(out, "KILL") {
		t.Fatalf("KILL: %s", out)
	}
	for _, c := range []*pgx.Conn{client, second} {
		if _, err := c.Exec(ctx, "SELECT 1"); err == nil {
			t.Fatal("a client of a killed database could still run a query")
		}
	}
	late, err := pgx.Connect(ctx, p.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatalf("logging in to a killed database: %v", err)
	}
	done := make(chan error, 1)
	go func() { _, err := late.Exec(ctx, "SELECT 1"); done <- err }()
	waitFor(t, 5*time.Second, "the new client to wait", func() bool {
		// Both earlier clients are gone; the new one waits.
		return strings.Contains(mustPsql(t, console, "SHOW POOLS"), "appdb|app|0|1|")
	})
	if out := mustPsql(t, console, "RESUME appdb"); !strings.Contains(out, "RESUME") {
		t.Fatalf("RESUME: %s", out)
	}
	if err := <-done; err != nil {
		t.Fatalf("the client held by KILL after RESUME: %v", err)
	}
	if out := mustPsql(t, console, "WAIT_CLOSE appdb"); !strings.Contains(out, "WAIT_CLOSE") {
		t.Fatalf("WAIT_CLOSE: %s", out)
	}
	late.Close(ctx)

	// SHUTDOWN: an orderly exit.
	if out := mustPsql(t, console, "SHUTDOWN"); !strings.Contains(out, "SHUTDOWN") {
		t.Fatalf("SHUTDOWN: %s", out)
	}
	select {
	case <-p.exited:
	case <-time.After(20 * time.Second):
		t.Fatalf("the process did not exit after SHUTDOWN:\n%s", p.stderr)
	}
	if p.err != nil {
		t.Fatalf("exit status after SHUTDOWN: %v", p.err)
	}
	lines := logLines(t, p)
	if countLogs(lines, "SHUTDOWN from the admin console", "") != 1 || countLogs(lines, "pggovernor stopped", "") != 1 {
		t.Fatalf("no orderly stop in the log:\n%s", p.stderr)
	}
	// Every session's last line carries the connection's fields.
	ended := 0
	for _, l := range lines {
		if l["msg"] != "client session ended" {
			continue
		}
		ended++
		for _, f := range []string{"conn_id", "client", "db", "user", "mode"} {
			if _, ok := l[f]; !ok {
				t.Fatalf("'client session ended' without %s: %v", f, l)
			}
		}
	}
	if ended < 3 {
		t.Fatalf("'client session ended' lines: want >= 3, got = %d", ended)
	}
}

// TestRepeatedErrorsAreRateLimited: a storm of failed logins is logged a
// few times, each line after the first carrying how many were skipped.
// After ten failures the login throttle answers 08004 instead of 28P01;
// both are logged as failed logins.
func TestRepeatedErrorsAreRateLimited(t *testing.T) {
	p := startProcess(t, []string{"PGGOVERNOR_UPSTREAM_PASSWORD=" + appPass}, "--upstream-url="+shared.URL("app", "", "appdb"),
		"--clients.users-file="+usersFile(t), "--budget.max=1", "--log.repeat-interval=300ms")
	ctx := context.Background()
	failures := 0
	fail := func() {
		_, err := pgx.Connect(ctx, p.url("alice", "wrong-password", "appdb"))
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || (pgErr.Code != "28P01" && pgErr.Code != "08004") {
			t.Fatalf("want = SQLSTATE 28P01 or 08004 (throttled), got = %v", err)
		}
		failures++
	}
	for i := 0; i < 20; i++ {
		fail()
	}
	skippedLine := func() bool {
		for _, l := range logLines(t, p) {
			if l["msg"] == "login failed" && l["skipped"] != nil {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(10 * time.Second)
	for !skippedLine() {
		if time.Now().After(deadline) {
			t.Fatalf("no 'login failed' line with a skipped count after %d failures:\n%s", failures, p.stderr)
		}
		fail()
	}
	lines, skipped := 0, 0
	for _, l := range logLines(t, p) {
		if l["msg"] == "login failed" {
			lines++
			if n, ok := l["skipped"].(float64); ok {
				skipped += int(n)
			}
		}
	}
	if lines >= failures || lines+skipped > failures || skipped == 0 {
		t.Fatalf("%d failed logins: %d lines written, %d counted as skipped", failures, lines, skipped)
	}
	t.Logf("%d failed logins: %d lines, %d skipped", failures, lines, skipped)
}
