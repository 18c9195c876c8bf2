package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/pool"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// governorBinary builds pggovernor once per test run.
func governorBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "pggovernor-bin-")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "pggovernor")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// process is a pggovernor child process.
type process struct {
	cmd    *exec.Cmd
	addr   string
	stderr *syncBuffer
	exited chan struct{} // closed when the process has exited
	err    error         // its exit status, valid after exited
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startProcess runs the binary with flags and env, and waits until it
// prints its listening address.
func startProcess(t *testing.T, env []string, args ...string) *process {
	t.Helper()
	cmd := exec.Command(governorBinary(t), append([]string{"run", "--listen=127.0.0.1:0", "--admin-listen="}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &process{cmd: cmd, stderr: &syncBuffer{}, exited: make(chan struct{})}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "pggovernor listening on "); ok {
				addrc <- a
			}
		}
	}()
	go func() { p.err = cmd.Wait(); close(p.exited) }()
	select {
	case p.addr = <-addrc:
	case <-p.exited:
		t.Fatalf("pggovernor exited at start: %v\n%s", p.err, p.stderr)
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("pggovernor did not start:\n%s", p.stderr)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.exited
		logsMu.Lock()
		allLogs = append(allLogs, p.stderr.String())
		logsMu.Unlock()
	})
	return p
}

func (p *process) url(user, password, db string) string {
	host, port, _ := net.SplitHostPort(p.addr)
	return fmt.Sprintf("postgres://%s:%s@%s:%s/%s?sslmode=disable", user, password, host, port, db)
}

// TestSIGTERMDrain: SIGTERM while 50 clients run transactions. Every
// transaction whose COMMIT was acknowledged is in the database, no client
// hangs, and the process exits within shutdown_drain.
func TestSIGTERMDrain(t *testing.T) {
	ctx := context.Background()
	if _, err := shared.ExecIn(ctx, "appdb", "DROP TABLE IF EXISTS drained; CREATE TABLE drained (client int, n int); GRANT ALL ON drained TO app"); err != nil {
		t.Fatal(err)
	}
	users := usersFile(t)
	drain := 3 * time.Second
	p := startProcess(t, []string{"PGGOVERNOR_UPSTREAM_PASSWORD=" + appPass},
		"--upstream-url="+shared.URL("app", "", "appdb"),
		"--clients.users-file="+users, "--budget.max=10", "--timeouts.shutdown-drain="+drain.String(), "--log.level=info")

	const clients = 50
	var mu sync.Mutex
	acked := map[[2]int]bool{}
	var wg sync.WaitGroup
	started := make(chan struct{}, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			conn, err := pgx.Connect(ctx, p.url("alice", userPass, "appdb"))
			if err != nil {
				t.Errorf("client %d: %v", i, err)
				started <- struct{}{}
				return
			}
			defer conn.Close(ctx)
			started <- struct{}{}
			for n := 0; ; n++ {
				tx, err := conn.Begin(ctx)
				if err != nil {
					return
				}
				if _, err := tx.Exec(ctx, fmt.Sprintf("INSERT INTO drained VALUES (%d, %d)", i, n)); err != nil {
					_ = tx.Rollback(ctx)
					return
				}
				if _, err := tx.Exec(ctx, "SELECT pg_sleep(0.01)"); err != nil {
					_ = tx.Rollback(ctx)
					return
				}
				if err := tx.Commit(ctx); err != nil {
					return
				}
				mu.Lock()
				acked[[2]int{i, n}] = true
				mu.Unlock()
			}
		}(i)
	}
	for i := 0; i < clients; i++ {
		<-started
	}
	time.Sleep(300 * time.Millisecond) // let transactions run; there is no event for "under load"
	exitAfter := stopAndCheckCommits(t, p, drain+5*time.Second, &wg, "drained", &mu, acked)
	mu.Lock()
	defer mu.Unlock()
	if len(acked) < clients {
		t.Fatalf("too few transactions ran before the signal: %d", len(acked))
	}
	if exitAfter > drain+2*time.Second {
		t.Fatalf("exit took %s, more than shutdown_drain %s", exitAfter, drain)
	}
	t.Logf("%d acknowledged commits, all present; exit %s after SIGTERM", len(acked), exitAfter.Round(time.Millisecond))
}

// stopAndCheckCommits sends SIGTERM to p and waits for it to exit (after
// hang, it dumps the goroutines and fails), then for the clients of wg to
// end, and checks that every acknowledged (client, n) pair (acked, under
// mu) is a row of table and that the process logged an orderly stop. It
// returns how long the exit took after the signal.
func stopAndCheckCommits(t *testing.T, p *process, hang time.Duration, wg *sync.WaitGroup, table string, mu *sync.Mutex, acked map[[2]int]bool) time.Duration {
	t.Helper()
	sigAt := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(hang):
		_ = p.cmd.Process.Signal(syscall.SIGQUIT) // Go dumps goroutines on SIGQUIT
		<-p.exited
		t.Fatalf("the process did not exit within %s of SIGTERM:\n%s", hang, p.stderr)
	}
	exitAfter := time.Since(sigAt)
	clientsDone := make(chan struct{})
	go func() { wg.Wait(); close(clientsDone) }()
	select {
	case <-clientsDone:
	case <-time.After(10 * time.Second):
		t.Fatal("clients hang after the governor exited")
	}
	rows, err := shared.ExecIn(context.Background(), "appdb", "SELECT client, n FROM "+table)
	if err != nil {
		t.Fatal(err)
	}
	inDB := map[[2]int]bool{}
	for _, r := range rows {
		var k [2]int
		k[0], _ = strconv.Atoi(r[0])
		k[1], _ = strconv.Atoi(r[1])
		inDB[k] = true
	}
	mu.Lock()
	defer mu.Unlock()
	for k := range acked {
		if !inDB[k] {
			t.Errorf("committed transaction %v is missing from the database", k)
		}
	}
	if !strings.Contains(p.stderr.String(), "pggovernor stopped") {
		t.Fatalf("no orderly stop in the log:\n%s", p.stderr)
	}
	return exitAfter
}

// TestDoctor prints the server's facts and the budget, and flags a
// password file with a trailing newline and an unreachable server.
func TestDoctor(t *testing.T) {
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "password")
	if err := os.WriteFile(pwFile, []byte(appPass+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	users := usersFile(t)
	var out, errOut bytes.Buffer
	err := execute(context.Background(), []string{"doctor", "--upstream-url=" + shared.URL("app", "", "appdb"),
		"--upstream.password-file=" + pwFile, "--clients.users-file=" + users}, nil, &out, &errOut)
	text := strings.Join(strings.Fields(out.String()), " ")
	for _, want := range []string{"server: server_version", "server: max_connections 60", "superuser_reserved_connections 3",
		"budget (derived) 56 = 60 max_connections", "round trip (median of 10)", "server: current_database appdb",
		"server: user app", "PROBLEM: upstream.password_file"} {
		if !strings.Contains(text, want) {
			t.Fatalf("doctor output lacks %q:\n%s", want, text)
		}
	}
	if ee, ok := err.(*exitError); !ok || ee.Code != 1 {
		t.Fatalf("doctor with a problem: want exit code 1, got %v", err)
	}
	// Unreachable host.
	out.Reset()
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := l.Addr().String()
	l.Close()
	err = execute(context.Background(), []string{"doctor", "--upstream-url=postgres://app@" + deadAddr + "/appdb?sslmode=disable",
		"--upstream.password=x", "--clients.users-file=" + users, "--timeouts.server-connect=2s"}, nil, &out, &errOut)
	if err == nil || !strings.Contains(out.String(), "PROBLEM: cannot reach the server") {
		t.Fatalf("unreachable server: want a PROBLEM line, got %v:\n%s", err, out.String())
	}
	// Wrong password.
	out.Reset()
	err = execute(context.Background(), []string{"doctor", "--upstream-url=" + shared.URL("app", "", "appdb"),
		"--upstream.password=wrong", "--clients.users-file=" + users}, nil, &out, &errOut)
	if err == nil || !strings.Contains(out.String(), "PROBLEM: authentication failed") || !strings.Contains(out.String(), "upstream.password") {
		t.Fatalf("wrong password: want a PROBLEM line naming the setting, got %v:\n%s", err, out.String())
	}
	if strings.Contains(out.String(), appPass) {
		t.Fatal("doctor printed the password")
	}
}

// TestMultiRoleModel: with no user in the upstream URL, each client's own
// role goes upstream, authenticated with its plaintext users-file entry.
func TestMultiRoleModel(t *testing.T) {
	ctx := context.Background()
	if err := shared.CreateRole(ctx, "multi_a", "pw-a", false); err != nil {
		t.Fatal(err)
	}
	if err := shared.CreateRole(ctx, "multi_b", "pw-b", false); err != nil {
		t.Fatal(err)
	}
	g := startGov(t, nil, func(c *config.Config) {
		c.Upstream.URL = fmt.Sprintf("host=%s port=%d dbname=appdb sslmode=disable", shared.Host, shared.Port)
		c.Upstream.Password = ""
		c.Budget.Max = 4
		c.Clients.UsersFile = usersFile(t, `"multi_a" "pw-a"`, `"multi_b" "pw-b"`)
	})
	for _, user := range []string{"multi_a", "multi_b"} {
		conn, err := pgx.Connect(ctx, g.url(user, "pw-"+user[len(user)-1:], "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		var got string
		if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&got); err != nil || got != user {
			t.Fatalf("want upstream user %s, got %q (%v)", user, got, err)
		}
		conn.Close(ctx)
	}
	routes := g.g.pool.RouteStats()
	if len(routes) != 2 {
		t.Fatalf("want one route per role, got %v", routes)
	}
}

// TestPasswordFileRotation: the upstream password file is read for each
// new server connection, so a rotated password takes effect without a
// restart; whitespace around it is trimmed with one warning.
func TestPasswordFileRotation(t *testing.T) {
	ctx := context.Background()
	if err := shared.CreateRole(ctx, "rotor", "old-pass", false); err != nil {
		t.Fatal(err)
	}
	if _, err := shared.Exec(ctx, "GRANT CONNECT ON DATABASE appdb TO rotor"); err != nil {
		t.Fatal(err)
	}
	pwFile := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pwFile, []byte("  old-pass\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	g := startGov(t, nil, func(c *config.Config) {
		c.Upstream.URL = shared.URL("rotor", "", "appdb")
		c.Upstream.Password = ""
		c.Upstream.PasswordFile = pwFile
		c.Budget.Max = 4
	})
	conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, conn, "SELECT 1")
	conn.Close(ctx)
	if _, err := shared.Exec(ctx, "ALTER ROLE rotor PASSWORD 'new-pass'"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pwFile, []byte("new-pass\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Close the governor's idle connections so the next one is new.
	g.g.pool.CloseIdle(ctx, func(pool.Route) bool { return true })
	conn, err = pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatalf("after rotation: %v", err)
	}
	mustExec(t, conn, "SELECT 1")
	conn.Close(ctx)
	warnings := g.logs.FilterMessageSnippet("trailing newline").Len()
	if warnings != 1 {
		t.Fatalf("whitespace warnings: want = 1, got = %d", warnings)
	}
	_ = pgconn.Config{}
}

// TestCoderEnvironment: with no upstream.url anywhere, the governor reads
// the environment Coder's Helm chart sets for coderd.
func TestCoderEnvironment(t *testing.T) {
	pwFile := filepath.Join(t.TempDir(), "db-password")
	if err := os.WriteFile(pwFile, []byte(appPass), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := shared.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS coder_schema AUTHORIZATION app"); err != nil {
		t.Fatal(err)
	}
	env := []string{"DB_HOST=" + shared.Host, fmt.Sprintf("DB_PORT=%d", shared.Port), "DB_USER=app", "DB_NAME=appdb",
		"DB_PASSWORD_PATH=" + pwFile, "DB_SSL_MODE=disable", "DB_SEARCH_PATH=coder_schema", "DB_PASSWORD=coder-env-secret"}
	p := startProcess(t, env, "--clients.users-file="+usersFile(t), "--budget.max=2")
	conn, err := pgx.Connect(ctx, p.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatalf("through a governor configured by Coder's environment: %v\n%s", err, p.stderr)
	}
	defer conn.Close(ctx)
	var user, searchPath string
	if err := conn.QueryRow(ctx, "SELECT current_user, current_setting('search_path')").Scan(&user, &searchPath); err != nil {
		t.Fatal(err)
	}
	if user != "app" || searchPath != "coder_schema" {
		t.Fatalf("want = app with search_path coder_schema, got = %s with %q", user, searchPath)
	}
}
