package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// The maintenance recipes of README (Operations, Maintenance) and
// docs/coder.md, each run as written against real Postgres with writers
// through the governor recording every acknowledged commit.

// maintenanceWriters is the writers' count in these tests.
const maintenanceWriters = 8

// halfInTx makes every second writer write in explicit transactions that
// last (BEGIN, INSERT, pg_sleep, COMMIT); the others autocommit.
func halfInTx(client int) bool { return client%2 == 1 }

// ackedRows reads the (client, seq) pairs of table acks on c.
func ackedRows(t *testing.T, c *pgtest.Cluster) map[[2]int64]bool {
	t.Helper()
	got, err := c.ExecIn(context.Background(), "appdb", "SELECT client, seq FROM acks")
	if err != nil {
		t.Fatal(err)
	}
	have := make(map[[2]int64]bool, len(got))
	for _, r := range got {
		cl, _ := strconv.ParseInt(r[0], 10, 64)
		s, _ := strconv.ParseInt(r[1], 10, 64)
		have[[2]int64{cl, s}] = true
	}
	return have
}

// maintenanceSetup starts a governor in front of pg (upstream.url as
// given, "" for pg's own) with an admin console user, creates the table
// acks, and starts the writers once it exists.
func maintenanceSetup(t *testing.T, pg *pgtest.Cluster, url string, pause time.Duration, inTx func(int) bool) (*gov, *ackedWriters) {
	t.Helper()
	if _, err := pg.ExecIn(context.Background(), "appdb", "CREATE TABLE acks (client int, seq bigint, PRIMARY KEY (client, seq)); GRANT ALL ON acks TO app"); err != nil {
		t.Fatal(err)
	}
	g := startGov(t, pg, func(c *config.Config) {
		if url != "" {
			c.Upstream.URL = url
		}
		c.Admin.Users = []string{"alice"}
		// A restart or a promotion outlasts the tests' 10 s on a loaded
		// machine only when something is wrong: the default, as operators
		// run it.
		c.Timeouts.QueryWait = 30 * time.Second
	})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the governor's last log lines:\n%s", lastLogs(g, 200))
		}
	})
	urls := make([]string, maintenanceWriters)
	for i := range urls {
		urls[i] = g.url("app", appPass, "appdb")
	}
	w := startAckedWriters(t, urls, "acks", pause, inTx)
	waitFor(t, 60*time.Second, "the writers to commit", func() bool { return w.acks() >= 20*maintenanceWriters })
	return g, w
}

// consoleExec runs a console command, within a minute.
func consoleExec(t *testing.T, console *pgx.Conn, command string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := console.Exec(ctx, command, pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatalf("%s: %v", command, err)
	}
}

// finishWriters waits until every writer committed after since and then
// some more, stops them and checks their acknowledged commits against
// what c holds. It returns what they saw.
func finishWriters(t *testing.T, w *ackedWriters, c *pgtest.Cluster, since time.Time) writerReport {
	t.Helper()
	waitFor(t, 60*time.Second, "every writer to commit after the maintenance", func() bool { return w.ackedSince(since) })
	target := w.acks() + 10*maintenanceWriters
	waitFor(t, 60*time.Second, "the writers to commit after the maintenance", func() bool { return w.acks() >= target })
	w.stop()
	rep := w.report(since, ackedRows(t, c))
	if rep.missing > 0 {
		t.Errorf("%d acknowledged commits missing, e.g. %v", rep.missing, rep.firstMissing)
	}
	return rep
}

// TestRestartWithPause: the recipe for a Postgres restart or minor upgrade
// — PAUSE, restart, RESUME. PAUSE returns with no server connection left,
// the writers wait through the restart instead of failing: not one error,
// nothing acknowledged lost, every writer commits after RESUME.
func TestRestartWithPause(t *testing.T) {
	pg := privateCluster(t, pgtest.Options{})
	g, w := maintenanceSetup(t, pg, "", 2*time.Millisecond, halfInTx)
	console := connectPgx(t, g.consoleURL("alice", userPass))
	began := time.Now()
	consoleExec(t, console, "PAUSE")
	if pids := governorBackends(t, pg, "app"); len(pids) != 0 {
		t.Fatalf("after PAUSE returned: want no server connection, got backends %v", pids)
	}
	if err := pg.Restart(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	resumed := time.Now()
	consoleExec(t, console, "RESUME")
	rep := finishWriters(t, w, pg, resumed)
	t.Logf("PAUSE, restart, RESUME: %d acknowledged, %d missing, %d errors (%s); paused for %s, writes resumed %s after RESUME",
		rep.acked, rep.missing, rep.errors, codesString(rep.codes), resumed.Sub(began).Round(time.Millisecond), rep.resumed.Round(time.Millisecond))
	if rep.errors != 0 {
		t.Errorf("the writers got %d errors, want none:\n%s", rep.errors, w.errorSummary(0))
	}
}

// TestRestartWithoutPause: a Postgres restart with no PAUSE, what the
// recipe says clients see. A fast shutdown terminates the backends with
// 57P01. A request that began a transaction-mode attachment and got that
// FATAL before the server had answered anything on the connection
// completed nothing there, so the governor sends it again on a new
// connection, which waits for the server to be back
// (timeouts.query_wait): most autocommit writers see nothing. A writer
// inside an explicit transaction loses it, and a request whose connection
// had already answered something (the governor's own preparation of a
// statement for it, say) is not sent again: they get the 57P01 (and the
// connection to the governor is closed, as a direct one would be), at
// most one error per client; their next transaction waits and commits.
// Nothing acknowledged is lost. The errors of each kind of writer are
// reported.
func TestRestartWithoutPause(t *testing.T) {
	pg := privateCluster(t, pgtest.Options{})
	// No pause between the writers' transactions: a statement of each is
	// running, or about to, when the server stops.
	_, w := maintenanceSetup(t, pg, "", 0, halfInTx)
	began := time.Now()
	if err := pg.Restart(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	rep := finishWriters(t, w, pg, back)
	autocommit, inTx := 0, 0
	for i := 0; i < maintenanceWriters; i++ {
		if halfInTx(i) {
			inTx += w.errorsOf(i)
		} else {
			autocommit += w.errorsOf(i)
		}
	}
	t.Logf("restart without PAUSE: %d acknowledged, %d missing, %d errors (most per client %d: %s; %d of %d autocommit writers, %d of %d in transactions); the server was down %s, writes resumed %s after it was back",
		rep.acked, rep.missing, rep.errors, rep.maxErrors, codesString(rep.codes), autocommit, maintenanceWriters/2, inTx, maintenanceWriters/2,
		back.Sub(began).Round(time.Millisecond), rep.resumed.Round(time.Millisecond))
	if rep.maxErrors > 1 {
		t.Errorf("a client got %d errors, want at most 1:\n%s", rep.maxErrors, w.errorSummary(1))
	}
}

// TestPlannedSwitchover: the recipe for a planned switchover — PAUSE, the
// old primary stopped, the replica promoted, RESUME — with upstream.url
// naming both hosts and target_session_attrs=read-write. The writers wait
// instead of failing: no error, nothing acknowledged lost (the replica is
// synchronous), every writer commits on the new primary after RESUME, and
// the governor counts one switch.
func TestPlannedSwitchover(t *testing.T) {
	old, replica := primaryAndReplica(t, true)
	g, w := maintenanceSetup(t, old, multiHostURL("target_session_attrs=read-write", old, replica), 2*time.Millisecond, halfInTx)
	console := connectPgx(t, g.consoleURL("alice", userPass))
	began := time.Now()
	consoleExec(t, console, "PAUSE")
	if pids := governorBackends(t, old, "app"); len(pids) != 0 {
		t.Fatalf("after PAUSE returned: want no server connection, got backends %v", pids)
	}
	old.Stop()
	if err := replica.Promote(context.Background()); err != nil {
		t.Fatal(err)
	}
	resumed := time.Now()
	consoleExec(t, console, "RESUME")
	rep := finishWriters(t, w, replica, resumed)
	st := g.g.pool.Stats()
	t.Logf("PAUSE, promote, RESUME: %d acknowledged, %d missing, %d errors (%s); paused for %s, writes resumed %s after RESUME; %d switch, to %s",
		rep.acked, rep.missing, rep.errors, codesString(rep.codes), resumed.Sub(began).Round(time.Millisecond), rep.resumed.Round(time.Millisecond),
		st.UpstreamSwitches, st.UpstreamAddr)
	if rep.errors != 0 {
		t.Errorf("the writers got %d errors, want none:\n%s", rep.errors, w.errorSummary(0))
	}
	if st.UpstreamSwitches != 1 || st.UpstreamAddr != replica.Addr() {
		t.Errorf("upstream: want = 1 switch, to %s; got = %d, to %s", replica.Addr(), st.UpstreamSwitches, st.UpstreamAddr)
	}
}

// TestPgDumpThroughTheGovernor: the backup recipe — pg_dump through the
// governor in transaction mode, custom format and a parallel directory
// dump (-j 2, whose workers import the leader's snapshot), while writers
// insert a row into each of two tables per transaction. pg_dump's SETs pin
// it to one server connection for its run, so its transaction and its
// snapshot stay on that connection; every dump restores (pg_restore,
// directly into a new database) with the two tables at the same count:
// one snapshot. The writers keep committing meanwhile.
func TestPgDumpThroughTheGovernor(t *testing.T) {
	pg := privateCluster(t, pgtest.Options{})
	ctx := context.Background()
	if _, err := pg.ExecIn(ctx, "appdb", `CREATE TABLE left_side (n bigint PRIMARY KEY, pad text);
		CREATE TABLE right_side (n bigint PRIMARY KEY, pad text);
		INSERT INTO left_side SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g;
		INSERT INTO right_side SELECT g, repeat('y', 200) FROM generate_series(1, 20000) g;
		ALTER TABLE left_side OWNER TO app; ALTER TABLE right_side OWNER TO app`); err != nil {
		t.Fatal(err)
	}
	g := startGov(t, pg, nil)
	// Writers: one row into each table per transaction, so that any one
	// snapshot sees the two tables at the same count.
	var next atomic.Int64
	next.Store(20000)
	var commits atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		conn := connectPgx(t, g.url("app", appPass, "appdb"))
		wg.Add(1)
		go func() { // owner: the test; exits when stop is closed
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				n := next.Add(1)
				err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, "INSERT INTO left_side VALUES ($1, 'x')", n); err != nil {
						return err
					}
					_, err := tx.Exec(ctx, "INSERT INTO right_side VALUES ($1, 'y')", n)
					return err
				})
				if err != nil {
					errs <- err
					return
				}
				commits.Add(1)
			}
		}()
	}
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}()
	host, port, err := net.SplitHostPort(g.addr)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	env := append(os.Environ(), "PGPASSWORD="+appPass, "PGSSLMODE=disable")
	run := func(name string, args ...string) {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
	}
	for i, dump := range []struct {
		name string
		args []string
	}{
		{"custom", []string{"-Fc", "-f", filepath.Join(dir, "appdb.dump")}},
		{"directory, -j 2", []string{"-Fd", "-j", "2", "-f", filepath.Join(dir, "appdb.dir")}},
	} {
		before := commits.Load()
		began := time.Now()
		run("pg_dump", append([]string{"-h", host, "-p", port, "-U", "app", "-d", "appdb", "--no-owner"}, dump.args...)...)
		took := time.Since(began)
		target := fmt.Sprintf("restored%d", i)
		if _, err := pg.Exec(ctx, "CREATE DATABASE "+target+" OWNER app"); err != nil {
			t.Fatal(err)
		}
		run("pg_restore", "-h", pg.Host, "-p", strconv.Itoa(pg.Port), "-U", "app", "-d", target, "--no-owner", dump.args[len(dump.args)-1])
		rows, err := pg.ExecIn(ctx, target, "SELECT (SELECT count(*) FROM left_side), (SELECT count(*) FROM right_side)")
		if err != nil {
			t.Fatal(err)
		}
		l, _ := strconv.Atoi(rows[0][0])
		r, _ := strconv.Atoi(rows[0][1])
		t.Logf("pg_dump %s through the governor: %s, %d and %d rows restored, %d writer commits meanwhile", dump.name, took.Round(time.Millisecond), l, r, commits.Load()-before)
		if l != r || l < 20000 {
			t.Errorf("pg_dump %s: want the two tables at one count (one snapshot), at least 20000 rows, got %d and %d", dump.name, l, r)
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("a writer failed during the dumps: %v", err)
	}
	if commits.Load() == 0 {
		t.Error("no writer committed: the dumps ran against an idle database")
	}
	// pg_dump's connections (1, then 1 + 2 workers) were pinned by its SETs.
	if n := g.logs.FilterMessage("client pinned to its server connection by session state").FilterField(zap.String("reason", "SET")).Len(); n != 4 {
		t.Errorf("pg_dump's connections pinned by SET: want = 4, got = %d", n)
	}
}
