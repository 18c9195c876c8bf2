package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pggovernor/pggovernor/pool"
)

// Metrics are pggovernor's own Prometheus metrics. Every name, help string
// and unit is declared in this file: the handles components report to as
// things happen (histograms and counters, resolved once so that reporting
// allocates nothing), and the descriptions (scrapeDescs) of what the
// scrape-time collector (collector.go) reads from the pool and the proxy.
//
// Create one with New on an injected registry; the process holds one.
type Metrics struct {
	// WaitSeconds observes how long clients waited for a server
	// connection: in the FIFO queue, or held by a PAUSE.
	WaitSeconds prometheus.Histogram
	// ServerConnectSeconds observes how long opening a server connection
	// took (successful attempts; failures are counted in
	// pggovernor_server_connect_errors_total).
	ServerConnectSeconds prometheus.Histogram
	// TransactionSeconds and QuerySeconds observe client transactions and
	// queries, from their first message to the server's ReadyForQuery.
	TransactionSeconds, QuerySeconds prometheus.Histogram
	// UpstreamRoundTripSeconds observes round trips to the server: the
	// health probe and the checks of idle connections.
	UpstreamRoundTripSeconds prometheus.Histogram
	// ClusterLeaseAcquireSeconds observes how long clients waited for this
	// replica to get more leases (budget.cluster): from when it saw them
	// waiting with fewer leases than it may hold to when it got more.
	ClusterLeaseAcquireSeconds prometheus.Histogram
	// PreparedHits and PreparedMisses count a client's prepared
	// statements found prepared on the server connection it landed on, or
	// prepared again there (transaction mode).
	PreparedHits, PreparedMisses prometheus.Counter

	errorsSent       *prometheus.CounterVec
	loginFailures    *prometheus.CounterVec
	cancelsForwarded *prometheus.CounterVec
	cancelsReceived  *prometheus.CounterVec
	cancelRequests   *prometheus.CounterVec
}

// namespace prefixes pggovernor's own metric names.
const namespace = "pggovernor"

// latencyBuckets suit round trips, queries and transactions: 100µs to 60s.
func latencyBuckets() []float64 {
	return []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}
}

// waitBuckets suit waits for a server connection: 1ms to timeouts.query_wait's order.
func waitBuckets() []float64 {
	return []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}
}

// governorSQLSTATEs are the codes the governor itself sends most, started
// at zero so that rate() and alerts see them before the first error.
var governorSQLSTATEs = [...]string{"53300", "08006", "57P01", "28P01", "08P01", "57014"}

// New creates the metrics, registers them and the scrape-time collector
// of src on reg, and returns the handles.
func New(reg prometheus.Registerer, src Sources) *Metrics {
	h := func(name, help string, buckets []float64) prometheus.Histogram {
		return prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Name: name, Help: help, Buckets: buckets})
	}
	m := &Metrics{
		WaitSeconds: h("wait_seconds",
			"Time clients waited for a server connection (queued behind the budget, or held by PAUSE).", waitBuckets()),
		ServerConnectSeconds: h("server_connect_seconds",
			"Time taken to open a server connection, authentication included (successful attempts).", latencyBuckets()),
		TransactionSeconds: h("transaction_duration_seconds",
			"Duration of client transactions, from their first message to the ReadyForQuery that ends them.", latencyBuckets()),
		QuerySeconds: h("query_duration_seconds",
			"Duration of client queries (a simple query, or an extended-protocol batch up to Sync), from first message to ReadyForQuery.", latencyBuckets()),
		UpstreamRoundTripSeconds: h("upstream_round_trip_seconds",
			"Round-trip time of an empty query to the upstream server (health probes and idle-connection checks).", latencyBuckets()),
		ClusterLeaseAcquireSeconds: h("cluster_lease_acquire_seconds",
			"Time from when this replica saw clients waiting with fewer leases than it may hold to when it got more (budget.cluster).", waitBuckets()),
		errorsSent: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "errors_sent_total",
			Help: "Errors pggovernor itself sent to clients, by SQLSTATE (errors from the server pass through uncounted)."}, []string{"sqlstate"}),
		loginFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "login_failures_total",
			Help: "Client logins that failed, by reason."}, []string{"reason"}),
		cancelsForwarded: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "cluster_cancels_forwarded_total",
			Help: "Cancel requests for another replica's client (budget.cluster), by result: forwarded, not_member, no_secret (budget.cluster.secret_file unset), address_refused (outside budget.cluster.peer_cidrs), failed."}, []string{"result"}),
		cancelsReceived: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "cluster_cancels_received_total",
			Help: "Cancel requests forwarded by another replica (budget.cluster), by result: accepted, refused (the authentication matched no client's key), no_secret (budget.cluster.secret_file unset here)."}, []string{"result"}),
		cancelRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "cancel_requests_total",
			Help: "Cancel requests received, by result: sent to the server, forwarded to the replica that issued the key, idle (no query running), dropped (unknown key or wrong secret)."}, []string{"result"}),
	}
	prepared := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "prepared_statements_total",
		Help: "Client prepared statements at the start of a transaction (transaction mode): hit, already prepared on the server connection; miss, prepared again."}, []string{"result"})
	m.PreparedHits, m.PreparedMisses = prepared.WithLabelValues("hit"), prepared.WithLabelValues("miss")
	for _, code := range governorSQLSTATEs {
		m.errorsSent.WithLabelValues(code)
	}
	for _, reason := range src.LoginFailureReasons {
		m.loginFailures.WithLabelValues(reason)
	}
	for _, r := range src.CancelForwardResults {
		m.cancelsForwarded.WithLabelValues(r)
	}
	for _, r := range src.CancelReceivedResults {
		m.cancelsReceived.WithLabelValues(r)
	}
	for _, result := range src.CancelResults {
		m.cancelRequests.WithLabelValues(result)
	}
	reg.MustRegister(m.WaitSeconds, m.ServerConnectSeconds, m.TransactionSeconds, m.QuerySeconds, m.UpstreamRoundTripSeconds, m.ClusterLeaseAcquireSeconds,
		m.errorsSent, m.loginFailures, m.cancelsForwarded, m.cancelsReceived, m.cancelRequests, prepared, newCollector(src))
	return m
}

// scrapeDescs describe the metrics the collector (collector.go) reads at
// scrape time.
type scrapeDescs struct {
	// database/sql's family (collectors.NewDBStatsCollector), one series
	// per upstream database.
	maxOpen, open, inUse, idle                           *prometheus.Desc
	waitCount, waitDuration                              *prometheus.Desc
	maxIdleClosed, maxIdleTimeClosed, maxLifetimeClosed  *prometheus.Desc
	clients, servers                                     *prometheus.Desc
	budget, budgetShare, budgetUsed                      *prometheus.Desc
	waitTimeouts, connects, connectErrors                *prometheus.Desc
	received, sent, upstreamUp, paused, leases, replicas *prometheus.Desc
	borrowed, rebalances, leaseLosses                    *prometheus.Desc
	rowsIgnored, foreignLocks                            *prometheus.Desc
	certExpiry, iamMints                                 *prometheus.Desc
	notifyBacklog, notifyOverflows                       *prometheus.Desc
	pendingLogins, throttleDelays, throttled             *prometheus.Desc
	buffered, bufferRefusals, stmtRefusals               *prometheus.Desc
	clientTimeouts                                       *prometheus.Desc
	upstreamSwitches, upstreamPrimary                    *prometheus.Desc
}

func newScrapeDescs() scrapeDescs {
	sql := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc("go_sql_"+name, help, []string{"db_name"}, nil)
	}
	own := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, labels, nil)
	}
	return scrapeDescs{
		// Names and help strings as client_golang's
		// collectors.NewDBStatsCollector, so that dashboards and alerts on
		// an application's go_sql_* work unchanged against the governor.
		maxOpen:           sql("max_open_connections", "Maximum number of open connections to the database."),
		open:              sql("open_connections", "The number of established connections both in use and idle."),
		inUse:             sql("in_use_connections", "The number of connections currently in use."),
		idle:              sql("idle_connections", "The number of idle connections."),
		waitCount:         sql("wait_count_total", "The total number of connections waited for."),
		waitDuration:      sql("wait_duration_seconds_total", "The total time blocked waiting for a new connection."),
		maxIdleClosed:     sql("max_idle_closed_total", "The total number of connections closed due to SetMaxIdleConns."),
		maxIdleTimeClosed: sql("max_idle_time_closed_total", "The total number of connections closed due to SetConnMaxIdleTime."),
		maxLifetimeClosed: sql("max_lifetime_closed_total", "The total number of connections closed due to SetConnMaxLifetime."),

		clients: own("clients", "Logged-in clients by state: active (holding a server connection), pinned (holding one for session state), waiting (for one), idle.", "state"),
		servers: own("server_connections", "Server connections by state: active (held by a client), idle, opening, closing (asked to close, backend not gone yet).", "state"),
		budget: own("budget_connections",
			"The connection budget: server connections allowed over every replica sharing it (this replica's alone without budget.cluster)."),
		budgetShare:   own("budget_share_connections", "This replica's share of the connection budget."),
		budgetUsed:    own("budget_used_connections", "Server connections counted against this replica's share: open, opening or closing."),
		waitTimeouts:  own("wait_timeouts_total", "Waits for a server connection that ended after timeouts.query_wait (clients got SQLSTATE 53300 or 08006)."),
		connects:      own("server_connects_total", "Server connections opened."),
		connectErrors: own("server_connect_errors_total", "Attempts to open a server connection that failed."),
		received:      own("client_received_bytes_total", "Bytes received from clients."),
		sent:          own("client_sent_bytes_total", "Bytes sent to clients."),
		upstreamUp:    own("upstream_up", "1 when the upstream server answered the last health probe, 0 when it did not."),
		upstreamSwitches: own("upstream_switches_total",
			"Times new server connections went to another server than before: after the connections to a server that stopped fitting target_session_attrs (demoted, made read-only, promoted) were retired, or when the server used before did not take a new connection and another host of upstream.url did."),
		upstreamPrimary: own("upstream_primary_info",
			"1, labelled with the address (IP and port) new server connections go to: the primary with target_session_attrs read-write or primary, whichever host of upstream.url fits otherwise.", "address"),
		paused:      own("paused", "1 while a PAUSE from the admin console holds one or more databases."),
		leases:      own("cluster_leases", "Leases this replica holds on the cluster budget, its control connection's included (budget.cluster)."),
		replicas:    own("cluster_replicas", "Replicas seen sharing the connection budget (budget.cluster)."),
		borrowed:    own("cluster_borrowed_leases", "Leases this replica holds beyond its fair share, borrowed while other replicas do not need them (budget.cluster)."),
		rebalances:  own("cluster_rebalances_total", "Times this replica gave leases back because another replica had waiting clients (budget.cluster)."),
		leaseLosses: own("cluster_lease_losses_total", "Times this replica lost its control connection, and with it its leases (budget.cluster)."),
		rowsIgnored: own("cluster_rows_ignored_total",
			"Rows of the membership table ignored (budget.cluster), by reason: heartbeat (not finite or in the future), replica_id, slots, address (not host:port or outside budget.cluster.peer_cidrs), malformed; counted at every heartbeat that reads one, once for one the heartbeat deletes.", "reason"),
		foreignLocks: own("cluster_foreign_locks",
			"Advisory locks of the cluster namespace held by sessions that are not replicas (budget.cluster), as last looked for: the replicas share the leases left."),
		certExpiry: own("tls_certificate_expiry_timestamp_seconds",
			"When a TLS certificate pggovernor presents expires (Unix time), by the configuration key of its file.", "certificate"),
		iamMints: own("iam_token_mints_total", "RDS IAM authentication tokens minted, by result (success or failure).", "result"),
		notifyBacklog: own("notify_backlog_bytes",
			"Bytes of notifications waiting to be written to listening clients (LISTEN through the shared listener connection), summed over them."),
		notifyOverflows: own("notify_backlog_overflows_total",
			"Clients disconnected (SQLSTATE 53200) because more than clients.notify_backlog_size of notifications waited for them."),
		pendingLogins: own("pending_logins",
			"Client connections that have not finished logging in; beyond clients.max_pending_logins the oldest is dropped (pggovernor_login_failures_total{reason=\"too_many_pending\"})."),
		throttleDelays: own("login_throttle_delays_total",
			"Failed logins whose answer was delayed because the user had failed too often from the client's address."),
		throttled: own("login_throttled_pairs",
			"Pairs of client address and user whose next failed login will be answered late."),
		buffered: own("buffered_bytes",
			"Bytes held for clients' messages beyond the connections' 8 KiB buffers (Query and Parse messages being read, kept statement texts, requests kept for a retry), counted against limits.max_buffered_bytes."),
		bufferRefusals: own("buffer_refusals_total",
			"Client messages refused with SQLSTATE 53200 because holding them would have taken pggovernor_buffered_bytes over limits.max_buffered_bytes."),
		stmtRefusals: own("client_statement_refusals_total",
			"Parse messages refused with SQLSTATE 53400 because the client held pool.max_client_statements named prepared statements already."),
		clientTimeouts: own("client_timeouts_total",
			"Clients cut off by a timeout, by setting: client_write (disconnected: took nothing written to it for timeouts.client_write), idle_in_transaction (disconnected with 25P03 after timeouts.idle_in_transaction idle in a transaction), query (request cancelled with 57014 after timeouts.query).", "timeout"),
	}
}

// ErrorSent counts an error the governor sent to a client.
func (m *Metrics) ErrorSent(sqlstate string) { m.errorsSent.WithLabelValues(sqlstate).Inc() }

// CancelForwarded counts a cancel request for another replica's client,
// by result.
func (m *Metrics) CancelForwarded(result string) { m.cancelsForwarded.WithLabelValues(result).Inc() }

// CancelReceived counts a cancel request forwarded by another replica, by
// result.
func (m *Metrics) CancelReceived(result string) { m.cancelsReceived.WithLabelValues(result).Inc() }

// LoginFailed counts a failed login.
func (m *Metrics) LoginFailed(reason string) { m.loginFailures.WithLabelValues(reason).Inc() }

// CancelRequest counts a cancel request dealt with, by result.
func (m *Metrics) CancelRequest(result string) { m.cancelRequests.WithLabelValues(result).Inc() }

// PoolEvents returns the pool callbacks that feed the histograms.
func (m *Metrics) PoolEvents() pool.Events {
	return pool.Events{
		Waited: func(d time.Duration, _ bool) { m.WaitSeconds.Observe(d.Seconds()) },
		Connected: func(_ pool.Route, d time.Duration, err error) {
			if err == nil {
				m.ServerConnectSeconds.Observe(d.Seconds())
			}
		},
		Checked: func(d time.Duration, err error) {
			if err == nil {
				m.UpstreamRoundTripSeconds.Observe(d.Seconds())
			}
		},
	}
}
