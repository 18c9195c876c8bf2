package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/pool/budget"
	"github.com/pggovernor/pggovernor/pool/cluster"
	"github.com/pggovernor/pggovernor/tlsconf"
)

// doctorCommand loads the same configuration as run, connects upstream and
// prints what Coder's guide makes operators look up by hand, flagging each
// problem with what to change. It exits non-zero when any problem is found.
func doctorCommand(ctx context.Context, args, environ []string, stdout, stderr io.Writer) error {
	cfg, err := loadConfig("doctor", args, environ, stderr)
	if err != nil {
		return err
	}
	d := &doctor{out: stdout}
	d.run(ctx, &cfg)
	if d.problems > 0 {
		return &exitError{Code: 1, Err: fmt.Errorf("%d problem(s) found", d.problems)}
	}
	fmt.Fprintln(stdout, "no problems found")
	return nil
}

type doctor struct {
	out      io.Writer
	problems int
}

func (d *doctor) row(name string, value any) { fmt.Fprintf(d.out, "%-32s %v\n", name, value) }

// certRow prints a certificate's end of validity and flags one that has
// expired or expires within a week.
func (d *doctor) certRow(name string, notAfter time.Time) {
	left := time.Until(notAfter)
	d.row(name, fmt.Sprintf("%s (%s left)", notAfter.UTC().Format(time.RFC3339), left.Round(time.Minute)))
	switch {
	case left <= 0:
		d.problem("%s: the certificate has expired; renew it (pggovernor reloads the files when they change)", name)
	case left < 7*24*time.Hour:
		d.problem("%s: the certificate expires in less than a week; renew it (pggovernor reloads the files when they change)", name)
	}
}

func (d *doctor) problem(format string, args ...any) {
	d.problems++
	fmt.Fprintf(d.out, "PROBLEM: "+format+"\n", args...)
}

func (d *doctor) run(ctx context.Context, cfg *config.Config) {
	d.row("config: listen", cfg.Listen)
	d.row("config: pool_mode", cfg.PoolMode)
	d.row("config: upstream.url", config.RedactURL(cfg.Upstream.URL))
	if f := cfg.Upstream.PasswordFile; f != "" {
		d.row("config: upstream.password_file", f)
		if _, trimmed, err := auth.ReadPasswordFile(f); err != nil {
			d.problem("%v: create it with the password and nothing else", err)
			return
		} else if trimmed {
			d.problem("upstream.password_file %s has surrounding whitespace or a trailing newline: pggovernor trims it, but other tools may not; write it with printf '%%s' \"$PASSWORD\" > %s", f, f)
		}
	}
	users, err := auth.NewUsers(cfg.Clients.UsersFile)
	if err != nil {
		d.problem("key clients.users_file: %v", err)
		return
	}
	if f := cfg.Clients.HBAFile; f != "" {
		if h, err := auth.NewHBA(f, hbaOptions(cfg, zap.NewNop())); err != nil {
			d.problem("key clients.hba_file: %v", err)
		} else {
			d.row("config: clients.hba_file", fmt.Sprintf("%s (%d rules)", f, h.Current().Len()))
		}
		if cfg.AuthIgnored() {
			d.problem("clients.auth is set but not used: clients.hba_file decides each login's method; remove clients.auth")
		}
	}
	if cfg.Clients.TLS.Mode != tlsconf.ModeDisable {
		st, err := tlsconf.NewServer(tlsconf.ServerOptions{Mode: cfg.Clients.TLS.Mode, CertFile: cfg.Clients.TLS.CertFile,
			KeyFile: cfg.Clients.TLS.KeyFile, ClientCAFile: cfg.Clients.TLS.ClientCAFile})
		if err != nil {
			d.problem("key %v", err)
		} else {
			d.certRow("clients.tls: certificate valid until", st.Stats().CertNotAfter)
		}
	}
	up, err := newUpstream(ctx, cfg, users, zap.NewNop(), startDeps{clock: auth.SystemClock{}})
	if err != nil {
		d.problem("%v", err)
		return
	}
	model := "multi-role (each client's own user goes upstream)"
	if up.sidecarUser != "" {
		model = "sidecar (every client is served as " + up.sidecarUser + ")"
	}
	d.row("identity model", model)
	d.row("upstream: sslmode", cfg.EffectiveSSLMode())
	if na := up.tls.Stats().ClientCertNotAfter; !na.IsZero() {
		d.certRow("upstream: client certificate valid until", na)
	}
	if up.iam != nil {
		d.row("upstream: connector", "awsiamrds (an RDS IAM token for each new connection)")
	}

	connCfg, err := pgx.ParseConfig(up.connString)
	if err != nil {
		d.problem("key upstream.url: %s", redactParseError(err, cfg.Upstream.URL))
		return
	}
	connCfg.Config = *up.base.Copy()
	if up.password != nil {
		pw, err := up.password(ctx, pool.Route{Database: up.base.Database, User: up.base.User})
		if err != nil {
			d.problem("%v", err)
			return
		}
		if pw != "" {
			connCfg.Password = pw
		}
	}
	cctx, cancel := context.WithTimeout(ctx, cfg.Timeouts.ServerConnect)
	defer cancel()
	conn, err := pgx.ConnectConfig(cctx, connCfg)
	if err != nil {
		d.connectProblem(err, up)
		return
	}
	defer conn.Close(context.WithoutCancel(ctx))

	var db, user string
	if err := conn.QueryRow(ctx, "SELECT current_database(), current_user").Scan(&db, &user); err != nil {
		d.problem("querying the server: %v", err)
		return
	}
	pg := conn.PgConn()
	d.row("server: host", hostOf(pg))
	d.row("server: port", up.base.Port)
	d.row("server: user", user)
	d.row("server: current_database", db)
	d.row("server: tls", tlsState(pg))

	l, err := budget.ReadLimits(ctx, conn)
	if err != nil {
		d.problem("reading the connection limits: %v", err)
		return
	}
	d.row("server: server_version", l.ServerVersion)
	d.row("server: max_connections", l.MaxConnections)
	d.row("server: superuser_reserved_connections", l.SuperuserReserved)
	d.row("server: reserved_connections", l.Reserved)
	n := budget.Compute(l, cfg.Budget.Reserve)
	if cfg.Budget.Cluster.Enabled {
		d.cluster(ctx, cfg, conn, l)
	} else if cfg.Budget.Max > 0 {
		d.row("budget (budget.max)", cfg.Budget.Max)
		if room := l.MaxConnections - l.SuperuserReserved - l.Reserved; cfg.Budget.Max > room {
			d.problem("budget.max (%d) is above what the server allows ordinary roles (%d = max_connections %d − reserved %d): Postgres would refuse connections; lower budget.max or raise max_connections",
				cfg.Budget.Max, room, l.MaxConnections, l.SuperuserReserved+l.Reserved)
		}
	} else {
		d.row("budget (derived)", fmt.Sprintf("%d = %d max_connections − %d superuser_reserved − %d reserved − %d budget.reserve − %d control connection",
			n, l.MaxConnections, l.SuperuserReserved, l.Reserved, cfg.Budget.Reserve, budget.ControlConnections))
		if n <= 0 {
			d.problem("the derived budget is %d: no client could be served; lower budget.reserve, raise the server's max_connections, or set budget.max", n)
		}
	}
	var open int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity a WHERE "+cluster.ClientBackend).Scan(&open); err == nil {
		d.row("server: client connections now", open)
	}
	d.row("round trip (median of 10)", medianRTT(ctx, conn).Round(time.Microsecond))
}

// cluster prints the cluster budget and its members with their shares
// (budget.cluster), as the replicas compute them.
func (d *doctor) cluster(ctx context.Context, cfg *config.Config, conn *pgx.Conn, l budget.Limits) {
	c := cfg.Budget.Cluster
	ns := int32(c.Namespace)
	d.row("cluster: namespace", c.Namespace)
	var exists, canCreate bool
	var schema string
	if err := conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL, coalesce(current_schema(), ''),
		coalesce(has_schema_privilege(current_schema(), 'CREATE'), false)`, c.Table).Scan(&exists, &schema, &canCreate); err != nil {
		d.problem("key budget.cluster.table: %v", err)
		return
	}
	if !exists {
		d.row("cluster: table", c.Table+" (not there yet: the first replica creates it)")
		if !canCreate {
			d.problem("key budget.cluster.table: %s does not exist and this user may not create tables in the schema %q: grant CREATE on it, or create the table once as docs/architecture.md shows", c.Table, schema)
		}
	} else {
		d.row("cluster: table", c.Table)
		var ok bool
		if err := conn.QueryRow(ctx, `SELECT has_table_privilege($1, 'SELECT, INSERT, UPDATE, DELETE')`, c.Table).Scan(&ok); err != nil || !ok {
			d.problem("key budget.cluster.table: this user may not read and write %s: grant SELECT, INSERT, UPDATE and DELETE on it to the upstream user of every replica", c.Table)
		}
	}
	members, err := cluster.ReadMembers(ctx, conn, ns, c.Table)
	if err != nil {
		d.problem("key budget.cluster.table: reading the members: %v", err)
		return
	}
	var live []cluster.Member
	for _, m := range members {
		if m.Age < c.MemberTimeout {
			live = append(live, m)
		}
	}
	foreign := 0
	if c.CountForeign && exists {
		if foreign, err = cluster.CountForeign(ctx, conn, ns, c.Table, c.MemberTimeout); err != nil {
			d.problem("counting the other applications' connections: %v", err)
			return
		}
		foreign-- // this doctor's own connection
	}
	members0 := max(len(live), 1) // as the first replica will see it
	b := cluster.ComputeBudget(l, cfg.Budget.Max, cfg.Budget.Reserve, members0, max(foreign, 0))
	d.row("cluster: budget", b.String())
	if b.Total < members0*cluster.Floor {
		d.problem("the cluster budget (%d leases) cannot give each of %d replicas a control connection and a server connection: raise max_connections, lower budget.reserve, or run fewer replicas", b.Total, members0)
	}
	d.row("cluster: replicas", len(live))
	demands := make([]int, len(live))
	for i, m := range live {
		demands[i] = m.Demand + 1
	}
	targets := cluster.Targets(b.Total, demands)
	for i, m := range live {
		share := cluster.FairShare(b.Total, len(live), i)
		d.row(fmt.Sprintf("  replica %d", m.ID), fmt.Sprintf("%s, cancel address %s: %d leases (fair share %d, target %d, borrowed %d), %d clients waiting, heartbeat %s ago",
			m.Name, m.Addr, len(m.Slots), share, targets[i], max(len(m.Slots)-share, 0), m.Waiting, m.Age.Round(time.Millisecond)))
	}
	for _, m := range members {
		if m.Age >= c.MemberTimeout {
			d.row(fmt.Sprintf("  replica %d", m.ID), fmt.Sprintf("%s: gone (heartbeat %s ago; its leases are free once others see it)", m.Name, m.Age.Round(time.Second)))
		}
	}
}

// connectProblem explains a failed upstream connection with what to change.
func (d *doctor) connectProblem(err error, up *upstream) {
	var pgErr *pgconn.PgError
	var netErr net.Error
	switch {
	case errors.As(err, &pgErr) && (pgErr.Code == "28P01" || pgErr.Code == "28000"):
		what := "upstream.password_file, upstream.password or the URL's password"
		switch {
		case up.iam != nil:
			what = "the IAM policy (rds-db:connect for this user), the database user's rds_iam role and upstream.aws_region"
		case up.sidecarUser == "":
			what = "the user's plaintext password in clients.users_file"
		}
		if strings.Contains(pgErr.Message, "certificate") || strings.Contains(pgErr.Message, "encryption") {
			what += "; and upstream.ssl.mode, upstream.ssl.cert_file and upstream.ssl.key_file"
		}
		d.problem("authentication failed: %s (SQLSTATE %s); check %s", pgErr.Message, pgErr.Code, what)
	case errors.As(err, &pgErr) && pgErr.Code == "3D000":
		d.problem("%s: check the database name in upstream.url", pgErr.Message)
	case errors.As(err, &pgErr):
		d.problem("the server refused the connection: %s (SQLSTATE %s)", pgErr.Message, pgErr.Code)
	case errors.As(err, &netErr), errors.Is(err, context.DeadlineExceeded):
		d.problem("cannot reach the server at %s:%d: %v; check the host and port in upstream.url and the network path", up.base.Host, up.base.Port, err)
	default:
		d.problem("cannot connect to the server: %v", err)
	}
}

func medianRTT(ctx context.Context, conn *pgx.Conn) time.Duration {
	var rtts []time.Duration
	for i := 0; i < 10; i++ {
		start := time.Now()
		if _, err := conn.Exec(ctx, ";"); err != nil {
			break
		}
		rtts = append(rtts, time.Since(start))
	}
	if len(rtts) == 0 {
		return 0
	}
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	return rtts[len(rtts)/2]
}

func hostOf(pg *pgconn.PgConn) string {
	if a := pg.Conn().RemoteAddr(); a != nil {
		return a.String()
	}
	return ""
}

func tlsState(pg *pgconn.PgConn) string {
	if tc, ok := pg.Conn().(*tls.Conn); ok {
		return "yes (" + tls.VersionName(tc.ConnectionState().Version) + ")"
	}
	return "no"
}
