package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"database/sql"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
	"github.com/pggovernor/pggovernor/pool"
)

// tlsEnv is a Postgres with ssl = on and certificates made by the test
// (crypto/x509), shared by the upstream TLS tests:
//
//	hostssl all certuser 127.0.0.1/32 cert clientcert=verify-full
//	hostssl all all      127.0.0.1/32 scram-sha-256
//
// Its server certificate names only db.test, so that verify-full against
// 127.0.0.1 fails unless upstream.ssl.server_name says db.test.
type tlsEnv struct {
	pg *pgtest.Cluster
	// ca signed the server's certificate and signs client certificates
	// Postgres accepts (its ssl_ca_file).
	ca *pgtest.CA
	// caFile is ca in a file; otherCAFile a CA nobody trusts.
	caFile, otherCAFile string
}

var (
	tlsOnce   sync.Once
	tlsShared *tlsEnv
	tlsErr    error
)

func sharedTLS(t *testing.T) *tlsEnv {
	t.Helper()
	tlsOnce.Do(func() { tlsShared, tlsErr = startTLSEnv() })
	if tlsErr != nil {
		t.Fatal(tlsErr)
	}
	return tlsShared
}

func startTLSEnv() (*tlsEnv, error) {
	ctx := context.Background()
	ca, err := pgtest.NewCA("pggovernor test upstream CA")
	if err != nil {
		return nil, err
	}
	other, err := pgtest.NewCA("a CA nobody trusts")
	if err != nil {
		return nil, err
	}
	srv, err := ca.Issue(pgtest.CertOptions{CommonName: "db.test", DNSNames: []string{"db.test"}})
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "pggovernor-tls-")
	if err != nil {
		return nil, err
	}
	env := &tlsEnv{ca: ca, caFile: filepath.Join(dir, "ca.crt"), otherCAFile: filepath.Join(dir, "other-ca.crt")}
	if err := os.WriteFile(env.caFile, ca.CertPEM, 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(env.otherCAFile, other.CertPEM, 0o600); err != nil {
		return nil, err
	}
	env.pg, err = pgtest.Start(ctx, pgtest.Options{
		MaxConnections: 40,
		TLS:            &pgtest.ServerTLS{CertPEM: srv.CertPEM, KeyPEM: srv.KeyPEM, CAPEM: ca.CertPEM},
		HBA: []string{
			"hostssl all certuser 127.0.0.1/32 cert clientcert=verify-full",
			"hostssl all all 127.0.0.1/32 scram-sha-256",
		},
	})
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	atExit(func() { env.pg.Close(); _ = os.RemoveAll(dir) })
	for _, sql := range []string{
		"CREATE ROLE app LOGIN PASSWORD " + pgtest.QuoteLiteral(appPass),
		"CREATE ROLE certuser LOGIN",
		"CREATE DATABASE appdb OWNER app",
		"GRANT CONNECT ON DATABASE appdb TO certuser",
	} {
		if _, err := env.pg.Exec(ctx, sql); err != nil {
			return nil, err
		}
	}
	return env, nil
}

// writeFile writes data into dir with mode 0600 and returns its path.
func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// clientCert issues a certificate with CN cn and writes it and its key.
func clientCert(t testing.TB, ca *pgtest.CA, cn string) (kp *pgtest.KeyPair, certFile, keyFile string) {
	t.Helper()
	kp, err := ca.Issue(pgtest.CertOptions{CommonName: cn})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	return kp, writeFile(t, dir, cn+".crt", kp.CertPEM), writeFile(t, dir, cn+".key", kp.KeyPEM)
}

// TestUpstreamSSLModes: each upstream sslmode behaves against a real
// Postgres as libpq's does, through the governor, with the error the
// client gets when it fails.
func TestUpstreamSSLModes(t *testing.T) {
	env := sharedTLS(t)
	_, certFile, keyFile := clientCert(t, env.ca, "certuser")
	_, otherUserCert, otherUserKey := clientCert(t, env.ca, "app")
	ctx := context.Background()
	for _, c := range []struct {
		name               string
		user, mode, root   string
		cert, key          string
		serverName         string
		wantErr, wantState string // wantErr: in the client's error; wantState: in the client's failure's SQLSTATE
	}{
		{name: "disable: the server takes only TLS", user: "app", mode: "disable", wantErr: "no encryption", wantState: "28000"},
		{name: "allow: plaintext first, refused, then TLS", user: "app", mode: "allow"},
		{name: "prefer: TLS", user: "app", mode: "prefer"},
		{name: "require: TLS without verification", user: "app", mode: "require"},
		{name: "require with a root certificate verifies like verify-ca", user: "app", mode: "require", root: env.otherCAFile,
			wantErr: "certificate signed by unknown authority", wantState: "08006"},
		{name: "verify-ca: known CA, any host name", user: "app", mode: "verify-ca", root: env.caFile},
		{name: "verify-ca: unknown CA", user: "app", mode: "verify-ca", root: env.otherCAFile,
			wantErr: "certificate signed by unknown authority", wantState: "08006"},
		{name: "verify-full: host name not in the certificate", user: "app", mode: "verify-full", root: env.caFile,
			wantErr: "doesn't contain any IP SANs", wantState: "08006"},
		{name: "verify-full: server name override", user: "app", mode: "verify-full", root: env.caFile, serverName: "db.test"},
		{name: "verify-full: wrong server name override", user: "app", mode: "verify-full", root: env.caFile, serverName: "other.test",
			wantErr: "not other.test", wantState: "08006"},
		{name: "require without a client certificate on a cert line", user: "certuser", mode: "require",
			wantErr: "connection requires a valid client certificate", wantState: "28000"},
		{name: "mTLS: a certificate for another user", user: "certuser", mode: "verify-full", root: env.caFile, serverName: "db.test",
			cert: otherUserCert, key: otherUserKey, wantErr: `certificate authentication failed for user "certuser"`, wantState: "28000"},
		{name: "mTLS: the right certificate", user: "certuser", mode: "verify-full", root: env.caFile, serverName: "db.test",
			cert: certFile, key: keyFile},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := startGov(t, env.pg, func(cfg *config.Config) {
				cfg.Upstream.URL = fmt.Sprintf("postgres://%s@127.0.0.1:%d/appdb", c.user, env.pg.Port)
				cfg.Upstream.Password = ""
				if c.user == "app" {
					cfg.Upstream.Password = appPass
				}
				cfg.Upstream.SSL = config.UpstreamSSL{Mode: c.mode, RootCertFile: c.root, CertFile: c.cert, KeyFile: c.key, ServerName: c.serverName}
				cfg.Budget.Max = 2
				cfg.Timeouts.QueryWait = 3 * time.Second
			})
			conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
			if c.wantErr != "" {
				e := assertCode(t, err, c.wantState)
				if got := e.Message + " " + e.Detail; !strings.Contains(got, c.wantErr) {
					t.Fatalf("want = an error saying %q, got = %s", c.wantErr, got)
				}
				if !strings.Contains(e.Hint, "upstream.ssl.") {
					t.Fatalf("want = a hint naming the upstream.ssl settings, got = %q", e.Hint)
				}
				return
			}
			if err != nil {
				t.Fatalf("want = connected, got = %v", err)
			}
			defer conn.Close(ctx)
			var user string
			var ssl bool
			if err := conn.QueryRow(ctx, "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").Scan(&user, &ssl); err != nil {
				t.Fatal(err)
			}
			if user != c.user || !ssl {
				t.Fatalf("upstream: want = %s over TLS, got = %s (ssl %v)", c.user, user, ssl)
			}
		})
	}
}

// TestCoderEnvironmentMTLS: Coder's DB_SSL_MODE, DB_ROOT_CERT, DB_CERT and
// DB_KEY configure mTLS to the server, as they do for coderd.
func TestCoderEnvironmentMTLS(t *testing.T) {
	env := sharedTLS(t)
	_, certFile, keyFile := clientCert(t, env.ca, "certuser")
	p := startProcess(t, []string{"DB_HOST=127.0.0.1", fmt.Sprintf("DB_PORT=%d", env.pg.Port), "DB_USER=certuser", "DB_NAME=appdb",
		"DB_SSL_MODE=verify-ca", "DB_ROOT_CERT=" + env.caFile, "DB_CERT=" + certFile, "DB_KEY=" + keyFile},
		"--clients.users-file="+usersFile(t), "--budget.max=2")
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, p.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatalf("through a governor configured by Coder's environment: %v\n%s", err, p.stderr)
	}
	defer conn.Close(ctx)
	var user, serial string
	if err := conn.QueryRow(ctx, "SELECT current_user, client_serial::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()").Scan(&user, &serial); err != nil {
		t.Fatal(err)
	}
	if user != "certuser" || serial == "" {
		t.Fatalf("want = certuser with a client certificate, got = %s (serial %q)", user, serial)
	}
}

// TestUpstreamCertRotation: the governor's client certificate is a mounted
// secret rotated the way cert-manager and the kubelet do it while 20
// clients run transactions: the server connections already open keep
// working, new ones present the new certificate, no client sees an error,
// and the certificate's expiry kept for metrics follows.
func TestUpstreamCertRotation(t *testing.T) {
	env := sharedTLS(t)
	ctx := context.Background()
	first, err := env.ca.Issue(pgtest.CertOptions{CommonName: "certuser", NotAfter: time.Now().Add(30 * 24 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	mount, err := pgtest.NewSecretMount(t.TempDir(), map[string][]byte{"tls.crt": first.CertPEM, "tls.key": first.KeyPEM, "ca.crt": env.ca.CertPEM})
	if err != nil {
		t.Fatal(err)
	}
	const budget = 20 // one server connection per client, so that some sit idle between transactions
	g := startGov(t, env.pg, func(c *config.Config) {
		c.Upstream.URL = fmt.Sprintf("postgres://certuser@127.0.0.1:%d/appdb", env.pg.Port)
		c.Upstream.Password = ""
		c.Upstream.SSL = config.UpstreamSSL{Mode: "verify-full", ServerName: "db.test",
			RootCertFile: mount.Path("ca.crt"), CertFile: mount.Path("tls.crt"), KeyFile: mount.Path("tls.key")}
		c.Budget.Max = budget
	})
	// serials maps each of the governor's backends to the serial of the
	// client certificate it logged in with.
	serials := func() map[string]string {
		rows, err := env.pg.Exec(ctx, `SELECT a.pid, s.client_serial FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
			WHERE a.usename = 'certuser' AND a.backend_type = 'client backend'`)
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]string{}
		for _, r := range rows {
			m[r[0]] = r[1]
		}
		return m
	}

	load := startTxLoad(t, g.url("alice", userPass, "appdb"), budget, 5*time.Millisecond)
	waitFor(t, 20*time.Second, "the budget's connections to be open", func() bool { return len(serials()) == budget })
	before := serials()
	if !allSerial(before, first) {
		t.Fatalf("before the rotation: want = every backend with the first certificate (serial %s), got = %v", first.Cert.SerialNumber, before)
	}

	second, err := env.ca.Issue(pgtest.CertOptions{CommonName: "certuser", NotAfter: time.Now().Add(60 * 24 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.Update(map[string][]byte{"tls.crt": second.CertPEM, "tls.key": second.KeyPEM, "ca.crt": env.ca.CertPEM}); err != nil {
		t.Fatal(err)
	}
	// The established connections keep serving after the files changed.
	mark := load.done.Load()
	waitFor(t, 20*time.Second, "200 more transactions", func() bool { return load.done.Load() >= mark+200 })
	if after := serials(); !sameKeys(after, before) || !allSerial(after, first) {
		t.Fatalf("established connections: want = the same %d backends, with the first certificate, still serving, got = %v then %v", budget, before, after)
	}
	// New server connections use the new certificate: close the idle ones
	// until every backend is new.
	waitFor(t, 30*time.Second, "every server connection to present the new certificate", func() bool {
		g.g.pool.CloseIdle(ctx, func(pool.Route) bool { return true })
		s := serials()
		return len(s) > 0 && allSerial(s, second)
	})
	mark = load.done.Load()
	waitFor(t, 20*time.Second, "transactions on the new connections", func() bool { return load.done.Load() >= mark+100 })
	if err := load.stop(); err != nil {
		t.Fatalf("clients during the rotation: want = no error, got = %v", err)
	}
	st := g.g.securityStats().UpstreamTLS
	if !st.ClientCertNotAfter.Equal(second.Cert.NotAfter) || st.Reloads != 1 || st.ReloadFailures != 0 {
		t.Fatalf("kept for metrics: want = the new certificate's expiry and 1 reload, got = %+v", st)
	}
}

// allSerial reports whether every backend presented kp's certificate.
func allSerial(serials map[string]string, kp *pgtest.KeyPair) bool {
	for _, s := range serials {
		if s != kp.Cert.SerialNumber.String() {
			return false
		}
	}
	return true
}

func sameKeys(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if _, ok := b[k]; !ok {
			return false
		}
	}
	return true
}

// clientPKI is the client-facing side's certificates: the governor's own
// (for localhost and 127.0.0.1) and clients' ones, signed by one CA.
type clientPKI struct {
	ca                 *pgtest.CA
	dir                string
	caFile             string
	mount              *pgtest.SecretMount // the governor's tls.crt and tls.key
	serverCert         *pgtest.KeyPair
	aliceCert, bobCert string
	aliceKey, bobKey   string
	strangerCert       string // signed by a CA the governor does not trust
	strangerKey        string
}

func newClientPKI(t *testing.T) *clientPKI {
	t.Helper()
	ca, err := pgtest.NewCA("pggovernor test client-side CA")
	if err != nil {
		t.Fatal(err)
	}
	p := &clientPKI{ca: ca, dir: t.TempDir()}
	p.caFile = writeFile(t, p.dir, "ca.crt", ca.CertPEM)
	p.serverCert = p.issueServer(t)
	if p.mount, err = pgtest.NewSecretMount(t.TempDir(), map[string][]byte{"tls.crt": p.serverCert.CertPEM, "tls.key": p.serverCert.KeyPEM}); err != nil {
		t.Fatal(err)
	}
	_, p.aliceCert, p.aliceKey = clientCert(t, ca, "alice")
	_, p.bobCert, p.bobKey = clientCert(t, ca, "bob")
	stranger, err := pgtest.NewCA("stranger CA")
	if err != nil {
		t.Fatal(err)
	}
	_, p.strangerCert, p.strangerKey = clientCert(t, stranger, "alice")
	return p
}

func (p *clientPKI) issueServer(t *testing.T) *pgtest.KeyPair {
	t.Helper()
	kp, err := p.ca.Issue(pgtest.CertOptions{CommonName: "pggovernor", DNSNames: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

// tlsURL is a client URL through the governor with sslmode=verify-full and
// extra parameters.
func (g *gov) tlsURL(user, password, caFile string, extra ...string) string {
	host, port, _ := net.SplitHostPort(g.addr)
	u := fmt.Sprintf("postgres://%s:%s@%s:%s/appdb?sslmode=verify-full&sslrootcert=%s", user, password, host, port, caFile)
	for _, e := range extra {
		u += "&" + e
	}
	return u
}

// TestClientTLS: with clients.tls.mode require, pgx, lib/pq and psql
// connect over TLS with sslmode=verify-full, with and without a client
// certificate, with SCRAM-SHA-256-PLUS when they ask for channel binding;
// plaintext clients are refused with a message naming the setting; a stalled
// handshake ends at the login deadline; a new server certificate is served
// to new clients while connected ones carry on.
func TestClientTLS(t *testing.T) {
	pki := newClientPKI(t)
	sockDir := t.TempDir()
	g := startGov(t, nil, func(c *config.Config) {
		c.Clients.TLS = config.ClientTLS{Mode: "require", CertFile: pki.mount.Path("tls.crt"), KeyFile: pki.mount.Path("tls.key"), ClientCAFile: pki.caFile}
		c.Budget.Max = 4
		c.Timeouts.ClientLogin = 2 * time.Second
		c.UnixSocketDir = sockDir
	})
	ctx := context.Background()
	cert := "sslcert=" + pki.aliceCert + "&sslkey=" + pki.aliceKey
	t.Run("pgx", func(t *testing.T) {
		for _, extra := range [][]string{nil, {cert}, {"channel_binding=require"}, {cert, "channel_binding=require"}} {
			conn, err := pgx.Connect(ctx, g.tlsURL("alice", userPass, pki.caFile, extra...))
			if err != nil {
				t.Fatalf("%v: want = connected, got = %v", extra, err)
			}
			if _, ok := conn.PgConn().Conn().(*tls.Conn); !ok {
				t.Fatalf("%v: want = a TLS connection, got = %T", extra, conn.PgConn().Conn())
			}
			mustExec(t, conn, "SELECT 1")
			conn.Close(ctx)
		}
		// Cancel requests come in plaintext (as libpq sends them) and are
		// accepted although TLS is required for logins.
		conn := connectPgx(t, g.tlsURL("alice", userPass, pki.caFile))
		cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		_, err := conn.Exec(cctx, "SELECT pg_sleep(10)")
		cancel()
		assertCode(t, err, "57014")
	})
	t.Run("lib/pq", func(t *testing.T) {
		for _, extra := range [][]string{nil, {cert}} {
			db, err := sql.Open("postgres", g.tlsURL("alice", userPass, pki.caFile, extra...))
			if err != nil {
				t.Fatal(err)
			}
			var one int
			if err := db.QueryRow("SELECT $1::int", 1).Scan(&one); err != nil || one != 1 {
				t.Fatalf("%v: want = 1, got = %d (%v)", extra, one, err)
			}
			db.Close()
		}
	})
	t.Run("psql", func(t *testing.T) {
		for _, extra := range [][]string{nil, {cert}, {"channel_binding=require"}} {
			out, err := runPsql(g.tlsURL("alice", userPass, pki.caFile, extra...), "\\conninfo\nSELECT 'through-tls';\n")
			if err != nil || !strings.Contains(out, "SSL connection") || !strings.Contains(out, "through-tls") {
				t.Fatalf("%v: want = an SSL connection, got = %v:\n%s", extra, err, out)
			}
		}
	})
	t.Run("plaintext refused", func(t *testing.T) {
		_, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		e := assertCode(t, err, "28000")
		if !strings.Contains(e.Message, "clients.tls.mode") {
			t.Fatalf("pgx: want = a message naming clients.tls.mode, got = %q", e.Message)
		}
		db, _ := sql.Open("postgres", g.url("alice", userPass, "appdb"))
		defer db.Close()
		assertCode(t, db.Ping(), "28000")
		out, err := runPsql(g.url("alice", userPass, "appdb"), "SELECT 1;\n")
		if err == nil || !strings.Contains(out, "pggovernor requires TLS") {
			t.Fatalf("psql: want = refused with the reason, got = %v:\n%s", err, out)
		}
	})
	t.Run("unix socket", func(t *testing.T) {
		// Local, and libpq never asks for TLS on it: not refused.
		_, port, _ := net.SplitHostPort(g.addr)
		out, err := runPsql(fmt.Sprintf("host=%s port=%s user=alice password=%s dbname=appdb", sockDir, port, userPass), "SELECT 'over-the-socket';\n")
		if err != nil || !strings.Contains(out, "over-the-socket") {
			t.Fatalf("psql over the unix socket: want = logged in, got = %v:\n%s", err, out)
		}
	})
	t.Run("client certificate from an unknown CA", func(t *testing.T) {
		// Go's client sends no certificate the server's CA list does not
		// cover; libpq (OpenSSL) sends it anyway, and the handshake fails.
		out, err := runPsql(g.tlsURL("alice", userPass, pki.caFile, "sslcert="+pki.strangerCert, "sslkey="+pki.strangerKey), "SELECT 1;\n")
		if err == nil || !strings.Contains(out, "unknown ca") {
			t.Fatalf("psql with a certificate from an unknown CA: want = refused in the handshake (unknown ca), got = %v:\n%s", err, out)
		}
	})
	t.Run("stalled handshake", func(t *testing.T) {
		c := rawConn(t, g)
		if _, err := c.Write([]byte{0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f}); err != nil { // SSLRequest
			t.Fatal(err)
		}
		b := make([]byte, 1)
		if _, err := c.Read(b); err != nil || b[0] != 'S' {
			t.Fatalf("want = 'S', got = %q (%v)", b, err)
		}
		start := time.Now()
		_, err := c.Read(b) // say nothing: the governor gives up
		if err == nil || time.Since(start) > 5*time.Second {
			t.Fatalf("want = closed within timeouts.client_login, got = %v after %s", err, time.Since(start))
		}
	})
	t.Run("certificate rotation", func(t *testing.T) {
		held := connectPgx(t, g.tlsURL("alice", userPass, pki.caFile))
		serial := func(conn *pgx.Conn) string {
			return conn.PgConn().Conn().(*tls.Conn).ConnectionState().PeerCertificates[0].SerialNumber.String()
		}
		if got := serial(held); got != pki.serverCert.Cert.SerialNumber.String() {
			t.Fatalf("before: want = the first certificate, got = serial %s", got)
		}
		next := pki.issueServer(t)
		if err := pki.mount.Update(map[string][]byte{"tls.crt": next.CertPEM, "tls.key": next.KeyPEM}); err != nil {
			t.Fatal(err)
		}
		fresh := connectPgx(t, g.tlsURL("alice", userPass, pki.caFile))
		if got := serial(fresh); got != next.Cert.SerialNumber.String() {
			t.Fatalf("new client: want = the new certificate, got = serial %s", got)
		}
		mustExec(t, held, "SELECT 1") // the connected client carries on
		if st := g.g.securityStats().ClientTLS; st == nil || st.Reloads != 1 || !st.CertNotAfter.Equal(next.Cert.NotAfter) {
			t.Fatalf("kept for metrics: want = 1 reload and the new expiry, got = %+v", st)
		}
	})
}

// TestClientCertAuth: clients.auth cert with clients.tls.mode
// verify-client logs in the user named by the certificate's CN, as
// Postgres' cert method, and refuses any other user and clients without a
// certificate.
func TestClientCertAuth(t *testing.T) {
	pki := newClientPKI(t)
	g := startGov(t, nil, func(c *config.Config) {
		c.Clients.Auth = config.AuthCert
		c.Clients.TLS = config.ClientTLS{Mode: "verify-client", CertFile: pki.mount.Path("tls.crt"), KeyFile: pki.mount.Path("tls.key"), ClientCAFile: pki.caFile}
		c.Budget.Max = 2
	})
	ctx := context.Background()
	aliceCert := []string{"sslcert=" + pki.aliceCert, "sslkey=" + pki.aliceKey}
	conn, err := pgx.Connect(ctx, g.tlsURL("alice", "", pki.caFile, aliceCert...))
	if err != nil {
		t.Fatalf("pgx as alice with alice's certificate: want = logged in, got = %v", err)
	}
	var user string
	if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil || user != "app" {
		t.Fatalf("want = served upstream as app, got = %q (%v)", user, err)
	}
	conn.Close(ctx)

	_, err = pgx.Connect(ctx, g.tlsURL("bob", "", pki.caFile, aliceCert...))
	e := assertCode(t, err, "28000")
	if e.Message != `certificate authentication failed for user "bob"` {
		t.Fatalf("bob with alice's certificate: want = Postgres' message, got = %q", e.Message)
	}
	if _, err := pgx.Connect(ctx, g.tlsURL("alice", "", pki.caFile)); err == nil {
		t.Fatal("without a client certificate: want = refused, got = logged in")
	}
	_, err = pgx.Connect(ctx, g.url("alice", "", "appdb"))
	assertCode(t, err, "28000")

	db, err := sql.Open("postgres", g.tlsURL("bob", "", pki.caFile, "sslcert="+pki.bobCert, "sslkey="+pki.bobKey))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Ping(); err != nil {
		t.Fatalf("lib/pq as bob with bob's certificate: want = logged in, got = %v", err)
	}
	out, err := runPsql(g.tlsURL("alice", "", pki.caFile, aliceCert...), "SELECT 'cert-login';\n")
	if err != nil || !strings.Contains(out, "cert-login") {
		t.Fatalf("psql with alice's certificate: want = logged in, got = %v:\n%s", err, out)
	}
	if n := g.logs.FilterMessage("login failed").FilterFieldKey("client_cert_cn").Len(); n == 0 {
		t.Fatal("refused logins: want = logged with the certificate's CN, got = none")
	}
}

// runPsql runs psql on url with script on its standard input.
func runPsql(url, script string) (string, error) {
	cmd := exec.Command("psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", url)
	cmd.Stdin = strings.NewReader(script)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}
