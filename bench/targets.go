package main

import (
	"context"
	"crypto/md5" //nolint:gosec // the Postgres md5 password format
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// Names of the targets.
const (
	targetDirect    = "direct"
	targetPgBouncer = "pgbouncer"
	targetGovernor  = "pggovernor"
)

// The benchmark's database and roles. benchUser has a SCRAM verifier and is
// the role both poolers log in upstream as; md5User has an md5 verifier and
// is used by direct clients in the cases whose client authentication is md5
// (it is a member of benchUser, so it reads the same tables).
const (
	database      = "bench"
	benchUser     = "bench"
	md5User       = "bench_md5"
	benchPassword = "bench-pw"
)

// Client authentication methods of the two pooler configurations.
const (
	authSCRAM = "scram-sha-256"
	authMD5   = "md5"
)

// tools are the external programs a session uses.
type tools struct {
	pgbench          string
	pgbouncer        string // "" when unavailable
	pgbouncerVersion string // e.g. "1.18.0"
	governor         string
	governorBuilt    bool // built by this session
}

// env is what every target and run shares: the Postgres cluster, a
// temporary work directory readable by the postgres user, the tools.
type env struct {
	opts    options
	bins    tools
	cluster *pgtest.Cluster
	work    string
	cred    *syscall.Credential // the postgres user, when running as root
	logf    func(string, ...any)
	// scramVerifier is benchUser's SCRAM-SHA-256 verifier as Postgres
	// stores it, for the poolers' users files.
	scramVerifier string
}

// makeWorkDir creates the session's temporary directory, owned by the
// postgres user when running as root so that PgBouncer can read its files.
func makeWorkDir() (string, *syscall.Credential, error) {
	dir, err := os.MkdirTemp("", "pggovernor-bench-")
	if err != nil {
		return "", nil, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", nil, err
	}
	if os.Geteuid() != 0 {
		return dir, nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return "", nil, fmt.Errorf("running as root needs a postgres user for PgBouncer: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		return "", nil, err
	}
	return dir, &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// findTools locates pgbench, installs PgBouncer when it is wanted and
// missing, and builds pggovernor unless -governor names a binary.
func findTools(ctx context.Context, root, work string, o options, targets []string, logf func(string, ...any)) (tools, error) {
	var t tools
	if dir, err := pgtest.BinDir(); err == nil {
		if _, err := os.Stat(filepath.Join(dir, "pgbench")); err == nil {
			t.pgbench = filepath.Join(dir, "pgbench")
		}
	}
	if t.pgbench == "" {
		p, err := exec.LookPath("pgbench")
		if err != nil {
			return t, errors.New("pgbench not found (Debian: apt-get install postgresql-client)")
		}
		t.pgbench = p
	}
	if contains(targets, targetPgBouncer) {
		t.pgbouncer = lookPgBouncer()
		if t.pgbouncer == "" && !o.noInstall {
			logf("pgbouncer not found: installing it with `apt-get install -y pgbouncer` (Debian's package)")
			if err := aptInstall(ctx, "pgbouncer", logf); err != nil {
				logf("warning: installing pgbouncer failed: %v; the pgbouncer target is skipped", err)
			}
			t.pgbouncer = lookPgBouncer()
		}
		if t.pgbouncer == "" {
			logf("warning: pgbouncer is not available; the pgbouncer target is skipped")
		} else if out, err := exec.CommandContext(ctx, t.pgbouncer, "--version").Output(); err == nil {
			// "PgBouncer 1.18.0\nlibevent ..."
			first, _, _ := strings.Cut(string(out), "\n")
			t.pgbouncerVersion = strings.TrimSpace(strings.TrimPrefix(first, "PgBouncer"))
		}
	}
	if o.governorBin != "" {
		t.governor = o.governorBin
		return t, nil
	}
	t.governor = filepath.Join(work, "pggovernor")
	logf("building pggovernor: (cd %s && go build -o %s ./cmd/pggovernor)", root, t.governor)
	cmd := exec.CommandContext(ctx, "go", "build", "-o", t.governor, "./cmd/pggovernor")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return t, fmt.Errorf("building pggovernor: %w\n%s", err, out)
	}
	t.governorBuilt = true
	return t, nil
}

// lookPgBouncer finds the pgbouncer binary (Debian puts it in /usr/sbin,
// which may not be on PATH).
func lookPgBouncer() string {
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// aptInstall installs a Debian package, running apt-get update once if the
// first attempt fails (a fresh image has no package lists).
func aptInstall(ctx context.Context, pkg string, logf func(string, ...any)) error {
	install := func() error {
		cmd := exec.CommandContext(ctx, "apt-get", "install", "-y", "--no-install-recommends", pkg)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("apt-get install %s: %w\n%s", pkg, err, tailLines(string(out), 10))
		}
		return nil
	}
	if err := install(); err == nil {
		return nil
	}
	logf("running `apt-get update` and retrying")
	if out, err := exec.CommandContext(ctx, "apt-get", "update").CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get update: %w\n%s", err, tailLines(string(out), 10))
	}
	return install()
}

// newEnv starts the Postgres cluster, creates the roles and the database and
// runs `pgbench -i` once (unless only the idle mode runs).
func newEnv(ctx context.Context, o options, bins tools, work string, cred *syscall.Credential, logf func(string, ...any)) (*env, error) {
	e := &env{opts: o, bins: bins, work: work, cred: cred, logf: logf}
	logf("starting Postgres (max_connections=%d)", o.pgMaxConns)
	c, err := pgtest.Start(ctx, pgtest.Options{
		MaxConnections: o.pgMaxConns,
		Settings:       map[string]string{"shared_buffers": "256MB"},
		HBA: []string{
			"host all " + md5User + " 127.0.0.1/32 md5",
			"host all all 127.0.0.1/32 scram-sha-256",
		},
	})
	if err != nil {
		return nil, fmt.Errorf("starting Postgres: %w", err)
	}
	e.cluster = c
	md5Verifier := md5.Sum([]byte(benchPassword + md5User)) //nolint:gosec // Postgres md5 format
	setup := []string{
		fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD %s", benchUser, pgtest.QuoteLiteral(benchPassword)),
		fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD %s", md5User, pgtest.QuoteLiteral("md5"+hex.EncodeToString(md5Verifier[:]))),
		fmt.Sprintf("GRANT %s TO %s", benchUser, md5User),
		fmt.Sprintf("CREATE DATABASE %s OWNER %s", database, benchUser),
	}
	for _, sql := range setup {
		if _, err := c.Exec(ctx, sql); err != nil {
			e.close()
			return nil, fmt.Errorf("%s: %w", sql, err)
		}
	}
	rows, err := c.Exec(ctx, fmt.Sprintf("SELECT rolpassword FROM pg_authid WHERE rolname = %s", pgtest.QuoteLiteral(benchUser)))
	if err != nil || len(rows) != 1 || !strings.HasPrefix(rows[0][0], "SCRAM-SHA-256$") {
		e.close()
		return nil, fmt.Errorf("reading the SCRAM verifier of %s: %v", benchUser, err)
	}
	e.scramVerifier = rows[0][0]
	if !o.runCases {
		return e, nil // the idle mode needs no tables
	}
	logf("pgbench -i -s %d (once, directly against Postgres)", o.scale)
	cmd := exec.CommandContext(ctx, bins.pgbench, "-i", "-q", "-s", strconv.Itoa(o.scale),
		"-h", c.Host, "-p", strconv.Itoa(c.Port), "-U", benchUser, database)
	cmd.Env = pgEnv(benchPassword)
	if out, err := cmd.CombinedOutput(); err != nil {
		e.close()
		return nil, fmt.Errorf("pgbench -i: %w\n%s", err, out)
	}
	return e, nil
}

// close stops the cluster.
func (e *env) close() {
	if e.cluster != nil {
		e.cluster.Close()
	}
}

// directMax is the most clients a direct run may use: Postgres'
// max_connections less its superuser reserve (3), both poolers' server
// connections, pggovernor's control connection and some slack.
func (e *env) directMax() int {
	return e.opts.pgMaxConns - 3 - 2*e.opts.budget - 1 - 5
}

// pgEnv is the environment of a libpq client (pgbench) for a password:
// no TLS and no GSS negotiation, for every target alike.
func pgEnv(password string) []string {
	return append(os.Environ(), "PGPASSWORD="+password, "PGSSLMODE=disable", "PGGSSENCMODE=disable")
}

// endpoint is where and as whom a client connects to a target.
type endpoint struct {
	Host     string
	Port     int
	User     string
	Password string
}

// dsn is the endpoint as a libpq key=value string for pgconn.
func (ep endpoint) dsn() string {
	return fmt.Sprintf("host=%s port=%d user=%s password=%s dbname=%s sslmode=disable connect_timeout=5",
		ep.Host, ep.Port, ep.User, ep.Password, database)
}

// target is one thing pgbench can be pointed at.
type target interface {
	// Name is direct, pgbouncer or pggovernor.
	Name() string
	// Start (re)starts the target with client authentication auth
	// (authSCRAM or authMD5), accepting at least maxClients clients, and
	// returns once a client can log in.
	Start(ctx context.Context, auth string, maxClients int) error
	// Stop stops the target's process, if it has one. Idempotent.
	Stop()
	// Endpoint is where clients connect with the current configuration.
	Endpoint() endpoint
	// PID is the process to measure (CPU, RSS); 0 for direct.
	PID() int
	// Supports says whether a case at a number of clients can run, and if
	// not why.
	Supports(c benchCase, clients int) (bool, string)
	// LogTail returns the last n lines of the process' log.
	LogTail(n int) string
	// Exited reports whether the target's process has died since Start.
	Exited() bool
}

// makeTargets builds the named targets in order.
func makeTargets(e *env, names []string) []target {
	var out []target
	for _, n := range names {
		switch n {
		case targetDirect:
			out = append(out, &directTarget{e: e})
		case targetPgBouncer:
			out = append(out, &pgbouncerTarget{e: e})
		case targetGovernor:
			out = append(out, &governorTarget{e: e})
		}
	}
	return out
}

// directTarget is Postgres itself.
type directTarget struct {
	e    *env
	auth string
}

func (d *directTarget) Name() string { return targetDirect }
func (d *directTarget) Start(_ context.Context, auth string, _ int) error {
	d.auth = auth
	return nil
}
func (d *directTarget) Stop()              {}
func (d *directTarget) PID() int           { return 0 }
func (d *directTarget) LogTail(int) string { return "" }
func (d *directTarget) Exited() bool       { return false }
func (d *directTarget) Endpoint() endpoint {
	u := benchUser
	if d.auth == authMD5 {
		u = md5User // an md5 verifier, so Postgres does md5 rather than SCRAM
	}
	return endpoint{Host: d.e.cluster.Host, Port: d.e.cluster.Port, User: u, Password: benchPassword}
}
func (d *directTarget) Supports(_ benchCase, clients int) (bool, string) {
	if clients > d.e.directMax() {
		return false, fmt.Sprintf("%d clients exceed what Postgres max_connections=%d leaves beside the poolers", clients, d.e.opts.pgMaxConns)
	}
	return true, ""
}

// child is a pooler process run by the harness.
type child struct {
	cmd     *exec.Cmd
	exited  chan struct{}
	logPath string
}

// startChild starts cmd with its output going to logPath, in its own process
// group (a terminal's Ctrl-C reaches the harness, which stops it) and killed
// if the harness dies.
func startChild(cmd *exec.Cmd, logPath string, cred *syscall.Credential) (*child, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if cred != nil {
		_ = os.Chown(logPath, int(cred.Uid), int(cred.Gid))
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, exited: make(chan struct{}), logPath: logPath}
	go func() { // owner: this child; ends when the process exits
		_ = cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

// stop sends SIGTERM, waits up to 5s, then kills the process group.
func (c *child) stop() {
	if c == nil {
		return
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
		<-c.exited
	}
}

// hasExited reports whether the process has exited.
func (c *child) hasExited() bool {
	if c == nil {
		return false
	}
	select {
	case <-c.exited:
		return true
	default:
		return false
	}
}

// logTail returns the last n lines of the child's log.
func (c *child) logTail(n int) string {
	if c == nil {
		return ""
	}
	b, err := os.ReadFile(c.logPath)
	if err != nil {
		return ""
	}
	return tailLines(string(b), n)
}

// logValue returns the value of a JSON field in the child's log (the first
// line that has it), "" if none.
func (c *child) logValue(field string) string {
	if c == nil {
		return ""
	}
	b, err := os.ReadFile(c.logPath)
	if err != nil {
		return ""
	}
	re := regexp.MustCompile(`"` + regexp.QuoteMeta(field) + `":\s*"?([^",}]*)`)
	if m := re.FindSubmatch(b); m != nil {
		return string(m[1])
	}
	return ""
}

// tailLines returns the last n lines of s.
func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitLogin waits until a client can log in at ep, or the child exits.
func waitLogin(ctx context.Context, c *child, ep endpoint, timeout time.Duration) error {
	return c.waitUntil(ctx, timeout, "no login", func() error {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		conn, err := pgconn.Connect(cctx, ep.dsn())
		if err != nil {
			return err
		}
		conn.Close(ctx)
		return nil
	})
}

// waitUntil calls probe every 100 ms until it succeeds; it gives up when
// the child exits (with its log tail), when ctx ends, or after timeout
// (saying what, with probe's last error and the log tail).
func (c *child) waitUntil(ctx context.Context, timeout time.Duration, what string, probe func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := probe()
		if err == nil {
			return nil
		}
		select {
		case <-c.exited:
			return fmt.Errorf("exited during start:\n%s", c.logTail(30))
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s within %s: %v\n%s", what, timeout, err, c.logTail(30))
		}
		time.Sleep(100 * time.Millisecond) // polling a child process: nothing announces readiness
	}
}

// writeOwned writes a file readable by the postgres user.
func writeOwned(path string, data []byte, cred *syscall.Credential) error {
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return err
	}
	if cred != nil {
		return os.Chown(path, int(cred.Uid), int(cred.Gid))
	}
	return nil
}

// userlist is the users file both poolers read (PgBouncer's userlist.txt
// format). For SCRAM it holds the SCRAM verifier Postgres stores, so that a
// login costs the pooler a few HMACs and no key derivation (PgBouncer
// derives the keys from a plaintext password at every login); md5 needs the
// plaintext (or md5) form. The upstream password is configured separately.
func (e *env) userlist(auth string) []byte {
	secret := benchPassword
	if auth == authSCRAM {
		secret = e.scramVerifier
	}
	return []byte(fmt.Sprintf("%q %q\n", benchUser, secret))
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// contains reports whether list holds s.
func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
