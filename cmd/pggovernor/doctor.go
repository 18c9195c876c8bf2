package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strconv"
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
	"github.com/pggovernor/pggovernor/proxy"
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
	if d.warnings > 0 {
		fmt.Fprintf(stdout, "no problems found; %d warning(s)\n", d.warnings)
		return nil
	}
	fmt.Fprintln(stdout, "no problems found")
	return nil
}

type doctor struct {
	out      io.Writer
	problems int
	// warnings are risks that do not stop pggovernor from working.
	warnings int
}

func (d *doctor) warn(format string, args ...any) {
	d.warnings++
	fmt.Fprintf(d.out, "WARNING: "+format+"\n", args...)
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
	for _, err := range exposedSecretFiles(cfg) {
		d.warn("%v", err)
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
	d.hosts(ctx, cfg, up, &connCfg.Config)
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
	if ta, ok := pg.Conn().RemoteAddr().(*net.TCPAddr); ok {
		d.row("server: port", ta.Port)
	} else {
		d.row("server: port", up.base.Port) // a Unix socket: the port in its name
	}
	d.row("server: user", user)
	d.row("server: current_database", db)
	d.row("server: tls", tlsState(pg))

	l, err := budget.ReadLimits(ctx, conn)
	if err != nil {
		d.problem("reading the connection limits: %v", err)
		return
	}
	d.row("server: server_version", l.ServerVersion)
	var enc string
	if err := conn.QueryRow(ctx, "SELECT current_setting('password_encryption')").Scan(&enc); err == nil {
		d.row("server: password_encryption", enc)
		if enc != cfg.Clients.PasswordEncryption && usesMD5(cfg) {
			d.warn("clients.password_encryption is %s but the server's password_encryption is %s: with the md5 method, unknown users get the exchange of %s passwords, which the server's users do not have; set clients.password_encryption to %s",
				cfg.Clients.PasswordEncryption, enc, cfg.Clients.PasswordEncryption, enc)
		}
	}
	d.row("server: max_connections", l.MaxConnections)
	d.row("server: superuser_reserved_connections", l.SuperuserReserved)
	d.row("server: reserved_connections", l.Reserved)
	n := budget.Compute(l, cfg.Budget.Reserve)
	if cfg.Budget.Cluster.Enabled {
		cconn := conn
		id, err := newControlIdentity(cfg, up, zap.NewNop(), startDeps{clock: auth.SystemClock{}})
		if err != nil {
			d.problem("%v", err)
			return
		}
		if id.own {
			if cconn, err = d.connectControl(ctx, cfg, connCfg, id); err != nil {
				return
			}
			defer cconn.Close(context.WithoutCancel(ctx))
		}
		d.cluster(ctx, cfg, cconn, l, up, users, id)
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

// hosts connects to each host of upstream.url on its own (every address
// its name resolves to now) and prints whether it answered and what it is,
// then which one new server connections would use: the first, in the
// URL's order, that target_session_attrs accepts (with load_balance_hosts
// random, any of those). It is a problem when none does.
func (d *doctor) hosts(ctx context.Context, cfg *config.Config, up *upstream, base *pgconn.Config) {
	type host struct {
		name     string
		attempts []*pgconn.FallbackConfig // its TLS attempts, in order
	}
	var hosts []host
	all := append([]*pgconn.FallbackConfig{{Host: base.Host, Port: base.Port, TLSConfig: base.TLSConfig}}, base.Fallbacks...)
	for _, fb := range all {
		name := net.JoinHostPort(fb.Host, strconv.Itoa(int(fb.Port)))
		if n := len(hosts); n > 0 && hosts[n-1].name == name {
			hosts[n-1].attempts = append(hosts[n-1].attempts, fb)
			continue
		}
		hosts = append(hosts, host{name: name, attempts: []*pgconn.FallbackConfig{fb}})
	}
	lb := "disable"
	if up.loadBalance {
		lb = "random"
	}
	d.row("upstream: hosts", fmt.Sprintf("%d (target_session_attrs %s, load_balance_hosts %s)", len(hosts), up.target, lb))
	var fits []string
	for _, h := range hosts {
		hc := base.Copy()
		hc.Host, hc.Port, hc.TLSConfig = h.attempts[0].Host, h.attempts[0].Port, h.attempts[0].TLSConfig
		hc.Fallbacks = h.attempts[1:]
		hc.ValidateConnect, hc.AfterConnect = nil, nil
		cctx, cancel := context.WithTimeout(ctx, cfg.Timeouts.ServerConnect)
		role, addr, err := hostRole(cctx, hc)
		cancel()
		if err != nil {
			d.row("  "+h.name, "did not answer: "+err.Error())
			d.warn("host %s of upstream.url did not answer: new server connections skip it; a failover to it would fail", h.name)
			continue
		}
		verdict := "not used: target_session_attrs is " + string(up.target)
		if up.target.Fits(role, role) && (up.target != pool.TargetPreferStandby || role.Standby) {
			verdict = "fits target_session_attrs"
			fits = append(fits, h.name)
		}
		d.row("  "+h.name, fmt.Sprintf("answered from %s: %s (%s)", addr, role, verdict))
	}
	switch {
	case len(fits) == 0 && up.target == pool.TargetPreferStandby:
		d.row("upstream: server used now", "a primary (no standby answered; prefer-standby falls back to one)")
	case len(fits) == 0:
		d.problem("no host of upstream.url fits target_session_attrs %s: new server connections fail until one does (a failover in progress? a wrong host list?)", up.target)
	case up.loadBalance:
		d.row("upstream: server used now", strings.Join(fits, ", ")+" (load_balance_hosts random: any of these)")
	default:
		d.row("upstream: server used now", fits[0])
	}
}

// hostRole connects with cfg and asks the server what it is
// (pool.RoleQuery); addr is the address that answered.
func hostRole(ctx context.Context, cfg *pgconn.Config) (role pool.Role, addr string, err error) {
	c, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return pool.Role{}, "", err
	}
	defer c.Close(context.WithoutCancel(ctx))
	if ra := c.Conn().RemoteAddr(); ra != nil {
		addr = ra.String()
	}
	res := c.ExecParams(ctx, pool.RoleQuery, nil, nil, nil, nil).Read()
	if res.Err != nil {
		return pool.Role{}, addr, res.Err
	}
	if len(res.Rows) != 1 {
		return pool.Role{}, addr, errors.New("the role query returned no row")
	}
	row := make([]string, len(res.Rows[0]))
	for i, v := range res.Rows[0] {
		row[i] = string(v)
	}
	role, err = pool.RoleFromRow(row)
	return role, addr, err
}

// usesMD5 reports whether some login may use the md5 method: clients.auth
// md5, or an md5 line of clients.hba_file.
func usesMD5(cfg *config.Config) bool {
	if cfg.Clients.HBAFile == "" {
		return cfg.Clients.Auth == config.AuthMD5
	}
	h, err := auth.NewHBA(cfg.Clients.HBAFile, hbaOptions(cfg, zap.NewNop()))
	if err != nil {
		return false // reported above
	}
	for _, r := range h.Current().Rules {
		if r.Method == auth.HBAMD5 {
			return true
		}
	}
	return false
}

// connectControl opens a connection as budget.cluster.control_user, as
// the replicas' control connections log in.
func (d *doctor) connectControl(ctx context.Context, cfg *config.Config, base *pgx.ConnConfig, id *controlIdentity) (*pgx.Conn, error) {
	cc := base.Copy()
	cc.User, cc.Password = id.user, ""
	if id.password != nil {
		pw, err := id.password(ctx, pool.Route{Database: cc.Database, User: id.user})
		if err != nil {
			d.problem("%v", err)
			return nil, err
		}
		cc.Password = pw
	}
	cctx, cancel := context.WithTimeout(ctx, cfg.Timeouts.ServerConnect)
	defer cancel()
	conn, err := pgx.ConnectConfig(cctx, cc)
	if err != nil {
		d.problem("connecting as budget.cluster.control_user %s: %v; check budget.cluster.control_password_file and the server's pg_hba.conf for that role", id.user, err)
		return nil, err
	}
	d.row("cluster: control connection as", id.user+" (budget.cluster.control_user)")
	return conn, nil
}

// cluster prints the cluster budget and its members with their shares
// (budget.cluster), as the replicas compute them, and flags what lets
// others interfere: a control role the application shares, a table the
// application may write, rows no replica wrote as they are, advisory locks
// of the namespace held by sessions that are not replicas. conn is logged
// in as the control connection's role.
func (d *doctor) cluster(ctx context.Context, cfg *config.Config, conn *pgx.Conn, l budget.Limits, up *upstream, users *auth.Users, id *controlIdentity) {
	c := cfg.Budget.Cluster
	ns := int32(c.Namespace)
	d.row("cluster: namespace", c.Namespace)
	switch {
	case up.sidecarUser != "" && id.user == up.sidecarUser:
		d.warn("the control connection logs in as %s, the role every client is served as: any client can write the membership table and take the namespace's advisory locks; set budget.cluster.control_user to a role of its own (README, Cluster mode)", id.user)
	case users != nil && func() bool { _, ok := users.Current().Lookup(id.user); return ok }():
		d.warn("the control connection's role %s is in clients.users_file: clients can log in as it and write the membership table; set budget.cluster.control_user to a role no client logs in as (README, Cluster mode)", id.user)
	}
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
			d.problem("key budget.cluster.table: %s does not exist and %s may not create tables in the schema %q: grant CREATE on it, or create the table once as docs/architecture.md shows", c.Table, id.user, schema)
		}
	} else {
		var owner string
		var ok, public bool
		if err := conn.QueryRow(ctx, `SELECT pg_get_userbyid(c.relowner), has_table_privilege($1::text, 'SELECT, INSERT, UPDATE, DELETE'),
			EXISTS (SELECT 1 FROM aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a WHERE a.grantee = 0)
			FROM pg_class c WHERE c.oid = $1::regclass`, c.Table).Scan(&owner, &ok, &public); err != nil {
			d.problem("key budget.cluster.table: %v", err)
			return
		}
		d.row("cluster: table", c.Table+" (owner "+owner+")")
		if !ok {
			d.problem("key budget.cluster.table: %s may not read and write %s: grant SELECT, INSERT, UPDATE and DELETE on it to the control connection's role of every replica", id.user, c.Table)
		}
		if public {
			d.warn("every role may use %s (PUBLIC has privileges on it): REVOKE ALL ON %s FROM PUBLIC", c.Table, c.Table)
		}
		if app := up.sidecarUser; app != "" && app != id.user {
			var appWrites bool
			if err := conn.QueryRow(ctx, `SELECT has_table_privilege($1::name, $2::text, 'INSERT, UPDATE, DELETE, TRUNCATE') OR pg_has_role($1::name, $3::name, 'USAGE')`,
				app, c.Table, owner).Scan(&appWrites); err == nil && appWrites {
				d.warn("the application role %s may write %s: REVOKE ALL ON %s FROM %s", app, c.Table, c.Table, app)
			}
		}
	}
	rules := cluster.Rules{MaxID: proxy.MaxReplicaID, Timeout: c.MemberTimeout}
	if p, err := cluster.ParsePrefixes(c.PeerCIDRs); err == nil {
		rules.PeerAllowed = p.Allows
	}
	rows, err := cluster.ReadMembers(ctx, conn, ns, c.Table, proxy.MaxReplicaID)
	if err != nil {
		d.problem("key budget.cluster.table: reading the members: %v", err)
		return
	}
	var live, gone []cluster.Member
	for _, m := range rows {
		if reason, detail := rules.Check(&m); reason != "" {
			d.warn("row of replica %d in %s ignored by the replicas (%s: %s): no replica wrote it as it is; delete it, and see who may write the table", m.ID, c.Table, reason, detail)
			continue
		}
		if m.Age < c.MemberTimeout {
			live = append(live, m)
		} else {
			gone = append(gone, m)
		}
	}
	foreign := 0
	if c.CountForeign && exists {
		if foreign, err = cluster.CountForeign(ctx, conn, ns, c.Table, c.MemberTimeout, proxy.MaxReplicaID); err != nil {
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
	for _, m := range gone {
		d.row(fmt.Sprintf("  replica %d", m.ID), fmt.Sprintf("%s: gone (heartbeat %s ago; its leases are free once others see it)", m.Name, m.Age.Round(time.Second)))
	}
	if c.SecretFile == "" {
		d.warn("budget.cluster.secret_file is not set: cancel requests that reach a replica other than the client's are dropped")
	} else if k, _, err := auth.ReadSecretFile("budget.cluster.secret_file", c.SecretFile); err != nil {
		d.problem("%v", err)
	} else if len(k) < minPeerSecret {
		d.problem("key budget.cluster.secret_file: %s holds %d bytes; the key must have at least %d (make one with: openssl rand -base64 32)", c.SecretFile, len(k), minPeerSecret)
	}
	if !exists {
		return
	}
	holders, err := cluster.LockHolders(ctx, conn, ns, c.Table, c.MemberTimeout, proxy.MaxReplicaID)
	if err != nil {
		d.problem("reading pg_locks: %v", err)
		return
	}
	if len(holders) > 0 {
		var parts []string
		for _, h := range holders {
			parts = append(parts, fmt.Sprintf("%d (%d lease and %d member locks)", h.PID, h.Leases, h.Members))
		}
		d.warn("locks in namespace %d are held by sessions that are not members: pids %s; the replicas share the leases left (a replica joining at this moment shows here briefly; see pg_stat_activity for who they are)",
			c.Namespace, strings.Join(parts, ", "))
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
