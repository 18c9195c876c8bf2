package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/metrics"
	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/pool/budget"
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
	return zap.New(core), level
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

	g, err := start(ctx, &cfg, logger)
	if err != nil {
		return &exitError{Code: 1, Err: err}
	}
	logger.Info("pggovernor started", zap.String("version", version), zap.String("listen", g.proxy.Addr().String()),
		zap.String("admin_listen", g.adminAddr()), zap.String("pool_mode", cfg.PoolMode),
		zap.String("upstream", config.RedactURL(cfg.Upstream.URL)), zap.String("model", g.model()))
	fmt.Fprintf(stdout, "pggovernor listening on %s\n", g.proxy.Addr())

	for {
		select {
		case <-hup:
			g.reload(level, func() (config.Config, error) { return loadConfig("run", args, environ, io.Discard) })
		case err := <-g.serveErr:
			g.stop(logger, time.Second)
			return &exitError{Code: 1, Err: err}
		case <-ctx.Done():
			sig := 143
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
			_ = sig
			return nil
		}
	}
}

// governor is one running instance: the pieces and their lifecycle.
type governor struct {
	cfg       *config.Config
	logger    *zap.Logger
	users     *auth.Users
	pool      *pool.Pool
	proxy     *proxy.Server
	control   *pgxpool.Pool
	up        *upstream
	clientTLS *tlsconf.Server // nil with clients.tls.mode disable
	throttle  *auth.Throttle
	admin     *http.Server
	adminLn   net.Listener
	cancel    context.CancelFunc
	bgDone    chan struct{}
	serveErr  chan error
}

// startDeps are the seams tests replace: what a test cannot set through
// the configuration.
type startDeps struct {
	// awsCredentials replaces the AWS default credential chain.
	awsCredentials aws.CredentialsProvider
	// clock drives the IAM token cache and the login throttle.
	clock auth.Clock
}

// startOption adjusts startDeps.
type startOption func(*startDeps)

// withAWSCredentials signs RDS IAM tokens with p instead of the default
// chain.
func withAWSCredentials(p aws.CredentialsProvider) startOption {
	return func(d *startDeps) { d.awsCredentials = p }
}

// withClock replaces the system clock.
func withClock(c auth.Clock) startOption { return func(d *startDeps) { d.clock = c } }

// start builds and starts every piece; on error, what was started is
// stopped.
func start(ctx context.Context, cfg *config.Config, logger *zap.Logger, opts ...startOption) (*governor, error) {
	if err := notYetImplemented(cfg); err != nil {
		return nil, err
	}
	deps := startDeps{clock: auth.SystemClock{}}
	for _, o := range opts {
		o(&deps)
	}
	users, err := auth.NewUsers(cfg.Clients.UsersFile, auth.WithUsersLogger(logger.Named("users")))
	if err != nil {
		return nil, fmt.Errorf("key clients.users_file: %w", err)
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
	g := &governor{cfg: cfg, logger: logger, users: users, up: up, clientTLS: clientTLS, cancel: cancel,
		throttle: auth.NewThrottle(auth.ThrottleOptions{Clock: deps.clock}),
		bgDone:   make(chan struct{}), serveErr: make(chan error, 1)}
	g.pool = pool.New(pool.Options{
		Connector: &pool.UpstreamConnector{Base: up.base, Password: up.password, Prepare: up.prepare,
			Timeout: cfg.Timeouts.ServerConnect},
		Logger:           logger.Named("pool"),
		ServerIdle:       cfg.Timeouts.ServerIdle,
		ServerLifetime:   cfg.Timeouts.ServerLifetime,
		ServerCheckDelay: cfg.Timeouts.ServerCheckDelay,
	})
	if cfg.Budget.Max > 0 {
		g.pool.SetLimit(cfg.Budget.Max)
		close(g.bgDone)
	} else {
		pcfg, err := pgxpool.ParseConfig(up.connString)
		if err != nil {
			cancel()
			g.pool.Close(ctx)
			return nil, fmt.Errorf("key upstream.url: %s", redactParseError(err, cfg.Upstream.URL))
		}
		pcfg.MaxConns = budget.ControlConnections
		pcfg.MinConns = 0
		pcfg.ConnConfig.Config = *up.base.Copy()
		pcfg.ConnConfig.RuntimeParams["application_name"] = "pggovernor-control"
		pw := up.password
		user := up.base.User
		pcfg.BeforeConnect = func(ctx context.Context, cc *pgx.ConnConfig) error {
			if err := up.tls.Apply(&cc.Config); err != nil {
				return err
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
		g.control, err = pgxpool.NewWithConfig(bg, pcfg)
		if err != nil {
			cancel()
			g.pool.Close(ctx)
			return nil, fmt.Errorf("control connection: %w", err)
		}
		go func() { // owner: governor; exits when g.cancel is called
			defer close(g.bgDone)
			budget.Run(bg, budget.Options{
				Control:  g.control,
				Reserve:  cfg.Budget.Reserve,
				Interval: cfg.Budget.RefreshInterval,
				Apply:    g.pool.SetLimit,
				Unknown:  g.pool.SetLimitError,
				Logger:   logger.Named("budget"),
			})
		}()
	}
	g.proxy = proxy.NewServer(proxy.Options{
		Config:       cfg,
		Pool:         g.pool,
		Verifier:     auth.NewVerifier(cfg.Clients.Auth, users, auth.WithThrottle(g.throttle)),
		TLS:          clientTLS,
		UpstreamUser: up.sidecarUser,
		Logger:       logger.Named("proxy"),
	})
	if err := g.proxy.Listen(); err != nil {
		g.stop(logger, 0)
		return nil, err
	}
	if cfg.AdminListen != "" {
		ln, err := net.Listen("tcp", cfg.AdminListen)
		if err != nil {
			g.stop(logger, 0)
			return nil, fmt.Errorf("listening on %s (key admin_listen): %w", cfg.AdminListen, err)
		}
		g.adminLn = ln
		reg := metrics.NewRegistry()
		g.admin = &http.Server{
			Handler:           metrics.NewHandler(metrics.HandlerOptions{Gatherer: reg, Ready: g.ready}),
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

// ready is /readyz: listening, not draining, budget known.
func (g *governor) ready() error {
	if !g.proxy.Ready() {
		return errors.New("not accepting clients (starting or draining)")
	}
	if n, known := g.pool.Limit(); !known {
		return errors.New("the connection budget is not known yet (upstream unreachable?)")
	} else if n <= 0 {
		return errors.New("the connection budget is zero")
	}
	return nil
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

// reload applies what can change without a restart: the users file and
// the log level.
func (g *governor) reload(level zap.AtomicLevel, load func() (config.Config, error)) {
	if err := g.users.Reload(); err != nil {
		g.logger.Error("reloading the users file failed; keeping the previous one", zap.Error(err))
	} else {
		g.logger.Info("users file reloaded", zap.String("file", g.users.Path()), zap.Int("users", g.users.Current().Len()))
	}
	cfg, err := load()
	if err != nil {
		g.logger.Error("reloading the configuration failed; keeping the previous settings", zap.Error(err))
		return
	}
	if cfg.Log.Level != level.String() {
		_ = level.UnmarshalText([]byte(cfg.Log.Level))
		g.logger.Info("log level changed", zap.String("level", cfg.Log.Level))
	}
}

// securityStats are the numbers of the security pieces, kept for the
// metrics endpoint: the certificates' remaining validity, reloads, IAM
// token mint results, throttled addresses.
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

// stop shuts down in order: readiness off and listeners closed, clients
// drained for up to drain, then server connections closed.
func (g *governor) stop(logger *zap.Logger, drain time.Duration) {
	if g.proxy != nil {
		ctx, cancel := context.WithTimeout(context.Background(), drain)
		if err := g.proxy.Shutdown(ctx); err != nil {
			logger.Warn("drain ended with clients disconnected", zap.Error(err))
		}
		cancel()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	g.pool.Close(ctx)
	if err := g.pool.Wait(ctx); err != nil {
		logger.Warn("server connections still closing at exit", zap.Error(err))
	}
	g.cancel()
	<-g.bgDone
	if g.control != nil {
		g.control.Close()
	}
	if g.admin != nil {
		_ = g.admin.Shutdown(ctx)
	}
	logger.Info("pggovernor stopped")
}

// notYetImplemented refuses settings whose feature has not landed yet, so
// that no configuration silently does less than it says.
func notYetImplemented(cfg *config.Config) error {
	switch {
	case cfg.Budget.Cluster.Enabled:
		return errors.New("key budget.cluster.enabled: the cluster-wide budget is not implemented in this version")
	}
	return nil
}
