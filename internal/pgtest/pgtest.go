// Package pgtest starts ephemeral, real PostgreSQL clusters for tests and for
// `make run`: initdb into a temporary directory, a postgres process owned by
// the caller, and helpers to connect, run SQL and inject faults. For the TLS
// tests it makes CAs and certificates (crypto/x509, nothing committed),
// starts clusters with ssl = on (Options.TLS), lays out files the way the
// kubelet mounts secrets (SecretMount), and provides the one scripted
// upstream a real Postgres cannot replace: an RDS-like server that takes an
// IAM token as a cleartext password over TLS (CleartextBackend), with
// VerifyIAMToken to check the token's SigV4 signature.
//
// When the process runs as root (CI), initdb refuses to run, so the cluster
// is created and run as the "postgres" user instead.
package pgtest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Options shape one cluster.
type Options struct {
	// MaxConnections is postgresql.conf's max_connections (default 100).
	MaxConnections int
	// Settings are extra postgresql.conf settings.
	Settings map[string]string
	// HBA replaces the TCP lines of pg_hba.conf; the Unix socket always
	// allows the superuser with trust, for the harness itself. The default
	// is "host all all 127.0.0.1/32 scram-sha-256" plus the same for ::1.
	HBA []string
	// Files are written into the data directory before start (for example
	// server.crt and server.key), owned by the server's user, mode 0600.
	Files map[string][]byte
	// TLS, when set, turns ssl on with its certificate and key and, when
	// it has a CA, verifies client certificates against it (for hba lines
	// such as "hostssl all all 127.0.0.1/32 cert clientcert=verify-full").
	TLS *ServerTLS
	// Logf receives the server's log lines; nil discards them.
	Logf func(format string, args ...any)
}

// ServerTLS is the server side of TLS: ssl = on with server.crt and
// server.key, and root.crt as ssl_ca_file when CAPEM is set.
type ServerTLS struct {
	CertPEM, KeyPEM []byte
	// CAPEM verifies client certificates; may be empty.
	CAPEM []byte
}

// Cluster is one running PostgreSQL server. Its methods are safe for
// concurrent use.
type Cluster struct {
	// Dir is the temporary directory holding the data directory and socket.
	Dir string
	// DataDir is the cluster's data directory.
	DataDir string
	// Host is the TCP host the server listens on (127.0.0.1).
	Host string
	// Port is the TCP port the server listens on.
	Port int
	// Version is the server's major version, e.g. "15".
	Version string

	opts  Options
	bin   string
	cred  *syscall.Credential
	mu    sync.Mutex
	cmd   *exec.Cmd
	exit  chan struct{}
	lines []string
}

// SuperUser is the cluster's superuser name.
const SuperUser = "postgres"

// BinDir finds the PostgreSQL server binaries: $PG_BINDIR, pg_config
// --bindir, then Debian's /usr/lib/postgresql/<newest>/bin.
func BinDir() (string, error) {
	if d := os.Getenv("PG_BINDIR"); d != "" {
		return d, nil
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		d := strings.TrimSpace(string(out))
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[i])))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[j])))
		return vi > vj
	})
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	return "", errors.New("PostgreSQL server binaries (initdb, postgres) not found: install them (Debian: apt-get install postgresql) or set PG_BINDIR")
}

// Start creates and starts a cluster. The caller must call Close.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	c := &Cluster{opts: opts, bin: bin, Host: "127.0.0.1"}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("running as root needs a postgres user to run the server: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		c.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	c.Dir, err = os.MkdirTemp("", "pgtest-")
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(c.Dir, 0o755); err != nil {
		return nil, err
	}
	if err := c.chown(c.Dir); err != nil {
		return nil, err
	}
	c.DataDir = filepath.Join(c.Dir, "data")
	initdb := c.command(ctx, filepath.Join(bin, "initdb"), "-D", c.DataDir, "-U", SuperUser,
		"-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C")
	if out, err := initdb.CombinedOutput(); err != nil {
		_ = os.RemoveAll(c.Dir)
		return nil, fmt.Errorf("initdb: %w: %s", err, out)
	}
	if v, err := os.ReadFile(filepath.Join(c.DataDir, "PG_VERSION")); err == nil {
		c.Version = strings.TrimSpace(string(v))
	}
	if err := c.writeConfig(); err != nil {
		_ = os.RemoveAll(c.Dir)
		return nil, err
	}
	if err := c.start(ctx); err != nil {
		_ = os.RemoveAll(c.Dir)
		return nil, err
	}
	return c, nil
}

func (c *Cluster) chown(path string) error {
	if c.cred == nil {
		return nil
	}
	return os.Chown(path, int(c.cred.Uid), int(c.cred.Gid))
}

func (c *Cluster) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred, Pdeathsig: syscall.SIGQUIT, Setpgid: true}
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	return cmd
}

func (c *Cluster) writeConfig() error {
	if c.Port == 0 {
		port, err := freePort()
		if err != nil {
			return err
		}
		c.Port = port
	}
	port := c.Port
	maxConns := c.opts.MaxConnections
	if maxConns == 0 {
		maxConns = 100
	}
	settings := map[string]string{
		"port":                    strconv.Itoa(port),
		"listen_addresses":        "'127.0.0.1'",
		"unix_socket_directories": "'" + c.Dir + "'",
		"max_connections":         strconv.Itoa(maxConns),
		"fsync":                   "off",
		"synchronous_commit":      "off",
		"full_page_writes":        "off",
		"shared_buffers":          "32MB",
		"password_encryption":     "'scram-sha-256'",
		"log_min_messages":        "warning",
		"log_line_prefix":         "'%m [%p] %q%u@%d '",
		"max_wal_size":            "1GB",
	}
	files := map[string][]byte{}
	if t := c.opts.TLS; t != nil {
		settings["ssl"] = "on"
		settings["ssl_cert_file"] = "'server.crt'"
		settings["ssl_key_file"] = "'server.key'"
		files["server.crt"], files["server.key"] = t.CertPEM, t.KeyPEM
		if len(t.CAPEM) > 0 {
			settings["ssl_ca_file"] = "'root.crt'"
			files["root.crt"] = t.CAPEM
		}
	}
	for k, v := range c.opts.Settings {
		settings[k] = v
	}
	for k, v := range c.opts.Files {
		files[k] = v
	}
	var conf strings.Builder
	names := make([]string, 0, len(settings))
	for k := range settings {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		fmt.Fprintf(&conf, "%s = %s\n", k, settings[k])
	}
	if err := c.writeFile("postgresql.auto.conf", []byte(conf.String())); err != nil {
		return err
	}
	hba := c.opts.HBA
	if hba == nil {
		hba = []string{
			"host all all 127.0.0.1/32 scram-sha-256",
			"host all all ::1/128 scram-sha-256",
		}
	}
	hbaText := "local all all trust\nlocal replication all trust\n" + strings.Join(hba, "\n") + "\n"
	if err := c.writeFile("pg_hba.conf", []byte(hbaText)); err != nil {
		return err
	}
	for name, data := range files {
		if err := c.writeFile(name, data); err != nil {
			return err
		}
	}
	return nil
}

func (c *Cluster) writeFile(name string, data []byte) error {
	p := filepath.Join(c.DataDir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		return err
	}
	return c.chown(p)
}

// WriteFile writes a file into the data directory, owned by the server's
// user with mode 0600 (certificates before a Restart or a reload).
func (c *Cluster) WriteFile(name string, data []byte) error { return c.writeFile(name, data) }

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// start runs postgres and returns once it accepts connections.
func (c *Cluster) start(ctx context.Context) error {
	cmd := c.command(context.WithoutCancel(ctx), filepath.Join(c.bin, "postgres"), "-D", c.DataDir)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting postgres: %w", err)
	}
	ready := make(chan struct{})
	exit := make(chan struct{})
	c.mu.Lock()
	c.cmd, c.exit = cmd, exit
	c.mu.Unlock()
	go func() { // owner: this cluster; exits when postgres closes stderr
		var once sync.Once
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			c.mu.Lock()
			c.lines = append(c.lines, line)
			if len(c.lines) > 2000 {
				c.lines = c.lines[len(c.lines)-1000:]
			}
			c.mu.Unlock()
			if c.opts.Logf != nil {
				c.opts.Logf("postgres: %s", line)
			}
			if strings.Contains(line, "database system is ready to accept connections") ||
				strings.Contains(line, "database system is ready to accept read-only connections") { // a standby
				once.Do(func() { close(ready) })
			}
		}
		_ = cmd.Wait()
		close(exit)
	}()
	timer := time.NewTimer(60 * time.Second)
	defer timer.Stop()
	select {
	case <-ready:
		return nil
	case <-exit:
		return fmt.Errorf("postgres exited during start:\n%s", c.Log())
	case <-timer.C:
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exit
		return fmt.Errorf("postgres did not become ready within 60s:\n%s", c.Log())
	case <-ctx.Done():
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exit
		return ctx.Err()
	}
}

// Log returns the server's recent log lines.
func (c *Cluster) Log() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return strings.Join(c.lines, "\n")
}

// stop signals the postmaster and waits for it to exit.
func (c *Cluster) stop(sig syscall.Signal) {
	c.mu.Lock()
	cmd, exit := c.cmd, c.exit
	c.cmd = nil
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	if sig == syscall.SIGKILL {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // the whole process group
	} else {
		_ = cmd.Process.Signal(sig)
	}
	<-exit
}

// Stop shuts the server down fast (SIGINT: sessions are terminated).
func (c *Cluster) Stop() { c.stop(syscall.SIGINT) }

// Kill kills the postmaster and every backend with SIGKILL, like a crash.
func (c *Cluster) Kill() { c.stop(syscall.SIGKILL) }

// Restart stops the server, applies settings (nil keeps them) and starts it
// again on the same port.
func (c *Cluster) Restart(ctx context.Context, settings map[string]string) error {
	c.Stop()
	if settings != nil {
		if c.opts.Settings == nil {
			c.opts.Settings = map[string]string{}
		}
		for k, v := range settings {
			c.opts.Settings[k] = v
		}
		if err := c.writeConfig(); err != nil { // same port: clients reconnect to the same address
			return err
		}
	}
	return c.start(ctx)
}

// Close stops the server and removes its directory. Idempotent.
func (c *Cluster) Close() {
	c.Stop()
	if c.Dir != "" {
		_ = os.RemoveAll(c.Dir)
	}
}

// Addr is the server's TCP address, host:port.
func (c *Cluster) Addr() string { return net.JoinHostPort(c.Host, strconv.Itoa(c.Port)) }

// URL returns a connection URL over TCP for user/password/database.
func (c *Cluster) URL(user, password, database string) string {
	u := url.URL{Scheme: "postgres", Host: c.Addr(), Path: "/" + database}
	if password != "" {
		u.User = url.UserPassword(user, password)
	} else {
		u.User = url.User(user)
	}
	u.RawQuery = "sslmode=disable"
	return u.String()
}

// SuperuserDSN connects as the superuser over the Unix socket (trust).
func (c *Cluster) SuperuserDSN(database string) string {
	if database == "" {
		database = "postgres"
	}
	return fmt.Sprintf("host=%s port=%d user=%s dbname=%s sslmode=disable", c.Dir, c.Port, SuperUser, database)
}

// Exec runs SQL as the superuser over the Unix socket and returns the rows
// of the last result as text.
func (c *Cluster) Exec(ctx context.Context, sql string) ([][]string, error) {
	return c.ExecIn(ctx, "postgres", sql)
}

// ExecIn is Exec in a given database.
func (c *Cluster) ExecIn(ctx context.Context, database, sql string) ([][]string, error) {
	conn, err := pgconn.Connect(ctx, c.SuperuserDSN(database))
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	results, err := conn.Exec(ctx, sql).ReadAll()
	if err != nil {
		return nil, err
	}
	var rows [][]string
	if len(results) > 0 {
		for _, r := range results[len(results)-1].Rows {
			row := make([]string, len(r))
			for i, v := range r {
				row[i] = string(v)
			}
			rows = append(rows, row)
		}
	}
	return rows, nil
}

// CreateRole creates a login role with a SCRAM password (superuser when
// super is true).
func (c *Cluster) CreateRole(ctx context.Context, name, password string, super bool) error {
	attrs := "LOGIN"
	if super {
		attrs += " SUPERUSER"
	}
	_, err := c.Exec(ctx, fmt.Sprintf("CREATE ROLE %s %s PASSWORD %s", QuoteIdent(name), attrs, QuoteLiteral(password)))
	return err
}

// QuoteIdent quotes a SQL identifier.
func QuoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// QuoteLiteral quotes a SQL string literal.
func QuoteLiteral(s string) string { return `'` + strings.ReplaceAll(s, `'`, `''`) + `'` }
