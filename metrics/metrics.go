package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pggovernor/pggovernor/pool"
)

// Metrics are pggovernor's own Prometheus metrics. Every name, help string
// and unit is declared in this file: the handles components report to as
// things happen (histograms and counters, resolved once so that reporting
// allocates nothing), and the descriptions of what the scrape-time
// collector (collector.go) reads from the pool and the proxy.
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
	// PreparedHits and PreparedMisses count a client's prepared
	// statements found prepared on the server connection it landed on, or
	// prepared again there (transaction mode).
	PreparedHits, PreparedMisses prometheus.Counter

	errorsSent     *prometheus.CounterVec
	loginFailures  *prometheus.CounterVec
	tokenSuccesses prometheus.Counter
	tokenFailures  prometheus.Counter
	certExpiry     *prometheus.GaugeVec
}

// namespace prefixes pggovernor's own metric names.
const namespace = "pggovernor"

// latencyBuckets suit round trips, queries and transactions: 100µs to 60s.
var latencyBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

// waitBuckets suit waits for a server connection: 1ms to timeouts.query_wait's order.
var waitBuckets = []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}

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
			"Time clients waited for a server connection (queued behind the budget, or held by PAUSE).", waitBuckets),
		ServerConnectSeconds: h("server_connect_seconds",
			"Time taken to open a server connection, authentication included (successful attempts).", latencyBuckets),
		TransactionSeconds: h("transaction_duration_seconds",
			"Duration of client transactions, from their first message to the ReadyForQuery that ends them.", latencyBuckets),
		QuerySeconds: h("query_duration_seconds",
			"Duration of client queries (a simple query, or an extended-protocol batch up to Sync), from first message to ReadyForQuery.", latencyBuckets),
		UpstreamRoundTripSeconds: h("upstream_round_trip_seconds",
			"Round-trip time of an empty query to the upstream server (health probes and idle-connection checks).", latencyBuckets),
		errorsSent: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "errors_sent_total",
			Help: "Errors pggovernor itself sent to clients, by SQLSTATE (errors from the server pass through uncounted)."}, []string{"sqlstate"}),
		loginFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "login_failures_total",
			Help: "Client logins that failed, by reason."}, []string{"reason"}),
		certExpiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Name: "tls_certificate_expiry_timestamp_seconds",
			Help: "When a TLS certificate pggovernor presents or trusts expires (Unix time), by the configuration key of its file."}, []string{"certificate"}),
	}
	prepared := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "prepared_statements_total",
		Help: "Client prepared statements at the start of a transaction (transaction mode): hit, already prepared on the server connection; miss, prepared again."}, []string{"result"})
	m.PreparedHits, m.PreparedMisses = prepared.WithLabelValues("hit"), prepared.WithLabelValues("miss")
	tokens := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "iam_token_mints_total",
		Help: "RDS IAM authentication tokens minted, by result (success or failure)."}, []string{"result"})
	m.tokenSuccesses, m.tokenFailures = tokens.WithLabelValues("success"), tokens.WithLabelValues("failure")
	for _, code := range governorSQLSTATEs {
		m.errorsSent.WithLabelValues(code)
	}
	for _, reason := range src.LoginFailureReasons {
		m.loginFailures.WithLabelValues(reason)
	}
	reg.MustRegister(m.WaitSeconds, m.ServerConnectSeconds, m.TransactionSeconds, m.QuerySeconds, m.UpstreamRoundTripSeconds,
		m.errorsSent, m.loginFailures, prepared, tokens, m.certExpiry, newCollector(src))
	return m
}

// ErrorSent counts an error the governor sent to a client.
func (m *Metrics) ErrorSent(sqlstate string) { m.errorsSent.WithLabelValues(sqlstate).Inc() }

// LoginFailed counts a failed login.
func (m *Metrics) LoginFailed(reason string) { m.loginFailures.WithLabelValues(reason).Inc() }

// CertificateExpiry records when a certificate expires. name is the
// configuration key of its file (clients.tls.cert_file,
// upstream.ssl.cert_file, upstream.ssl.root_cert_file, ...), a bounded set.
//
// TODO: called by TLS termination and upstream mTLS when they load or
// reload a certificate; neither is in this version.
func (m *Metrics) CertificateExpiry(name string, notAfter time.Time) {
	m.certExpiry.WithLabelValues(name).Set(float64(notAfter.Unix()))
}

// TokenMinted counts an RDS IAM token minted (err nil) or a failure.
//
// TODO: called by the awsiamrds connector, not in this version.
func (m *Metrics) TokenMinted(err error) {
	if err != nil {
		m.tokenFailures.Inc()
		return
	}
	m.tokenSuccesses.Inc()
}

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
