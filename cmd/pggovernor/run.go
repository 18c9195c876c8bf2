package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/ratelog"
	"github.com/pggovernor/pggovernor/metrics"
	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/pool/budget"
	"github.com/pggovernor/pggovernor/pool/cluster"
	"github.com/pggovernor/pggovernor/proxy"
	"github.com/pggovernor/pggovernor/tlsconf"
)

// loadConfig parses flags for a subcommand and loads the configuration.
func loadConfig(name string, args, environ []string, stderr io.Writer) (config.Config, error) {
	fs := flag.NewFlagSet("pggovernor "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	flags := config.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return config.Config{}, &exitError{Code: 0}
		}
		return config.Config{}, &exitError{Code: 2, Err: err}
	}
	if fs.NArg() > 0 {
		return config.Config{}, &exitError{Code: 2, Err: fmt.Errorf("unexpected argument %q", fs.Arg(0))}
	}
	cfg, err := config.Load(config.Source{Environ: environ, Flags: flags})
	if err != nil {
		return config.Config{}, &exitError{Code: 2, Err: fmt.Errorf("invalid configuration:\n%w", err)}
	}
	return cfg, nil
}

// newLogger builds the zap logger the configuration asks for; its level
// can be changed later through the returned AtomicLevel.
func newLogger(c config.Log, w io.Writer) (*zap.Logger, zap.AtomicLevel) {
	level := zap.NewAtomicLevel()
	_ = level.UnmarshalText([]byte(c.Level))
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.TimeKey = "ts"
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	var enc zapcore.Encoder
	if c.Format == "console" {
		encCfg.EncodeLevel = zapcore.CapitalLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	} else {
		enc = zapcore.NewJSONEncoder(encCfg)
	}
	core := zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(w)), level)
	return zap.New(ratelog.NewCore(core, c.RepeatInterval, nil)), level
}

// runCommand serves clients until a signal.
func runCommand(ctx context.Context, args, environ []string, stdout, stderr io.Writer) error {
	cfg, err := loadConfig("run", args, environ, stderr)
	if err != nil {
		return err
	}
	logger, level := newLogger(cfg.Log, stderr)
	defer func() { _ = logger.Sync() }()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	g, err := start(ctx, &cfg, logger, withReload(level, func() (config.Config, error) {
		return loadConfig("run", args, environ, io.Discard)
	}))
	if err != nil {
		return &exitError{Code: 1, Err: err}
	}
	logger.Info("pggovernor started", zap.String("version", version), zap.String("listen", g.proxy.Addr().String()),
		zap.String("admin_listen", g.adminAddr()), zap.String("pool_mode", cfg.PoolMode),
		zap.String("upstream", config.RedactURL(cfg.Upstream.URL)), zap.String("model", g.model()),
		zap.Int("gomaxprocs", runtime.GOMAXPROCS(0)))
	fmt.Fprintf(stdout, "pggovernor listening on %s\n", g.proxy.Addr())

	for {
		shutdown := false
		select {
		case <-hup:
			_ = g.reload()
		case err := <-g.serveErr:
			g.stop(logger, time.Second)
			return &exitError{Code: 1, Err: err}
		case <-g.shutdownReq:
			logger.Info("SHUTDOWN from the admin console")
			shutdown = true
		case <-ctx.Done():
			shutdown = true
		}
		if shutdown {
			logger.Info("shutting down: no new clients; in-flight transactions may finish",
				zap.Duration("shutdown_drain", cfg.Timeouts.ShutdownDrain))
			forced := make(chan os.Signal, 1)
			signal.Notify(forced, syscall.SIGINT, syscall.SIGTERM)
			done := make(chan struct{})
			go func() { // owner: runCommand; exits when stop returns
				g.stop(logger, cfg.Timeouts.ShutdownDrain)
				close(done)
			}()
			select {
			case <-done:
			case s := <-forced:
				logger.Warn("second signal: exiting now", zap.String("signal", s.String()))
				return &exitError{Code: 1}
			}
			signal.Stop(forced)
			return nil
		}
	}
}

// governor is one running instance: the pieces and their lifecycle.
type governor struct {
	cfg     *config.Config
	logger  *zap.Logger
	users   *auth.Users
	hba     *auth.HBA // nil without clients.hba_file
	pool    *pool.Pool
	proxy   *proxy.Server
	control *pgxpool.Pool
	// controlAddr is the address the control connection reached, as of
	// its last connect (nil before).
	controlAddr atomic.Pointer[string]
	cluster     *cluster.Manager // nil without budget.cluster
	up          *upstream
	clientTLS   *tlsconf.Server // nil with clients.tls.mode disable
	throttle    *auth.Throttle
	admin       *http.Server
	adminLn     net.Listener
	cancel      context.CancelFunc
	bg          sync.WaitGroup // the budget and probe loops
	serveErr    chan error
	// registry holds every metric; metrics are the handles.
	registry *prometheus.Registry
	metrics  *metrics.Metrics
	health   *upstreamHealth
	// shutdownReq receives SHUTDOWN from the admin console.
	shutdownReq chan struct{}
	// reloadMu serialises reloads (SIGHUP, RELOAD); level and load are
	// what reload applies and re-reads (see withReload).
	reloadMu sync.Mutex
	level    zap.AtomicLevel
	load     func() (config.Config, error)
}

// option adjusts what start builds (functional options): the seams tests
// replace and what reload needs.
type option func(*startDeps)

// withReload lets reload re-read the configuration with load and apply its
// log level to level (the command passes the loader of its flags, file and
// environment; without it, reload re-reads the users file only).
func withReload(level zap.AtomicLevel, load func() (config.Config, error)) option {
	return func(d *startDeps) { d.level, d.load = level, load }
}

// startDeps are what options set: the seams tests replace (what a test
// cannot set through the configuration) and what reload needs.
type startDeps struct {
	// awsCredentials replaces the AWS default credential chain.
	awsCredentials aws.CredentialsProvider
	// clock drives the IAM token cache and the login throttle.
	clock auth.Clock
	// level and load: see withReload.
	level zap.AtomicLevel
	load  func() (config.Config, error)
	// replayUnnamed: see withReplayUnnamed.
	replayUnnamed bool
	// lookup replaces the resolver of the upstream's host names.
	lookup pgconn.LookupFunc
}

// withLookup resolves the upstream's host names with f instead of the
// system's resolver (a test's DNS whose answer changes).
func withLookup(f pgconn.LookupFunc) option { return func(d *startDeps) { d.lookup = f } }

// withReplayUnnamed releases a client's server connection between a Parse
// of the unnamed statement and its Bind, and prepares it again where the
// Bind lands (proxy.Options.ReplayUnnamed): for the benchmark that chose
// linking.
func withReplayUnnamed() option { return func(d *startDeps) { d.replayUnnamed = true } }

// withAWSCredentials signs RDS IAM tokens with p instead of the default
// chain.
func withAWSCredentials(p aws.CredentialsProvider) option {
	return func(d *startDeps) { d.awsCredentials = p }
}

// withClock replaces the system clock.
func withClock(c auth.Clock) option { return func(d *startDeps) { d.clock = c } }

// start builds and starts every piece; on error, what was started is
// stopped.
func start(ctx context.Context, cfg *config.Config, logger *zap.Logger, opts ...option) (*governor, error) {
	deps := startDeps{clock: auth.SystemClock{}}
	for _, o := range opts {
		o(&deps)
	}
	users, err := auth.NewUsers(cfg.Clients.UsersFile, auth.WithUsersLogger(logger.Named("users")))
	if err != nil {
		return nil, fmt.Errorf("key clients.users_file: %w", err)
	}
	var hba *auth.HBA
	if cfg.Clients.HBAFile != "" {
		if hba, err = auth.NewHBA(cfg.Clients.HBAFile, hbaOptions(cfg, logger.Named("hba"))); err != nil {
			return nil, fmt.Errorf("key clients.hba_file: %w", err)
		}
		if cfg.AuthIgnored() {
			logger.Warn("clients.auth is not used: clients.hba_file decides each login's method; remove clients.auth")
		}
	}
	for _, err := range exposedSecretFiles(cfg) {
		logger.Warn("a file holding secrets is readable by others", zap.Error(err))
	}
	up, err := newUpstream(ctx, cfg, users, logger, deps)
	if err != nil {
		return nil, err
	}
	var clientTLS *tlsconf.Server
	if cfg.Clients.TLS.Mode != tlsconf.ModeDisable {
		clientTLS, err = tlsconf.NewServer(tlsconf.ServerOptions{
			Mode:         cfg.Clients.TLS.Mode,
			CertFile:     cfg.Clients.TLS.CertFile,
			KeyFile:      cfg.Clients.TLS.KeyFile,
			ClientCAFile: cfg.Clients.TLS.ClientCAFile,
			Logger:       logger.Named("tls"),
		})
		if err != nil {
			return nil, fmt.Errorf("key %w", err)
		}
	}
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	g := &governor{cfg: cfg, logger: logger, users: users, hba: hba, up: up, clientTLS: clientTLS, cancel: cancel,
		throttle: auth.NewThrottle(auth.ThrottleOptions{Clock: deps.clock}),
		serveErr: make(chan error, 1), shutdownReq: make(chan struct{}, 1),
		health: &upstreamHealth{logger: logger.Named("health")}, registry: metrics.NewRegistry(),
		level: deps.level, load: deps.load}
	// The metrics read the pool and the proxy at scrape time through
	// these closures; both exist before the first scrape.
	g.metrics = metrics.New(g.registry, metrics.Sources{
		Pool:    poolSource{g},
		Clients: g.clientStates,
		Traffic: g.traffic,
		Notifications: func() (int64, int64) {
			if g.proxy == nil {
				return 0, 0
			}
			st := g.proxy.Stats()
			return st.NotifyBacklog, st.NotifyOverflows
		},
		Memory: func() (int64, int64, int64) {
			if g.proxy == nil {
				return 0, 0, 0
			}
			st := g.proxy.Stats()
			return st.BufferedBytes, st.BufferRefusals, st.StatementRefusals
		},
		Timeouts: func() (int64, int64, int64) {
			if g.proxy == nil {
				return 0, 0, 0
			}
			st := g.proxy.Stats()
			return st.ClientWriteTimeouts, st.IdleInTransactionTimeouts, st.QueryTimeouts
		},
		Upstream: func() (bool, bool) { up, known, _ := g.health.state(); return up, known },
		Cluster:  g.clusterStats,
		Security: g.securityMetrics,
		Logins:   g.loginFigures,
		LoginFailureReasons: func() []string {
			r := proxy.LoginFailureReasons()
			return r[:]
		}(),
		CancelForwardResults: func() []string {
			r := proxy.CancelForwardResults()
			return r[:]
		}(),
		CancelReceivedResults: func() []string {
			r := proxy.CancelReceivedResults()
			return r[:]
		}(),
		CancelResults: proxy.CancelResults(),
	})
	events := g.metrics.PoolEvents()
	observeConnect := events.Connected
	events.Connected = func(r pool.Route, d time.Duration, err error) {
		observeConnect(r, d, err)
		g.health.connected(r, d, err)
	}
	clustered := cfg.Budget.Cluster.Enabled
	events.Queued = func() {
		if m := g.cluster; m != nil { // set before the first client
			m.Queued()
		}
	}
	events.Retired = g.upstreamRetired
	base := up.base
	switch u := cfg.Timeouts.ServerUnreachable; {
	case clustered:
		// The server drops a vanished replica's connections before the
		// others may take its leases (pool/cluster's keepalive bound).
		base = up.base.Copy()
		maps.Copy(base.RuntimeParams, cluster.ServerParams(cfg.Budget.Cluster.MemberTimeout))
	case u > 0:
		// A silent server is given up within u, and the server drops what
		// it cannot reach within u/2: before a connection given up is
		// replaced (timeouts.server_unreachable).
		base = up.base.Copy()
		maps.Copy(base.RuntimeParams, cluster.ServerParams(u))
		base.DialFunc = cluster.Dialer(2 * u).DialContext
	}
	g.pool = pool.New(pool.Options{
		Connector: &pool.UpstreamConnector{Base: base, Password: up.password, Prepare: up.prepare,
			Timeout: cfg.Timeouts.ServerConnect, LoadBalance: up.loadBalance},
		Target:           up.target,
		LoadBalance:      up.loadBalance,
		HoldOnSwitch:     clustered,
		Logger:           logger.Named("pool"),
		ServerIdle:       cfg.Timeouts.ServerIdle,
		ServerLifetime:   cfg.Timeouts.ServerLifetime,
		ServerCheckDelay: cfg.Timeouts.ServerCheckDelay,
		RouteIdleTimeout: cfg.Pool.RouteIdleTimeout,
		Events:           events,
	})
	var peers clusterPeers
	if clustered {
		if peers, err = newClusterPeers(cfg, logger); err != nil {
			cancel()
			g.pool.Close(ctx)
			return nil, err
		}
	}
	if clustered || cfg.Budget.Max == 0 {
		var id *controlIdentity
		id, err = newControlIdentity(cfg, up, logger, deps)
		if err == nil {
			g.control, err = newControlPool(bg, cfg, up, id, &g.controlAddr)
		}
		if err != nil {
			cancel()
			g.pool.Close(ctx)
			return nil, err
		}
	}
	var store *cluster.PgStore
	switch {
	case clustered:
		store = &cluster.PgStore{Pool: g.control, Namespace: int32(cfg.Budget.Cluster.Namespace), Table: cfg.Budget.Cluster.Table,
			MaxID: proxy.MaxReplicaID}
		host, _ := os.Hostname()
		g.cluster = cluster.New(cluster.Options{
			Store:         store,
			Pool:          g.pool,
			Max:           cfg.Budget.Max,
			Reserve:       cfg.Budget.Reserve,
			CountForeign:  cfg.Budget.Cluster.CountForeign,
			Heartbeat:     cfg.Budget.Cluster.HeartbeatInterval,
			MemberTimeout: cfg.Budget.Cluster.MemberTimeout,
			MaxID:         proxy.MaxReplicaID,
			Name:          fmt.Sprintf("%s pid %d", host, os.Getpid()),
			Addr:          func() string { return g.advertiseAddr(store) },
			PeerAllowed:   peers.allowed.Allows,
			Logger:        logger.Named("cluster"),
			Events: cluster.Events{
				RoundTrip: func(d time.Duration, err error) {
					if err == nil {
						g.metrics.UpstreamRoundTripSeconds.Observe(d.Seconds())
					}
					g.health.record(err == nil, err)
					g.heartbeatRefused(err)
				},
				Acquired: func(d time.Duration) { g.metrics.ClusterLeaseAcquireSeconds.Observe(d.Seconds()) },
			},
		})
	case cfg.Budget.Max > 0:
		g.pool.SetLimit(cfg.Budget.Max)
	default:
		g.bg.Add(1)
		go func() { // owner: governor; exits when g.cancel is called
			defer g.bg.Done()
			budget.Run(bg, budget.Options{
				Control:  g.control,
				Timeout:  cfg.Timeouts.ServerConnect,
				Reserve:  cfg.Budget.Reserve,
				Interval: cfg.Budget.RefreshInterval,
				Apply:    g.pool.SetLimit,
				Unknown:  g.pool.SetLimitError,
				Logger:   logger.Named("budget"),
			})
		}()
	}
	if !clustered {
		// In cluster mode the heartbeats are the probe: the lease manager
		// holds the one control connection.
		g.bg.Add(1)
		go func() { // owner: governor; exits when g.cancel is called
			defer g.bg.Done()
			g.health.probeLoop(bg, probeOptions{
				interval: cfg.Admin.ProbeInterval,
				timeout:  cfg.Timeouts.ServerConnect,
				control:  g.control,
				pool:     g.pool,
				target:   up.target,
				observe:  func(d time.Duration) { g.metrics.UpstreamRoundTripSeconds.Observe(d.Seconds()) },
			})
		}()
	}
	var proxyPeers proxy.Peers
	if g.cluster != nil {
		proxyPeers = g.cluster
	}
	verifier := auth.NewVerifier(cfg.Clients.Auth, users, auth.WithThrottle(g.throttle), auth.WithHBA(hba),
		auth.WithPasswordEncryption(cfg.Clients.PasswordEncryption))
	g.proxy = proxy.NewServer(proxy.Options{
		Config:           cfg,
		Pool:             g.pool,
		Verifier:         verifier,
		TLS:              clientTLS,
		ReplayUnnamed:    deps.replayUnnamed,
		UpstreamUser:     up.sidecarUser,
		PrepareOnControl: g.prepareOnControl(cfg),
		Logger:           logger.Named("proxy"),
		Metrics: proxy.Metrics{
			QueryDuration:         g.metrics.QuerySeconds,
			TransactionDuration:   g.metrics.TransactionSeconds,
			ErrorSent:             g.metrics.ErrorSent,
			LoginFailed:           g.metrics.LoginFailed,
			CancelRequest:         g.metrics.CancelRequest,
			PreparedStatementHit:  g.metrics.PreparedHits,
			PreparedStatementMiss: g.metrics.PreparedMisses,
			CancelForwarded:       g.metrics.CancelForwarded,
			CancelReceived:        g.metrics.CancelReceived,
		},
		Console: proxy.ConsoleOptions{
			Version:      version,
			UpstreamHost: up.base.Host,
			UpstreamPort: int(up.base.Port),
			Reload:       g.reload,
			Shutdown: func() {
				select {
				case g.shutdownReq <- struct{}{}:
				default: // already requested
				}
			},
		},
		Peers:       proxyPeers,
		PeerSecret:  peers.secret,
		PeerAllowed: peers.allowed.Allows,
	})
	if err := g.proxy.Listen(); err != nil {
		g.stop(logger, 0)
		return nil, err
	}
	if g.cluster != nil {
		g.bg.Add(1)
		go func() { // owner: governor; exits when g.cancel is called
			defer g.bg.Done()
			g.cluster.Run(bg)
		}()
	}
	if cfg.AdminListen != "" {
		ln, err := net.Listen("tcp", cfg.AdminListen)
		if err != nil {
			g.stop(logger, 0)
			return nil, fmt.Errorf("listening on %s (key admin_listen): %w", cfg.AdminListen, err)
		}
		g.adminLn = ln
		if cfg.Admin.Pprof && !config.IsLoopback(cfg.AdminListen) {
			logger.Warn("admin.pprof is on and admin_listen is not a loopback address: whoever reaches it can profile the process and read its memory statistics; listen on 127.0.0.1 and use kubectl port-forward",
				zap.String("admin_listen", cfg.AdminListen))
		}
		g.admin = &http.Server{
			Handler:           metrics.NewHandler(metrics.HandlerOptions{Gatherer: g.registry, Ready: g.ready, Pprof: cfg.Admin.Pprof}),
			ReadHeaderTimeout: 10 * time.Second,
		}
		go func() { _ = g.admin.Serve(ln) }() // owner: governor; exits at admin.Shutdown
	}
	go func() { // owner: governor; exits when the listeners close
		if err := g.proxy.Serve(); err != nil {
			g.serveErr <- err
		}
	}()
	return g, nil
}

// hbaOptions are what clients.hba_file is checked against: the TLS, users
// file and listen settings.
func hbaOptions(cfg *config.Config, logger *zap.Logger) auth.HBAOptions {
	tls := cfg.Clients.TLS.Mode != tlsconf.ModeDisable
	return auth.HBAOptions{
		TLS:         tls,
		ClientCA:    tls && cfg.Clients.TLS.ClientCAFile != "",
		UsersFile:   cfg.Clients.UsersFile != "",
		TrustRemote: cfg.Clients.AllowTrustRemote || config.IsLoopback(cfg.Listen),
		Logger:      logger,
	}
}

// ready is /readyz: listening and not draining, not paused, the upstream
// reachable (see upstreamHealth), the budget known and positive.
func (g *governor) ready() error {
	if !g.proxy.Ready() {
		return errors.New("not accepting clients (starting or draining)")
	}
	if all, dbs := g.pool.Paused(); all {
		return errors.New("paused by the admin console (every database); RESUME ends it")
	} else if len(dbs) > 0 {
		return fmt.Errorf("paused by the admin console (%s); RESUME ends it", strings.Join(dbs, ", "))
	}
	if up, known, err := g.health.state(); known && !up {
		return fmt.Errorf("the upstream server is unreachable: %v", err)
	}
	n, known := g.pool.Limit()
	switch {
	case !known && g.cluster != nil:
		return errors.New("this replica has not joined the cluster budget yet (budget.cluster; upstream unreachable, or the budget in use by the other replicas?)")
	case !known:
		return errors.New("the connection budget is not known yet (upstream unreachable?)")
	case n <= 0 && g.cluster != nil:
		return errors.New("this replica holds no lease for a server connection (budget.cluster): its control connection is down, or the cluster budget is too small for the replicas")
	case n <= 0:
		return errors.New("the connection budget is zero")
	}
	return nil
}

// clusterStats gives the metrics the cluster budget, in server
// connections (each replica's control connection holds a lease too).
func (g *governor) clusterStats() (metrics.ClusterStats, bool) {
	if g.cluster == nil {
		return metrics.ClusterStats{}, false
	}
	st := g.cluster.Stats()
	if !st.Known {
		return metrics.ClusterStats{}, false
	}
	locks := 0
	for _, h := range st.LockHolders {
		locks += h.Leases + h.Members
	}
	return metrics.ClusterStats{Total: st.Budget.Servers(), Share: max(st.Share-1, 0), Leases: st.Leases, Replicas: len(st.Members),
		Borrowed: st.Borrowed, Rebalances: st.Rebalances, Losses: st.Losses, RowsIgnored: st.Ignored, ForeignLocks: locks}, true
}

// clusterPeers are what cancel forwarding between replicas needs
// (budget.cluster): where peers may be, and the shared key.
type clusterPeers struct {
	allowed cluster.Prefixes
	// secret returns the key, nil without budget.cluster.secret_file.
	secret func() []byte
}

// minPeerSecret is the shortest key budget.cluster.secret_file may hold.
const minPeerSecret = 16

// newClusterPeers parses budget.cluster.peer_cidrs and reads
// budget.cluster.secret_file (read again when it changes).
func newClusterPeers(cfg *config.Config, logger *zap.Logger) (clusterPeers, error) {
	c := cfg.Budget.Cluster
	var p clusterPeers
	var err error
	if p.allowed, err = cluster.ParsePrefixes(c.PeerCIDRs); err != nil {
		return p, fmt.Errorf("key budget.cluster.peer_cidrs: %w", err)
	}
	if c.SecretFile == "" {
		logger.Warn("budget.cluster.secret_file is not set: cancel requests are not forwarded between replicas (a cancel request that reaches a replica other than the client's is dropped)")
		return p, nil
	}
	sf, err := auth.NewSecretFile(auth.SecretFileNames{Key: "budget.cluster.secret_file", Noun: "cluster secret file",
		Use: "forwarded cancel requests use the new key", Keep: "forwarded cancel requests use the last key read"}, c.SecretFile, logger.Named("cluster"))
	if err != nil {
		return p, err
	}
	if k, _ := sf.Password(context.Background()); len(k) < minPeerSecret {
		return p, fmt.Errorf("key budget.cluster.secret_file: %s holds %d bytes; the key must have at least %d (make one with: openssl rand -base64 32)", c.SecretFile, len(k), minPeerSecret)
	}
	p.secret = func() []byte {
		k, _ := sf.Password(context.Background())
		if len(k) < minPeerSecret {
			return nil
		}
		return []byte(k)
	}
	return p, nil
}

// advertiseAddr is where peers forward cancel requests for this replica's
// clients: budget.cluster.advertise_address, else the listen host (or,
// for a wildcard, the address this replica reaches the server from) with
// the port it listens on.
func (g *governor) advertiseAddr(store *cluster.PgStore) string {
	if a := g.cfg.Budget.Cluster.AdvertiseAddress; a != "" {
		return a
	}
	_, port, err := net.SplitHostPort(g.proxy.Addr().String())
	if err != nil {
		return ""
	}
	host, _, _ := net.SplitHostPort(g.cfg.Listen)
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		if host = store.LocalHost(); host == "" {
			return ""
		}
	}
	return net.JoinHostPort(host, port)
}

// poolSource gives the metrics the pool's figures.
type poolSource struct{ g *governor }

func (s poolSource) Stats() pool.Stats        { return s.g.pool.Stats() }
func (s poolSource) Routes() []pool.RouteStat { return s.g.pool.Routes() }

// clientStates and traffic give the metrics the proxy's figures (none
// before the proxy exists).
func (g *governor) clientStates() metrics.ClientStates {
	if g.proxy == nil {
		return metrics.ClientStates{}
	}
	cs := g.proxy.ClientStates()
	return metrics.ClientStates{Active: cs.Active, Pinned: cs.Pinned, Waiting: cs.Waiting, Idle: cs.Idle}
}

func (g *governor) traffic() (received, sent int64) {
	if g.proxy == nil {
		return 0, 0
	}
	for _, t := range g.proxy.Totals() {
		received += t.BytesIn
		sent += t.BytesOut
	}
	return received, sent
}

func (g *governor) adminAddr() string {
	if g.adminLn == nil {
		return ""
	}
	return g.adminLn.Addr().String()
}

func (g *governor) model() string {
	if g.up.sidecarUser != "" {
		return "sidecar (every client served as " + g.up.sidecarUser + ")"
	}
	return "multi-role (each client's own user upstream)"
}

// reload applies what can change without a restart (SIGHUP, and RELOAD
// from the admin console): the users file, the hba file, the log level and
// admin.users. The other keys keep their values until a restart.
func (g *governor) reload() error {
	g.reloadMu.Lock()
	defer g.reloadMu.Unlock()
	var errs []error
	if err := g.users.Reload(); err != nil {
		// The users file logged what is in force now (it fails closed).
		errs = append(errs, fmt.Errorf("reloading clients.users_file: %w", err))
	} else {
		g.logger.Info("users file reloaded", zap.String("file", g.users.Path()), zap.Int("users", g.users.Current().Len()))
	}
	if g.hba != nil {
		if err := g.hba.Reload(); err != nil {
			g.logger.Error("reloading the hba file failed; keeping the previous rules (fix clients.hba_file)", zap.String("file", g.hba.Path()), zap.Error(err))
			errs = append(errs, err)
		} else {
			g.logger.Info("hba file reloaded", zap.String("file", g.hba.Path()), zap.Int("rules", g.hba.Current().Len()))
		}
	}
	if g.load == nil {
		return errors.Join(errs...)
	}
	cfg, err := g.load()
	if err != nil {
		g.logger.Error("reloading the configuration failed; keeping the previous settings", zap.Error(err))
		return errors.Join(append(errs, err)...)
	}
	if cfg.Log.Level != g.level.String() {
		_ = g.level.UnmarshalText([]byte(cfg.Log.Level))
		g.logger.Info("log level changed", zap.String("log_level", cfg.Log.Level)) // not "level": the encoder's key
	}
	g.proxy.Reconfigure(&cfg)
	return errors.Join(errs...)
}

// securityStats are the numbers of the security pieces, kept for the
// metrics endpoint: the certificates' remaining validity, reloads, IAM
// token mint results, the login throttle.
type securityStats struct {
	UpstreamTLS tlsconf.UpstreamStats
	ClientTLS   *tlsconf.ServerStats // nil with clients.tls.mode disable
	IAM         *auth.IAMStats       // nil unless upstream.connector is awsiamrds
	Throttle    auth.ThrottleStats
}

func (g *governor) securityStats() securityStats {
	st := securityStats{UpstreamTLS: g.up.tls.Stats(), Throttle: g.throttle.Stats()}
	if g.clientTLS != nil {
		s := g.clientTLS.Stats()
		st.ClientTLS = &s
	}
	if g.up.iam != nil {
		s := g.up.iam.Stats()
		st.IAM = &s
	}
	return st
}

// loginFigures are the figures of clients logging in, for the metrics.
func (g *governor) loginFigures() metrics.Logins {
	var l metrics.Logins
	if g.proxy != nil {
		l.Pending = g.proxy.Stats().PendingLogins
	}
	st := g.throttle.Stats()
	l.ThrottleDelays, l.Throttled = st.Delayed, st.Throttled
	return l
}

// exposedSecretFiles checks the files that hold secrets — the users file,
// the password files, the private keys, the cluster's key — for others'
// read access (auth.CheckSecretMode): a warning at start and in doctor.
func exposedSecretFiles(cfg *config.Config) []error {
	var errs []error
	for _, f := range [...][2]string{
		{"clients.users_file", cfg.Clients.UsersFile},
		{"upstream.password_file", cfg.Upstream.PasswordFile},
		{"budget.cluster.control_password_file", cfg.Budget.Cluster.ControlPasswordFile},
		{"budget.cluster.secret_file", cfg.Budget.Cluster.SecretFile},
		{"clients.tls.key_file", cfg.Clients.TLS.KeyFile},
		{"upstream.ssl.key_file", cfg.Upstream.SSL.KeyFile},
	} {
		if f[1] == "" {
			continue
		}
		if err := auth.CheckSecretMode(f[0], f[1]); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// securityMetrics turns the TLS and IAM figures into what the metrics
// export: certificates by the configuration key of their file, and IAM
// token mints by result.
func (g *governor) securityMetrics() metrics.Security {
	st := g.securityStats()
	out := metrics.Security{Certificates: map[string]time.Time{}}
	if !st.UpstreamTLS.ClientCertNotAfter.IsZero() {
		out.Certificates["upstream.ssl.cert_file"] = st.UpstreamTLS.ClientCertNotAfter
	}
	if st.ClientTLS != nil && !st.ClientTLS.CertNotAfter.IsZero() {
		out.Certificates["clients.tls.cert_file"] = st.ClientTLS.CertNotAfter
	}
	if st.IAM != nil {
		out.Minted = st.IAM.Minted
		out.MintFailures = st.IAM.NoCredentials + st.IAM.NoRegion + st.IAM.Other
	}
	return out
}

// stopGrace is how long the stop may take after the drain: the process
// exits within timeouts.shutdown_drain + 1 s of the signal, whatever the
// clients do (the proxy's forced drain takes at most 600 ms of it).
const stopGrace = 900 * time.Millisecond

// stop shuts down in order: readiness off and listeners closed, clients
// drained for up to drain, then server connections closed. It returns
// within drain + stopGrace.
func (g *governor) stop(logger *zap.Logger, drain time.Duration) {
	exitBy := time.Now().Add(drain + stopGrace)
	if err := g.pool.Resume(""); err == nil {
		logger.Info("shutting down: paused databases resumed so that their clients can be drained")
	}
	if g.proxy != nil {
		ctx, cancel := context.WithTimeout(context.Background(), drain)
		if err := g.proxy.Shutdown(ctx); err != nil {
			logger.Warn("drain ended with clients disconnected", zap.Error(err))
		}
		cancel()
	}
	ctx, cancel := context.WithDeadline(context.Background(), exitBy)
	defer cancel()
	g.pool.Close(ctx)
	if err := g.pool.Wait(ctx); err != nil {
		logger.Warn("server connections still closing at exit", zap.Error(err))
	}
	g.cancel()
	g.bg.Wait()
	if g.control != nil {
		g.control.Close()
	}
	if g.admin != nil {
		if err := g.admin.Shutdown(ctx); err != nil {
			_ = g.admin.Close() // a scrape still running is cut off
		}
	}
	logger.Info("pggovernor stopped")
}

// prepareOnControl is proxy.Options.PrepareOnControl: a prepare-only batch
// of a client holding no server connection, parsed on the control
// connection when the client's route is the control connection's own. Not
// in cluster mode, where the control connection holds the leases and must
// never wait on a client's statement.
func (g *governor) prepareOnControl(cfg *config.Config) proxy.PrepareFunc {
	if g.control == nil || cfg.Budget.Cluster.Enabled {
		return nil
	}
	own := pool.Route{Database: g.up.base.Database, User: g.up.base.User}
	return func(ctx context.Context, route pool.Route, query string, oids []uint32) (*pgconn.StatementDescription, error) {
		if route != own {
			return nil, proxy.ErrNoControlPrepare
		}
		c, err := g.control.Acquire(ctx)
		if err != nil {
			return nil, err
		}
		defer c.Release()
		return c.Conn().PgConn().Prepare(ctx, "", query, oids)
	}
}

// upstreamRetired is the pool's Events.Retired: the connections to addr
// were retired, so the control connection, if it is there, is closed too
// (at once when idle, else when its user gives it back) and the next use
// opens one where upstream.url leads now. In cluster mode the lease
// manager holds it for good: its heartbeat, a write, fails on a server
// that no longer takes writes, and it reconnects.
func (g *governor) upstreamRetired(addr string) {
	if g.control == nil {
		return
	}
	if a := g.controlAddr.Load(); a != nil && *a == addr {
		g.logger.Info("the control connection's server was retired: reconnecting it", zap.String("address", addr))
		if g.cluster != nil {
			// Its leases count nothing on the next server: none are
			// used until they are taken again there.
			g.cluster.Move()
			return
		}
		g.control.Reset()
	}
}

// heartbeatRefused is told of every cluster heartbeat's outcome. The
// heartbeat is a write on the control connection, which never makes its
// own transactions read-only: one refused with 25006 says its server is
// read-only now (a writer demoted, default_transaction_read_only turned
// on), so every connection to it is retired, as the probe does outside
// cluster mode (in cluster mode the heartbeats are the probe).
func (g *governor) heartbeatRefused(err error) {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "25006" {
		return
	}
	if a := g.controlAddr.Load(); a != nil {
		g.pool.RetireAddr(*a, "the cluster heartbeat, a write on the control connection, was refused as read-only (SQLSTATE 25006)")
	}
}

// controlRoleKey is where the control connection keeps, in its pgconn's
// CustomData, the pool.Role of its server when it was opened.
const controlRoleKey = "pggovernor.role"

// newControlPool is the control plane's pool of one connection (counted in
// the budget): the budget's reads, the health probe, and with
// budget.cluster the leases, whose connection also carries keepalives and
// tcp_user_timeout on both ends so that a vanished peer is noticed within
// the cluster's bounds. It opens its connection through the same hosts,
// target_session_attrs and load_balance_hosts as the server connections;
// addr records where each one went, and the connection's CustomData what
// its server was (controlRoleKey), for the probe.
func newControlPool(ctx context.Context, cfg *config.Config, up *upstream, id *controlIdentity, addr *atomic.Pointer[string]) (*pgxpool.Pool, error) {
	pcfg, err := pgxpool.ParseConfig(up.connString)
	if err != nil {
		return nil, fmt.Errorf("key upstream.url: %s", redactParseError(err, cfg.Upstream.URL))
	}
	pcfg.MaxConns = budget.ControlConnections
	pcfg.MinConns = 0
	pcfg.ConnConfig.Config = *up.base.Copy()
	pcfg.ConnConfig.User = id.user
	if id.own {
		pcfg.ConnConfig.Password = "" // the upstream user's
	}
	pcfg.ConnConfig.RuntimeParams["application_name"] = "pggovernor-control"
	if c := cfg.Budget.Cluster; c.Enabled {
		maps.Copy(pcfg.ConnConfig.RuntimeParams, cluster.ServerParams(c.MemberTimeout))
		pcfg.ConnConfig.DialFunc = cluster.Dialer(c.MemberTimeout).DialContext
	} else if u := cfg.Timeouts.ServerUnreachable; u > 0 {
		maps.Copy(pcfg.ConnConfig.RuntimeParams, cluster.ServerParams(u))
		pcfg.ConnConfig.DialFunc = cluster.Dialer(2 * u).DialContext
	}
	pw := id.password
	user := id.user
	pcfg.AfterConnect = func(_ context.Context, c *pgx.Conn) error {
		pg := c.PgConn()
		params := map[string]string{}
		for _, k := range []string{"in_hot_standby", "default_transaction_read_only"} {
			if v := pg.ParameterStatus(k); v != "" {
				params[k] = v
			}
		}
		pg.CustomData()[controlRoleKey] = pool.RoleFromParams(params)
		if ra := pg.Conn().RemoteAddr(); ra != nil {
			a := ra.String()
			addr.Store(&a)
		}
		return nil
	}
	pcfg.BeforeConnect = func(ctx context.Context, cc *pgx.ConnConfig) error {
		if err := up.tls.Apply(&cc.Config); err != nil {
			return err
		}
		if up.loadBalance {
			pool.RandomizeHosts(&cc.Config)
		}
		if pw == nil {
			return nil
		}
		p, err := pw(ctx, pool.Route{Database: cc.Database, User: user})
		if err != nil {
			return err
		}
		if p != "" {
			cc.Password = p
		}
		return nil
	}
	p, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("control connection: %w", err)
	}
	return p, nil
}
