package main

import (
	"context"
	"database/sql"
	"io"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// TestMetricsUnderWorkload scrapes /metrics under a known workload: two
// clients hold the whole budget of 2 in open transactions, a third queues
// and times out, a fourth fails to log in; then the budget frees and
// transactions run on two databases.
func TestMetricsUnderWorkload(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 2
		c.Timeouts.QueryWait = 500 * time.Millisecond
	})
	ctx := context.Background()
	appdb := map[string]string{"db_name": "appdb"}
	holders := make([]pgx.Tx, 2)
	for i := range holders {
		conn := connectPgx(t, g.url("alice", userPass, "appdb"))
		tx, err := conn.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		mustExecTx(t, tx, "SELECT 1")
		holders[i] = tx
	}
	mfs := g.scrape(t)
	pids := governorBackends(t, shared, "app")
	if got := mustValue(t, mfs, "go_sql_open_connections", appdb); got != float64(len(pids)) || got != 2 {
		t.Fatalf("go_sql_open_connections: want = the governor's connections in pg_stat_activity (%d: %v), got = %v", len(pids), pids, got)
	}
	for name, want := range map[string]float64{"go_sql_in_use_connections": 2, "go_sql_idle_connections": 0, "go_sql_max_open_connections": 2} {
		if got := mustValue(t, mfs, name, appdb); got != want {
			t.Fatalf("%s: want = %v, got = %v", name, want, got)
		}
	}
	for name, want := range map[string]float64{"pggovernor_budget_connections": 2, "pggovernor_budget_share_connections": 2,
		"pggovernor_budget_used_connections": 2} {
		if got := mustValue(t, mfs, name, nil); got != want {
			t.Fatalf("%s: want = %v, got = %v", name, want, got)
		}
	}
	if got := mustValue(t, mfs, "pggovernor_clients", map[string]string{"state": "active"}); got != 2 {
		t.Fatalf("active clients: want = 2, got = %v", got)
	}
	if got := mustValue(t, mfs, "pggovernor_server_connections", map[string]string{"state": "active"}); got != 2 {
		t.Fatalf("active server connections: want = 2, got = %v", got)
	}
	waitsBefore := mustValue(t, mfs, "go_sql_wait_count_total", appdb)
	timeoutsBefore := mustValue(t, mfs, "pggovernor_errors_sent_total", map[string]string{"sqlstate": "53300"})

	// A third client queues: it shows as waiting, and as a wait.
	third := connectPgx(t, g.url("alice", userPass, "appdb"))
	done := make(chan error, 1)
	go func() { _, err := third.Exec(ctx, "SELECT 1"); done <- err }()
	waitFor(t, 5*time.Second, "the third client to queue", func() bool { return g.g.pool.Stats().Waiting == 1 })
	mfs = g.scrape(t)
	if got := mustValue(t, mfs, "pggovernor_clients", map[string]string{"state": "waiting"}); got != 1 {
		t.Fatalf("waiting clients: want = 1, got = %v", got)
	}
	if got := mustValue(t, mfs, "go_sql_wait_count_total", appdb); got != waitsBefore+1 {
		t.Fatalf("go_sql_wait_count_total: want = %v, got = %v", waitsBefore+1, got)
	}
	// ... and times out with 53300, counted by SQLSTATE.
	assertCode(t, <-done, "53300")
	mfs = g.scrape(t)
	if got := mustValue(t, mfs, "pggovernor_errors_sent_total", map[string]string{"sqlstate": "53300"}); got != timeoutsBefore+1 {
		t.Fatalf("pggovernor_errors_sent_total{sqlstate=53300}: want = %v, got = %v", timeoutsBefore+1, got)
	}
	if got := mustValue(t, mfs, "pggovernor_wait_timeouts_total", nil); got != 1 {
		t.Fatalf("pggovernor_wait_timeouts_total: want = 1, got = %v", got)
	}
	if got := mustValue(t, mfs, "go_sql_wait_duration_seconds_total", appdb); got < 0.5 {
		t.Fatalf("go_sql_wait_duration_seconds_total: want >= 0.5 (query_wait), got = %v", got)
	}
	if got := mustValue(t, mfs, "pggovernor_wait_seconds", nil); got != 1 {
		t.Fatalf("pggovernor_wait_seconds observations: want = 1, got = %v", got)
	}
	// A failed login, counted by reason.
	_, err := pgx.Connect(ctx, g.url("alice", "wrong-password", "appdb"))
	assertCode(t, err, "28P01")
	mfs = g.scrape(t)
	if got := mustValue(t, mfs, "pggovernor_login_failures_total", map[string]string{"reason": "auth_failed"}); got != 1 {
		t.Fatalf("login failures (auth_failed): want = 1, got = %v", got)
	}
	// The budget frees; transactions run on two databases.
	for _, tx := range holders {
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	}
	other := connectPgx(t, g.url("alice", userPass, "otherdb"))
	for i := 0; i < 5; i++ {
		mustExec(t, third, "SELECT 1")
		mustExec(t, other, "SELECT 1")
	}
	mfs = g.scrape(t)
	for _, db := range []string{"appdb", "otherdb"} {
		if _, ok := value(mfs, "go_sql_open_connections", map[string]string{"db_name": db}); !ok {
			t.Fatalf("go_sql_open_connections has no series for database %s", db)
		}
	}
	// At least: 12 transactions and queries (2 held, 10 after), bytes each
	// way, the connections opened for two databases.
	for name, least := range map[string]float64{"pggovernor_transaction_duration_seconds": 12, "pggovernor_query_duration_seconds": 12,
		"pggovernor_client_received_bytes_total": 100, "pggovernor_client_sent_bytes_total": 100, "pggovernor_server_connect_seconds": 3} {
		if got := mustValue(t, mfs, name, nil); got < least {
			t.Fatalf("%s: want >= %v, got = %v", name, least, got)
		}
	}
	// No series is labelled with a client address or query text. The one
	// address label is the server's new connections go to (one series,
	// from the hosts of upstream.url).
	if mf := mfs["pggovernor_upstream_primary_info"]; mf == nil || len(mf.GetMetric()) != 1 ||
		mf.GetMetric()[0].GetLabel()[0].GetValue() != shared.Addr() {
		t.Fatalf("pggovernor_upstream_primary_info: want = one series, address %s; got = %v", shared.Addr(), mf)
	}
	for name, mf := range mfs {
		if name == "pggovernor_upstream_primary_info" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if strings.Contains(lp.GetValue(), "127.0.0.1") || strings.Contains(lp.GetValue(), "SELECT") {
					t.Fatalf("%s has a label with an address or query text: %s=%q", name, lp.GetName(), lp.GetValue())
				}
			}
		}
	}

	// Lint: Prometheus naming conventions.
	problems, err := testutil.GatherAndLint(g.g.registry)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}

	// The go_sql_* family is what client_golang's NewDBStatsCollector
	// emits for a database/sql pool (lib/pq, as coderd): same names, types,
	// help and labels.
	db, err := sql.Open("postgres", shared.URL("app", appPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.PingContext(ctx); err != nil {
		t.Fatal(err)
	}
	ref := prometheus.NewRegistry()
	ref.MustRegister(collectors.NewDBStatsCollector(db, "appdb"))
	want := goSQLFamilies(t, ref)
	got := goSQLFamilies(t, g.g.registry)
	if len(want) != 9 {
		t.Fatalf("NewDBStatsCollector emitted %d families, expected 9: %v", len(want), want)
	}
	for name, w := range want {
		gf, ok := got[name]
		if !ok {
			t.Fatalf("the governor does not export %s", name)
		}
		if gf.GetType() != w.GetType() || gf.GetHelp() != w.GetHelp() {
			t.Fatalf("%s: want = %v %q, got = %v %q", name, w.GetType(), w.GetHelp(), gf.GetType(), gf.GetHelp())
		}
		for _, m := range gf.GetMetric() {
			if labels := labelNames(m); labels != labelNames(w.GetMetric()[0]) {
				t.Fatalf("%s labels: want = %s, got = %s", name, labelNames(w.GetMetric()[0]), labels)
			}
		}
	}
	if len(got) != len(want) {
		t.Fatalf("go_sql_* families: want = %d, got = %d", len(want), len(got))
	}
}

func goSQLFamilies(t *testing.T, g prometheus.Gatherer) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "go_sql_") {
			out[mf.GetName()] = mf
		}
	}
	return out
}

func labelNames(m *dto.Metric) string {
	var names []string
	for _, lp := range m.GetLabel() {
		names = append(names, lp.GetName())
	}
	sort.Strings(names)
	return strings.Join(names, ",")
}

// get fetches an admin path without failing the test (the listener may be
// gone): code 0 when the request failed.
func (g *gov) get(path string) (int, string) {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + g.g.adminAddr() + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// TestReadiness: /readyz is true when serving, false while paused, with the
// upstream down and while draining, and true again after each; /healthz
// stays true throughout. /debug/pprof is served only with admin.pprof.
func TestReadiness(t *testing.T) {
	ctx := context.Background()
	c := privateCluster(t, pgtest.Options{MaxConnections: 20})
	g := startGov(t, c, func(cfg *config.Config) {
		cfg.Budget.RefreshInterval = time.Second
		cfg.Admin.ProbeInterval = 100 * time.Millisecond
		cfg.Admin.Users = []string{"alice"}
		cfg.Timeouts.ServerConnect = time.Second
	})
	ready := func(want int, substr string) func() bool {
		return func() bool {
			code, body := g.get("/readyz")
			return code == want && strings.Contains(body, substr)
		}
	}
	healthy := func() {
		t.Helper()
		if code, body := g.get("/healthz"); code != http.StatusOK {
			t.Fatalf("/healthz: want = 200, got = %d %s", code, body)
		}
	}
	waitFor(t, 10*time.Second, "/readyz to say ready", ready(http.StatusOK, "ok"))
	waitFor(t, 10*time.Second, "pggovernor_upstream_up = 1", func() bool {
		v, ok := value(g.scrape(t), "pggovernor_upstream_up", nil)
		return ok && v == 1
	})
	healthy()
	if code, _ := g.get("/debug/pprof/"); code != http.StatusNotFound {
		t.Fatalf("/debug/pprof/ without admin.pprof: want = 404, got = %d", code)
	}

	// Paused.
	console := connectPgx(t, g.consoleURL("alice", userPass))
	if _, err := console.Exec(ctx, "PAUSE"); err != nil {
		t.Fatal(err)
	}
	if code, body := g.get("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "paused") {
		t.Fatalf("/readyz while paused: want = 503 naming the pause, got = %d %s", code, body)
	}
	healthy()
	if _, err := console.Exec(ctx, "RESUME"); err != nil {
		t.Fatal(err)
	}
	if code, body := g.get("/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz after RESUME: want = 200, got = %d %s", code, body)
	}

	// The upstream down, then back.
	c.Stop()
	waitFor(t, 10*time.Second, "/readyz to say the upstream is unreachable", ready(http.StatusServiceUnavailable, "unreachable"))
	healthy()
	if v := mustValue(t, g.scrape(t), "pggovernor_upstream_up", nil); v != 0 {
		t.Fatalf("pggovernor_upstream_up with the server stopped: want = 0, got = %v", v)
	}
	if err := c.Restart(ctx, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "/readyz to say ready after the server restarted", ready(http.StatusOK, "ok"))

	// Draining: a client holds a transaction, so the drain lasts until it
	// commits.
	conn := connectPgx(t, g.url("alice", userPass, "appdb"))
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mustExecTx(t, tx, "SELECT 1")
	stopped := make(chan struct{})
	go func() { g.stop(); close(stopped) }()
	waitFor(t, 10*time.Second, "/readyz to say draining", ready(http.StatusServiceUnavailable, "draining"))
	healthy()
	if err := tx.Commit(ctx); err != nil {
		t.Fatalf("a transaction in flight at the drain: %v", err)
	}
	<-stopped

	// pprof, when asked for.
	p := startGov(t, nil, func(cfg *config.Config) { cfg.Budget.Max = 1; cfg.Admin.Pprof = true })
	if code, body := p.get("/debug/pprof/"); code != http.StatusOK || !strings.Contains(body, "goroutine") {
		t.Fatalf("/debug/pprof/ with admin.pprof: want = 200 with the profiles, got = %d", code)
	}
}
