package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/lib/pq"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// Passwords of the hba tests' users (in testSecrets: never logged).
const (
	hbaSCRAMPass  = "hba-scram-pw"
	hbaMD5Pass    = "hba-md5-pw"
	hbaClearPass  = "hba-clear-pw"
	hbaTLSPass    = "hba-tls-pw"
	hbaPlainPass  = "hba-plain-pw"
	hbaRejectPass = "hba-reject-pw"
)

// hbaRules is the file TestHBAFile runs under: every method, the Unix
// socket, TLS-only and plaintext-only users, a reject line, first match
// wins (sc may use appdb and the console, and nothing else), an @file.
const hbaRules = `# TYPE   DATABASE           USER          ADDRESS                    METHOD
local     all                trusty                                   trust
local     all                all                                      scram-sha-256
hostssl   all                certy         127.0.0.1/32               cert
hostssl   all                tlsonly       127.0.0.1/32               scram-sha-256
hostnossl all                plainonly     127.0.0.1/32               scram-sha-256
host      all                rj            127.0.0.1/32               reject
host      appdb,pggovernor   sc            127.0.0.1 255.255.255.255  scram-sha-256
host      all                sc            127.0.0.1/32               reject    # first match wins
host      all                m5            127.0.0.0/8                md5
host      all                @clear.txt    127.0.0.1/32               \
                                                                      password
`

// writeAtomic replaces a file as an editor or the kubelet does: a new
// file renamed over the old one (a new inode, seen at once).
func writeAtomic(t testing.TB, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// hbaFiles writes the hba file (with clear.txt beside it) and the users
// file of the hba tests.
func hbaFiles(t *testing.T, rules string) (hbaFile, users string) {
	t.Helper()
	dir := t.TempDir()
	writeAtomic(t, filepath.Join(dir, "clear.txt"), "clr\n# ghost has no users-file entry\nghost\n")
	hbaFile = filepath.Join(dir, "pg_hba.conf")
	writeAtomic(t, hbaFile, rules)
	users = usersFile(t,
		fmt.Sprintf("%q %q", "sc", scramVerifierFor(t, hbaSCRAMPass)),
		fmt.Sprintf("%q %q", "m5", "md5"+md5hex(hbaMD5Pass+"m5")),
		fmt.Sprintf("%q %q", "clr", scramVerifierFor(t, hbaClearPass)), // the password method checks a SCRAM entry too
		fmt.Sprintf("%q %q", "tlsonly", hbaTLSPass),
		fmt.Sprintf("%q %q", "plainonly", hbaPlainPass),
		fmt.Sprintf("%q %q", "rj", hbaRejectPass),
		fmt.Sprintf("%q %q", "trusty", "unused"))
	return hbaFile, users
}

// authRequest connects with a raw pgproto3 Frontend (over TLS when tlsCfg
// is set) and returns the first message after the StartupMessage: the
// authentication request the governor chose, or its ErrorResponse.
func authRequest(t *testing.T, network, addr string, tlsCfg *tls.Config, user, db string) pgproto3.BackendMessage {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	conn := c
	if tlsCfg != nil {
		if _, err := c.Write([]byte{0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f}); err != nil { // SSLRequest
			t.Fatal(err)
		}
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil || b[0] != 'S' {
			t.Fatalf("SSLRequest: want = 'S', got = %q (%v)", b, err)
		}
		tc := tls.Client(c, tlsCfg)
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		conn = tc
	}
	if _, err := conn.Write(startupPacket(map[string]string{"user": user, "database": db})); err != nil {
		t.Fatal(err)
	}
	msg, err := pgproto3.NewFrontend(bufio.NewReader(conn), conn).Receive()
	if err != nil {
		t.Fatalf("%s@%s: reading the answer to the StartupMessage: %v", user, db, err)
	}
	switch m := msg.(type) { // the frontend reuses its messages: copy
	case *pgproto3.ErrorResponse:
		cp := *m
		return &cp
	case *pgproto3.AuthenticationSASL:
		return &pgproto3.AuthenticationSASL{AuthMechanisms: append([]string(nil), m.AuthMechanisms...)}
	}
	return msg
}

// TestHBAFile: with clients.hba_file, each login gets exactly the method of
// the first line it matches — seen as the AuthenticationRequest a raw
// client receives, and by pgx, lib/pq and psql logging in over TCP, TLS
// and the Unix socket — and a login no line admits, or a reject line
// refuses, gets Postgres' 28000 error word for word; hostssl lines never
// match plaintext and hostnossl lines never match TLS; the console follows
// the same rules.
func TestHBAFile(t *testing.T) {
	pki := newClientPKI(t)
	_, certyCert, certyKey := clientCert(t, pki.ca, "certy")
	hbaFile, users := hbaFiles(t, hbaRules)
	sockDir := t.TempDir()
	g := startGov(t, nil, func(c *config.Config) {
		c.Clients.HBAFile = hbaFile
		c.Clients.UsersFile = users
		c.Clients.TLS = config.ClientTLS{Mode: "allow", CertFile: pki.mount.Path("tls.crt"), KeyFile: pki.mount.Path("tls.key"), ClientCAFile: pki.caFile}
		c.UnixSocketDir = sockDir
		c.Admin.Users = []string{"sc"}
		c.Budget.Max = 4
	})
	_, port, _ := net.SplitHostPort(g.addr)
	socket := filepath.Join(sockDir, ".s.PGSQL."+port)
	ctx := context.Background()

	t.Run("authentication requests", func(t *testing.T) {
		certy, err := tls.LoadX509KeyPair(certyCert, certyKey)
		if err != nil {
			t.Fatal(err)
		}
		plainTLS := &tls.Config{InsecureSkipVerify: true}                                        //nolint:gosec // the test's own server
		certTLS := &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{certy}} //nolint:gosec // the test's own server
		noEntry := func(user, db, enc string) string {
			return fmt.Sprintf("no pg_hba.conf entry for host \"127.0.0.1\", user \"%s\", database \"%s\", %s", user, db, enc)
		}
		for _, c := range []struct {
			name          string
			network, addr string
			tls           *tls.Config
			user, db      string
			want          string // the message's type, or the error's message
		}{
			{"local trust", "unix", socket, nil, "trusty", "appdb", "*pgproto3.AuthenticationOk"},
			{"local scram", "unix", socket, nil, "sc", "otherdb", "*pgproto3.AuthenticationSASL SCRAM-SHA-256"},
			{"hostssl cert", "tcp", g.addr, certTLS, "certy", "appdb", "*pgproto3.AuthenticationOk"},
			{"hostssl cert without a certificate", "tcp", g.addr, plainTLS, "certy", "appdb", "connection requires a valid client certificate"},
			{"hostssl never matches plaintext", "tcp", g.addr, nil, "certy", "appdb", noEntry("certy", "appdb", "no encryption")},
			{"hostssl scram: -PLUS offered first", "tcp", g.addr, plainTLS, "tlsonly", "appdb", "*pgproto3.AuthenticationSASL SCRAM-SHA-256-PLUS,SCRAM-SHA-256"},
			{"TLS-only user in plaintext", "tcp", g.addr, nil, "tlsonly", "appdb", noEntry("tlsonly", "appdb", "no encryption")},
			{"hostnossl scram", "tcp", g.addr, nil, "plainonly", "appdb", "*pgproto3.AuthenticationSASL SCRAM-SHA-256"},
			{"hostnossl never matches TLS", "tcp", g.addr, plainTLS, "plainonly", "appdb", noEntry("plainonly", "appdb", "SSL encryption")},
			{"reject", "tcp", g.addr, nil, "rj", "appdb", `pg_hba.conf rejects connection for host "127.0.0.1", user "rj", database "appdb", no encryption`},
			{"reject over TLS", "tcp", g.addr, plainTLS, "rj", "appdb", `pg_hba.conf rejects connection for host "127.0.0.1", user "rj", database "appdb", SSL encryption`},
			{"first match: sc to appdb", "tcp", g.addr, nil, "sc", "appdb", "*pgproto3.AuthenticationSASL SCRAM-SHA-256"},
			{"first match: sc elsewhere", "tcp", g.addr, nil, "sc", "otherdb", `pg_hba.conf rejects connection for host "127.0.0.1", user "sc", database "otherdb", no encryption`},
			{"md5", "tcp", g.addr, nil, "m5", "appdb", "*pgproto3.AuthenticationMD5Password"},
			{"password from an @file", "tcp", g.addr, nil, "clr", "appdb", "*pgproto3.AuthenticationCleartextPassword"},
			{"password over TLS (host matches TLS)", "tcp", g.addr, plainTLS, "clr", "appdb", "*pgproto3.AuthenticationCleartextPassword"},
			{"unknown user on a password line", "tcp", g.addr, nil, "ghost", "appdb", "*pgproto3.AuthenticationCleartextPassword"},
			{"no line", "tcp", g.addr, nil, "nobody", "appdb", noEntry("nobody", "appdb", "no encryption")},
			{"the database defaults to the user", "tcp", g.addr, nil, "nobody", "", noEntry("nobody", "nobody", "no encryption")},
		} {
			t.Run(c.name, func(t *testing.T) {
				msg := authRequest(t, c.network, c.addr, c.tls, c.user, c.db)
				got := fmt.Sprintf("%T", msg)
				switch m := msg.(type) {
				case *pgproto3.AuthenticationSASL:
					got += " " + strings.Join(m.AuthMechanisms, ",")
				case *pgproto3.ErrorResponse:
					if m.Code != "28000" || m.Severity != "FATAL" {
						t.Fatalf("want = FATAL 28000, got = %s %s: %s", m.Severity, m.Code, m.Message)
					}
					got = m.Message
				}
				if got != c.want {
					t.Fatalf("want = %s, got = %s", c.want, got)
				}
			})
		}
	})

	tlsURL := func(user, password string, extra ...string) string {
		return g.tlsURL(user, password, pki.caFile, extra...)
	}
	certParams := []string{"sslcert=" + certyCert, "sslkey=" + certyKey}
	sockDSN := func(user, password, db string) string {
		dsn := fmt.Sprintf("host=%s port=%s user=%s dbname=%s sslmode=disable", sockDir, port, user, db)
		if password != "" {
			dsn += " password=" + password
		}
		return dsn
	}
	logins := []struct {
		name, url, user string
	}{
		{"trust over the unix socket", sockDSN("trusty", "", "appdb"), "trusty"},
		{"scram over the unix socket", sockDSN("sc", hbaSCRAMPass, "otherdb"), "sc"},
		{"cert over TLS", tlsURL("certy", "", certParams...), "certy"},
		{"scram over TLS only", tlsURL("tlsonly", hbaTLSPass), "tlsonly"},
		{"scram in plaintext only", g.url("plainonly", hbaPlainPass, "appdb"), "plainonly"},
		{"scram for appdb", g.url("sc", hbaSCRAMPass, "appdb"), "sc"},
		{"md5", g.url("m5", hbaMD5Pass, "appdb"), "m5"},
		{"password", g.url("clr", hbaClearPass, "appdb"), "clr"},
		{"password over TLS", tlsURL("clr", hbaClearPass), "clr"},
	}
	type refusal struct {
		name, url, code, message string
	}
	refusals := []refusal{
		{"reject", g.url("rj", hbaRejectPass, "appdb"), "28000", `pg_hba.conf rejects connection for host "127.0.0.1", user "rj", database "appdb", no encryption`},
		{"first match wins", g.url("sc", hbaSCRAMPass, "otherdb"), "28000", `pg_hba.conf rejects connection for host "127.0.0.1", user "sc", database "otherdb", no encryption`},
		{"a TLS-only user in plaintext", g.url("tlsonly", hbaTLSPass, "appdb"), "28000", `no pg_hba.conf entry for host "127.0.0.1", user "tlsonly", database "appdb", no encryption`},
		{"a plaintext-only user over TLS", tlsURL("plainonly", hbaPlainPass), "28000", `no pg_hba.conf entry for host "127.0.0.1", user "plainonly", database "appdb", SSL encryption`},
		{"no line", g.url("nobody", "x", "appdb"), "28000", `no pg_hba.conf entry for host "127.0.0.1", user "nobody", database "appdb", no encryption`},
		{"wrong password", g.url("clr", "wrong", "appdb"), "28P01", `password authentication failed for user "clr"`},
		{"unknown user, as a wrong password", g.url("ghost", "wrong", "appdb"), "28P01", `password authentication failed for user "ghost"`},
		{"md5 with a wrong password", g.url("m5", "wrong", "appdb"), "28P01", `password authentication failed for user "m5"`},
	}

	t.Run("pgx", func(t *testing.T) {
		for _, l := range logins {
			conn, err := pgx.Connect(ctx, l.url)
			if err != nil {
				t.Fatalf("%s: want = logged in, got = %v", l.name, err)
			}
			mustExec(t, conn, "SELECT 1")
			conn.Close(ctx)
		}
		for _, r := range refusals {
			_, err := pgx.Connect(ctx, r.url)
			if e := assertCode(t, err, r.code); e.Message != r.message {
				t.Fatalf("%s: want = %q, got = %q", r.name, r.message, e.Message)
			}
		}
	})
	t.Run("lib/pq", func(t *testing.T) {
		for _, l := range logins {
			db, err := sql.Open("postgres", l.url)
			if err != nil {
				t.Fatal(err)
			}
			var one int
			if err := db.QueryRow("SELECT $1::int", 1).Scan(&one); err != nil || one != 1 {
				t.Fatalf("%s: want = 1, got = %d (%v)", l.name, one, err)
			}
			db.Close()
		}
		for _, r := range refusals {
			db, _ := sql.Open("postgres", r.url)
			err := db.Ping()
			db.Close()
			var pqErr *pq.Error
			if !errors.As(err, &pqErr) || string(pqErr.Code) != r.code || pqErr.Message != r.message {
				t.Fatalf("%s: want = %s %q, got = %v", r.name, r.code, r.message, err)
			}
		}
	})
	t.Run("psql", func(t *testing.T) {
		for _, l := range logins {
			out, err := runPsql(l.url, "SELECT 'in-as-' || current_setting('application_name', true);\n")
			if err != nil || !strings.Contains(out, "in-as-") {
				t.Fatalf("%s: want = logged in, got = %v:\n%s", l.name, err, out)
			}
		}
		for _, r := range refusals {
			out, err := runPsql(r.url, "SELECT 1;\n")
			if err == nil || !strings.Contains(out, "FATAL:  "+r.message) {
				t.Fatalf("%s: want = psql showing FATAL:  %s, got = %v:\n%s", r.name, r.message, err, out)
			}
		}
	})
	t.Run("console", func(t *testing.T) {
		// The console database is matched like any other: sc may use it
		// (appdb,pggovernor), rj is rejected, m5 logs in and is refused
		// for not being in admin.users.
		out, err := runPsql(g.url("sc", hbaSCRAMPass, "pggovernor"), "SHOW VERSION;\n")
		if err != nil || !strings.Contains(out, "pggovernor") {
			t.Fatalf("sc to the console: want = served, got = %v:\n%s", err, out)
		}
		_, err = pgx.Connect(ctx, g.url("rj", hbaRejectPass, "pggovernor"))
		if e := assertCode(t, err, "28000"); e.Message != `pg_hba.conf rejects connection for host "127.0.0.1", user "rj", database "pggovernor", no encryption` {
			t.Fatalf("rj to the console: want = Postgres' reject message, got = %q", e.Message)
		}
		_, err = pgx.Connect(ctx, g.url("m5", hbaMD5Pass, "pgbouncer"))
		assertCode(t, err, "42501")
	})
	t.Run("logged and counted", func(t *testing.T) {
		rejected := g.logs.FilterMessage("login failed").FilterField(zap.String("hba_rule", hbaFile+":7"))
		if rejected.Len() == 0 {
			t.Fatalf("want = rj's refusals logged with the line that rejected them (%s:7)", hbaFile)
		}
		fams, err := g.g.registry.Gather()
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, f := range fams {
			if f.GetName() != "pggovernor_login_failures_total" {
				continue
			}
			for _, m := range f.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "reason" && l.GetValue() == "hba_rejected" && m.GetCounter().GetValue() > 0 {
						found = true
					}
				}
			}
		}
		if !found {
			t.Fatal("want = pggovernor_login_failures_total{reason=\"hba_rejected\"} counted")
		}
	})
}

// TestHBAFileReload: the hba file is read again on use when it changes,
// and on SIGHUP (a real signal to the binary); a version that does not
// parse is refused as a whole, logged with its file and line, and the
// previous rules stay.
func TestHBAFileReload(t *testing.T) {
	hbaFile, users := hbaFiles(t, "host all m5 127.0.0.1/32 md5\n")
	p := startProcess(t, []string{"PGGOVERNOR_UPSTREAM_PASSWORD=" + appPass},
		"--upstream-url="+shared.URL("app", "", "appdb"), "--clients.users-file="+users, "--clients.hba-file="+hbaFile,
		"--budget.max=2", "--log.level=info")
	ctx := context.Background()
	login := func(user, password string) error {
		conn, err := pgx.Connect(ctx, p.url(user, password, "appdb"))
		if err == nil {
			conn.Close(ctx)
		}
		return err
	}
	if err := login("m5", hbaMD5Pass); err != nil {
		t.Fatalf("first version: m5: %v", err)
	}
	assertCode(t, login("clr", hbaClearPass), "28000")

	// On use: the next login reads the new version.
	writeAtomic(t, hbaFile, "host all m5 127.0.0.1/32 reject\nhost all @clear.txt 127.0.0.1/32 password\n")
	if e := assertCode(t, login("m5", hbaMD5Pass), "28000"); !strings.HasPrefix(e.Message, "pg_hba.conf rejects connection") {
		t.Fatalf("second version: m5: want = rejected, got = %q", e.Message)
	}
	if err := login("clr", hbaClearPass); err != nil {
		t.Fatalf("second version: clr: %v", err)
	}
	if !strings.Contains(p.stderr.String(), "hba file changed and was reloaded") {
		t.Fatalf("want = the reload on use logged:\n%s", p.stderr)
	}

	// A broken version is refused as a whole: the second version stays,
	// and the error names the file and line.
	writeAtomic(t, hbaFile, "host all all 127.0.0.1/32 trust\nhost all m5 127.0.0.1/32 frob\n")
	if err := login("clr", hbaClearPass); err != nil {
		t.Fatalf("broken version: clr under the previous rules: %v", err)
	}
	assertCode(t, login("clr", "wrong"), "28P01") // not the broken version's trust line
	wantErr := hbaFile + `:2: invalid authentication method \"frob\"`
	if s := p.stderr.String(); !strings.Contains(s, "cannot be used; keeping the previous rules") || !strings.Contains(s, wantErr) {
		t.Fatalf("want = the broken version logged with %s:\n%s", wantErr, s)
	}
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the failed reload to be logged", func() bool {
		return strings.Contains(p.stderr.String(), "reloading the hba file failed; keeping the previous rules")
	})
	assertCode(t, login("clr", "wrong"), "28P01")

	// SIGHUP reads a good version; the log says so before any login.
	writeAtomic(t, hbaFile, "host all m5 127.0.0.1/32 md5\n")
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the reload to be logged", func() bool { return strings.Contains(p.stderr.String(), "hba file reloaded") })
	if err := login("m5", hbaMD5Pass); err != nil {
		t.Fatalf("after SIGHUP: m5: %v", err)
	}
	assertCode(t, login("clr", hbaClearPass), "28000")
}

// TestHBAFileStartAndDoctor: a file that does not parse, or does not fit
// the rest of the configuration, stops the start with file:line; doctor
// prints the same problems, and the rules it loaded.
func TestHBAFileStartAndDoctor(t *testing.T) {
	dir := t.TempDir()
	broken := filepath.Join(dir, "broken.conf")
	writeAtomic(t, broken, "local all all trust\nhost all +admins all md5\n")
	noTLS := filepath.Join(dir, "notls.conf")
	writeAtomic(t, noTLS, "hostssl all all 127.0.0.1/32 scram-sha-256\n")
	good := filepath.Join(dir, "good.conf")
	writeAtomic(t, good, "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
	for _, c := range []struct{ file, want string }{
		{broken, broken + `:2: group name "+admins" is not supported`},
		{noTLS, noTLS + ":1: hostssl record cannot match because TLS is disabled"},
		{filepath.Join(dir, "missing.conf"), "no such file or directory"},
	} {
		cfg := config.Default()
		cfg.Listen, cfg.AdminListen = "127.0.0.1:0", ""
		cfg.Upstream.URL, cfg.Upstream.Password = shared.URL("app", "", "appdb"), appPass
		cfg.Clients.UsersFile = usersFile(t)
		cfg.Clients.HBAFile = c.file
		g, err := start(context.Background(), &cfg, zap.NewNop())
		if err == nil {
			g.stop(zap.NewNop(), 0)
			t.Fatalf("%s: want = the start refused, got = started", c.file)
		}
		if !strings.Contains(err.Error(), "key clients.hba_file: ") || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("want = an error naming %q, got = %v", c.want, err)
		}
	}
	doctor := func(file string, extra ...string) (string, error) {
		var out, errOut strings.Builder
		err := execute(context.Background(), append([]string{"doctor", "--upstream-url=" + shared.URL("app", "", "appdb"),
			"--upstream.password=" + appPass, "--clients.users-file=" + usersFile(t), "--clients.hba-file=" + file}, extra...), nil, &out, &errOut)
		return out.String(), err
	}
	out, err := doctor(broken)
	if err == nil || !strings.Contains(out, "PROBLEM: key clients.hba_file: "+broken+`:2: group name "+admins"`) {
		t.Fatalf("doctor with a broken hba file: want = a PROBLEM naming line 2, got = %v:\n%s", err, out)
	}
	out, err = doctor(good)
	if err != nil || !strings.Contains(out, "config: clients.hba_file") || !strings.Contains(out, good+" (2 rules)") {
		t.Fatalf("doctor with a good hba file: want = its rules counted and no problem, got = %v:\n%s", err, out)
	}
	out, err = doctor(good, "--clients.auth=md5")
	if err == nil || !strings.Contains(out, "PROBLEM: clients.auth is set but not used") {
		t.Fatalf("doctor with clients.auth and clients.hba_file: want = a PROBLEM, got = %v:\n%s", err, out)
	}
}

// TestHBAMessagesMatchPostgres: the same rules in Postgres' own
// pg_hba.conf and in clients.hba_file give a client the same refusal,
// severity, SQLSTATE and message, word for word.
func TestHBAMessagesMatchPostgres(t *testing.T) {
	lines := []string{"host all rj 127.0.0.1/32 reject", "host appdb app 127.0.0.1/32 scram-sha-256", "host all m5 127.0.0.1/32 scram-sha-256"}
	pg := privateCluster(t, pgtest.Options{HBA: lines})
	hbaFile, users := hbaFiles(t, strings.Join(lines, "\n")+"\n")
	g := startGov(t, pg, func(c *config.Config) {
		c.Clients.HBAFile = hbaFile
		c.Clients.UsersFile = users
		c.Budget.Max = 2
	})
	ctx := context.Background()
	for _, c := range []struct{ user, db string }{{"rj", "appdb"}, {"nobody", "appdb"}, {"app", "otherdb"}, {"m5", "appdb"}} {
		_, direct := pgx.Connect(ctx, pg.URL(c.user, "wrong", c.db))
		_, through := pgx.Connect(ctx, g.url(c.user, "wrong", c.db))
		var want, got *pgconn.PgError
		if !errors.As(direct, &want) || !errors.As(through, &got) {
			t.Fatalf("%s@%s: want = two server errors, got = %v and %v", c.user, c.db, direct, through)
		}
		if got.Severity != want.Severity || got.Code != want.Code || got.Message != want.Message {
			t.Fatalf("%s@%s: want = Postgres' %s %s %q, got = %s %s %q", c.user, c.db, want.Severity, want.Code, want.Message, got.Severity, got.Code, got.Message)
		}
	}
}

// Passwords of TestMD5ExchangeMatchesPostgres's roles (in testSecrets).
const (
	md5StoredPass   = "md5-stored-pw-8a1"
	scramStoredPass = "scram-stored-pw-2c7"
)

// TestMD5ExchangeMatchesPostgres: with the md5 method, the governor offers
// each user the exchange Postgres 15 offers for the same line and the same
// stored passwords — md5 for a password stored as md5, SCRAM for one
// stored as SCRAM, and for a user that does not exist what
// password_encryption says — so that the method offered does not tell
// which users exist; and each logs in with its password.
func TestMD5ExchangeMatchesPostgres(t *testing.T) {
	ctx := context.Background()
	pg := privateCluster(t, pgtest.Options{HBA: []string{"host all all 127.0.0.1/32 md5"}})
	for _, r := range []struct{ name, enc, pw string }{{"md5_stored", "md5", md5StoredPass}, {"scram_stored", "scram-sha-256", scramStoredPass}} {
		if _, err := pg.Exec(ctx, fmt.Sprintf("SET password_encryption = '%s'; CREATE ROLE %s LOGIN PASSWORD %s", r.enc, r.name, pgtest.QuoteLiteral(r.pw))); err != nil {
			t.Fatal(err)
		}
	}
	// The users file holds what Postgres stored.
	rows, err := pg.Exec(ctx, "SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN ('md5_stored', 'scram_stored')")
	if err != nil {
		t.Fatal(err)
	}
	lines := []string{fmt.Sprintf("%q %q", "app", appPass)}
	for _, r := range rows {
		lines = append(lines, fmt.Sprintf("%q %q", r[0], r[1]))
	}
	users := usersFile(t, lines...)
	typeOf := func(m pgproto3.BackendMessage) string { return fmt.Sprintf("%T", m) }
	for _, enc := range []string{"scram-sha-256", "md5"} {
		t.Run(enc, func(t *testing.T) {
			if _, err := pg.Exec(ctx, fmt.Sprintf("ALTER SYSTEM SET password_encryption = '%s'", enc)); err != nil {
				t.Fatal(err)
			}
			if _, err := pg.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 10*time.Second, "the server to use password_encryption "+enc, func() bool {
				r, err := pg.Exec(ctx, "SHOW password_encryption")
				return err == nil && r[0][0] == enc
			})
			g := startGov(t, pg, func(c *config.Config) {
				c.Clients.Auth = config.AuthMD5
				c.Clients.PasswordEncryption = enc
				c.Clients.UsersFile = users
				c.Budget.Max = 2
			})
			for _, user := range []string{"md5_stored", "scram_stored", "no_such_user"} {
				direct := typeOf(authRequest(t, "tcp", pg.Addr(), nil, user, "appdb"))
				through := typeOf(authRequest(t, "tcp", g.addr, nil, user, "appdb"))
				if through != direct {
					t.Fatalf("%s: want = Postgres' %s, got = %s", user, direct, through)
				}
			}
			for user, pw := range map[string]string{"md5_stored": md5StoredPass, "scram_stored": scramStoredPass} {
				conn, err := pgx.Connect(ctx, g.url(user, pw, "appdb"))
				if err != nil {
					t.Fatalf("%s through the governor: want = logged in, got = %v", user, err)
				}
				conn.Close(ctx)
				_, err = pgx.Connect(ctx, g.url(user, "wrong", "appdb"))
				assertCode(t, err, "28P01")
			}
			_, err := pgx.Connect(ctx, g.url("no_such_user", "wrong", "appdb"))
			assertCode(t, err, "28P01")
		})
	}
}
