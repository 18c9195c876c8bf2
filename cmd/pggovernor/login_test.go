package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pggovernor/pggovernor/config"
)

// healthyLoad runs queries from a few clients until stopped and reports any
// failure: bad clients must not touch it.
func healthyLoad(t *testing.T, g *gov) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var failures atomic.Int64
	var firstErr atomic.Value
	var done atomic.Int64
	for i := 0; i < 4; i++ {
		conn, err := pgx.Connect(context.Background(), g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close(context.Background())
			for ctx.Err() == nil {
				if _, err := conn.Exec(context.Background(), "SELECT 1"); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
					return
				}
				done.Add(1)
			}
		}()
	}
	return func() {
		cancel()
		wg.Wait()
		if failures.Load() > 0 {
			t.Fatalf("healthy clients failed while bad clients were handled: %v", firstErr.Load())
		}
		if done.Load() == 0 {
			t.Fatal("healthy clients made no progress")
		}
	}
}

// rawStartup opens a TCP connection to the governor.
func rawConn(t *testing.T, g *gov) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", g.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

// readError reads backend messages until an ErrorResponse or EOF.
func readError(t *testing.T, c net.Conn) *pgproto3.ErrorResponse {
	t.Helper()
	fe := pgproto3.NewFrontend(bufio.NewReader(c), c)
	for {
		msg, err := fe.Receive()
		if err != nil {
			return nil
		}
		if er, ok := msg.(*pgproto3.ErrorResponse); ok {
			cp := *er
			return &cp
		}
	}
}

func startupPacket(params map[string]string) []byte {
	buf, _ := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: params}).Encode(nil)
	return buf
}

func TestBadClientsGetClearErrors(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 4
		c.Timeouts.ClientLogin = 500 * time.Millisecond
	})
	stop := healthyLoad(t, g)
	ctx := context.Background()

	t.Run("wrong password and unknown user look the same", func(t *testing.T) {
		_, errWrong := pgx.Connect(ctx, g.url("alice", "wrong", "appdb"))
		_, errUnknown := pgx.Connect(ctx, g.url("mallory", "wrong", "appdb"))
		a := assertCode(t, errWrong, "28P01")
		b := assertCode(t, errUnknown, "28P01")
		if a.Message != strings.Replace(b.Message, "mallory", "alice", 1) {
			t.Fatalf("messages differ: %q vs %q", a.Message, b.Message)
		}
		if a.Message != `password authentication failed for user "alice"` {
			t.Fatalf("want = Postgres' own message, got = %q", a.Message)
		}
	})
	t.Run("unknown database", func(t *testing.T) {
		_, err := pgx.Connect(ctx, g.url("alice", userPass, "nosuchdb"))
		e := assertCode(t, err, "3D000")
		if !strings.Contains(e.Message, `database "nosuchdb" does not exist`) {
			t.Fatalf("want = Postgres' message, got = %q", e.Message)
		}
	})
	t.Run("startup packet with a bad length", func(t *testing.T) {
		c := rawConn(t, g)
		_, _ = c.Write([]byte{0, 0, 0, 3, 0, 3, 0, 0})
		e := readError(t, c)
		if e == nil || e.Code != "08P01" {
			t.Fatalf("want = 08P01, got = %+v", e)
		}
	})
	t.Run("startup packet over 10000 bytes", func(t *testing.T) {
		c := rawConn(t, g)
		pkt := startupPacket(map[string]string{"user": "alice", "database": "appdb", "application_name": strings.Repeat("a", 10001)})
		_, _ = c.Write(pkt[:8])
		e := readError(t, c)
		if e == nil || e.Code != "08P01" || !strings.Contains(e.Message, "10000") {
			t.Fatalf("want = 08P01 naming the 10000-byte limit, got = %+v", e)
		}
	})
	t.Run("unsupported protocol", func(t *testing.T) {
		c := rawConn(t, g)
		_, _ = c.Write([]byte{0, 0, 0, 8, 0, 2, 0, 0})
		e := readError(t, c)
		if e == nil || e.Code != "0A000" {
			t.Fatalf("want = 0A000, got = %+v", e)
		}
	})
	t.Run("garbage after startup", func(t *testing.T) {
		c := rawConn(t, g)
		fe := pgproto3.NewFrontend(bufio.NewReader(c), c)
		loginRaw(t, c, fe, "alice", userPass)
		_, _ = c.Write([]byte("GARBAGE!\x00\x00\x00"))
		e := readError(t, c)
		if e == nil || e.Code != "08P01" {
			t.Fatalf("want = 08P01, got = %+v", e)
		}
	})
	t.Run("message longer than clients.max_message_size", func(t *testing.T) {
		c := rawConn(t, g)
		fe := pgproto3.NewFrontend(bufio.NewReader(c), c)
		loginRaw(t, c, fe, "alice", userPass)
		hdr := []byte{'Q', 0x7f, 0xff, 0xff, 0xff}
		_, _ = c.Write(hdr)
		e := readError(t, c)
		if e == nil || e.Code != "08P01" || !strings.Contains(e.Hint, "clients.max_message_size") {
			t.Fatalf("want = 08P01 naming clients.max_message_size, got = %+v", e)
		}
	})
	t.Run("a client that never finishes login", func(t *testing.T) {
		c := rawConn(t, g)
		start := time.Now()
		_, _ = c.Write(startupPacket(map[string]string{"user": "alice", "database": "appdb"}))
		// Then say nothing: the governor asked for a password.
		e := readError(t, c)
		if time.Since(start) > 5*time.Second {
			t.Fatalf("the login timeout did not fire")
		}
		if e == nil || e.Code != "57014" || !strings.Contains(e.Hint, "timeouts.client_login") {
			t.Fatalf("want = 57014 naming timeouts.client_login, got = %+v", e)
		}
	})
	t.Run("SSLRequest and GSSENCRequest answered N", func(t *testing.T) {
		for _, code := range []uint32{80877103, 80877104} {
			c := rawConn(t, g)
			req := binary.BigEndian.AppendUint32([]byte{0, 0, 0, 8}, code)
			_, _ = c.Write(req)
			b := make([]byte, 1)
			if _, err := io.ReadFull(c, b); err != nil || b[0] != 'N' {
				t.Fatalf("request %d: want = 'N', got = %q (%v)", code, b, err)
			}
			// The client then logs in in plaintext.
			fe := pgproto3.NewFrontend(bufio.NewReader(c), c)
			loginRaw(t, c, fe, "alice", userPass)
		}
	})
	stop()
}

// loginRaw logs in over a raw connection with SCRAM (via pgconn's own
// client would hide the protocol; this uses pgproto3 and the SCRAM
// exchange through a real pgconn instead where possible).
func loginRaw(t *testing.T, c net.Conn, fe *pgproto3.Frontend, user, password string) {
	t.Helper()
	_, _ = c.Write(startupPacket(map[string]string{"user": user, "database": "appdb"}))
	if err := scramLogin(fe, user, password); err != nil {
		t.Fatalf("raw login: %v", err)
	}
	for {
		msg, err := fe.Receive()
		if err != nil {
			t.Fatalf("raw login: %v", err)
		}
		if _, ok := msg.(*pgproto3.ReadyForQuery); ok {
			return
		}
	}
}

func TestClientsMaxConnections(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) { c.Clients.MaxConnections = 2; c.Budget.Max = 2 })
	ctx := context.Background()
	var conns []*pgx.Conn
	for i := 0; i < 2; i++ {
		conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, conn)
	}
	_, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	e := assertCode(t, err, "53300")
	if !strings.Contains(e.Message, "clients.max_connections") {
		t.Fatalf("want the message to name clients.max_connections, got %q", e.Message)
	}
	for _, c := range conns {
		c.Close(ctx)
	}
	waitFor(t, 5*time.Second, "clients to be gone", func() bool { return g.g.proxy.ClientCount() == 0 })
	conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatalf("after clients left: %v", err)
	}
	conn.Close(ctx)
}

// TestPendingLoginsBounded: 500 connections that never say anything do not
// keep a real client out: they are not logged-in clients
// (clients.max_connections) and at most clients.max_pending_logins of them
// are kept, the oldest dropped first with 53300 naming the setting,
// counted; real clients log in meanwhile.
func TestPendingLoginsBounded(t *testing.T) {
	const maxPending = 50
	g := startGov(t, nil, func(c *config.Config) {
		c.Clients.MaxConnections = 100
		c.Clients.MaxPendingLogins = maxPending
		c.Budget.Max = 2
		c.Timeouts.ClientLogin = time.Minute // the silent ones do not time out
	})
	ctx := context.Background()
	pending := func() float64 {
		v, _ := value(g.scrape(t), "pggovernor_pending_logins", nil)
		return v
	}
	// The oldest: counted before any other arrives.
	oldest := rawConn(t, g)
	waitFor(t, 10*time.Second, "the first connection to be logging in", func() bool { return pending() == 1 })
	silent := make([]net.Conn, 0, 500)
	for i := 0; i < 500; i++ {
		c, err := net.DialTimeout("tcp", g.addr, 5*time.Second)
		if err != nil {
			t.Fatalf("silent connection %d: %v", i, err)
		}
		silent = append(silent, c)
	}
	defer func() {
		for _, c := range silent {
			c.Close()
		}
	}()
	e := readError(t, oldest)
	if e == nil || e.Code != "53300" || e.Severity != "FATAL" || !strings.Contains(e.Message, "clients.max_pending_logins (50)") {
		t.Fatalf("the oldest silent connection: want = FATAL 53300 naming clients.max_pending_logins, got = %+v", e)
	}
	waitFor(t, 10*time.Second, "the dropped connections to be gone", func() bool { return pending() <= maxPending })
	for i := 0; i < 5; i++ {
		conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatalf("a real client among %d silent connections: want = logged in, got = %v", len(silent), err)
		}
		mustExec(t, conn, "SELECT 1")
		conn.Close(ctx)
	}
	waitFor(t, 10*time.Second, "every dropped connection to be counted", func() bool {
		v, _ := value(g.scrape(t), "pggovernor_login_failures_total", map[string]string{"reason": "too_many_pending"})
		return v >= 500+1-maxPending
	})
	if got := mustValue(t, g.scrape(t), "pggovernor_pending_logins", nil); got > maxPending {
		t.Fatalf("pggovernor_pending_logins: want <= %d, got = %v", maxPending, got)
	}
}

func TestClientAuthMethods(t *testing.T) {
	ctx := context.Background()
	md5Line := fmt.Sprintf("%q %q", "bob", "md5"+md5hex("bobpass"+"bob"))
	scramVerifier := scramVerifierFor(t, "carolpass")
	users := []string{
		fmt.Sprintf("%q %q", "alice", userPass),
		md5Line,
		fmt.Sprintf("%q %q", "carol", scramVerifier),
		`"quote""d" "pw"`,
	}
	for _, method := range []string{config.AuthSCRAM, config.AuthMD5} {
		t.Run(method, func(t *testing.T) {
			g := startGov(t, nil, func(c *config.Config) {
				c.Clients.Auth = method
				c.Clients.UsersFile = usersFile(t, users...)
				c.Budget.Max = 2
			})
			ok := func(user, pw string) {
				t.Helper()
				conn, err := pgx.Connect(ctx, g.url(user, pw, "appdb"))
				if err != nil {
					t.Fatalf("%s/%s: %v", method, user, err)
				}
				conn.Close(ctx)
			}
			ok("alice", userPass) // plaintext entry
			ok("carol", "carolpass")
			if method == config.AuthMD5 {
				ok("bob", "bobpass") // md5 verifier works only with md5
			} else {
				_, err := pgx.Connect(ctx, g.url("bob", "bobpass", "appdb"))
				assertCode(t, err, "28P01")
			}
			ok(`quote"d`, "pw")
			_, err := pgx.Connect(ctx, g.url("carol", "wrong", "appdb"))
			assertCode(t, err, "28P01")
		})
	}
	t.Run("trust on loopback", func(t *testing.T) {
		g := startGov(t, nil, func(c *config.Config) { c.Clients.Auth = config.AuthTrust; c.Budget.Max = 2 })
		conn, err := pgx.Connect(ctx, g.url("anyone", "", "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		var user string
		if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil || user != "app" {
			t.Fatalf("sidecar model: want = app upstream, got = %q (%v)", user, err)
		}
		conn.Close(ctx)
	})
	t.Run("trust refused on a non-loopback listener", func(t *testing.T) {
		cfg := config.Default()
		cfg.Listen = "0.0.0.0:6432"
		cfg.Clients.Auth = config.AuthTrust
		err := cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), "clients.allow_trust_remote") {
			t.Fatalf("want an error naming clients.allow_trust_remote, got %v", err)
		}
	})
}

// TestUsersFileReloadOnSIGHUP: a user added to the users file can log in
// after SIGHUP, without a restart.
func TestUsersFileReloadOnSIGHUP(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) { c.Budget.Max = 2 })
	ctx := context.Background()
	_, err := pgx.Connect(ctx, g.url("dave", "davepass", "appdb"))
	assertCode(t, err, "28P01")
	f, err := os.OpenFile(g.cfg.Clients.UsersFile, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "%q %q\n", "dave", "davepass")
	f.Close()
	// The process handles SIGHUP by reloading; in-process, call what the
	// signal handler calls.
	if err := g.g.reload(); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, g.url("dave", "davepass", "appdb"))
	if err != nil {
		t.Fatalf("after reload: %v", err)
	}
	conn.Close(ctx)
	_ = syscall.SIGHUP
}

// TestStartupParametersReachTheServer: application_name, search_path,
// TimeZone, DateStyle, extra_float_digits and options from the startup
// packet hold on the server, in both modes, and what the client is told
// matches.
func TestStartupParametersReachTheServer(t *testing.T) {
	for _, mode := range modes() {
		t.Run(mode, func(t *testing.T) {
			g := startGov(t, nil, func(c *config.Config) {
				c.PoolMode = mode
				c.Budget.Max = 1
				if mode == config.PoolModeSession {
					c.Budget.Max = 2 // each session holds one
				}
			})
			ctx := context.Background()
			cfg, err := pgx.ParseConfig(g.url("alice", userPass, "appdb"))
			if err != nil {
				t.Fatal(err)
			}
			cfg.RuntimeParams = map[string]string{
				"application_name":   "params-test",
				"search_path":        "custom_schema, public",
				"TimeZone":           "America/New_York",
				"DateStyle":          "German",
				"extra_float_digits": "1",
				"options":            "-c statement_timeout=4242 --work-mem=5MB",
			}
			conn, err := pgx.ConnectConfig(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			if got := conn.PgConn().ParameterStatus("application_name"); got != "params-test" {
				t.Fatalf("reported application_name: want = params-test, got = %q", got)
			}
			if got := conn.PgConn().ParameterStatus("TimeZone"); got != "America/New_York" {
				t.Fatalf("reported TimeZone: want = America/New_York, got = %q", got)
			}
			// Another client with defaults uses the same single server
			// connection in between, in transaction mode.
			other, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
			if err != nil {
				t.Fatal(err)
			}
			var otherApp string
			if mode == config.PoolModeTransaction {
				if err := other.QueryRow(ctx, "SHOW application_name").Scan(&otherApp); err != nil {
					t.Fatal(err)
				}
				if otherApp == "params-test" {
					t.Fatal("another client sees this client's application_name")
				}
			}
			other.Close(ctx)
			for setting, want := range map[string]string{
				"application_name":   "params-test",
				"search_path":        "custom_schema, public",
				"TimeZone":           "America/New_York",
				"DateStyle":          "German, DMY",
				"extra_float_digits": "1",
				"statement_timeout":  "4242ms",
				"work_mem":           "5MB",
			} {
				var got string
				if err := conn.QueryRow(ctx, "SELECT current_setting($1)", setting).Scan(&got); err != nil {
					t.Fatal(err)
				}
				if got != want {
					t.Errorf("%s on the server: want = %q, got = %q", setting, want, got)
				}
			}
		})
	}
}

// TestClientKilledMidTransaction: a client killed inside a transaction
// after SET application_name and CREATE TEMP TABLE leaves nothing behind:
// the next client on the same (only) server connection sees neither.
func TestClientKilledMidTransaction(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) { c.Budget.Max = 1 })
	ctx := context.Background()
	setup, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, setup, "DROP TABLE IF EXISTS killed")
	mustExec(t, setup, "CREATE TABLE killed (v int)")
	setup.Close(ctx)

	for _, inTx := range []bool{true, false} {
		victim, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		script := "SET application_name = 'leaked'; CREATE TEMP TABLE secret (v int); INSERT INTO killed VALUES (1)"
		if inTx {
			script = "BEGIN; " + script
		}
		if _, err := victim.Exec(ctx, script).ReadAll(); err != nil {
			t.Fatal(err)
		}
		// Kill the client abruptly: no Terminate, a TCP close.
		_ = victim.Conn().Close()

		other, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		var app string
		var temp *string
		var inTxNow bool
		err = other.QueryRow(ctx, `SELECT current_setting('application_name'), to_regclass('pg_temp.secret')::text,
			(SELECT state FROM pg_stat_activity WHERE pid = pg_backend_pid()) = 'active' AND txid_current_if_assigned() IS NOT NULL`).Scan(&app, &temp, &inTxNow)
		if err != nil {
			t.Fatal(err)
		}
		if app == "leaked" || temp != nil || inTxNow {
			t.Fatalf("inTx=%v: the next client observed the killed client's state: application_name=%q temp=%v open tx=%v", inTx, app, temp, inTxNow)
		}
		var n int
		if err := other.QueryRow(ctx, "SELECT count(*) FROM killed").Scan(&n); err != nil {
			t.Fatal(err)
		}
		if inTx && n != 0 {
			t.Fatalf("the killed client's open transaction was committed: %d rows", n)
		}
		other.Close(ctx)
	}
	// Nothing is left idle in transaction on the server.
	rows, err := shared.Exec(ctx, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND state LIKE 'idle in transaction%'")
	if err != nil {
		t.Fatal(err)
	}
	if rows[0][0] != "0" {
		t.Fatalf("server connections idle in transaction: want = 0, got = %s", rows[0][0])
	}
}

var errLogin = errors.New("login failed")
