package main

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lib/pq"

	"github.com/pggovernor/pggovernor/config"
)

// TestPgbenchModesThroughGovernor: pgbench -M simple, extended and
// prepared with 100 clients on a budget of 5: zero errors.
func TestPgbenchModesThroughGovernor(t *testing.T) {
	pgbench, err := exec.LookPath("pgbench")
	if err != nil {
		t.Fatalf("pgbench is required (apt-get install postgresql-contrib): %v", err)
	}
	ctx := context.Background()
	if _, err := shared.Exec(ctx, "CREATE DATABASE benchdb OWNER app"); err != nil {
		t.Fatal(err)
	}
	init := exec.Command(pgbench, "-i", "-s", "1", "-q", "-h", shared.Dir, "-p", fmt.Sprint(shared.Port), "-U", "app", "benchdb")
	if out, err := init.CombinedOutput(); err != nil {
		t.Fatalf("pgbench -i: %v\n%s", err, out)
	}
	// The budget derived from the server (max_connections 60, 3 reserved
	// for superusers, the control connection) less a reserve of 51: 5.
	// pgbench's threads prepare synchronously while their other clients
	// hold every server connection inside transactions; the control
	// connection (in the database of upstream.url) answers those prepares.
	g := txGov(t, func(c *config.Config) {
		c.Upstream.URL = shared.URL("app", "", "benchdb")
		c.Budget.Max = 0
		c.Budget.Reserve = 51
	})
	if limit, _ := g.g.pool.Limit(); limit != 5 {
		t.Fatalf("budget: want = 5, got = %d", limit)
	}
	host, port, _ := strings.Cut(g.addr, ":")
	for _, mode := range []string{"simple", "extended", "prepared"} {
		for _, script := range []string{"-S", "-b tpcb-like"} {
			t.Run(mode+script, func(t *testing.T) {
				args := append([]string{"-n", "-h", host, "-p", port, "-U", "alice", "-c", "100", "-j", "2", "-t", "20", "-M", mode},
					append(strings.Fields(script), "benchdb")...)
				cmd := exec.Command(pgbench, args...)
				cmd.Env = append(os.Environ(), "PGPASSWORD="+userPass)
				out, err := cmd.CombinedOutput()
				text := string(out)
				if err != nil {
					t.Fatalf("pgbench %v: %v\n%s", args, err, text)
				}
				if !strings.Contains(text, "number of transactions actually processed: 2000/2000") ||
					!strings.Contains(text, "number of failed transactions: 0") {
					t.Fatalf("pgbench %s %s: want 2000/2000 transactions and 0 failures:\n%s", mode, script, text)
				}
			})
		}
	}
	if open := g.g.pool.Stats().Open; open > 5 {
		t.Fatalf("server connections: want <= 5, got = %d", open)
	}
}

// coderWorkerEnv carries the governor URL to a worker process.
const coderWorkerEnv = "CODER_SHAPED_WORKER_URL"

// coderWorkerResult is what a worker reports on stdout.
type coderWorkerResult struct {
	Sent     int      `json:"sent"`
	Received int      `json:"received"`
	Errors   []string `json:"errors"`
}

const (
	coderWorkers        = 5
	coderNotifyPerProc  = 40
	coderOpsPerGoroutin = 30
)

// TestCoderShapedWorkload: 5 processes, each a database/sql + lib/pq pool
// of 10 plus one pq.Listener, run parameterised queries, serializable
// transactions with pg_advisory_xact_lock and pg_notify fan-out against a
// total budget of 8: no errors, every notification reaches every
// listener, server connections never above 8.
func TestCoderShapedWorkload(t *testing.T) {
	ctx := context.Background()
	if _, err := shared.ExecIn(ctx, "appdb", "DROP TABLE IF EXISTS coder_counters; CREATE TABLE coder_counters (worker int PRIMARY KEY, n int); GRANT ALL ON coder_counters TO app"); err != nil {
		t.Fatal(err)
	}
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 8 })
	s := sampleConnections(t, shared, "app", 50*time.Millisecond)

	type worker struct {
		cmd    *exec.Cmd
		stdin  io.WriteCloser
		stdout *bufio.Scanner
		stderr *syncBuffer
	}
	workers := make([]*worker, coderWorkers)
	for i := range workers {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), coderWorkerEnv+"="+g.url("alice", userPass, "appdb"), fmt.Sprintf("CODER_SHAPED_WORKER_ID=%d", i))
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		w := &worker{cmd: cmd, stdin: stdin, stdout: bufio.NewScanner(stdout), stderr: &syncBuffer{}}
		cmd.Stderr = w.stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
		workers[i] = w
	}
	// Every worker listens before anyone notifies.
	for i, w := range workers {
		if !w.stdout.Scan() || w.stdout.Text() != "listening" {
			t.Fatalf("worker %d did not start listening: %q\n%s", i, w.stdout.Text(), w.stderr)
		}
	}
	for _, w := range workers {
		_, _ = io.WriteString(w.stdin, "go\n")
	}
	total := 0
	for i, w := range workers {
		if !w.stdout.Scan() {
			t.Fatalf("worker %d reported nothing:\n%s", i, w.stderr)
		}
		var r coderWorkerResult
		if err := json.Unmarshal(w.stdout.Bytes(), &r); err != nil {
			t.Fatalf("worker %d: %v: %q", i, err, w.stdout.Text())
		}
		if len(r.Errors) > 0 {
			t.Errorf("worker %d errors: %v", i, r.Errors)
		}
		if r.Received != coderWorkers*coderNotifyPerProc {
			t.Errorf("worker %d received %d notifications, want = %d", i, r.Received, coderWorkers*coderNotifyPerProc)
		}
		total += r.Sent
	}
	max, samples := s.finish()
	if max > 8 {
		t.Fatalf("server connections in pg_stat_activity: want <= 8, got = %d (%d samples)", max, samples)
	}
	rows, err := shared.ExecIn(ctx, "appdb", "SELECT sum(n) FROM coder_counters")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprint(coderWorkers * 10 * coderOpsPerGoroutin / 3); rows[0][0] != want {
		t.Fatalf("serialized increments: want = %s, got = %s", want, rows[0][0])
	}
	t.Logf("%d notifications sent, each received by %d listeners; max %d server connections over %d samples", total, coderWorkers, max, samples)
}

// runCoderWorker is the body of a worker process (see TestMain).
func runCoderWorker(url string) int {
	id := 0
	fmt.Sscan(os.Getenv("CODER_SHAPED_WORKER_ID"), &id)
	var received atomic.Int64
	l := pq.NewListener(url, 10*time.Millisecond, time.Second, nil)
	defer l.Close()
	if err := l.Listen("coder_pubsub"); err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		return 1
	}
	done := make(chan struct{})
	go func() {
		for {
			select {
			case n := <-l.Notify:
				if n != nil {
					received.Add(1)
				}
			case <-done:
				return
			}
		}
	}()
	defer close(done)
	db, err := sql.Open("postgres", url)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer db.Close()
	db.SetMaxOpenConns(10)
	if _, err := db.Exec("INSERT INTO coder_counters VALUES ($1, 0) ON CONFLICT DO NOTHING", id); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("listening")
	if line, _ := bufio.NewReader(os.Stdin).ReadString('\n'); line != "go\n" {
		return 1
	}
	var mu sync.Mutex
	var errs []string
	var sent atomic.Int64
	fail := func(err error) {
		mu.Lock()
		if len(errs) < 10 {
			errs = append(errs, err.Error())
		}
		mu.Unlock()
	}
	var wg sync.WaitGroup
	for g := 0; g < 10; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < coderOpsPerGoroutin; i++ {
				switch i % 3 {
				case 0: // a parameterised query
					var s string
					if err := db.QueryRow("SELECT $1::text || $2::text", "w", fmt.Sprint(id)).Scan(&s); err != nil || s != fmt.Sprint("w", id) {
						fail(fmt.Errorf("query: %q %v", s, err))
					}
				case 1: // a serializable transaction with an advisory xact lock
					for attempt := 0; ; attempt++ {
						err := serializedIncrement(db, id)
						var pqErr *pq.Error
						if errors.As(err, &pqErr) && pqErr.Code == "40001" && attempt < 50 {
							continue
						}
						if err != nil {
							fail(fmt.Errorf("serializable: %w", err))
						}
						break
					}
				case 2: // pub/sub
					if n := sent.Load(); n < coderNotifyPerProc {
						if sent.Add(1) <= coderNotifyPerProc {
							if _, err := db.Exec("SELECT pg_notify('coder_pubsub', $1)", fmt.Sprintf("%d-%d-%d", id, g, i)); err != nil {
								fail(fmt.Errorf("notify: %w", err))
							}
						}
					}
				}
			}
		}(g)
	}
	wg.Wait()
	for sent.Load() < coderNotifyPerProc { // make up the fixed count
		if sent.Add(1) <= coderNotifyPerProc {
			if _, err := db.Exec("SELECT pg_notify('coder_pubsub', $1)", fmt.Sprintf("%d-extra", id)); err != nil {
				fail(fmt.Errorf("notify: %w", err))
			}
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for received.Load() < coderWorkers*coderNotifyPerProc && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond) // the worker has no event for "all received"
	}
	out, _ := json.Marshal(coderWorkerResult{Sent: int(min(sent.Load(), coderNotifyPerProc)), Received: int(received.Load()), Errors: errs})
	fmt.Println(string(out))
	return 0
}

func serializedIncrement(db *sql.DB, id int) error {
	tx, err := db.BeginTx(context.Background(), &sql.TxOptions{Isolation: sql.LevelSerializable})
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck
	if _, err := tx.Exec("SELECT pg_advisory_xact_lock($1)", 1000+id); err != nil {
		return err
	}
	var n int
	if err := tx.QueryRow("SELECT n FROM coder_counters WHERE worker = $1", id).Scan(&n); err != nil {
		return err
	}
	if _, err := tx.Exec("UPDATE coder_counters SET n = $1 WHERE worker = $2", n+1, id); err != nil {
		return err
	}
	return tx.Commit()
}
