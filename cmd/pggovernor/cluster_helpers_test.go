package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// Helpers for the tests of budget.cluster: several pggovernor processes
// (separate binaries, separate ports) in front of one Postgres, each
// logging in upstream as its own role so that pg_stat_activity tells
// their connections apart.

const (
	clusterPass            = "cluster-pw-Q4"
	clusterMaxConnections  = 30
	clusterSuperReserved   = 3 // Postgres' default superuser_reserved_connections
	clusterHeartbeat       = 100 * time.Millisecond
	clusterMemberTimeout   = time.Second
	clusterBudgetReserve   = 2 // the tests' own connections (sampler, checks)
	clusterClientsPerProxy = 100
)

// clusterLeases is the cluster budget of the tests' server with the
// default reserve: max_connections − superuser reserved − budget.reserve −
// the one slot kept free for a joining replica, in leases (each replica's
// control connection holds one).
const clusterLeases = clusterMaxConnections - clusterSuperReserved - clusterBudgetReserve - 1

var (
	clusterOnce sync.Once
	clusterPG   *pgtest.Cluster
	clusterErr  error
	clusterNS   atomic.Int32
)

// clusterServer is the Postgres of the cluster tests (max_connections 30),
// with roles rep1 to rep4 for the replicas and outsider for a foreign
// application, and the table load the clients write to.
func clusterServer(t *testing.T) *pgtest.Cluster {
	t.Helper()
	clusterOnce.Do(func() {
		ctx := context.Background()
		c, err := pgtest.Start(ctx, pgtest.Options{MaxConnections: clusterMaxConnections})
		if err != nil {
			clusterErr = err
			return
		}
		atExit(c.Close)
		if clusterErr = setupClusterDB(ctx, c); clusterErr != nil {
			return
		}
		clusterPG = c
	})
	if clusterErr != nil {
		t.Fatalf("starting the cluster tests' postgres: %v", clusterErr)
	}
	return clusterPG
}

// setupClusterDB creates the roles rep1 to rep4 (the replicas) and
// outsider (a foreign application), and the database clusterdb with the
// table load, where the replicas may create the membership table and use
// it whichever of them creates it.
func setupClusterDB(ctx context.Context, c *pgtest.Cluster) error {
	setup := []string{"CREATE DATABASE clusterdb"}
	for _, r := range []string{"rep1", "rep2", "rep3", "rep4", "outsider"} {
		setup = append(setup, fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'", r, clusterPass))
	}
	for _, q := range setup {
		if _, err := c.Exec(ctx, q); err != nil {
			return err
		}
	}
	_, err := c.ExecIn(ctx, "clusterdb", `CREATE TABLE load (replica text, n bigint);
		GRANT ALL ON load TO rep1, rep2, rep3, rep4;
		GRANT USAGE, CREATE ON SCHEMA public TO rep1, rep2, rep3, rep4;
		ALTER DEFAULT PRIVILEGES FOR ROLE rep1, rep2, rep3, rep4 IN SCHEMA public
			GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO rep1, rep2, rep3, rep4`)
	return err
}

// replica is one pggovernor process with budget.cluster.
type replica struct {
	*process
	user  string
	admin string
}

// startReplica runs a replica logging in as user, in namespace ns, with
// the tests' short heartbeat and member timeout; extra flags come last
// (and win).
func startReplica(t *testing.T, pg *pgtest.Cluster, user string, ns int32, users string, extra ...string) *replica {
	t.Helper()
	args := append([]string{
		"--upstream-url=" + pg.URL(user, "", "clusterdb"),
		"--clients.users-file=" + users,
		"--admin-listen=127.0.0.1:0",
		"--clients.max-connections=1000",
		"--timeouts.query-wait=30s",
		"--budget.reserve=" + strconv.Itoa(clusterBudgetReserve),
		"--budget.cluster.enabled",
		"--budget.cluster.namespace=" + strconv.Itoa(int(ns)),
		"--budget.cluster.heartbeat-interval=" + clusterHeartbeat.String(),
		"--budget.cluster.member-timeout=" + clusterMemberTimeout.String(),
		"--log.level=info",
	}, extra...)
	p := startProcess(t, []string{"PGGOVERNOR_UPSTREAM_PASSWORD=" + clusterPass}, args...)
	r := &replica{process: p, user: user}
	// The start line is on its way through stderr's pipe.
	waitFor(t, 10*time.Second, user+"'s start log line", func() bool {
		for _, l := range logLines(t, p) {
			if l["msg"] == "pggovernor started" {
				r.admin, _ = l["admin_listen"].(string)
			}
		}
		return r.admin != ""
	})
	return r
}

// startReplicas runs one replica per user name in namespace ns, all with
// the same extra flags, and waits until every one is a member.
func startReplicas(t *testing.T, pg *pgtest.Cluster, ns int32, users string, names []string, extra ...string) []*replica {
	t.Helper()
	rs := make([]*replica, 0, len(names))
	for _, name := range names {
		rs = append(rs, startReplica(t, pg, name, ns, users, extra...))
	}
	waitMembers(t, pg, ns, rs...)
	return rs
}

// clearLoad empties the table the cluster loads insert into, so that the
// next test counts its own commits.
func clearLoad(t *testing.T, pg *pgtest.Cluster) {
	t.Helper()
	if _, err := pg.ExecIn(context.Background(), "clusterdb", "DELETE FROM load"); err != nil {
		t.Fatal(err)
	}
}

// newNamespace gives each test its own advisory-lock namespace (and so its
// own members) on the shared server.
func newNamespace() int32 { return 0x7000 + clusterNS.Add(1) }

// scrape reads the replica's /metrics.
func (r *replica) scrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + r.admin + "/metrics")
	if err != nil {
		t.Fatalf("%s /metrics: %v", r.user, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parsing %s /metrics: %v", r.user, err)
	}
	return mfs
}

// metric is one series of the replica's metrics (0 when absent).
func (r *replica) metric(t *testing.T, name string) float64 {
	t.Helper()
	v, _ := value(r.scrape(t), name, nil)
	return v
}

// member is a row of the membership table.
type member struct {
	id      int
	addr    string
	leases  int
	waiting int
	age     time.Duration
}

// members reads the live members of namespace ns by the address they
// advertise (each replica's listen address).
func members(t *testing.T, pg *pgtest.Cluster, ns int32) map[string]member {
	t.Helper()
	rows, err := pg.ExecIn(context.Background(), "clusterdb", fmt.Sprintf(`SELECT replica_id, cancel_addr, cardinality(slots), waiting,
		extract(epoch FROM now() - heartbeat) FROM pggovernor_members WHERE namespace = %d`, ns))
	if err != nil {
		if strings.Contains(err.Error(), "does not exist") {
			return nil
		}
		t.Fatal(err)
	}
	out := map[string]member{}
	for _, r := range rows {
		var m member
		var age float64
		m.id, _ = strconv.Atoi(r[0])
		m.addr = r[1]
		m.leases, _ = strconv.Atoi(r[2])
		m.waiting, _ = strconv.Atoi(r[3])
		age, _ = strconv.ParseFloat(r[4], 64)
		m.age = time.Duration(age * float64(time.Second))
		if m.age < clusterMemberTimeout {
			out[m.addr] = m
		}
	}
	return out
}

// leasesOf lists the leases of the replicas, in their order (0 for one
// that is not a member).
func leasesOf(t *testing.T, pg *pgtest.Cluster, ns int32, rs ...*replica) []int {
	t.Helper()
	ms := members(t, pg, ns)
	out := make([]int, len(rs))
	for i, r := range rs {
		out[i] = ms[r.addr].leases
	}
	return out
}

// waitMembers waits until every replica is a member.
func waitMembers(t *testing.T, pg *pgtest.Cluster, ns int32, rs ...*replica) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ms := members(t, pg, ns)
		joined := 0
		for _, r := range rs {
			if ms[r.addr].leases > 0 {
				joined++
			}
		}
		if joined == len(rs) {
			return
		}
		if time.Now().After(deadline) {
			for _, r := range rs {
				t.Logf("%s (%s):\n%s", r.user, r.addr, r.stderr)
			}
			t.Fatalf("replicas joined: want = %d, got = %d (members %+v)", len(rs), joined, ms)
		}
		time.Sleep(10 * time.Millisecond) // rows in a table: nothing announces them
	}
}

// clusterSampler counts, every 50 ms, the governors' server connections
// (by role, control connections apart) and every client backend.
type clusterSampler struct {
	mu       sync.Mutex
	maxSrv   int // governor server connections, all replicas
	maxGov   int // the same and their control connections
	maxAll   int // every client backend
	samples  int
	last     map[string]int // server connections by role at the last sample
	series   []clusterSample
	stop     chan struct{}
	done     chan struct{}
	sampling sync.WaitGroup
}

type clusterSample struct {
	at      time.Time
	servers map[string]int
}

func sampleCluster(t *testing.T, pg *pgtest.Cluster) *clusterSampler {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), pg.SuperuserDSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	s := &clusterSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() { // owner: the test; exits at finish
		defer close(s.done)
		defer conn.Close(context.Background())
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			rows, err := conn.Query(context.Background(), `SELECT coalesce(usename, ''), application_name = 'pggovernor-control', count(*)
				FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1, 2`)
			if err == nil {
				byRole := map[string]int{}
				srv, gov, all := 0, 0, 0
				for rows.Next() {
					var user string
					var control bool
					var n int
					if rows.Scan(&user, &control, &n) != nil {
						continue
					}
					all += n
					if strings.HasPrefix(user, "rep") {
						gov += n
						if !control {
							srv += n
							byRole[user] += n
						}
					}
				}
				if rows.Err() == nil {
					s.mu.Lock()
					s.samples++
					s.maxSrv, s.maxGov, s.maxAll = max(s.maxSrv, srv), max(s.maxGov, gov), max(s.maxAll, all)
					s.last = byRole
					s.series = append(s.series, clusterSample{at: time.Now(), servers: byRole})
					s.mu.Unlock()
				}
			}
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

// finish stops sampling and returns the maxima.
func (s *clusterSampler) finish() (servers, governors, all, samples int) {
	close(s.stop)
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxSrv, s.maxGov, s.maxAll, s.samples
}

// minSince is the fewest server connections of role seen since at.
func (s *clusterSampler) minSince(role string, at time.Time) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := -1
	for _, x := range s.series {
		if !x.at.Before(at) && (m < 0 || x.servers[role] < m) {
			m = x.servers[role]
		}
	}
	return m
}

// serversOf is the server connections of role at the last sample.
func (s *clusterSampler) serversOf(role string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last[role]
}

// clusterLoad is clients running transactions through one replica until
// stopped, each one BEGIN; INSERT; pg_sleep(20 ms); COMMIT in one round
// trip (a real transaction in transaction mode).
type clusterLoad struct {
	stopc   chan struct{}
	wg      sync.WaitGroup
	commits atomic.Int64
	mu      sync.Mutex
	errs    []error
}

func startClusterLoad(t *testing.T, url, tag string, clients int) *clusterLoad {
	t.Helper()
	l := &clusterLoad{stopc: make(chan struct{})}
	ctx := context.Background()
	for i := 0; i < clients; i++ {
		l.wg.Add(1)
		go func() { // owner: the test; exits at stop
			defer l.wg.Done()
			conn, err := pgx.Connect(ctx, url)
			if err != nil {
				l.fail(fmt.Errorf("client %d connect: %w", i, err))
				return
			}
			defer conn.Close(ctx)
			q := fmt.Sprintf("BEGIN; INSERT INTO load VALUES ('%s', %d); SELECT pg_sleep(0.02); COMMIT", tag, i)
			for {
				select {
				case <-l.stopc:
					return
				default:
				}
				if _, err := conn.Exec(ctx, q); err != nil {
					l.fail(fmt.Errorf("client %d: %w", i, err))
					return
				}
				l.commits.Add(1)
			}
		}()
	}
	return l
}

func (l *clusterLoad) fail(err error) {
	l.mu.Lock()
	l.errs = append(l.errs, err)
	l.mu.Unlock()
}

// stop ends the load and returns the commits and the errors.
func (l *clusterLoad) stop() (int64, []error) {
	close(l.stopc)
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.commits.Load(), l.errs
}

// mustStop stops the load and fails the test on any client error.
func (l *clusterLoad) mustStop(t *testing.T, name string) int64 {
	t.Helper()
	n, errs := l.stop()
	for i, err := range errs {
		if i == 5 {
			t.Errorf("%s: … %d client errors in all", name, len(errs))
			break
		}
		t.Errorf("%s: %v", name, err)
	}
	if n == 0 {
		t.Errorf("%s: no transaction committed", name)
	}
	return n
}

// logged reports whether the replica logged a line with message msg.
func (r *replica) logged(t *testing.T, msg string) bool {
	for _, line := range strings.Split(r.stderr.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			return true
		}
	}
	return false
}
