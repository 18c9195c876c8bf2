package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// The shares the tests expect: the leases (clusterLeases = 24) split among
// the replicas, each one's control connection holding one.
func fairLeases(replicas int) []int {
	out := make([]int, replicas)
	for i := range out {
		out[i] = clusterLeases / replicas
		if i < clusterLeases%replicas {
			out[i]++
		}
	}
	return out
}

func equalInts(a, b []int) bool { return fmt.Sprint(a) == fmt.Sprint(b) }

// TestClusterSharesOneBudget: three replicas (separate processes) in front
// of one Postgres with max_connections = 30, each driven by 100 clients in
// transaction mode. The governors' server connections in pg_stat_activity,
// sampled every 50 ms, never exceed the budget; every transaction succeeds;
// the replicas hold equal shares.
func TestClusterSharesOneBudget(t *testing.T) {
	pg := clusterServer(t)
	ns := newNamespace()
	users := usersFile(t)
	rs := startReplicas(t, pg, ns, users, []string{"rep1", "rep2", "rep3"})
	s := sampleCluster(t, pg)
	var loads []*clusterLoad
	for _, r := range rs {
		loads = append(loads, startClusterLoad(t, r.url("alice", userPass, "clusterdb"), r.user, clusterClientsPerProxy))
	}
	want := fairLeases(3)
	began := time.Now()
	waitFor(t, convergeTimeout, fmt.Sprintf("fair shares %v", want), func() bool { return equalInts(leasesOf(t, pg, ns, rs...), want) })
	t.Logf("fair shares %v %s after the load began", want, time.Since(began).Round(time.Millisecond))
	time.Sleep(2 * time.Second) // steady load; nothing to await
	var commits int64
	for i, l := range loads {
		commits += l.mustStop(t, rs[i].user)
	}
	servers, governors, all, samples := s.finish()
	if samples < 20 {
		t.Fatalf("pg_stat_activity samples: want >= 20, got = %d", samples)
	}
	// Three control connections hold three of the leases.
	if budget := clusterLeases - 3; servers > budget {
		t.Errorf("governor server connections in pg_stat_activity: want <= %d (the budget), got = %d", budget, servers)
	}
	if governors > clusterLeases {
		t.Errorf("governor connections, control connections included: want <= %d (the leases), got = %d", clusterLeases, governors)
	}
	if all > clusterMaxConnections-clusterSuperReserved {
		t.Errorf("client backends: want <= %d, got = %d", clusterMaxConnections-clusterSuperReserved, all)
	}
	rows, err := pg.ExecIn(context.Background(), "clusterdb", "SELECT count(*) FROM load WHERE replica IN ('rep1', 'rep2', 'rep3')")
	if err != nil {
		t.Fatal(err)
	}
	if got := rows[0][0]; got != fmt.Sprint(commits) {
		t.Errorf("committed rows: want = %d (the transactions acknowledged), got = %s", commits, got)
	}
	clearLoad(t, pg)
	for _, r := range rs {
		mfs := r.scrape(t)
		if got := mustValue(t, mfs, "pggovernor_cluster_replicas", nil); got != 3 {
			t.Errorf("%s pggovernor_cluster_replicas: want = 3, got = %v", r.user, got)
		}
		if got := mustValue(t, mfs, "pggovernor_budget_connections", nil); got != clusterLeases-3 {
			t.Errorf("%s pggovernor_budget_connections: want = %d, got = %v", r.user, clusterLeases-3, got)
		}
	}
	t.Logf("%d transactions; at most %d server connections (%d with control connections, %d client backends in all) over %d samples",
		commits, servers, governors, all, samples)
}

// waitConverge polls cond every 10 ms (lease rows and pg_stat_activity
// announce nothing) and returns how long it took. bound is the time the
// design promises; the test waits on the state, not on that time: it
// reports a convergence slower than bound (a loaded machine shows those)
// and fails only when the state is not reached within convergeTimeout.
func waitConverge(t *testing.T, bound time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	began := time.Now()
	for !cond() {
		if time.Since(began) > convergeTimeout {
			t.Fatalf("%s: not within %s", what, convergeTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	took := time.Since(began)
	if took > bound {
		t.Logf("%s took %s, beyond the %s expected on an unloaded machine", what, took.Round(time.Millisecond), bound)
	}
	return took
}

// convergeTimeout is how long waitConverge waits for a state before it
// fails: far beyond every bound, so that only a state never reached fails.
const convergeTimeout = 60 * time.Second

// TestClusterReplicaKilledAndRestarted: kill -9 one of three replicas under
// load; the other two use its share within the documented bound
// (member_timeout + heartbeat_interval, and the time to open the
// connections). Restart it: the shares converge to fair within the
// documented bound for a join (4 × heartbeat_interval + twice the longest
// transaction, once its clients wait). No client of a live replica sees an
// error, and the budget holds throughout. The limits the test waits are the
// bounds plus slack for a loaded test machine; the figures measured are
// logged.
func TestClusterReplicaKilledAndRestarted(t *testing.T) {
	pg := clusterServer(t)
	ns := newNamespace()
	users := usersFile(t)
	rs := startReplicas(t, pg, ns, users, []string{"rep1", "rep2", "rep3"})
	a, b, c := rs[0], rs[1], rs[2]
	s := sampleCluster(t, pg)
	la := startClusterLoad(t, a.url("alice", userPass, "clusterdb"), "rep1", clusterClientsPerProxy)
	lb := startClusterLoad(t, b.url("alice", userPass, "clusterdb"), "rep2", clusterClientsPerProxy)
	lc := startClusterLoad(t, c.url("alice", userPass, "clusterdb"), "rep3", clusterClientsPerProxy)
	waitFor(t, convergeTimeout, "fair shares", func() bool { return equalInts(leasesOf(t, pg, ns, a, b, c), fairLeases(3)) })

	if err := c.cmd.Process.Kill(); err != nil { // kill -9
		t.Fatal(err)
	}
	<-c.exited
	_, _ = lc.stop() // its clients lost their connections with it: expected
	bound := clusterMemberTimeout + clusterHeartbeat
	took := waitConverge(t, bound, "the survivors taking over the killed replica's share", func() bool {
		l := leasesOf(t, pg, ns, a, b)
		return l[0]+l[1] == clusterLeases && s.serversOf("rep1")+s.serversOf("rep2") == clusterLeases-2
	})
	t.Logf("killed replica's share in use by the others after %s (documented bound %s)", took.Round(time.Millisecond), bound)
	if got := leasesOf(t, pg, ns, a, b); !equalInts(got, fairLeases(2)) {
		t.Errorf("shares of the survivors: want = %v, got = %v", fairLeases(2), got)
	}

	c2 := startReplica(t, pg, "rep3", ns, users)
	lc2 := startClusterLoad(t, c2.url("alice", userPass, "clusterdb"), "rep3", clusterClientsPerProxy)
	// Documented: 4 heartbeats and twice the longest transaction (20 ms)
	// once its clients wait (they log in while it joins).
	joinBound := 4*clusterHeartbeat + 2*20*time.Millisecond
	took = waitConverge(t, joinBound, "fair shares after the restart", func() bool {
		return equalInts(leasesOf(t, pg, ns, a, b, c2), fairLeases(3))
	})
	t.Logf("restarted replica at its fair share %s after it started listening (documented bound %s)", took.Round(time.Millisecond), joinBound)
	time.Sleep(time.Second) // load on the three again; nothing to await
	la.mustStop(t, "rep1")
	lb.mustStop(t, "rep2")
	lc2.mustStop(t, "rep3 restarted")
	servers, governors, _, samples := s.finish()
	// With two members, the budget leaves 24 − 2 leases for server
	// connections; and every governor connection, the joining replica's
	// control connection included, fits max_connections − reserved.
	if budget := clusterLeases - 2; servers > budget {
		t.Errorf("governor server connections in pg_stat_activity: want <= %d, got = %d", budget, servers)
	}
	if capacity := clusterLeases + 1; governors > capacity {
		t.Errorf("governor connections, control connections included: want <= %d, got = %d", capacity, governors)
	}
	t.Logf("at most %d server connections, %d with control connections, over %d samples", servers, governors, samples)
	clearLoad(t, pg)
}

// TestClusterSkewedLoad: one busy replica and two idle ones: the busy one
// borrows all the leases but the idle ones' floors (a control connection
// and one server connection each); move the load to another replica and
// the shares follow.
func TestClusterSkewedLoad(t *testing.T) {
	pg := clusterServer(t)
	ns := newNamespace()
	users := usersFile(t)
	rs := startReplicas(t, pg, ns, users, []string{"rep1", "rep2", "rep3"})
	s := sampleCluster(t, pg)
	busy := clusterLeases - 2*2
	l1 := startClusterLoad(t, rs[0].url("alice", userPass, "clusterdb"), "rep1", clusterClientsPerProxy)
	took := waitConverge(t, 10*time.Second, "rep1 borrowing the idle replicas' leases", func() bool {
		return equalInts(leasesOf(t, pg, ns, rs...), []int{busy, 2, 2})
	})
	t.Logf("busy replica at %d of %d leases %s after its load began", busy, clusterLeases, took.Round(time.Millisecond))
	if got := rs[0].metric(t, "pggovernor_cluster_borrowed_leases"); got != float64(busy-clusterLeases/3) {
		t.Errorf("rep1 pggovernor_cluster_borrowed_leases: want = %d, got = %v", busy-clusterLeases/3, got)
	}
	time.Sleep(time.Second) // steady skewed load; nothing to await

	l2 := startClusterLoad(t, rs[1].url("alice", userPass, "clusterdb"), "rep2", clusterClientsPerProxy)
	moved := time.Now()
	n1 := l1.mustStop(t, "rep1")
	took = waitConverge(t, 10*time.Second, "the leases following the load to rep2", func() bool {
		return equalInts(leasesOf(t, pg, ns, rs...), []int{2, busy, 2})
	})
	t.Logf("leases followed the load to rep2 within %s (the busy replica's demand is the peak of its last 3 heartbeats)",
		time.Since(moved).Round(time.Millisecond))
	_ = took
	if got := rs[0].metric(t, "pggovernor_cluster_rebalances_total"); got < 1 {
		t.Errorf("rep1 pggovernor_cluster_rebalances_total: want >= 1 (it gave leases back), got = %v", got)
	}
	n2 := l2.mustStop(t, "rep2")
	servers, governors, _, samples := s.finish()
	if budget := clusterLeases - 3; servers > budget {
		t.Errorf("governor server connections in pg_stat_activity: want <= %d, got = %d", budget, servers)
	}
	if governors > clusterLeases {
		t.Errorf("governor connections, control connections included: want <= %d, got = %d", clusterLeases, governors)
	}
	t.Logf("%d and %d transactions; at most %d server connections over %d samples", n1, n2, servers, samples)
	clearLoad(t, pg)
}

// TestClusterForeignConnections: with budget.cluster.count_foreign, a
// foreign application that opens 10 connections gets them one after the
// other as the replicas shrink to make room (each one it opens takes the
// slot kept free, and the replicas give one back at their next
// heartbeat), and the total stays within max_connections − reserved
// throughout, with every client transaction succeeding.
func TestClusterForeignConnections(t *testing.T) {
	pg := clusterServer(t)
	ns := newNamespace()
	users := usersFile(t)
	rs := startReplicas(t, pg, ns, users, []string{"rep1", "rep2", "rep3"}, "--budget.reserve=0", "--budget.cluster.count-foreign")
	s := sampleCluster(t, pg) // a foreign connection itself
	var loads []*clusterLoad
	for _, r := range rs {
		loads = append(loads, startClusterLoad(t, r.url("alice", userPass, "clusterdb"), r.user, clusterClientsPerProxy))
	}
	limit := clusterMaxConnections - clusterSuperReserved // what non-superusers may use
	// Leases: limit − 1 kept free − 1 sampler − what else of the tests is
	// connected; the replicas use them all.
	waitFor(t, convergeTimeout, "the replicas to use the budget", func() bool {
		return s.serversOf("rep1")+s.serversOf("rep2")+s.serversOf("rep3") >= limit-1-1-3-1
	})

	ctx := context.Background()
	began := time.Now()
	var foreign []*pgx.Conn
	defer func() {
		for _, c := range foreign {
			c.Close(ctx)
		}
	}()
	refused := 0
	var lastErr error
	for len(foreign) < 10 {
		if time.Since(began) > 20*time.Second {
			rows, _ := pg.Exec(ctx, "SELECT usename, application_name, state, backend_type FROM pg_stat_activity")
			t.Fatalf("the foreign application got %d of its 10 connections in 20 s (%d refusals, the last: %v); leases %v, budget %v; activity %v",
				len(foreign), refused, lastErr, leasesOf(t, pg, ns, rs...), rs[0].metric(t, "pggovernor_budget_connections"), rows)
		}
		c, err := pgx.Connect(ctx, pg.URL("outsider", clusterPass, "clusterdb"))
		if err != nil {
			refused, lastErr = refused+1, err
			time.Sleep(20 * time.Millisecond) // a client retrying; nothing to await
			continue
		}
		foreign = append(foreign, c)
	}
	t.Logf("the foreign application opened 10 connections in %s (%d attempts refused by the server meanwhile)",
		time.Since(began).Round(time.Millisecond), refused)
	budget := limit - 1 - 11 - 3 // kept free, foreign (sampler included), control connections
	took := waitConverge(t, 5*time.Second, "the replicas to shrink", func() bool {
		for _, r := range rs {
			if r.metric(t, "pggovernor_budget_connections") != float64(budget) {
				return false
			}
		}
		return s.serversOf("rep1")+s.serversOf("rep2")+s.serversOf("rep3") <= budget
	})
	t.Logf("replicas within the %d server connections left %s after", budget, took.Round(time.Millisecond))
	time.Sleep(time.Second) // the load carries on beside the foreign application; nothing to await
	for i, l := range loads {
		l.mustStop(t, rs[i].user)
	}
	_, _, all, samples := s.finish()
	if all > limit {
		t.Errorf("client backends in pg_stat_activity: want <= %d (max_connections − superuser_reserved_connections), got = %d", limit, all)
	}
	t.Logf("at most %d client backends over %d samples", all, samples)
	clearLoad(t, pg)
}

// TestClusterControlConnectionTerminated: pg_terminate_backend on a
// replica's control connection under load. Its advisory locks go with the
// session, but its row keeps its leases reserved: it stops opening server
// connections and sheds (idle ones at once, busy ones at release), then
// reconnects at its next heartbeat, takes its leases back and recovers.
// The budget is never exceeded meanwhile, and no client sees an error.
func TestClusterControlConnectionTerminated(t *testing.T) {
	pg := clusterServer(t)
	ns := newNamespace()
	users := usersFile(t)
	rs := startReplicas(t, pg, ns, users, []string{"rep1", "rep2", "rep3"})
	s := sampleCluster(t, pg)
	var loads []*clusterLoad
	for _, r := range rs {
		loads = append(loads, startClusterLoad(t, r.url("alice", userPass, "clusterdb"), r.user, clusterClientsPerProxy))
	}
	waitFor(t, convergeTimeout, "fair shares", func() bool { return equalInts(leasesOf(t, pg, ns, rs...), fairLeases(3)) })
	ctx := context.Background()
	pidOf := func() string {
		rows, err := pg.Exec(ctx, "SELECT pid FROM pg_stat_activity WHERE usename = 'rep1' AND application_name = 'pggovernor-control'")
		if err != nil {
			t.Fatal(err)
		}
		if len(rows) != 1 {
			return ""
		}
		return rows[0][0]
	}
	before := pidOf()
	shedBefore := rs[0].metric(t, "go_sql_max_idle_closed_total")
	terminated := time.Now()
	if _, err := pg.Exec(ctx, "SELECT pg_terminate_backend("+before+")"); err != nil {
		t.Fatal(err)
	}
	took := waitConverge(t, 10*time.Second, "rep1 back with its leases on a new control connection", func() bool {
		pid := pidOf()
		return pid != "" && pid != before && equalInts(leasesOf(t, pg, ns, rs...), fairLeases(3)) && s.serversOf("rep1") > 0
	})
	t.Logf("rep1 recovered %s after its control connection was terminated; fewest server connections meanwhile %d (of %d)",
		took.Round(time.Millisecond), s.minSince("rep1", terminated), fairLeases(3)[0]-1)
	if got := rs[0].metric(t, "pggovernor_cluster_lease_losses_total"); got != 1 {
		t.Errorf("rep1 pggovernor_cluster_lease_losses_total: want = 1, got = %v", got)
	}
	if shed := rs[0].metric(t, "go_sql_max_idle_closed_total") - shedBefore; shed < 1 {
		t.Errorf("rep1's server connections closed as surplus while its leases were lost: want >= 1, got = %v", shed)
	}
	if !rs[0].logged(t, "lost the control connection: no new server connections until it is back; idle ones are closed now, the others as their clients release them") {
		t.Errorf("rep1 did not log the loss of its control connection:\n%s", rs[0].stderr)
	}
	time.Sleep(time.Second) // the load carries on; nothing to await
	for i, l := range loads {
		l.mustStop(t, rs[i].user)
	}
	servers, governors, _, samples := s.finish()
	if budget := clusterLeases - 3; servers > budget {
		t.Errorf("governor server connections in pg_stat_activity: want <= %d, got = %d", budget, servers)
	}
	if capacity := clusterLeases + 1; governors > capacity {
		t.Errorf("governor connections, control connections included: want <= %d, got = %d", capacity, governors)
	}
	t.Logf("at most %d server connections, %d with control connections, over %d samples", servers, governors, samples)
	clearLoad(t, pg)
}

// cancelRequest sends a CancelRequest for pid and secret to addr, as libpq
// does, and waits for the receiver to close the connection.
func cancelRequest(t *testing.T, addr string, pid, secret uint32) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var buf [16]byte
	binary.BigEndian.PutUint32(buf[0:], 16)
	binary.BigEndian.PutUint32(buf[4:], 80877102)
	binary.BigEndian.PutUint32(buf[8:], pid)
	binary.BigEndian.PutUint32(buf[12:], secret)
	if _, err := c.Write(buf[:]); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.Copy(io.Discard, c)
}

// TestClusterCancelAcrossReplicas: a query runs through replica A; a
// CancelRequest with its key sent to replica B (as behind a Service) is
// forwarded to A, authenticated with budget.cluster.secret_file's key,
// and A cancels it: 57014. The key carries A's replica
// number; one with a wrong secret, forwarded the same way, is dropped by A
// and the query runs on.
func TestClusterCancelAcrossReplicas(t *testing.T) {
	pg := clusterServer(t)
	ns := newNamespace()
	users := usersFile(t)
	secretFlag := "--budget.cluster.secret-file=" + clusterSecretFile(t)
	a := startReplica(t, pg, "rep1", ns, users, "--log.level=debug", secretFlag)
	b := startReplica(t, pg, "rep2", ns, users, secretFlag)
	waitMembers(t, pg, ns, a, b)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, a.url("alice", userPass, "clusterdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	pid, secret := conn.PgConn().PID(), binary.BigEndian.Uint32(conn.PgConn().SecretKey())
	if got, want := int(pid>>21), members(t, pg, ns)[a.addr].id; got != want {
		t.Fatalf("replica number in the cancel key: want = %d (A's), got = %d (pid %d)", want, got, pid)
	}
	done := make(chan error, 1)
	go func() { // owner: the test; ends with the query
		_, err := conn.Exec(ctx, "SELECT pg_sleep(60)")
		done <- err
	}()
	running := func() bool {
		rows, err := pg.Exec(ctx, "SELECT 1 FROM pg_stat_activity WHERE usename = 'rep1' AND state = 'active' AND query = 'SELECT pg_sleep(60)'")
		return err == nil && len(rows) == 1
	}
	waitFor(t, 10*time.Second, "the query to run", running)

	// B forwards the request to A and closes the client's connection only
	// once A has closed its own (forwardCancel waits for it, as libpq
	// waits for the server), and each counts the request before it closes:
	// when cancelRequest returns, both counters say what became of it.
	cancels := func(r *replica, result string) float64 {
		v, _ := value(r.scrape(t), "pggovernor_cancel_requests_total", map[string]string{"result": result})
		return v
	}
	cancelRequest(t, b.addr, pid, secret+1)
	if fw, dropped, sent := cancels(b, "forwarded"), cancels(a, "dropped"), cancels(a, "sent"); fw != 1 || dropped != 1 || sent != 0 {
		t.Fatalf("a cancel request with a wrong secret: want = forwarded by B, dropped by A; got = B forwarded %v, A dropped %v, A sent %v", fw, dropped, sent)
	}
	select {
	case err := <-done:
		t.Fatalf("a cancel request with a wrong secret ended the query: %v", err)
	default:
	}

	began := time.Now()
	cancelRequest(t, b.addr, pid, secret)
	if fw, sent := cancels(b, "forwarded"), cancels(a, "sent"); fw != 2 || sent != 1 {
		t.Fatalf("the cancel request: want = forwarded by B, sent to the server by A; got = B forwarded %v, A sent %v", fw, sent)
	}
	select {
	case err := <-done:
		assertCode(t, err, "57014")
		t.Logf("query cancelled through the other replica %s after the request", time.Since(began).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("the query was not cancelled through the other replica")
	}
	if _, err := conn.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("the client after its query was cancelled: %v", err)
	}
}

// TestClusterBudgetFollowsTheServer: after the server restarts with a new
// max_connections, and again with more superuser_reserved_connections, the
// replicas recompute the budget and clients carry on. pggovernor doctor
// lists the members and their shares.
func TestClusterBudgetFollowsTheServer(t *testing.T) {
	ctx := context.Background()
	pg, err := pgtest.Start(ctx, pgtest.Options{MaxConnections: clusterMaxConnections})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Close()
	if err := setupClusterDB(ctx, pg); err != nil {
		t.Fatal(err)
	}
	ns := newNamespace()
	users := usersFile(t)
	a, b := startReplica(t, pg, "rep1", ns, users), startReplica(t, pg, "rep2", ns, users)
	waitMembers(t, pg, ns, a, b)
	budgetIs := func(want int) func() bool {
		return func() bool {
			return a.metric(t, "pggovernor_budget_connections") == float64(want) && b.metric(t, "pggovernor_budget_connections") == float64(want)
		}
	}
	waitFor(t, convergeTimeout, "the budget of 2 replicas", budgetIs(clusterLeases-2))

	var out, errOut bytes.Buffer
	err = execute(ctx, []string{"doctor", "--upstream-url=" + pg.URL("rep1", "", "clusterdb"), "--upstream.password=" + clusterPass,
		"--clients.users-file=" + users, "--budget.reserve=2", "--budget.cluster.enabled", fmt.Sprintf("--budget.cluster.namespace=%d", ns),
		"--budget.cluster.member-timeout=" + clusterMemberTimeout.String(), "--budget.cluster.heartbeat-interval=" + clusterHeartbeat.String()},
		nil, &out, &errOut)
	if err != nil {
		t.Fatalf("doctor: %v\n%s%s", err, out.String(), errOut.String())
	}
	t.Logf("pggovernor doctor:\n%s", out.String())
	text := strings.Join(strings.Fields(out.String()), " ")
	for _, want := range []string{
		"cluster: budget 24 leases = 30 max_connections − 3 superuser_reserved − 0 reserved − 2 budget.reserve − 1 kept free for a joining replica; 2 for the control connections of 2 replicas, 22 for server connections",
		"cluster: replicas 2",
		"replica 1 ", "replica 2 ", "fair share 12", "cancel address " + a.addr, "cancel address " + b.addr,
	} {
		if !strings.Contains(text, want) {
			t.Fatalf("doctor output lacks %q:\n%s", want, out.String())
		}
	}

	for _, step := range []struct {
		settings map[string]string
		want     int
	}{
		{map[string]string{"max_connections": "40"}, 40 - 3 - 2 - 1 - 2},
		{map[string]string{"superuser_reserved_connections": "5"}, 40 - 5 - 2 - 1 - 2},
	} {
		if err := pg.Restart(ctx, step.settings); err != nil {
			t.Fatal(err)
		}
		began := time.Now()
		waitFor(t, convergeTimeout, fmt.Sprintf("the budget after %v", step.settings), budgetIs(step.want))
		t.Logf("budget %d server connections %s after the server restarted with %v", step.want, time.Since(began).Round(time.Millisecond), step.settings)
		for _, r := range []*replica{a, b} {
			if err := selectOne(ctx, r.url("alice", userPass, "clusterdb")); err != nil {
				t.Fatalf("%s after the restart: %v", r.user, err)
			}
		}
	}

	// A replica that stops in order leaves: its row and its locks are gone
	// as it exits, not a member timeout later.
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-b.exited
	if _, ok := members(t, pg, ns)[b.addr]; ok {
		t.Errorf("members after rep2 stopped: want it gone, got = %+v", members(t, pg, ns))
	}
	rows, err := pg.ExecIn(ctx, "clusterdb", fmt.Sprintf(`SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
		WHERE l.locktype = 'advisory' AND l.classid = %d AND a.usename = 'rep2'`, ns))
	if err != nil {
		t.Fatal(err)
	}
	if rows[0][0] != "0" {
		t.Errorf("advisory locks of rep2 after it stopped: want = 0, got = %s", rows[0][0])
	}
}

// TestClusterWaitTimeoutNamesTheShare: a client that waits past
// timeouts.query_wait for a server connection of a replica's share gets
// 53300 with a message saying it is the replica's share of the cluster
// budget and a hint naming the settings. (budget.max 3: 2 leases once one
// slot is kept free, one of them the control connection's.)
func TestClusterWaitTimeoutNamesTheShare(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 3
		c.Timeouts.QueryWait = 300 * time.Millisecond
		c.Budget.Cluster = config.Cluster{Enabled: true, Namespace: int(newNamespace()), Table: "pggovernor_members",
			HeartbeatInterval: 50 * time.Millisecond, MemberTimeout: time.Second}
	})
	waitFor(t, convergeTimeout, "the replica to join", func() bool { return g.g.cluster.Stats().Known })
	if n, _ := g.g.pool.Limit(); n != 1 {
		t.Fatalf("pool limit: want = 1 (2 leases, one the control connection's), got = %d", n)
	}
	ctx := context.Background()
	holder := connectPgx(t, g.url("alice", userPass, "appdb"))
	tx, err := holder.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	mustExecTx(t, tx, "SELECT 1")
	waiter := connectPgx(t, g.url("alice", userPass, "appdb"))
	_, err = waiter.Exec(ctx, "SELECT 1")
	pgErr := assertCode(t, err, "53300")
	if want := "all 1 server connections of this replica's share of the cluster budget are in use"; !strings.Contains(pgErr.Message, want) {
		t.Fatalf("53300 message: want it to contain %q, got = %q", want, pgErr.Message)
	}
	if !strings.Contains(pgErr.Hint, "budget.cluster.enabled") || !strings.Contains(pgErr.Hint, "max_connections") {
		t.Fatalf("53300 hint: want it to name budget.cluster.enabled and max_connections, got = %q", pgErr.Hint)
	}
}
