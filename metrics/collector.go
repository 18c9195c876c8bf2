package metrics

import (
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pggovernor/pggovernor/pool"
)

// PoolSource is what the collector reads from the pool at scrape time.
// *pool.Pool is one.
type PoolSource interface {
	Stats() pool.Stats
	Routes() []pool.RouteStat
}

// ClientStates counts logged-in clients by state (the proxy's view).
type ClientStates struct {
	// Active clients hold a server connection; Pinned ones hold it
	// because of session state; Waiting ones wait for one; Idle ones
	// neither hold nor wait.
	Active, Pinned, Waiting, Idle int
}

// ClusterStats is what the cluster-wide budget reports.
type ClusterStats struct {
	// Total is the budget of server connections shared by every replica;
	// Share is this replica's fair part of it.
	Total, Share int
	// Leases counts the leases this replica holds, its control
	// connection's included; Replicas the replicas sharing the budget.
	Leases, Replicas int
	// Borrowed counts the leases held beyond the fair share.
	Borrowed int
	// Rebalances counts the times this replica gave leases back to
	// replicas with waiting clients; Losses the times it lost its control
	// connection, and with it its leases.
	Rebalances, Losses uint64
	// RowsIgnored counts the rows of the membership table ignored, by
	// reason (every reason present, zero included).
	RowsIgnored map[string]uint64
	// ForeignLocks counts the advisory locks of the namespace held by
	// sessions that are not replicas.
	ForeignLocks int
}

// Security are the TLS and RDS IAM figures.
type Security struct {
	// Certificates maps the configuration key of a certificate file
	// (clients.tls.cert_file, upstream.ssl.cert_file) to its expiry.
	Certificates map[string]time.Time
	// Minted and MintFailures count RDS IAM token mints by result.
	Minted, MintFailures uint64
}

// Logins are the figures of clients logging in.
type Logins struct {
	// Pending counts the connections that have not finished logging in
	// (clients.max_pending_logins).
	Pending int64
	// ThrottleDelays counts the failed logins whose answer the throttle
	// delayed; Throttled is the number of (address, user) pairs whose next
	// failure will be.
	ThrottleDelays uint64
	Throttled      int
}

// Sources are what the collector reads at scrape time. Nil fields are
// skipped (their metrics are absent).
type Sources struct {
	// Pool gives the server connections' figures.
	Pool PoolSource
	// Clients counts the logged-in clients by state.
	Clients func() ClientStates
	// Traffic returns the bytes received from and sent to clients so far.
	Traffic func() (received, sent int64)
	// Notifications returns the bytes of notifications waiting to be
	// written to listening clients, and how many clients were disconnected
	// because more than clients.notify_backlog_size waited for them.
	Notifications func() (backlogBytes, overflows int64)
	// Memory returns what the proxy holds for clients' messages beyond
	// their 8 KiB buffers (limits.max_buffered_bytes counts it), and how
	// many client messages were refused for limits.max_buffered_bytes and
	// for pool.max_client_statements.
	Memory func() (bufferedBytes, bufferRefusals, statementRefusals int64)
	// Timeouts returns how many clients were disconnected for
	// timeouts.client_write and timeouts.idle_in_transaction, and how many
	// requests were cancelled for timeouts.query.
	Timeouts func() (clientWrite, idleInTransaction, query int64)
	// Upstream reports whether the upstream server answered the last
	// health probe; known is false before any evidence.
	Upstream func() (up, known bool)
	// Cluster reports the cluster-wide budget; ok is false when budget
	// sharing is off or this replica has not joined yet.
	Cluster func() (stats ClusterStats, ok bool)
	// Security gives the TLS certificates' expiry and the IAM token
	// mints.
	Security func() Security
	// Logins gives the figures of clients logging in.
	Logins func() Logins
	// LoginFailureReasons are started at zero in
	// pggovernor_login_failures_total.
	LoginFailureReasons []string
	// CancelForwardResults and CancelReceivedResults are started at zero
	// in pggovernor_cluster_cancels_forwarded_total and
	// pggovernor_cluster_cancels_received_total.
	CancelForwardResults, CancelReceivedResults []string
	// CancelResults are started at zero in pggovernor_cancel_requests_total.
	CancelResults []string
}

// collector reads the pool's and the proxy's state at scrape time, as
// collectors.NewDBStatsCollector reads sql.DB.Stats(). Its metrics'
// names and help are declared in metrics.go (scrapeDescs).
type collector struct {
	src Sources
	scrapeDescs
}

func newCollector(src Sources) *collector { return &collector{src: src, scrapeDescs: newScrapeDescs()} }

// Describe implements prometheus.Collector.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.maxOpen, c.open, c.inUse, c.idle, c.waitCount, c.waitDuration,
		c.maxIdleClosed, c.maxIdleTimeClosed, c.maxLifetimeClosed, c.clients, c.servers, c.budget, c.budgetShare,
		c.budgetUsed, c.waitTimeouts, c.connects, c.connectErrors, c.received, c.sent, c.upstreamUp, c.paused,
		c.leases, c.replicas, c.borrowed, c.rebalances, c.leaseLosses, c.rowsIgnored, c.foreignLocks, c.certExpiry, c.iamMints,
		c.notifyBacklog, c.notifyOverflows, c.pendingLogins, c.throttleDelays, c.throttled, c.buffered, c.bufferRefusals, c.stmtRefusals,
		c.clientTimeouts, c.upstreamSwitches, c.upstreamPrimary} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	if p := c.src.Pool; p != nil {
		st := p.Stats()
		for _, db := range byDatabase(p.Routes()) {
			gauge(c.maxOpen, float64(st.Limit), db.name)
			gauge(c.open, float64(db.Open), db.name)
			gauge(c.inUse, float64(db.InUse), db.name)
			gauge(c.idle, float64(db.Idle), db.name)
			counter(c.waitCount, float64(db.WaitCount), db.name)
			counter(c.waitDuration, db.WaitDuration.Seconds(), db.name)
			counter(c.maxIdleClosed, float64(db.ClosedSurplus), db.name)
			counter(c.maxIdleTimeClosed, float64(db.ClosedIdle), db.name)
			counter(c.maxLifetimeClosed, float64(db.ClosedLifetime), db.name)
		}
		gauge(c.servers, float64(st.InUse), "active")
		gauge(c.servers, float64(st.Idle), "idle")
		gauge(c.servers, float64(st.Opening), "opening")
		gauge(c.servers, float64(st.Closing), "closing")
		if limit, known := st.Limit, st.LimitKnown; known {
			total, share := limit, limit
			if c.src.Cluster != nil {
				if cs, ok := c.src.Cluster(); ok {
					total, share = cs.Total, cs.Share
				}
			}
			gauge(c.budget, float64(total))
			gauge(c.budgetShare, float64(share))
		}
		gauge(c.budgetUsed, float64(st.Open))
		counter(c.upstreamSwitches, float64(st.UpstreamSwitches))
		if st.UpstreamAddr != "" {
			gauge(c.upstreamPrimary, 1, st.UpstreamAddr)
		}
		counter(c.waitTimeouts, float64(st.WaitTimeouts))
		counter(c.connects, float64(st.Connects))
		counter(c.connectErrors, float64(st.ConnectErrors))
		paused := 0.0
		if st.Paused {
			paused = 1
		}
		gauge(c.paused, paused)
	}
	if c.src.Clients != nil {
		cs := c.src.Clients()
		gauge(c.clients, float64(cs.Active), "active")
		gauge(c.clients, float64(cs.Pinned), "pinned")
		gauge(c.clients, float64(cs.Waiting), "waiting")
		gauge(c.clients, float64(cs.Idle), "idle")
	}
	if c.src.Traffic != nil {
		in, out := c.src.Traffic()
		counter(c.received, float64(in))
		counter(c.sent, float64(out))
	}
	if c.src.Notifications != nil {
		backlog, overflows := c.src.Notifications()
		gauge(c.notifyBacklog, float64(backlog))
		counter(c.notifyOverflows, float64(overflows))
	}
	if c.src.Memory != nil {
		held, refused, stmts := c.src.Memory()
		gauge(c.buffered, float64(held))
		counter(c.bufferRefusals, float64(refused))
		counter(c.stmtRefusals, float64(stmts))
	}
	if c.src.Timeouts != nil {
		write, idleTx, query := c.src.Timeouts()
		counter(c.clientTimeouts, float64(write), "client_write")
		counter(c.clientTimeouts, float64(idleTx), "idle_in_transaction")
		counter(c.clientTimeouts, float64(query), "query")
	}
	if c.src.Upstream != nil {
		if up, known := c.src.Upstream(); known {
			v := 0.0
			if up {
				v = 1
			}
			gauge(c.upstreamUp, v)
		}
	}
	if c.src.Cluster != nil {
		if cs, ok := c.src.Cluster(); ok {
			gauge(c.leases, float64(cs.Leases))
			gauge(c.replicas, float64(cs.Replicas))
			gauge(c.borrowed, float64(cs.Borrowed))
			counter(c.rebalances, float64(cs.Rebalances))
			counter(c.leaseLosses, float64(cs.Losses))
			for reason, n := range cs.RowsIgnored {
				counter(c.rowsIgnored, float64(n), reason)
			}
			gauge(c.foreignLocks, float64(cs.ForeignLocks))
		}
	}
	if c.src.Logins != nil {
		l := c.src.Logins()
		gauge(c.pendingLogins, float64(l.Pending))
		counter(c.throttleDelays, float64(l.ThrottleDelays))
		gauge(c.throttled, float64(l.Throttled))
	}
	var sec Security
	if c.src.Security != nil {
		sec = c.src.Security()
	}
	for name, notAfter := range sec.Certificates {
		gauge(c.certExpiry, float64(notAfter.Unix()), name)
	}
	counter(c.iamMints, float64(sec.Minted), "success")
	counter(c.iamMints, float64(sec.MintFailures), "failure")
}

// dbFigures are a database's figures summed over its routes (one per
// upstream user).
type dbFigures struct {
	name string
	pool.RouteStat
}

func byDatabase(routes []pool.RouteStat) []dbFigures {
	idx := map[string]int{}
	var out []dbFigures
	for _, r := range routes {
		i, ok := idx[r.Route.Database]
		if !ok {
			i = len(out)
			idx[r.Route.Database] = i
			out = append(out, dbFigures{name: r.Route.Database})
		}
		d := &out[i]
		d.Open += r.Open
		d.Idle += r.Idle
		d.InUse += r.InUse
		d.WaitCount += r.WaitCount
		d.WaitDuration += r.WaitDuration
		d.ClosedIdle += r.ClosedIdle
		d.ClosedSurplus += r.ClosedSurplus
		d.ClosedLifetime += r.ClosedLifetime
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}
