package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// The package's shared Postgres cluster, started by TestMain.
var (
	shared   *pgtest.Cluster
	logsMu   sync.Mutex
	allLogs  []string // every log line of every governor in this test run, for the secrets test
	appPass  = "app-secret-Xq7"
	userPass = "client-secret-Zk9"
)

func TestMain(m *testing.M) {
	if url := os.Getenv(coderWorkerEnv); url != "" {
		os.Exit(runCoderWorker(url)) // a worker process of TestCoderShapedWorkload
	}
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	ctx := context.Background()
	c, err := pgtest.Start(ctx, pgtest.Options{MaxConnections: 60})
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting postgres:", err)
		return 1
	}
	defer c.Close()
	shared = c
	// The goroutines running now (the cluster's log reader) are not the
	// tests'; IgnoreCurrent records them here, not at the check.
	preexisting := goleak.IgnoreCurrent()
	if err := c.CreateRole(ctx, "app", appPass, false); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for _, db := range []string{"appdb", "otherdb"} {
		if _, err := c.Exec(ctx, "CREATE DATABASE "+db+" OWNER app"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	code := m.Run()
	runAtExit()
	if code == 0 {
		if leaked := secretsInLogs(); leaked != "" {
			fmt.Fprintln(os.Stderr, "a secret reached the logs:", leaked)
			return 1
		}
	}
	if code == 0 {
		if err := goleak.Find(preexisting); err != nil {
			fmt.Fprintln(os.Stderr, "goroutine leak:", err)
			return 1
		}
	}
	return code
}

// privateCluster starts a cluster of the test's own (for tests that
// restart the server or depend on its limits) with the role app owning
// the database appdb, as on the shared one; it is stopped at cleanup.
func privateCluster(t *testing.T, opts pgtest.Options) *pgtest.Cluster {
	t.Helper()
	ctx := context.Background()
	c, err := pgtest.Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.CreateRole(ctx, "app", appPass, false); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "CREATE DATABASE appdb OWNER app"); err != nil {
		t.Fatal(err)
	}
	return c
}

// gov is a governor running in-process for a test.
type gov struct {
	t      testing.TB
	cfg    *config.Config
	g      *governor
	logs   *observer.ObservedLogs
	addr   string
	stopMu sync.Once
}

// usersFile writes a users file for the tests' client users.
func usersFile(t testing.TB, lines ...string) string {
	t.Helper()
	if len(lines) == 0 {
		lines = []string{fmt.Sprintf("%q %q", "alice", userPass), fmt.Sprintf("%q %q", "app", appPass)}
	}
	p := filepath.Join(t.TempDir(), "userlist.txt")
	if err := os.WriteFile(p, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// startGov starts a governor in front of cluster c (shared when nil), with
// cfg adjusted by mutate and start's options.
func startGov(t testing.TB, c *pgtest.Cluster, mutate func(*config.Config), opts ...option) *gov {
	t.Helper()
	if c == nil {
		c = shared
	}
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	cfg.AdminListen = "127.0.0.1:0"
	cfg.Upstream.URL = c.URL("app", "", "appdb")
	cfg.Upstream.Password = appPass
	cfg.Clients.UsersFile = usersFile(t)
	cfg.Timeouts.QueryWait = 10 * time.Second
	cfg.Timeouts.ShutdownDrain = 5 * time.Second
	cfg.Log.Level = "debug"
	if mutate != nil {
		mutate(&cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("test config invalid: %v", err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	logger := zap.New(zapcore.NewTee(core, zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(&logSink{}), zapcore.DebugLevel)))
	g, err := start(context.Background(), &cfg, logger, opts...)
	if err != nil {
		t.Fatalf("starting the governor: %v", err)
	}
	gv := &gov{t: t, cfg: &cfg, g: g, logs: logs, addr: g.proxy.Addr().String()}
	t.Cleanup(gv.stop)
	if cfg.Budget.Max == 0 {
		waitFor(t, 10*time.Second, "the budget to be known", func() bool { _, ok := g.pool.Limit(); return ok })
	}
	return gv
}

func (g *gov) stop() {
	g.stopMu.Do(func() { g.g.stop(zap.NewNop(), g.cfg.Timeouts.ShutdownDrain) })
}

// url returns a client connection URL through the governor.
func (g *gov) url(user, password, db string) string {
	host, port, _ := net.SplitHostPort(g.addr)
	return fmt.Sprintf("postgres://%s:%s@%s:%s/%s?sslmode=disable", user, password, host, port, db)
}

// dsn returns a key=value connection string through the governor.
func (g *gov) dsn(user, password, db string) string {
	host, port, _ := net.SplitHostPort(g.addr)
	return fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=%s sslmode=disable", host, port, user, password, db)
}

// logSink keeps every log line for the secrets test.
type logSink struct{}

func (logSink) Write(p []byte) (int, error) {
	logsMu.Lock()
	allLogs = append(allLogs, string(p))
	logsMu.Unlock()
	return len(p), nil
}

func (logSink) Sync() error { return nil }

// waitFor polls cond until it holds or the timeout ends. It is for states
// that no event announces (counts seen in pg_stat_activity).
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// testSecrets are every secret the tests use; none may appear in any log
// line of any governor started by the tests. Besides the passwords: the AWS
// secret key, what every RDS IAM token holds (its signature parameter), and
// what every PEM private key holds.
func testSecrets() []string {
	return append(leakSecrets, appPass, userPass, "old-pass", "new-pass", "pw-a", "pw-b", "carolpass", "bobpass", "davepass", "coder-env-secret", "erinpass", "lifer-pw", "victim-pw", "loader-pw", "sessauth-pw",
		hbaSCRAMPass, hbaMD5Pass, hbaClearPass, hbaTLSPass, hbaPlainPass, hbaRejectPass, md5StoredPass, scramStoredPass,
		k8sOldPass, k8sNewPass, newbiePass, ddlNobodyPass, clusterPass, clusterSecret, "control-pw-Vb81", awsTestCreds.SecretAccessKey, "X-Amz-Signature", "PRIVATE KEY")
}

var (
	exitMu  sync.Mutex
	atExits []func()
)

// atExit registers f to run once all tests have run (to stop a cluster
// shared by some tests), before the leak check.
func atExit(f func()) {
	exitMu.Lock()
	atExits = append(atExits, f)
	exitMu.Unlock()
}

func runAtExit() {
	exitMu.Lock()
	defer exitMu.Unlock()
	for i := len(atExits) - 1; i >= 0; i-- {
		atExits[i]()
	}
	atExits = nil
}

// secretsInLogs returns the first log line holding a secret, "" if none.
func secretsInLogs() string {
	logsMu.Lock()
	defer logsMu.Unlock()
	if len(allLogs) == 0 {
		if f := flag.Lookup("test.run"); f != nil && f.Value.String() != "" {
			return "" // a selection of tests that logged nothing
		}
		return "no logs were captured, so the check proves nothing"
	}
	for _, line := range allLogs {
		for _, s := range testSecrets() {
			if strings.Contains(line, s) {
				return fmt.Sprintf("%q in %s", s, line)
			}
		}
	}
	return ""
}
