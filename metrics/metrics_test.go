package metrics

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/pggovernor/pggovernor/pool"
)

// fakePool is a PoolSource with fixed figures.
type fakePool struct {
	stats  pool.Stats
	routes []pool.RouteStat
}

func (f fakePool) Stats() pool.Stats        { return f.stats }
func (f fakePool) Routes() []pool.RouteStat { return f.routes }

func route(db, user string, open, idle, inUse int, waits int64) pool.RouteStat {
	return pool.RouteStat{Route: pool.Route{Database: db, User: user}, Open: open, Idle: idle, InUse: inUse,
		RouteCounters: pool.RouteCounters{WaitCount: waits, WaitDuration: time.Duration(waits) * time.Second,
			ClosedIdle: 1, ClosedSurplus: 2, ClosedLifetime: 3}}
}

// TestCollectorLintsAndSumsRoutesByDatabase: the collector's output has no
// naming problem, go_sql_* has one series per database summed over its
// routes (one per upstream user), and figures that are unknown are absent.
func TestCollectorLintsAndSumsRoutesByDatabase(t *testing.T) {
	src := Sources{
		Pool: fakePool{
			stats: pool.Stats{Limit: 10, LimitKnown: true, Open: 7, Idle: 2, InUse: 4, Opening: 1, WaitTimeouts: 3},
			routes: []pool.RouteStat{route("appdb", "alice", 3, 1, 2, 1), route("appdb", "bob", 2, 0, 2, 2),
				route("otherdb", "alice", 1, 1, 0, 0)},
		},
		Clients:             func() ClientStates { return ClientStates{Active: 4, Pinned: 1, Waiting: 2, Idle: 9} },
		Traffic:             func() (int64, int64) { return 100, 2000 },
		Upstream:            func() (bool, bool) { return false, false },
		LoginFailureReasons: []string{"auth_failed"},
	}
	c := newCollector(src)
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	want := `
# HELP go_sql_open_connections The number of established connections both in use and idle.
# TYPE go_sql_open_connections gauge
go_sql_open_connections{db_name="appdb"} 5
go_sql_open_connections{db_name="otherdb"} 1
# HELP go_sql_wait_count_total The total number of connections waited for.
# TYPE go_sql_wait_count_total counter
go_sql_wait_count_total{db_name="appdb"} 3
go_sql_wait_count_total{db_name="otherdb"} 0
# HELP go_sql_max_idle_closed_total The total number of connections closed due to SetMaxIdleConns.
# TYPE go_sql_max_idle_closed_total counter
go_sql_max_idle_closed_total{db_name="appdb"} 4
go_sql_max_idle_closed_total{db_name="otherdb"} 2
# HELP go_sql_max_open_connections Maximum number of open connections to the database.
# TYPE go_sql_max_open_connections gauge
go_sql_max_open_connections{db_name="appdb"} 10
go_sql_max_open_connections{db_name="otherdb"} 10
# HELP pggovernor_clients Logged-in clients by state: active (holding a server connection), pinned (holding one for session state), waiting (for one), idle.
# TYPE pggovernor_clients gauge
pggovernor_clients{state="active"} 4
pggovernor_clients{state="idle"} 9
pggovernor_clients{state="pinned"} 1
pggovernor_clients{state="waiting"} 2
# HELP pggovernor_budget_share_connections This replica's share of the connection budget.
# TYPE pggovernor_budget_share_connections gauge
pggovernor_budget_share_connections 10
# HELP pggovernor_wait_timeouts_total Waits for a server connection that ended after timeouts.query_wait (clients got SQLSTATE 53300 or 08006).
# TYPE pggovernor_wait_timeouts_total counter
pggovernor_wait_timeouts_total 3
`
	names := []string{"go_sql_open_connections", "go_sql_wait_count_total", "go_sql_max_idle_closed_total",
		"go_sql_max_open_connections", "pggovernor_clients", "pggovernor_budget_share_connections", "pggovernor_wait_timeouts_total"}
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), names...); err != nil {
		t.Fatal(err)
	}
	// The upstream's state is unknown: no pggovernor_upstream_up series;
	// no cluster: no lease series.
	for _, absent := range []string{"pggovernor_upstream_up", "pggovernor_cluster_leases"} {
		if n := testutil.CollectAndCount(c, absent); n != 0 {
			t.Fatalf("%s: want = absent, got %d series", absent, n)
		}
	}
	// The cluster-wide budget, when shared, replaces total and share.
	src.Cluster = func() (ClusterStats, bool) {
		return ClusterStats{Total: 40, Share: 10, Leases: 7, Replicas: 4, Borrowed: 2, Rebalances: 3, Losses: 1}, true
	}
	c = newCollector(src)
	if err := testutil.CollectAndCompare(c, strings.NewReader(`
# HELP pggovernor_budget_connections The connection budget: server connections allowed over every replica sharing it (this replica's alone without budget.cluster).
# TYPE pggovernor_budget_connections gauge
pggovernor_budget_connections 40
# HELP pggovernor_cluster_leases Leases this replica holds on the cluster budget, its control connection's included (budget.cluster).
# TYPE pggovernor_cluster_leases gauge
pggovernor_cluster_leases 7
# HELP pggovernor_cluster_borrowed_leases Leases this replica holds beyond its fair share, borrowed while other replicas do not need them (budget.cluster).
# TYPE pggovernor_cluster_borrowed_leases gauge
pggovernor_cluster_borrowed_leases 2
# HELP pggovernor_cluster_rebalances_total Times this replica gave leases back because another replica had waiting clients (budget.cluster).
# TYPE pggovernor_cluster_rebalances_total counter
pggovernor_cluster_rebalances_total 3
# HELP pggovernor_cluster_lease_losses_total Times this replica lost its control connection, and with it its leases (budget.cluster).
# TYPE pggovernor_cluster_lease_losses_total counter
pggovernor_cluster_lease_losses_total 1
`), "pggovernor_budget_connections", "pggovernor_cluster_leases", "pggovernor_cluster_borrowed_leases",
		"pggovernor_cluster_rebalances_total", "pggovernor_cluster_lease_losses_total"); err != nil {
		t.Fatal(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Fatalf("lint of the cluster metrics: want none, got = %v (%v)", problems, err)
	}
}

// TestMetricsHandlesAndHandler: the pushed metrics lint clean, the TLS and
// IAM figures read at scrape time produce their series, and the HTTP
// handler serves
// /metrics, /healthz, /readyz and pprof only when asked.
func TestMetricsHandlesAndHandler(t *testing.T) {
	reg := NewRegistry()
	m := New(reg, Sources{LoginFailureReasons: []string{"auth_failed", "timeout"}, Security: func() Security {
		return Security{Certificates: map[string]time.Time{"clients.tls.cert_file": time.Unix(2000000000, 0)}, Minted: 1, MintFailures: 1}
	}})
	m.WaitSeconds.Observe(0.2)
	m.ErrorSent("53300")
	m.LoginFailed("auth_failed")
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP pggovernor_iam_token_mints_total RDS IAM authentication tokens minted, by result (success or failure).
# TYPE pggovernor_iam_token_mints_total counter
pggovernor_iam_token_mints_total{result="failure"} 1
pggovernor_iam_token_mints_total{result="success"} 1
# HELP pggovernor_tls_certificate_expiry_timestamp_seconds When a TLS certificate pggovernor presents expires (Unix time), by the configuration key of its file.
# TYPE pggovernor_tls_certificate_expiry_timestamp_seconds gauge
pggovernor_tls_certificate_expiry_timestamp_seconds{certificate="clients.tls.cert_file"} 2e+09
# HELP pggovernor_login_failures_total Client logins that failed, by reason.
# TYPE pggovernor_login_failures_total counter
pggovernor_login_failures_total{reason="auth_failed"} 1
pggovernor_login_failures_total{reason="timeout"} 0
`), "pggovernor_iam_token_mints_total", "pggovernor_tls_certificate_expiry_timestamp_seconds", "pggovernor_login_failures_total"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(m.errorsSent); n != len(governorSQLSTATEs) {
		t.Fatalf("errors_sent series: want = %d (started at zero), got = %d", len(governorSQLSTATEs), n)
	}

	for _, tc := range []struct {
		pprof bool
		path  string
		want  int
	}{
		{false, "/metrics", 200}, {false, "/healthz", 200}, {false, "/readyz", 503}, {false, "/debug/pprof/", 404},
		{true, "/debug/pprof/", 200}, {true, "/debug/pprof/goroutine?debug=1", 200},
		{true, "/debug/pprof/cmdline", 404}, // the command line may hold a password
	} {
		h := NewHandler(HandlerOptions{Gatherer: reg, Ready: func() error { return errTest{} }, Pprof: tc.pprof})
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, tc.path, nil))
		if rec.Code != tc.want {
			t.Fatalf("GET %s (pprof %v): want = %d, got = %d", tc.path, tc.pprof, tc.want, rec.Code)
		}
	}
}

type errTest struct{}

func (errTest) Error() string { return "test error" }
