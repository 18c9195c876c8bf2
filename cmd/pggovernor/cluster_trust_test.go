package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// The tests of what others who can write the membership table or take
// advisory locks can do to the replicas (budget.cluster): rows no replica
// wrote, cancel requests pointed at their addresses, squatted locks, and
// the control connection's role.

// clusterSecret is the key of budget.cluster.secret_file in these tests.
const clusterSecret = "cluster-cancel-key-8Hq2Lw0Pz5Rt"

// clusterSecretFile writes clusterSecret to a file of the test's.
func clusterSecretFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "cluster-secret")
	if err := os.WriteFile(p, []byte(clusterSecret), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// readyz returns the replica's /readyz status code.
func (r *replica) readyz(t *testing.T) int {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + r.admin + "/readyz")
	if err != nil {
		t.Fatalf("%s /readyz: %v", r.user, err)
	}
	_ = resp.Body.Close()
	return resp.StatusCode
}

// ignored is pggovernor_cluster_rows_ignored_total{reason}.
func (r *replica) ignored(t *testing.T, reason string) float64 {
	t.Helper()
	v, _ := value(r.scrape(t), "pggovernor_cluster_rows_ignored_total", map[string]string{"reason": reason})
	return v
}

// execThrough runs q through the replica as a client (served upstream as
// the replica's role, the table's owner: the attack of issue 12).
func execThrough(t *testing.T, r *replica, q string) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, r.url("alice", userPass, "clusterdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, q); err != nil {
		t.Fatalf("%s through %s: %v", q, r.user, err)
	}
}

// insertRow is an INSERT of a membership row of namespace ns, with the
// columns a replica writes and the given overrides.
func insertRow(ns int32, id int, over map[string]string) string {
	cols := []string{"namespace", "replica_id", "name", "cancel_addr", "slots", "demand", "waiting", "control_pid", "server_pids", "joined", "heartbeat"}
	vals := map[string]string{"namespace": fmt.Sprint(ns), "replica_id": fmt.Sprint(id), "name": "'intruder'", "cancel_addr": "'127.0.0.1:9'",
		"slots": "'{}'", "demand": "50", "waiting": "50", "control_pid": "1", "server_pids": "'{}'", "joined": "now()", "heartbeat": "now()"}
	for k, v := range over {
		vals[k] = v
	}
	var vs []string
	for _, c := range cols {
		vs = append(vs, vals[c])
	}
	return fmt.Sprintf("INSERT INTO pggovernor_members (%s) VALUES (%s)", strings.Join(cols, ", "), strings.Join(vs, ", "))
}

// TestClusterIgnoresBadRows: a client of a replica (served as the role
// that owns the membership table, as in the sidecar model) inserts rows no
// replica wrote. Each one is ignored and counted by reason: both replicas
// stay ready, keep serving clients, and keep their shares (the budget of 2
// members, not 3). On today's main a heartbeat of 'infinity' failed every
// heartbeat ("cannot subtract infinite timestamps": /readyz 503, clients
// refused until the row is deleted), and the others counted as members.
func TestClusterIgnoresBadRows(t *testing.T) {
	pg := clusterServer(t)
	ns := newNamespace()
	users := usersFile(t)
	rs := startReplicas(t, pg, ns, users, []string{"rep1", "rep2"})
	twoMembers := func() error {
		for _, r := range rs {
			mfs := r.scrape(t)
			if got, _ := value(mfs, "pggovernor_cluster_replicas", nil); got != 2 {
				return fmt.Errorf("%s pggovernor_cluster_replicas: want = 2, got = %v", r.user, got)
			}
			if got, _ := value(mfs, "pggovernor_budget_connections", nil); got != clusterLeases-2 {
				return fmt.Errorf("%s pggovernor_budget_connections: want = %d (the budget of 2 members), got = %v", r.user, clusterLeases-2, got)
			}
			if got := r.readyz(t); got != http.StatusOK {
				return fmt.Errorf("%s /readyz: want = 200, got = %d", r.user, got)
			}
		}
		return nil
	}
	waitFor(t, 10*time.Second, "two members", func() bool { return twoMembers() == nil })
	for _, tc := range []struct {
		name   string
		id     int
		over   map[string]string
		reason string
	}{
		{"heartbeat infinity", 901, map[string]string{"heartbeat": "'infinity'"}, "heartbeat"},
		{"heartbeat -infinity", 902, map[string]string{"heartbeat": "'-infinity'"}, "heartbeat"},
		{"heartbeat far in the future", 903, map[string]string{"heartbeat": "now() + interval '100 years'"}, "heartbeat"},
		{"joined infinity", 904, map[string]string{"joined": "'infinity'"}, "malformed"},
		{"a huge slots array", 905, map[string]string{"slots": "array_fill(5, ARRAY[100000])"}, "slots"},
		{"a slot listed twice", 906, map[string]string{"slots": "'{3,3}'"}, "slots"},
		{"a negative slot", 907, map[string]string{"slots": "'{-4}'"}, "slots"},
		{"a negative replica number", -5, nil, "replica_id"},
		{"a replica number beyond a cancel key's", 5000, nil, "replica_id"},
		{"a malformed cancel address", 908, map[string]string{"cancel_addr": "'not an address'"}, "address"},
		{"a cancel address outside peer_cidrs", 909, map[string]string{"cancel_addr": "'203.0.113.9:5432'"}, "address"},
		{"a negative control PID", 910, map[string]string{"control_pid": "-1"}, "malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			waitFor(t, 10*time.Second, "two members", func() bool { return twoMembers() == nil })
			counted := func() float64 { return rs[0].ignored(t, tc.reason) + rs[1].ignored(t, tc.reason) }
			before := counted()
			t.Cleanup(func() {
				if _, err := pg.ExecIn(context.Background(), "clusterdb", fmt.Sprintf("DELETE FROM pggovernor_members WHERE namespace = %d AND replica_id = %d", ns, tc.id)); err != nil {
					t.Error(err)
				}
			})
			execThrough(t, rs[0], insertRow(ns, tc.id, tc.over))
			// Until it is counted (by both replicas at each heartbeat, or
			// once by the one whose heartbeat deletes a row that can never
			// count) — or, on old code, until the row shows in what they do
			// (a failing heartbeat, a third member).
			var bad error
			waitFor(t, 10*time.Second, "the replicas to read the row", func() bool {
				if bad = twoMembers(); bad != nil {
					return true
				}
				return counted() > before
			})
			if bad != nil {
				t.Fatalf("with the row: %v", bad)
			}
			for _, r := range rs {
				if err := selectOne(context.Background(), r.url("alice", userPass, "clusterdb")); err != nil {
					t.Fatalf("a client of %s with the row: %v", r.user, err)
				}
			}
		})
	}
	waitFor(t, 10*time.Second, "two members", func() bool { return twoMembers() == nil })
}

// cancelSink is a TCP listener standing for whatever address a tampered
// row points forwarded cancel requests at. It answers a forwarded request
// as a replica would (a challenge after the header) and records every
// byte it receives.
type cancelSink struct {
	ln    net.Listener
	mu    sync.Mutex
	got   [][]byte
	conns int
	done  chan struct{}
}

func newCancelSink(t *testing.T) *cancelSink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &cancelSink{ln: ln, done: make(chan struct{})}
	go func() { // owner: the test; exits when ln closes
		defer close(s.done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.serve(c)
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); <-s.done })
	return s
}

// serve reads the header, sends a challenge, reads what follows for a
// second, records it all, and closes (the sender waits for the close).
func (s *cancelSink) serve(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	var b bytes.Buffer
	head := make([]byte, 12)
	n, _ := io.ReadFull(c, head)
	b.Write(head[:n])
	if n == len(head) {
		_, _ = c.Write(bytes.Repeat([]byte{0x5a}, 32))
		_, _ = io.Copy(&b, c)
	}
	s.mu.Lock()
	s.conns++
	s.got = append(s.got, b.Bytes())
	s.mu.Unlock()
}

func (s *cancelSink) port() int { return s.ln.Addr().(*net.TCPAddr).Port }

func (s *cancelSink) received() (int, [][]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns, s.got
}

// TestClusterCancelForwardingToTamperedRows: a client writes a row whose
// replica number is 77 and whose cancel address is a listener of the
// test's, then sends an unauthenticated CancelRequest whose process ID
// carries 77. On today's main the replica dialled the address and wrote the
// key, secret included, to it. Now:
//   - without budget.cluster.secret_file, nothing is forwarded;
//   - with peer_cidrs excluding the listener's address, the row is ignored
//     and nothing is dialled; a row naming the listener by a DNS name that
//     resolves outside peer_cidrs is dialled to no address;
//   - within peer_cidrs, with the key, the listener gets the process ID and
//     a MAC over its own challenge: never the secret.
func TestClusterCancelForwardingToTamperedRows(t *testing.T) {
	pg := clusterServer(t)
	users := usersFile(t)
	const bogusID = 77
	pid, secret := uint32(bogusID<<21|12345), uint32(0x7e57c0de)
	var secretBytes [4]byte
	binary.BigEndian.PutUint32(secretBytes[:], secret)
	for _, tc := range []struct {
		name  string
		flags []string
		host  string // the row's cancel address host
		// member says the row counts (a third... second member).
		member bool
		// dialled says the listener may get a connection.
		dialled bool
		reason  string // rows_ignored reason, when the row is ignored
		result  string // cancels_forwarded result
	}{
		{name: "no secret file", host: "127.0.0.1", member: true, result: "no_secret"},
		{name: "outside peer_cidrs", flags: []string{"--budget.cluster.peer-cidrs=10.0.0.0/8"}, host: "127.0.0.1", reason: "address", result: "not_member"},
		{name: "a DNS name resolving outside peer_cidrs", flags: []string{"--budget.cluster.peer-cidrs=10.0.0.0/8"}, host: "localhost", member: true, result: "address_refused"},
		{name: "inside peer_cidrs with the key", host: "127.0.0.1", member: true, dialled: true, result: "forwarded"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := newNamespace()
			flags := append([]string{"--budget.cluster.member-timeout=30s"}, tc.flags...)
			if tc.name != "no secret file" {
				flags = append(flags, "--budget.cluster.secret-file="+clusterSecretFile(t))
			}
			r := startReplica(t, pg, "rep1", ns, users, flags...)
			// (Outside peer_cidrs, it publishes no address of its own.)
			waitFor(t, 20*time.Second, "the replica to join", func() bool { return r.metric(t, "pggovernor_cluster_replicas") == 1 })
			sink := newCancelSink(t)
			execThrough(t, r, insertRow(ns, bogusID, map[string]string{"cancel_addr": fmt.Sprintf("'%s:%d'", tc.host, sink.port())}))
			waitFor(t, 10*time.Second, "the replica to read the row", func() bool {
				if tc.member {
					return r.metric(t, "pggovernor_cluster_replicas") == 2
				}
				return r.ignored(t, tc.reason) > 0
			})
			cancelRequest(t, r.addr, pid, secret) // returns once the replica closed: it has forwarded, or not
			conns, got := sink.received()
			for _, b := range got {
				if bytes.Contains(b, secretBytes[:]) {
					t.Fatalf("the listener the row points at received the cancel key's secret: % x", b)
				}
			}
			switch {
			case !tc.dialled && conns > 0:
				t.Fatalf("the listener the row points at: want no connection, got = %d (% x)", conns, got)
			case tc.dialled && (conns != 1 || len(got[0]) != 12+36):
				t.Fatalf("the listener within peer_cidrs: want one forwarded request (12-byte header, 36-byte MAC), got = %d connections (% x)", conns, got)
			}
			if v, _ := value(r.scrape(t), "pggovernor_cluster_cancels_forwarded_total", map[string]string{"result": tc.result}); v != 1 {
				t.Fatalf("pggovernor_cluster_cancels_forwarded_total{result=%q}: want = 1, got = %v", tc.result, v)
			}
		})
	}
}

// peerCancel sends a forwarded cancel request to addr as a replica does:
// the header, then, with mac non-nil, the MAC computed over the challenge
// received; it waits for the receiver to close.
func peerCancel(t *testing.T, addr string, pid uint32, mac func(challenge []byte) []byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	var hdr [12]byte
	binary.BigEndian.PutUint32(hdr[0:], 12)
	binary.BigEndian.PutUint32(hdr[4:], 1234<<16|5691)
	binary.BigEndian.PutUint32(hdr[8:], pid)
	if _, err := c.Write(hdr[:]); err != nil {
		t.Fatal(err)
	}
	challenge := make([]byte, 32)
	if _, err := io.ReadFull(c, challenge); err == nil {
		msg := binary.BigEndian.AppendUint32(nil, 36)
		_, _ = c.Write(append(msg, mac(challenge)...))
	}
	_, _ = io.Copy(io.Discard, c)
}

// legacyPeerCancel sends the unauthenticated forwarded cancel request of
// today's main (1234.5690 with the key's secret).
func legacyPeerCancel(t *testing.T, addr string, pid, secret uint32) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var buf [16]byte
	binary.BigEndian.PutUint32(buf[0:], 16)
	binary.BigEndian.PutUint32(buf[4:], 1234<<16|5690)
	binary.BigEndian.PutUint32(buf[8:], pid)
	binary.BigEndian.PutUint32(buf[12:], secret)
	if _, err := c.Write(buf[:]); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.Copy(io.Discard, c)
}

// TestClusterPeerCancelNeedsTheKey: a replica obeys a forwarded cancel
// request only with a MAC made with budget.cluster.secret_file's key over
// its own challenge and the client's key. The unauthenticated form of
// today's main (which cancelled the query: anyone could send it) and a MAC
// made with another key are refused, and counted; the right MAC cancels
// (57014).
func TestClusterPeerCancelNeedsTheKey(t *testing.T) {
	pg := clusterServer(t)
	ns := newNamespace()
	users := usersFile(t)
	a := startReplica(t, pg, "rep1", ns, users, "--budget.cluster.secret-file="+clusterSecretFile(t))
	waitMembers(t, pg, ns, a)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, a.url("alice", userPass, "clusterdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	pid, secret := conn.PgConn().PID(), binary.BigEndian.Uint32(conn.PgConn().SecretKey())
	done := make(chan error, 1)
	go func() { // owner: the test; ends with the query
		_, err := conn.Exec(ctx, "SELECT pg_sleep(60)")
		done <- err
	}()
	waitFor(t, 10*time.Second, "the query to run", func() bool {
		rows, err := pg.Exec(ctx, "SELECT 1 FROM pg_stat_activity WHERE usename = 'rep1' AND state = 'active' AND query = 'SELECT pg_sleep(60)'")
		return err == nil && len(rows) == 1
	})
	macWith := func(key string) func([]byte) []byte {
		return func(challenge []byte) []byte {
			h := hmac.New(sha256.New, []byte(key))
			h.Write([]byte("pggovernor cancel v1\x00"))
			h.Write(challenge)
			h.Write(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, pid), secret))
			return h.Sum(nil)
		}
	}
	stillRunning := func(what string) {
		t.Helper()
		select {
		case err := <-done:
			t.Fatalf("%s ended the query: %v", what, err)
		case <-time.After(500 * time.Millisecond): // the absence of a cancel: nothing to await
		}
	}
	legacyPeerCancel(t, a.addr, pid, secret)
	stillRunning("an unauthenticated forwarded cancel request (1234.5690)")
	peerCancel(t, a.addr, pid, macWith("another-key-of-16-bytes-or-more"))
	stillRunning("a forwarded cancel request authenticated with another key")
	if v, _ := value(a.scrape(t), "pggovernor_cluster_cancels_received_total", map[string]string{"result": "refused"}); v != 1 {
		t.Errorf("pggovernor_cluster_cancels_received_total{result=refused}: want = 1, got = %v", v)
	}
	peerCancel(t, a.addr, pid, macWith(clusterSecret))
	select {
	case err := <-done:
		assertCode(t, err, "57014")
	case <-time.After(10 * time.Second):
		t.Fatal("a forwarded cancel request with the right MAC did not cancel the query")
	}
	if v, _ := value(a.scrape(t), "pggovernor_cluster_cancels_received_total", map[string]string{"result": "accepted"}); v != 1 {
		t.Errorf("pggovernor_cluster_cancels_received_total{result=accepted}: want = 1, got = %v", v)
	}
}

// TestClusterSquattedLocks: before the replicas start, a session that is
// no replica's takes ten lease locks and the membership locks of replica
// numbers 1 to 5 of the namespace, and the lock that serialises the
// creation of a new membership table. Both replicas still create the
// table, join (under numbers above 5), and serve clients with the leases
// left; they report the squatter's 15 locks (pggovernor_cluster_foreign_locks),
// and doctor names its PID.
func TestClusterSquattedLocks(t *testing.T) {
	pg := clusterServer(t)
	ns := newNamespace()
	users := usersFile(t)
	ctx := context.Background()
	squatter, err := pgx.Connect(ctx, pg.URL("outsider", clusterPass, "clusterdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer squatter.Close(ctx)
	var pid int
	if err := squatter.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		"SELECT pg_advisory_lock($1, k) FROM generate_series(0, 9) k",        // leases 0 to 9
		"SELECT pg_advisory_lock($1, -1 - id) FROM generate_series(1, 5) id", // replica numbers 1 to 5
		"SELECT pg_advisory_lock($1, -2147483648)",                           // the creation of the table
	} {
		if _, err := squatter.Exec(ctx, q, ns); err != nil {
			t.Fatal(err)
		}
	}
	table := fmt.Sprintf("squat_members_%d", ns)
	names := []string{"rep1", "rep2"}
	var rs []*replica
	for _, name := range names {
		rs = append(rs, startReplica(t, pg, name, ns, users, "--budget.cluster.table="+table))
	}
	waitFor(t, 20*time.Second, "both replicas to join", func() bool {
		for _, r := range rs {
			if r.metric(t, "pggovernor_cluster_replicas") != 2 || r.readyz(t) != http.StatusOK {
				return false
			}
		}
		return true
	})
	rows, err := pg.ExecIn(ctx, "clusterdb", fmt.Sprintf("SELECT replica_id, cardinality(slots) FROM %s WHERE namespace = %d ORDER BY replica_id", table, ns))
	if err != nil {
		t.Fatal(err)
	}
	for _, row := range rows {
		var id int
		fmt.Sscan(row[0], &id)
		if id <= 5 {
			t.Errorf("replica number %s: want > 5 (1 to 5 are squatted)", row[0])
		}
	}
	for _, r := range rs {
		if err := selectOne(ctx, r.url("alice", userPass, "clusterdb")); err != nil {
			t.Fatalf("a client of %s: %v", r.user, err)
		}
	}
	waitFor(t, 10*time.Second, "the replicas to report the squatted locks", func() bool {
		for _, r := range rs {
			if r.metric(t, "pggovernor_cluster_foreign_locks") != 15 {
				return false
			}
		}
		return true
	})
	var out, errOut bytes.Buffer
	err = execute(ctx, []string{"doctor", "--upstream-url=" + pg.URL("rep1", "", "clusterdb"), "--upstream.password=" + clusterPass,
		"--clients.users-file=" + users, "--budget.reserve=2", "--budget.cluster.enabled", fmt.Sprintf("--budget.cluster.namespace=%d", ns),
		"--budget.cluster.table=" + table, "--budget.cluster.member-timeout=" + clusterMemberTimeout.String(),
		"--budget.cluster.heartbeat-interval=" + clusterHeartbeat.String()}, nil, &out, &errOut)
	if err != nil {
		t.Fatalf("doctor: %v\n%s%s", err, out.String(), errOut.String())
	}
	text := strings.Join(strings.Fields(out.String()), " ")
	if want := fmt.Sprintf("WARNING: locks in namespace %d are held by sessions that are not members: pids %d (10 lease and 5 member locks)", ns, pid); !strings.Contains(text, want) {
		t.Fatalf("doctor output lacks %q:\n%s", want, out.String())
	}
	_ = ns // the table stays: the replicas still write it until they stop
}

// TestClusterControlRole: with budget.cluster.control_user, the control
// connection logs in as a role of its own, which creates and owns the
// membership table; a client served as the application role cannot write
// it. doctor warns when the application and the control connection share
// a role, and when the application role may write the table, and not with
// a role of its own.
func TestClusterControlRole(t *testing.T) {
	pg := clusterServer(t)
	ns := newNamespace()
	users := usersFile(t)
	ctx := context.Background()
	const controlPass = "control-pw-Vb81"
	role := fmt.Sprintf("pgg_control_%d", ns)
	table := fmt.Sprintf("ctl_members_%d", ns)
	if _, err := pg.Exec(ctx, fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'", role, controlPass)); err != nil {
		t.Fatal(err)
	}
	if _, err := pg.ExecIn(ctx, "clusterdb", "GRANT USAGE, CREATE ON SCHEMA public TO "+role); err != nil {
		t.Fatal(err)
	}
	pwFile := filepath.Join(t.TempDir(), "control-password")
	if err := os.WriteFile(pwFile, []byte(controlPass), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startReplica(t, pg, "rep1", ns, users, "--budget.cluster.table="+table,
		"--budget.cluster.control-user="+role, "--budget.cluster.control-password-file="+pwFile)
	waitFor(t, 20*time.Second, "the replica to join", func() bool {
		return r.metric(t, "pggovernor_cluster_replicas") == 1 && r.readyz(t) == http.StatusOK
	})
	rows, err := pg.ExecIn(ctx, "clusterdb", fmt.Sprintf(`SELECT pg_get_userbyid(relowner), (SELECT usename FROM pg_stat_activity
		WHERE application_name = 'pggovernor-control' AND pid = (SELECT control_pid FROM %s WHERE namespace = %d))
		FROM pg_class WHERE oid = '%s'::regclass`, table, ns, table))
	if err != nil {
		t.Fatal(err)
	}
	if got := rows[0]; got[0] != role || got[1] != role {
		t.Fatalf("the table's owner and the control connection's role: want = %s and %s, got = %v", role, role, got)
	}
	conn, err := pgx.Connect(ctx, r.url("alice", userPass, "clusterdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, strings.Replace(insertRow(ns, 900, nil), "pggovernor_members", table, 1))
	assertCode(t, err, "42501")

	doctor := func(extra ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		args := append([]string{"doctor", "--upstream-url=" + pg.URL("rep1", "", "clusterdb"), "--upstream.password=" + clusterPass,
			"--clients.users-file=" + users, "--budget.reserve=2", "--budget.cluster.enabled", fmt.Sprintf("--budget.cluster.namespace=%d", ns),
			"--budget.cluster.member-timeout=" + clusterMemberTimeout.String(), "--budget.cluster.heartbeat-interval=" + clusterHeartbeat.String()}, extra...)
		if err := execute(ctx, args, nil, &out, &errOut); err != nil {
			t.Fatalf("doctor: %v\n%s%s", err, out.String(), errOut.String())
		}
		return strings.Join(strings.Fields(out.String()), " ")
	}
	const sameRole = "WARNING: the control connection logs in as rep1, the role every client is served as"
	if out := doctor(); !strings.Contains(out, sameRole) {
		t.Fatalf("doctor with the application's role for the control connection: want %q, got:\n%s", sameRole, out)
	}
	out := doctor("--budget.cluster.table="+table, "--budget.cluster.control-user="+role, "--budget.cluster.control-password-file="+pwFile)
	if strings.Contains(out, "WARNING: the control connection logs in as") || strings.Contains(out, "may write") || !strings.Contains(out, "cluster: replicas 1") {
		t.Fatalf("doctor with budget.cluster.control_user: want the member and no warning about roles, got:\n%s", out)
	}
	if _, err := pg.ExecIn(ctx, "clusterdb", fmt.Sprintf("GRANT INSERT ON %s TO rep1", table)); err != nil {
		t.Fatal(err)
	}
	out = doctor("--budget.cluster.table="+table, "--budget.cluster.control-user="+role, "--budget.cluster.control-password-file="+pwFile)
	if want := fmt.Sprintf("WARNING: the application role rep1 may write %s: REVOKE ALL ON %s FROM rep1", table, table); !strings.Contains(out, want) {
		t.Fatalf("doctor with the table writable by the application: want %q, got:\n%s", want, out)
	}
}
