package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/pool"
)

// Secrets of the tests in this file (listed in testSecrets): one per place
// a secret can be given, so that a failure names the one that leaked.
const (
	leakRolePass      = "leak-role-pw-Hn3"          // the role's password: --upstream.password, the password file
	leakUserinfoPass  = "leak-userinfo-pw-Tq5"      // postgres://user:…@
	leakQueryPass     = "leak-query-pw-Rz8"         // ?password=…
	leakURLSSLPass    = "leak-url-sslkey-pass-Mw2"  // ?sslpassword=…
	leakDSNPass       = "leak-dsn-pw-Jd4"           // password=…
	leakDSNSSLPass    = "leak-dsn-sslkey-pass-Ky6"  // sslpassword=…
	leakControlPass   = "leak-control-pw-Fp1"       // budget.cluster.control_password_file
	leakClusterSecret = "leak-cancel-key-Vx9Qm3Lr7" // budget.cluster.secret_file
)

var leakSetupOnce sync.Once

// leakSecrets are the secrets TestSecretsNeverShown gives pggovernor.
var leakSecrets = []string{leakRolePass, leakUserinfoPass, leakQueryPass, leakURLSSLPass, leakDSNPass, leakDSNSSLPass,
	leakControlPass, leakClusterSecret}

// findSecret returns the first of the tests' secrets in text (these
// tests' and the client users'), "" when none is there.
func findSecret(text string) string {
	for _, s := range append(leakSecrets, userPass, appPass) {
		if strings.Contains(text, s) {
			return s
		}
	}
	return ""
}

// TestSecretsNeverShown gives pggovernor every secret-bearing setting it
// knows — the upstream URL's userinfo password, its password and
// sslpassword parameters, the same two keys of a key=value DSN,
// upstream.password as a flag, and the files holding the upstream
// password, the clients' passwords, the cluster's cancel key and the
// control role's password — and reads everything it shows: SHOW CONFIG on
// the admin console, its log, `pggovernor doctor`'s output, /metrics and
// every /debug/pprof endpoint (/debug/pprof/cmdline, which would show the
// flags, is not served). No secret appears in any of them; the start
// refusal of a connection string pgconn cannot parse shows none either.
func TestSecretsNeverShown(t *testing.T) {
	ctx := context.Background()
	leakSetupOnce.Do(func() {
		if err := shared.CreateRole(ctx, "leaker", leakRolePass, false); err != nil {
			t.Fatal(err)
		}
		if err := shared.CreateRole(ctx, "leakctl", leakControlPass, false); err != nil {
			t.Fatal(err)
		}
		if _, err := shared.ExecIn(ctx, "appdb", "GRANT USAGE, CREATE ON SCHEMA public TO leakctl"); err != nil {
			t.Fatal(err)
		}
	})
	dir := t.TempDir()
	users := usersFile(t)
	passwordFile := writeFile(t, dir, "upstream-password", []byte(leakRolePass))
	secretFile := writeFile(t, dir, "cancel-key", []byte(leakClusterSecret))
	controlFile := writeFile(t, dir, "control-password", []byte(leakControlPass))
	hostPort := fmt.Sprintf("host=%s port=%d", shared.Host, shared.Port)
	ns := newNamespace()
	for _, c := range []struct {
		name string
		args []string // the settings of run and doctor
	}{
		{"URL", []string{
			fmt.Sprintf("--upstream-url=postgres://leaker:%s@%s/appdb?sslmode=disable&password=%s&sslpassword=%s",
				leakUserinfoPass, shared.Addr(), leakQueryPass, leakURLSSLPass),
			"--upstream.password=" + leakRolePass,
		}},
		{"key=value with the cluster's files", []string{
			fmt.Sprintf("--upstream-url=%s user=leaker password=%s sslpassword='%s' dbname=appdb sslmode=disable",
				hostPort, leakDSNPass, leakDSNSSLPass),
			"--upstream.password-file=" + passwordFile,
			"--budget.cluster.enabled", fmt.Sprintf("--budget.cluster.namespace=%d", ns),
			fmt.Sprintf("--budget.cluster.table=leak_members_%d", ns),
			"--budget.cluster.secret-file=" + secretFile,
			"--budget.cluster.control-user=leakctl", "--budget.cluster.control-password-file=" + controlFile,
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			common := append([]string{"--clients.users-file=" + users}, c.args...)
			p := startProcess(t, nil, append([]string{"--admin-listen=127.0.0.1:0", "--admin.pprof", "--admin.users=alice",
				"--log.level=debug", "--timeouts.query-wait=5s"}, common...)...)
			admin := adminAddr(t, p)
			// A client's transaction: server connections opened, logged.
			if out := mustPsql(t, p.url("alice", userPass, "appdb"), "SELECT current_user"); !strings.Contains(out, "leaker") {
				t.Fatalf("a query through the governor: want = served as leaker, got:\n%s", out)
			}

			config := mustPsql(t, p.url("alice", userPass, "pggovernor"), "SHOW CONFIG")
			if !strings.Contains(config, "upstream.url|") || !strings.Contains(config, "xxxxx") {
				t.Fatalf("SHOW CONFIG: want = the upstream.url row, masked, got:\n%s", config)
			}
			if s := findSecret(config); s != "" {
				t.Fatalf("SHOW CONFIG shows %q:\n%s", s, config)
			}

			get := func(path string) (int, string) {
				t.Helper()
				client := &http.Client{Timeout: 30 * time.Second}
				resp, err := client.Get("http://" + admin + path)
				if err != nil {
					t.Fatalf("GET %s: %v", path, err)
				}
				defer resp.Body.Close()
				body, err := io.ReadAll(resp.Body)
				if err != nil {
					t.Fatalf("GET %s: %v", path, err)
				}
				if zr, err := gzip.NewReader(bytes.NewReader(body)); err == nil { // a profile in pprof's format
					if unzipped, err := io.ReadAll(zr); err == nil {
						body = unzipped
					}
				}
				return resp.StatusCode, string(body)
			}
			if code, body := get("/debug/pprof/cmdline"); code != http.StatusNotFound {
				t.Fatalf("GET /debug/pprof/cmdline: want = 404, got = %d:\n%q", code, body)
			}
			for _, path := range []string{"/metrics", "/debug/pprof/", "/debug/pprof/goroutine?debug=2", "/debug/pprof/goroutine",
				"/debug/pprof/heap?debug=1", "/debug/pprof/heap", "/debug/pprof/allocs?debug=1", "/debug/pprof/threadcreate?debug=1",
				"/debug/pprof/block?debug=1", "/debug/pprof/mutex?debug=1", "/debug/pprof/symbol", "/debug/pprof/profile?seconds=1",
				"/debug/pprof/trace?seconds=1"} {
				code, body := get(path)
				if code != http.StatusOK {
					t.Fatalf("GET %s: want = 200, got = %d:\n%s", path, code, body)
				}
				if s := findSecret(body); s != "" {
					t.Fatalf("GET %s shows %q", path, s)
				}
			}

			out := runDoctor(t, common...)
			if !strings.Contains(out, "config: upstream.url") || !strings.Contains(out, "server: user") {
				t.Fatalf("doctor: want = the configuration and the server's answers, got:\n%s", out)
			}
			if s := findSecret(out); s != "" {
				t.Fatalf("doctor shows %q:\n%s", s, out)
			}

			if !strings.Contains(p.stderr.String(), `"msg":"pggovernor started"`) {
				t.Fatalf("log: want = the start line, got:\n%s", p.stderr)
			}
			if s := findSecret(p.stderr.String()); s != "" {
				t.Fatalf("the log shows %q:\n%s", s, p.stderr)
			}
		})
	}

	// A connection string pgconn refuses (connect_timeout is not a number):
	// the refusal names the key and shows the string, masked.
	for _, url := range []string{
		fmt.Sprintf("postgres://leaker:%s@%s/appdb?sslpassword=%s&password=%s&connect_timeout=soon", leakUserinfoPass, shared.Addr(), leakURLSSLPass, leakQueryPass),
		fmt.Sprintf("%s user=leaker sslpassword=%s password=%s connect_timeout=soon", hostPort, leakDSNSSLPass, leakDSNPass),
	} {
		_, out := runFailing(t, nil, "--upstream-url="+url, "--clients.users-file="+users, "--budget.max=2")
		if !strings.Contains(out, "key upstream.url") || !strings.Contains(out, "connect_timeout") {
			t.Fatalf("an unparsable URL: want = a refusal naming upstream.url and the cause, got:\n%s", out)
		}
		if s := findSecret(out); s != "" {
			t.Fatalf("the refusal of an unparsable URL shows %q:\n%s", s, out)
		}
		out = runDoctor(t, "--upstream-url="+url, "--clients.users-file="+users)
		if !strings.Contains(out, "PROBLEM: key upstream.url") {
			t.Fatalf("doctor on an unparsable URL: want = a problem naming upstream.url, got:\n%s", out)
		}
		if s := findSecret(out); s != "" {
			t.Fatalf("doctor on an unparsable URL shows %q:\n%s", s, out)
		}
	}
}

// adminAddr is the admin_listen address of a process, from its start log
// line.
func adminAddr(t *testing.T, p *process) string {
	t.Helper()
	var addr string
	waitFor(t, 10*time.Second, "the start log line", func() bool {
		for _, l := range logLines(t, p) {
			if l["msg"] == "pggovernor started" {
				addr, _ = l["admin_listen"].(string)
			}
		}
		return addr != ""
	})
	return addr
}

// runDoctor runs `pggovernor doctor` (the binary) with args and returns
// what it printed; it may find problems (exit code 1), nothing worse.
func runDoctor(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, governorBinary(t), append([]string{"doctor"}, args...)...).CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 1) {
		t.Fatalf("doctor: %v\n%s", err, out)
	}
	return string(out)
}

// TestRoutesOnlyForAcceptedDatabases: 30 logins to databases that do not
// exist (3D000 from the server) add no go_sql_* series and no row of SHOW
// POOLS or SHOW STATS; a pool unused for pool.route_idle_timeout (no
// server connection, no client) goes from both, while one with a client
// logged in stays.
func TestRoutesOnlyForAcceptedDatabases(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 4
		c.Admin.Users = []string{"alice"}
		c.Pool.RouteIdleTimeout = time.Second
	})
	ctx := context.Background()
	// A client of appdb stays logged in; one of otherdb leaves.
	stay := connectPgx(t, g.url("alice", userPass, "appdb"))
	if _, err := stay.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	leave := connectPgx(t, g.url("alice", userPass, "otherdb"))
	if _, err := leave.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	console := connectPgx(t, g.consoleURL("alice", userPass))
	// What operators see: the databases of go_sql_open_connections, SHOW
	// POOLS and SHOW STATS.
	seen := func() (series, pools, stats []string) {
		t.Helper()
		if mf := g.scrape(t)["go_sql_open_connections"]; mf != nil {
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "db_name" {
						series = append(series, l.GetValue())
					}
				}
			}
		}
		_, rows := consoleRows(t, console, "SHOW POOLS", pgx.QueryExecModeSimpleProtocol)
		for _, r := range rows {
			pools = append(pools, fmt.Sprint(r[0]))
		}
		_, rows = consoleRows(t, console, "SHOW STATS", pgx.QueryExecModeSimpleProtocol)
		for _, r := range rows {
			stats = append(stats, fmt.Sprint(r[0]))
		}
		sort.Strings(series)
		sort.Strings(pools)
		sort.Strings(stats)
		return series, pools, stats
	}
	series, pools, stats := seen()
	if want := []string{"appdb", "otherdb"}; !slices.Equal(series, want) || !slices.Equal(pools, want) {
		t.Fatalf("before: want = series and pools of %v, got = %v and %v", want, series, pools)
	}
	for i := 0; i < 30; i++ {
		_, err := pgx.Connect(ctx, g.url("alice", userPass, fmt.Sprintf("bogus_%02d", i)))
		assertCode(t, err, "3D000")
	}
	s2, p2, st2 := seen()
	if !slices.Equal(s2, series) || !slices.Equal(p2, pools) || !slices.Equal(st2, stats) {
		t.Fatalf("after 30 logins to databases that do not exist: want = series %v, pools %v, stats %v unchanged, got = %v, %v, %v",
			series, pools, stats, s2, p2, st2)
	}

	// otherdb's client leaves, its connection is closed: the pool goes
	// after pool.route_idle_timeout. appdb's client stays: its pool too.
	leave.Close(ctx)
	waitFor(t, 10*time.Second, "otherdb's client to be gone", func() bool {
		_, rows := consoleRows(t, console, "SHOW CLIENTS", pgx.QueryExecModeSimpleProtocol)
		for _, r := range rows {
			if r[2] == "otherdb" {
				return false
			}
		}
		return true
	})
	g.g.pool.CloseIdle(ctx, func(pool.Route) bool { return true })
	waitFor(t, 20*time.Second, "otherdb's pool to be forgotten", func() bool {
		series, pools, _ := seen()
		return !slices.Contains(series, "otherdb") && !slices.Contains(pools, "otherdb")
	})
	if series, pools, _ := seen(); !slices.Equal(series, []string{"appdb"}) || !slices.Equal(pools, []string{"appdb"}) {
		t.Fatalf("with a client of appdb logged in: want = appdb's series and pool kept, got = %v and %v", series, pools)
	}
	// Used again, it comes back.
	if _, err := stay.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	again := connectPgx(t, g.url("alice", userPass, "otherdb"))
	if _, err := again.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if series, _, _ := seen(); !slices.Equal(series, []string{"appdb", "otherdb"}) {
		t.Fatalf("otherdb used again: want = its series back, got = %v", series)
	}
}

// TestBudgetReadOfAStalledServerTimesOut: the backend of the control
// connection stops (SIGSTOP: a server that accepts nothing more on that
// connection) while the budget is re-read. The read ends after
// timeouts.server_connect and is logged, and the next one is made on a new
// control connection, instead of the refresh hanging for ever.
func TestBudgetReadOfAStalledServerTimesOut(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.RefreshInterval = time.Second
		c.Timeouts.ServerConnect = 500 * time.Millisecond
		c.Admin.ProbeInterval = time.Hour // the probe does not take the one control connection
	})
	ctx := context.Background()
	conn, err := g.g.control.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pid := conn.Conn().PgConn().PID()
	conn.Release()
	if err := syscall.Kill(int(pid), syscall.SIGSTOP); err != nil {
		t.Fatalf("stopping the control connection's backend %d: %v", pid, err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = syscall.Kill(int(pid), syscall.SIGCONT)
		}
	}
	t.Cleanup(resume)
	const warning = "cannot read the server's connection limits"
	waitFor(t, 20*time.Second, "the stalled read to be reported", func() bool { return g.logs.FilterMessageSnippet(warning).Len() > 0 })
	if e := g.logs.FilterMessageSnippet(warning).All()[0].ContextMap()["error"]; !strings.Contains(fmt.Sprint(e), "timeout") && !strings.Contains(fmt.Sprint(e), "deadline") {
		t.Fatalf("the stalled read: want = a timeout, got = %v", e)
	}
	resume()
	waitFor(t, 20*time.Second, "a new control connection", func() bool {
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		conn, err := g.g.control.Acquire(actx)
		if err != nil {
			return false
		}
		defer conn.Release()
		return conn.Conn().PgConn().PID() != pid
	})
	if _, known := g.g.pool.Limit(); !known {
		t.Fatal("the budget: want = still known, got = unknown")
	}
}
