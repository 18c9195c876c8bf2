package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
	"github.com/pggovernor/pggovernor/pool"
)

// Secrets of the tests in this file (listed in testSecrets).
const (
	k8sOldPass = "k8s-old-pw-3f8"
	k8sNewPass = "k8s-new-pw-9c1"
	newbiePass = "newbie-pw-71d"
)

// awsTestCreds are static AWS keys (the documentation's example access
// key) that sign the tests' IAM tokens.
var awsTestCreds = aws.Credentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY", Source: "test"}

const iamRegion = "eu-west-3"

// rdsLike starts the scripted RDS-like upstream: TLS with a certificate for
// 127.0.0.1, and a cleartext password that must be an IAM token for user,
// signed with awsTestCreds for its endpoint and iamRegion. It returns the
// backend and the file of the CA that signed its certificate.
func rdsLike(t *testing.T, user string) (*pgtest.CleartextBackend, string) {
	t.Helper()
	return rdsLikeWith(t, user, pgtest.CertOptions{CommonName: "rds.test", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
}

// rdsLikeWith is rdsLike with a certificate for names.
func rdsLikeWith(t *testing.T, user string, names pgtest.CertOptions) (*pgtest.CleartextBackend, string) {
	t.Helper()
	ca, err := pgtest.NewCA("RDS-like test CA")
	if err != nil {
		t.Fatal(err)
	}
	kp, err := ca.Issue(names)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := kp.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	var want atomic.Pointer[pgtest.IAMTokenWant]
	b, err := pgtest.StartCleartextBackend(pgtest.CleartextOptions{
		TLS: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		Check: func(u, password string) error {
			w := want.Load()
			if w == nil {
				return errors.New("not ready")
			}
			_, err := pgtest.VerifyIAMToken(password, *w)
			return err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	want.Store(&pgtest.IAMTokenWant{Host: "127.0.0.1", Port: b.Port(), User: user, Region: iamRegion, Credentials: awsTestCreds})
	return b, writeFile(t, t.TempDir(), "rds-ca.crt", ca.CertPEM)
}

// selectOne runs SELECT 1 in the simple protocol (all the scripted
// upstream understands).
func selectOne(ctx context.Context, url string) error {
	conn, err := pgconn.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "SELECT 1").ReadAll()
	return err
}

// TestIAMTokenThroughGovernor: configured by Coder's environment
// (DB_CONNECTOR=awsiamrds, DB_SSL_MODE, DB_ROOT_CERT) with static keys in
// the environment, where aws-sdk-go-v2's default chain finds them, the
// governor logs in to an RDS-like upstream over verified TLS with a token
// that verifies as a SigV4 presigned URL for the right host, port, user,
// region and expiry, recomputed with the same keys; the second server
// connection reuses the cached token; the token is not in the logs.
func TestIAMTokenThroughGovernor(t *testing.T) {
	rds, caFile := rdsLike(t, "iamuser")
	noFile := filepath.Join(t.TempDir(), "none")
	env := []string{
		"DB_HOST=127.0.0.1", fmt.Sprintf("DB_PORT=%d", rds.Port()), "DB_USER=iamuser", "DB_NAME=appdb",
		"DB_SSL_MODE=verify-full", "DB_ROOT_CERT=" + caFile, "DB_CONNECTOR=awsiamrds",
		"AWS_ACCESS_KEY_ID=" + awsTestCreds.AccessKeyID, "AWS_SECRET_ACCESS_KEY=" + awsTestCreds.SecretAccessKey,
		"AWS_SESSION_TOKEN=", "AWS_PROFILE=", "AWS_REGION=" + iamRegion, "AWS_EC2_METADATA_DISABLED=true",
		"AWS_CONFIG_FILE=" + noFile, "AWS_SHARED_CREDENTIALS_FILE=" + noFile,
	}
	started := time.Now().UTC().Truncate(time.Second)
	p := startProcess(t, env, "--clients.users-file="+usersFile(t), "--budget.max=2", "--pool-mode=session", "--log.level=debug")
	ctx := context.Background()
	// Two clients at once in session mode: two server connections.
	first, err := pgconn.Connect(ctx, p.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatalf("first client: %v\n%s", err, p.stderr)
	}
	defer first.Close(ctx)
	if err := selectOne(ctx, p.url("alice", userPass, "appdb")); err != nil {
		t.Fatalf("second client: %v\n%s", err, p.stderr)
	}
	logins := rds.Logins()
	if len(logins) != 2 {
		t.Fatalf("logins upstream: want = 2, got = %d", len(logins))
	}
	want := pgtest.IAMTokenWant{Host: "127.0.0.1", Port: rds.Port(), User: "iamuser", Region: iamRegion, Credentials: awsTestCreds}
	for i, l := range logins {
		if !l.TLS || l.User != "iamuser" || l.Database != "appdb" {
			t.Fatalf("login %d: want = iamuser on appdb over TLS, got = %+v", i, l)
		}
		signedAt, err := pgtest.VerifyIAMToken(l.Password, want)
		if err != nil {
			t.Fatalf("login %d: want = a valid IAM token, got = %v", i, err)
		}
		if signedAt.Before(started) || signedAt.After(time.Now().Add(time.Second)) {
			t.Fatalf("login %d: X-Amz-Date: want = during the test, got = %s", i, signedAt)
		}
	}
	if logins[0].Password != logins[1].Password {
		t.Fatal("second server connection: want = the cached token, got = a new one")
	}
	if strings.Contains(p.stderr.String(), "X-Amz-") {
		t.Fatal("a token reached the log")
	}
}

// TestIAMNeedsAVerifiedServer: an RDS IAM token goes only to a server
// whose certificate was verified. With verify-full and a certificate that
// does not name the host, the client gets 08006 and the server never sees
// a token; with verify-ca, accepted only with
// upstream.ssl.allow_verify_ca_for_iam, the same server gets one.
func TestIAMNeedsAVerifiedServer(t *testing.T) {
	rds, caFile := rdsLikeWith(t, "iamuser", pgtest.CertOptions{CommonName: "proxy.internal", DNSNames: []string{"proxy.internal"}})
	ctx := context.Background()
	for _, c := range []struct {
		mode    string
		allowCA bool
		want    string // SQLSTATE; "" for a working connection
	}{
		{"verify-full", false, "08006"},
		{"verify-ca", true, ""},
	} {
		t.Run(c.mode, func(t *testing.T) {
			before := len(rds.Logins())
			g := startGov(t, nil, func(cfg *config.Config) {
				cfg.Upstream.URL = fmt.Sprintf("postgres://iamuser@127.0.0.1:%d/appdb?sslmode=%s&sslrootcert=%s", rds.Port(), c.mode, caFile)
				cfg.Upstream.Password = ""
				cfg.Upstream.Connector = config.ConnectorAWSIAMRDS
				cfg.Upstream.AWSRegion = iamRegion
				cfg.Upstream.SSL.AllowVerifyCAForIAM = c.allowCA
				cfg.Budget.Max = 2
				cfg.Timeouts.QueryWait = 2 * time.Second
			}, withAWSCredentials(&switchableCreds{}))
			err := selectOne(ctx, g.url("alice", userPass, "appdb"))
			logins := rds.Logins()[before:]
			if c.want != "" {
				e := assertCode(t, err, c.want)
				if !strings.Contains(e.Detail, "certificate") {
					t.Fatalf("want = the certificate check in the detail, got = %q / %q", e.Message, e.Detail)
				}
				if len(logins) != 0 {
					t.Fatalf("logins upstream: want = none (no token to an unverified server), got = %d", len(logins))
				}
				return
			}
			if err != nil {
				t.Fatalf("verify-ca with upstream.ssl.allow_verify_ca_for_iam: want = connected, got = %v", err)
			}
			if len(logins) != 1 || !logins[0].TLS {
				t.Fatalf("logins upstream: want = 1 over TLS, got = %+v", logins)
			}
		})
	}
}

// clockSource is an injected clock the test moves.
type clockSource struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clockSource) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clockSource) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// switchableCreds returns awsTestCreds, or fails as the default chain does
// where it finds nothing, and counts lookups.
type switchableCreds struct {
	fail  atomic.Bool
	calls atomic.Int64
}

func (c *switchableCreds) Retrieve(context.Context) (aws.Credentials, error) {
	c.calls.Add(1)
	if c.fail.Load() {
		return aws.Credentials{}, errors.New("failed to refresh cached credentials, no EC2 IMDS role found")
	}
	return awsTestCreds, nil
}

// TestIAMTokenCacheAndFailures: with static credentials and an injected
// clock, the governor caches the token across new server connections,
// mints a new one once the cached one is 10 minutes old (before its 15
// minutes), and when minting fails, the waiting client gets a clear error
// naming the cause, the log names it too, and the governor recovers when
// the credentials come back.
func TestIAMTokenCacheAndFailures(t *testing.T) {
	rds, caFile := rdsLike(t, "iamuser")
	clock := &clockSource{now: time.Now()}
	creds := &switchableCreds{}
	g := startGov(t, nil, func(c *config.Config) {
		c.Upstream.URL = fmt.Sprintf("postgres://iamuser@127.0.0.1:%d/appdb?sslmode=verify-full&sslrootcert=%s", rds.Port(), caFile)
		c.Upstream.Password = ""
		c.Upstream.Connector = config.ConnectorAWSIAMRDS
		c.Upstream.AWSRegion = iamRegion
		c.Budget.Max = 2
		c.Timeouts.QueryWait = 2 * time.Second
	}, withAWSCredentials(creds), withClock(clock))
	ctx := context.Background()
	url := g.url("alice", userPass, "appdb")
	newServerConn := func() error {
		waitFor(t, 5*time.Second, "the last server connection to be released", func() bool { return g.g.pool.Stats().InUse == 0 })
		g.g.pool.CloseIdle(ctx, func(pool.Route) bool { return true })
		return selectOne(ctx, url)
	}
	minted := func() uint64 { return g.g.securityStats().IAM.Minted }
	if err := newServerConn(); err != nil {
		t.Fatal(err)
	}
	if err := newServerConn(); err != nil {
		t.Fatal(err)
	}
	if n, m := len(rds.Logins()), minted(); n != 2 || m != 1 {
		t.Fatalf("two server connections within 10 minutes: want = 2 logins with 1 token, got = %d logins, %d tokens", n, m)
	}
	clock.Advance(auth.IAMTokenRefresh)
	if err := newServerConn(); err != nil {
		t.Fatal(err)
	}
	if m := minted(); m != 2 {
		t.Fatalf("after %s: want = a new token (2 minted), got = %d", auth.IAMTokenRefresh, m)
	}
	for i, l := range rds.Logins() {
		if _, err := pgtest.VerifyIAMToken(l.Password, pgtest.IAMTokenWant{Host: "127.0.0.1", Port: rds.Port(), User: "iamuser",
			Region: iamRegion, Credentials: awsTestCreds}); err != nil {
			t.Fatalf("login %d: %v", i, err)
		}
	}

	// The credentials disappear and the cached token is too old to use.
	creds.fail.Store(true)
	clock.Advance(auth.IAMTokenLifetime)
	err := newServerConn()
	e := assertCode(t, err, "08006")
	if !strings.Contains(e.Detail, "no AWS credentials") || !strings.Contains(e.Detail, "no EC2 IMDS role found") || !strings.Contains(e.Hint, "AWS credentials") {
		t.Fatalf("waiting client: want = the cause in the detail and a hint, got = %q / %q / %q", e.Message, e.Detail, e.Hint)
	}
	if n := g.logs.FilterMessage("minting an RDS IAM token failed").FilterField(zap.String("cause", auth.MintNoCredentials)).Len(); n == 0 {
		t.Fatal("log: want = a line naming the cause, got = none")
	}
	if st := g.g.securityStats().IAM; st.NoCredentials == 0 {
		t.Fatalf("mint results: want = failures counted by cause, got = %+v", st)
	}
	// They come back: after the backoff, the next connection gets a token.
	creds.fail.Store(false)
	clock.Advance(10 * time.Second)
	if err := newServerConn(); err != nil {
		t.Fatalf("credentials back: want = connected, got = %v", err)
	}
}

// runFailing runs the binary with env and args and returns its exit code
// and output; it must exit by itself.
func runFailing(t *testing.T, env []string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, governorBinary(t), append([]string{"run", "--admin-listen="}, args...)...)
	cmd.Env = append(cmd.Environ(), env...)
	out, err := cmd.CombinedOutput()
	logsMu.Lock()
	allLogs = append(allLogs, string(out))
	logsMu.Unlock()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("want = the process to exit with an error, got = %v:\n%s", err, out)
	}
	return ee.ExitCode(), string(out)
}

// TestStartRefusals: settings that would be unsafe or cannot work stop the
// start with a message that says why and what to change.
func TestStartRefusals(t *testing.T) {
	users := usersFile(t)
	noFile := filepath.Join(t.TempDir(), "none")
	noAWS := []string{"AWS_REGION=", "AWS_DEFAULT_REGION=", "AWS_PROFILE=", "AWS_CONFIG_FILE=" + noFile, "AWS_SHARED_CREDENTIALS_FILE=" + noFile, "AWS_EC2_METADATA_DISABLED=true"}
	for _, c := range []struct {
		name     string
		env      []string
		args     []string
		wantCode int
		want     []string
	}{
		{"IAM without TLS", noAWS, []string{"--upstream-url=postgres://coder@db.test/coder?sslmode=prefer", "--upstream.connector=awsiamrds", "--upstream.aws-region=" + iamRegion},
			2, []string{"upstream.ssl.mode", "needs TLS", "cleartext"}},
		{"IAM over TLS that does not verify the server", noAWS, []string{"--upstream-url=postgres://coder@db.test/coder?sslmode=require", "--upstream.connector=awsiamrds", "--upstream.aws-region=" + iamRegion},
			2, []string{"upstream.ssl.mode", "man in the middle", "verify-full", "(it is require)"}},
		{"IAM with verify-ca", noAWS, []string{"--upstream-url=postgres://coder@db.test/coder?sslmode=verify-ca", "--upstream.connector=awsiamrds", "--upstream.aws-region=" + iamRegion},
			2, []string{"upstream.ssl.mode", "upstream.ssl.allow_verify_ca_for_iam"}},
		{"IAM without a region", noAWS, []string{"--upstream-url=postgres://coder@db.test/coder?sslmode=verify-full", "--upstream.connector=awsiamrds"},
			1, []string{"upstream.aws_region", "AWS_REGION"}},
		{"trust on a listener other clients can reach", nil, []string{"--listen=0.0.0.0:0", "--clients.auth=trust", "--upstream-url=" + shared.URL("app", "", "appdb")},
			2, []string{"clients.allow_trust_remote"}},
		{"upstream key readable by others", nil, []string{"--upstream-url=" + shared.URL("app", "", "appdb"), "--upstream.ssl.mode=require",
			"--upstream.ssl.cert-file=" + writeFile(t, t.TempDir(), "c.crt", []byte("x")), "--upstream.ssl.key-file=" + worldReadable(t)},
			1, []string{"upstream.ssl.key_file", "group or world access"}},
		{"missing password file", nil, []string{"--upstream-url=" + shared.URL("app", "", "appdb"), "--upstream.password-file=" + noFile},
			1, []string{"upstream.password_file", "does not exist"}},
		{"client TLS without its files", nil, []string{"--upstream-url=" + shared.URL("app", "", "appdb"), "--clients.tls.mode=require"},
			2, []string{"clients.tls.cert_file"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, out := runFailing(t, c.env, append(c.args, "--clients.users-file="+users)...)
			if code != c.wantCode {
				t.Fatalf("exit code: want = %d, got = %d:\n%s", c.wantCode, code, out)
			}
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Fatalf("want = a message with %q, got:\n%s", w, out)
				}
			}
		})
	}
}

func worldReadable(t *testing.T) string {
	t.Helper()
	p := writeFile(t, t.TempDir(), "world.key", []byte("key"))
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// txLoad is n clients running transactions through a governor.
type txLoad struct {
	stopRun  context.CancelFunc
	wg       sync.WaitGroup
	done     atomic.Int64
	failures atomic.Int64
	firstErr atomic.Value
}

// startTxLoad connects n clients to url. They first hold n transactions
// open at once, so that the governor opens n server connections, then each
// runs a transaction every interval until stop.
func startTxLoad(t *testing.T, url string, n int, interval time.Duration) *txLoad {
	t.Helper()
	ctx := context.Background()
	runCtx, cancel := context.WithCancel(ctx)
	l := &txLoad{stopRun: cancel}
	var warm sync.WaitGroup
	warm.Add(n)
	for i := 0; i < n; i++ {
		conn := connectPgx(t, url)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			fail := func(err error) {
				l.failures.Add(1)
				l.firstErr.CompareAndSwap(nil, err)
			}
			tx, err := conn.Begin(ctx)
			warm.Done()
			if err != nil {
				fail(err)
				return
			}
			warm.Wait()
			if err := tx.Commit(ctx); err != nil {
				fail(err)
				return
			}
			tick := time.NewTicker(interval)
			defer tick.Stop()
			for {
				select {
				case <-runCtx.Done():
					return
				case <-tick.C:
				}
				if err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
					_, err := tx.Exec(ctx, "SELECT current_user, pg_backend_pid()")
					return err
				}); err != nil {
					fail(err)
					return
				}
				l.done.Add(1)
			}
		}()
	}
	t.Cleanup(func() { _ = l.stop() })
	return l
}

// stop ends the load and returns the first error any client met.
func (l *txLoad) stop() error {
	l.stopRun()
	l.wg.Wait()
	if l.failures.Load() > 0 {
		return fmt.Errorf("%d clients failed, the first with: %v", l.failures.Load(), l.firstErr.Load())
	}
	return nil
}

// TestPasswordFileKubernetesSwap: like a Kubernetes secret rotation, the
// role's password is changed in Postgres and the mounted file swapped
// through its ..data symlink while clients run transactions: new server
// connections use the new password, no restart, no failed client.
func TestPasswordFileKubernetesSwap(t *testing.T) {
	ctx := context.Background()
	if err := shared.CreateRole(ctx, "k8srot", k8sOldPass, false); err != nil {
		t.Fatal(err)
	}
	if _, err := shared.Exec(ctx, "GRANT CONNECT ON DATABASE appdb TO k8srot"); err != nil {
		t.Fatal(err)
	}
	mount, err := pgtest.NewSecretMount(t.TempDir(), map[string][]byte{"password": []byte(k8sOldPass)})
	if err != nil {
		t.Fatal(err)
	}
	const budget = 8
	g := startGov(t, nil, func(c *config.Config) {
		c.Upstream.URL = shared.URL("k8srot", "", "appdb")
		c.Upstream.Password = ""
		c.Upstream.PasswordFile = mount.Path("password")
		c.Budget.Max = budget
	})
	pids := func() map[string]string {
		rows, err := shared.Exec(ctx, "SELECT pid FROM pg_stat_activity WHERE usename = 'k8srot'")
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]string{}
		for _, r := range rows {
			m[r[0]] = ""
		}
		return m
	}
	load := startTxLoad(t, g.url("alice", userPass, "appdb"), budget, 5*time.Millisecond)
	waitFor(t, 20*time.Second, "the budget's connections to be open", func() bool { return len(pids()) == budget })
	old := pids()
	if _, err := shared.Exec(ctx, "ALTER ROLE k8srot PASSWORD "+pgtest.QuoteLiteral(k8sNewPass)); err != nil {
		t.Fatal(err)
	}
	if err := mount.Update(map[string][]byte{"password": []byte(k8sNewPass + "\n")}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "every server connection to be a new one", func() bool {
		g.g.pool.CloseIdle(ctx, func(pool.Route) bool { return true })
		now := pids()
		for pid := range now {
			if _, ok := old[pid]; ok {
				return false
			}
		}
		return len(now) > 0
	})
	mark := load.done.Load()
	waitFor(t, 20*time.Second, "transactions on the new connections", func() bool { return load.done.Load() >= mark+100 })
	if err := load.stop(); err != nil {
		t.Fatalf("clients during the rotation: want = no error, got = %v", err)
	}
	// The new connections could only log in with the new password.
	_, err = pgconn.Connect(ctx, shared.URL("k8srot", k8sOldPass, "appdb"))
	assertCode(t, err, "28P01")
	if n := g.logs.FilterMessageSnippet("password file changed").Len(); n != 1 {
		t.Fatalf("log: want = one notice of the change, got = %d", n)
	}
}

// TestUsersFileReloadsOnChange: the users file, mounted like a Kubernetes
// secret and swapped, is read again at the next login without SIGHUP.
func TestUsersFileReloadsOnChange(t *testing.T) {
	line := func(u, p string) string { return fmt.Sprintf("%q %q\n", u, p) }
	mount, err := pgtest.NewSecretMount(t.TempDir(), map[string][]byte{"userlist.txt": []byte(line("alice", userPass))})
	if err != nil {
		t.Fatal(err)
	}
	g := startGov(t, nil, func(c *config.Config) {
		c.Clients.UsersFile = mount.Path("userlist.txt")
		c.Budget.Max = 2
	})
	ctx := context.Background()
	_, err = pgx.Connect(ctx, g.url("newbie", newbiePass, "appdb"))
	assertCode(t, err, "28P01")
	if err := mount.Update(map[string][]byte{"userlist.txt": []byte(line("alice", userPass) + line("newbie", newbiePass))}); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, g.url("newbie", newbiePass, "appdb"))
	if err != nil {
		t.Fatalf("after the swap: want = newbie logs in, got = %v", err)
	}
	conn.Close(ctx)
}

// TestUsersFileFailsClosed: an edit that removes a user and breaks a line
// in the same write removes that user (and the broken line's), adds
// nothing, and is logged naming the line; a deleted users file lets nobody
// in with a password until it is back; a broken file stops the start with
// its line.
func TestUsersFileFailsClosed(t *testing.T) {
	line := func(u, p string) string { return fmt.Sprintf("%q %q\n", u, p) }
	mount, err := pgtest.NewSecretMount(t.TempDir(), map[string][]byte{
		"userlist.txt": []byte(line("alice", userPass) + line("app", appPass) + line("newbie", newbiePass))})
	if err != nil {
		t.Fatal(err)
	}
	path := mount.Path("userlist.txt")
	g := startGov(t, nil, func(c *config.Config) {
		c.Clients.UsersFile = path
		c.Budget.Max = 2
	})
	ctx := context.Background()
	login := func(user, pw string) error {
		conn, err := pgx.Connect(ctx, g.url(user, pw, "appdb"))
		if err == nil {
			conn.Close(ctx)
		}
		return err
	}
	if err := login("newbie", newbiePass); err != nil {
		t.Fatal(err)
	}
	// newbie removed, app's line broken, erin added, in one edit.
	if err := mount.Update(map[string][]byte{"userlist.txt": []byte(line("alice", userPass) + `"app" "unterminated` + "\n" + line("erin", "erinpass"))}); err != nil {
		t.Fatal(err)
	}
	assertCode(t, login("newbie", newbiePass), "28P01")
	assertCode(t, login("app", appPass), "28P01")
	assertCode(t, login("erin", "erinpass"), "28P01")
	if err := login("alice", userPass); err != nil {
		t.Fatalf("alice, unchanged in the broken edit: want = logged in, got = %v", err)
	}
	logged := g.logs.FilterMessageSnippet("do not parse")
	if logged.Len() != 1 || !strings.Contains(fmt.Sprint(logged.All()[0].ContextMap()["error"]), ":2:") {
		t.Fatalf("want = one error naming line 2, got = %v", logged.All())
	}
	// Deleted: nobody logs in with a password.
	if err := mount.Update(map[string][]byte{"other": []byte("x")}); err != nil {
		t.Fatal(err)
	}
	assertCode(t, login("alice", userPass), "28P01")
	if g.logs.FilterMessageSnippet("cannot be read").Len() != 1 {
		t.Fatal("want = the missing users file logged once as an error")
	}
	if err := mount.Update(map[string][]byte{"userlist.txt": []byte(line("alice", userPass))}); err != nil {
		t.Fatal(err)
	}
	if err := login("alice", userPass); err != nil {
		t.Fatalf("the file back: want = logged in, got = %v", err)
	}
	// At start, a broken file is an error naming it and its line.
	broken := usersFile(t, fmt.Sprintf("%q %q", "alice", userPass), `"bob" "unterminated`)
	cfg := config.Default()
	cfg.Upstream.URL = shared.URL("app", appPass, "appdb")
	cfg.Clients.UsersFile = broken
	cfg.Listen, cfg.AdminListen = "127.0.0.1:0", ""
	if _, err := start(ctx, &cfg, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "clients.users_file") || !strings.Contains(err.Error(), broken+":2:") {
		t.Fatalf("start with a broken users file: want = an error naming clients.users_file and %s:2, got = %v", broken, err)
	}
}

// TestSecretFilesReadableByOthers: a users file or password file that
// others may read is warned about at start and by doctor.
func TestSecretFilesReadableByOthers(t *testing.T) {
	users := usersFile(t)
	pwFile := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pwFile, []byte(appPass), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{users, pwFile} {
		if err := os.Chmod(f, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	g := startGov(t, nil, func(c *config.Config) {
		c.Clients.UsersFile = users
		c.Upstream.Password = ""
		c.Upstream.PasswordFile = pwFile
		c.Budget.Max = 2
	})
	for _, want := range []string{"clients.users_file " + users, "upstream.password_file " + pwFile} {
		found := false
		for _, e := range g.logs.FilterMessageSnippet("readable by others").All() {
			if strings.Contains(fmt.Sprint(e.ContextMap()["error"]), want+" is readable by every user (mode 0644)") {
				found = true
			}
		}
		if !found {
			t.Fatalf("start: want = a warning about %s, got = %v", want, g.logs.FilterMessageSnippet("readable").All())
		}
	}
	var out, errOut bytes.Buffer
	err := execute(context.Background(), []string{"doctor", "--upstream-url=" + shared.URL("app", "", "appdb"),
		"--upstream.password-file=" + pwFile, "--clients.users-file=" + users}, nil, &out, &errOut)
	if err != nil {
		t.Fatalf("doctor: want = warnings only, got = %v:\n%s", err, out.String())
	}
	for _, want := range []string{"WARNING: clients.users_file " + users + " is readable by every user", "WARNING: upstream.password_file " + pwFile + " is readable by every user"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("doctor: want = %q, got:\n%s", want, out.String())
		}
	}
}

// TestFailedLoginThrottle: failed logins are counted per address and user;
// beyond the free failures a failure is answered late (28P01 still), and
// nothing else is slowed or refused: in a sidecar, where every client is
// 127.0.0.1, an attacker who fails the free logins of the real user, fails
// as unknown users and keeps a SCRAM exchange stalled locks nobody out —
// the real user's correct password logs in at once (no delay counted) from
// the same address, and failures as unknown names never count against a
// real user's.
func TestFailedLoginThrottle(t *testing.T) {
	// The clock stands still: nothing is forgotten however slowly the test
	// runs.
	clock := &clockSource{now: time.Now()}
	g := startGov(t, nil, func(c *config.Config) { c.Budget.Max = 2 }, withClock(clock))
	stopHealthy := healthyLoad(t, g) // from 127.0.0.1
	ctx := context.Background()
	from := func(ip, user, password string) error {
		cfg, err := pgx.ParseConfig(g.url(user, password, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
		cfg.DialFunc = d.DialContext
		conn, err := pgx.ConnectConfig(ctx, cfg)
		if err == nil {
			conn.Close(ctx)
		}
		return err
	}
	delays := func() float64 { return mustValue(t, g.scrape(t), "pggovernor_login_throttle_delays_total", nil) }

	// The attacker, at 127.0.0.3: the real user's free failures, and as
	// many as unknown users.
	for i := 0; i < auth.DefaultFreeFailures; i++ {
		assertCode(t, from("127.0.0.3", "alice", "wrong"), "28P01")
		assertCode(t, from("127.0.0.3", fmt.Sprint("mallory", i%2), "wrong"), "28P01")
	}
	// A SCRAM exchange it keeps stalled, as alice.
	stalled := rawConnFrom(t, g, "127.0.0.3")
	if _, err := stalled.Write(startupPacket(map[string]string{"user": "alice", "database": "appdb"})); err != nil {
		t.Fatal(err)
	}
	if msg, err := pgproto3.NewFrontend(bufio.NewReader(stalled), stalled).Receive(); err != nil {
		t.Fatal(err)
	} else if _, ok := msg.(*pgproto3.AuthenticationSASL); !ok {
		t.Fatalf("stalled exchange: want = AuthenticationSASL, got = %T", msg)
	}
	if got := delays(); got != 0 {
		t.Fatalf("delayed answers within the free failures: want = 0, got = %v", got)
	}
	// The real user, from the same address, with its password: in, at
	// once, every time.
	for i := 0; i < 3; i++ {
		if err := from("127.0.0.3", "alice", userPass); err != nil {
			t.Fatalf("alice's correct password from the attacker's address: want = logged in, got = %v", err)
		}
	}
	// Another user at that address has its own count: a failure of app
	// is answered at once; and failures as an unknown name never count
	// against a real user's.
	assertCode(t, from("127.0.0.3", "app", "wrong"), "28P01")
	for i := 0; i < auth.DefaultFreeFailures; i++ {
		assertCode(t, from("127.0.0.5", "mallory", "wrong"), "28P01")
	}
	assertCode(t, from("127.0.0.5", "alice", "wrong"), "28P01")
	if got := delays(); got != 0 {
		t.Fatalf("delayed answers after correct passwords and another user's failure: want = 0, got = %v", got)
	}
	// Beyond alice's free failures, a wrong password is answered late, and
	// the same.
	e := assertCode(t, from("127.0.0.3", "alice", "wrong"), "28P01")
	if e.Message != `password authentication failed for user "alice"` {
		t.Fatalf("a delayed failure: want = Postgres' message, got = %q", e.Message)
	}
	if got := delays(); got != 1 {
		t.Fatalf("delayed answers: want = 1, got = %v", got)
	}
	if err := from("127.0.0.3", "alice", userPass); err != nil {
		t.Fatalf("alice's correct password after a delayed failure: want = logged in, got = %v", err)
	}
	if err := from("127.0.0.4", "alice", userPass); err != nil {
		t.Fatalf("another address: want = logged in, got = %v", err)
	}
	stopHealthy()
	// Throttled: alice at 127.0.0.3, mallory at 127.0.0.5 (its free
	// failures used).
	if st := g.g.securityStats().Throttle; st.Throttled != 2 || st.Delayed != 1 {
		t.Fatalf("throttled pairs: want = 2 with 1 delayed answer, got = %+v", st)
	}
	if got := mustValue(t, g.scrape(t), "pggovernor_login_throttled_pairs", nil); got != 2 {
		t.Fatalf("pggovernor_login_throttled_pairs: want = 2, got = %v", got)
	}
	_ = stalled.Close()
}

// rawConnFrom opens a TCP connection to the governor from a local address.
func rawConnFrom(t *testing.T, g *gov, ip string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", g.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	return c
}

// TestFailedLoginIsForgotten: a client whose login fails after it was
// accepted (here the server refuses its database) leaves nothing behind, so
// that a drain does not wait for it.
func TestFailedLoginIsForgotten(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 2
		c.Timeouts.ShutdownDrain = 20 * time.Second
	})
	_, err := pgx.Connect(context.Background(), g.url("alice", userPass, "nosuchdb"))
	assertCode(t, err, "3D000")
	start := time.Now()
	g.stop()
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("shutdown after a failed login: want = at once, got = %s (waiting for the drain of a session that never was)", took)
	}
}

// TestDoctorUpstreamTLS: doctor connects with the mTLS settings and flags
// a client certificate that expires within a week.
func TestDoctorUpstreamTLS(t *testing.T) {
	env := sharedTLS(t)
	kp, err := env.ca.Issue(pgtest.CertOptions{CommonName: "certuser", NotAfter: time.Now().Add(72 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var out, errOut bytes.Buffer
	err = execute(context.Background(), []string{"doctor",
		fmt.Sprintf("--upstream-url=postgres://certuser@127.0.0.1:%d/appdb", env.pg.Port),
		"--upstream.ssl.mode=verify-full", "--upstream.ssl.server-name=db.test", "--upstream.ssl.root-cert-file=" + env.caFile,
		"--upstream.ssl.cert-file=" + writeFile(t, dir, "c.crt", kp.CertPEM), "--upstream.ssl.key-file=" + writeFile(t, dir, "c.key", kp.KeyPEM),
		"--clients.users-file=" + usersFile(t)}, nil, &out, &errOut)
	text := strings.Join(strings.Fields(out.String()), " ")
	for _, want := range []string{"upstream: sslmode verify-full", "upstream: client certificate valid until", "server: tls yes",
		"server: user certuser", "PROBLEM: upstream: client certificate valid until: the certificate expires in less than a week"} {
		if !strings.Contains(text, want) {
			t.Fatalf("doctor output lacks %q:\n%s", want, out.String())
		}
	}
	if ee, ok := err.(*exitError); !ok || ee.Code != 1 {
		t.Fatalf("doctor with a problem: want = exit code 1, got = %v", err)
	}
}

// TestDoctorPasswordFileProblems: doctor names a missing or empty password
// file as a problem, as the start refuses it.
func TestDoctorPasswordFileProblems(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ name, path, want string }{
		{"missing", filepath.Join(dir, "none"), "does not exist"},
		{"empty", writeFile(t, dir, "empty", []byte("\n")), "is empty"},
	} {
		var out, errOut bytes.Buffer
		err := execute(context.Background(), []string{"doctor", "--upstream-url=" + shared.URL("app", "", "appdb"),
			"--upstream.password-file=" + c.path, "--clients.users-file=" + usersFile(t)}, nil, &out, &errOut)
		if err == nil || !strings.Contains(out.String(), "PROBLEM: upstream.password_file "+c.path) || !strings.Contains(out.String(), c.want) {
			t.Fatalf("%s password file: want = a PROBLEM line saying %q, got = %v:\n%s", c.name, c.want, err, out.String())
		}
	}
}
