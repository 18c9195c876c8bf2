package cluster

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/pggovernor/pggovernor/internal/pgtest"
)

var server *pgtest.Cluster

func TestMain(m *testing.M) {
	os.Exit(func() int {
		c, err := pgtest.Start(context.Background(), pgtest.Options{MaxConnections: 20})
		if err != nil {
			fmt.Fprintln(os.Stderr, "starting postgres:", err)
			return 1
		}
		defer c.Close()
		server = c
		preexisting := goleak.IgnoreCurrent()
		code := m.Run()
		if code == 0 {
			if err := goleak.Find(preexisting); err != nil {
				fmt.Fprintln(os.Stderr, "goroutine leak:", err)
				return 1
			}
		}
		return code
	}())
}

// newStore is a PgStore on a control pool of one connection.
func newStore(t *testing.T, ns int32) *PgStore {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(server.SuperuserDSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 1
	cfg.ConnConfig.RuntimeParams["application_name"] = "pggovernor-control"
	p, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return &PgStore{Pool: p, Namespace: ns, Table: "store_test_members"}
}

func open(t *testing.T, s *PgStore) Session {
	t.Helper()
	sess, err := s.Open(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sess.Close)
	return sess
}

// locksOf counts the advisory locks of namespace ns held by the control
// sessions.
func locksOf(t *testing.T, ns int32) int {
	t.Helper()
	rows, err := server.Exec(context.Background(), fmt.Sprintf(
		"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %d::oid AND objsubid = 2 AND granted", uint32(ns)))
	if err != nil {
		t.Fatal(err)
	}
	var n int
	fmt.Sscan(rows[0][0], &n)
	return n
}

// TestStoreAgainstPostgres: the table is created once by replicas starting
// together; Join takes exactly one membership lock; Lock skips slots a
// live member reserves and takes them once its row is old; Heartbeat reads
// members, limits and foreign connections; Release and Leave let go.
func TestStoreAgainstPostgres(t *testing.T) {
	ctx := context.Background()
	const ns = 4242
	stores := []*PgStore{newStore(t, ns), newStore(t, ns), newStore(t, ns)}
	sessions := make([]Session, len(stores))
	var wg sync.WaitGroup
	errs := make([]error, len(stores))
	for i, s := range stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sessions[i], errs[i] = s.Open(ctx)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("store %d: opening concurrently with the table missing: %v", i, err)
		}
		t.Cleanup(sessions[i].Close)
	}
	a, b := sessions[0], sessions[1]

	id, err := a.Join(ctx, []int{1, 2, 3})
	if err != nil || id != 1 {
		t.Fatalf("join: want = 1, got = %d (%v)", id, err)
	}
	if got := locksOf(t, ns); got != 1 {
		t.Fatalf("advisory locks after a join: want = 1, got = %d", got)
	}
	if id, err := b.Join(ctx, []int{1, 2, 3}); err != nil || id != 2 {
		t.Fatalf("second join: want = 2 (1 is taken), got = %d (%v)", id, err)
	}

	const timeout = 400 * time.Millisecond
	got, err := a.Lock(ctx, 1, []int{0, 1}, timeout)
	if err != nil || !slices.Equal(got, []int{0, 1}) {
		t.Fatalf("lock: want = [0 1], got = %v (%v)", got, err)
	}
	beat := Beat{ID: 1, Name: "a", Addr: "127.0.0.1:1", Slots: []int{0, 1}, Demand: 5, Waiting: 2, Joined: time.Now(), Timeout: timeout}
	if err := a.Publish(ctx, beat); err != nil {
		t.Fatal(err)
	}
	if got, _ := b.Lock(ctx, 2, []int{0, 1, 2}, timeout); !slices.Equal(got, []int{2}) {
		t.Fatalf("lock of slots another session holds: want = [2], got = %v", got)
	}
	a.Close() // a's locks go; its row still reserves 0 and 1
	if got, _ := b.Lock(ctx, 2, []int{0, 1}, timeout); len(got) != 0 {
		t.Fatalf("lock of slots a live member's row reserves: want = [], got = %v", got)
	}
	var view View
	deadline := time.Now().Add(10 * time.Second)
	for {
		view, err = b.Heartbeat(ctx, Beat{ID: 2, Name: "b", Addr: "127.0.0.1:2", Slots: []int{2}, Joined: time.Now(), Timeout: timeout, CountForeign: true})
		if err != nil {
			t.Fatal(err)
		}
		if len(view.Members) == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(timeout / 4) // the row ages on the server's clock; nothing announces it
	}
	if len(view.Members) != 1 || view.Members[0].ID != 2 || view.Members[0].Addr != "127.0.0.1:2" {
		t.Fatalf("members once a's row is older than the timeout: want = [2], got = %+v", view.Members)
	}
	if view.Limits.MaxConnections != 20 || view.Limits.SuperuserReserved != 3 {
		t.Fatalf("limits: want = 20 and 3, got = %+v", view.Limits)
	}
	// Foreign: the third store's session and this test's own connections
	// to the server, not b's control connection.
	conn, err := pgx.Connect(ctx, server.SuperuserDSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var clients int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'").Scan(&clients); err != nil {
		t.Fatal(err)
	}
	view, err = b.Heartbeat(ctx, Beat{ID: 2, Name: "b", Slots: []int{2}, Joined: time.Now(), Timeout: timeout, CountForeign: true})
	if err != nil {
		t.Fatal(err)
	}
	if want := clients - 1; view.Foreign != want {
		t.Fatalf("foreign connections: want = %d (every client backend but b's control connection), got = %d", want, view.Foreign)
	}
	if got, _ := b.Lock(ctx, 2, []int{0, 1}, timeout); !slices.Equal(got, []int{0, 1}) {
		t.Fatalf("lock once the reserving row is gone: want = [0 1], got = %v", got)
	}
	if err := b.Release(ctx, []int{0, 1}, Beat{ID: 2, Name: "b", Slots: []int{2}, Joined: time.Now(), Timeout: timeout}); err != nil {
		t.Fatal(err)
	}
	if got := locksOf(t, ns); got != 2 { // b's membership and slot 2
		t.Fatalf("advisory locks after a release: want = 2, got = %d", got)
	}
	if err := b.Leave(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if got := locksOf(t, ns); got != 0 {
		t.Fatalf("advisory locks after leaving: want = 0, got = %d", got)
	}
	members, err := ReadMembers(ctx, conn, ns, "store_test_members", 1023)
	if err != nil || len(members) != 0 {
		t.Fatalf("members after leaving: want none, got = %+v (%v)", members, err)
	}
}

// TestStoreReadsBadRows: rows no replica wrote — heartbeats of ±infinity
// and far in the future, replica numbers out of range, a huge, a
// two-dimensional and a NULL-holding slots array, an overlong name, a join
// time of infinity — neither fail a read nor a heartbeat (on today's
// main, 'infinity' failed every heartbeat: "cannot subtract infinite
// timestamps"); each is read marked Invalid or fails Rules.Check, the
// heartbeat deletes those that can never count and says so, and a future
// heartbeat reserves no lease. A session holding locks of the namespace
// that is no member's is listed.
func TestStoreReadsBadRows(t *testing.T) {
	ctx := context.Background()
	const ns, table = 4343, "bad_rows_members"
	st := newStore(t, ns)
	st.Table, st.MaxID = table, 1023
	sess := open(t, st)
	const timeout = 10 * time.Second
	insert := func(id int, heartbeat, extra string) {
		t.Helper()
		cols, vals := "slots", "'{8}'"
		if strings.Contains(heartbeat, "infinity") || strings.Contains(heartbeat, "years") {
			vals = "'{7}'"
		}
		name, joined := "'x'", "now()"
		switch {
		case strings.HasPrefix(extra, "slots="):
			vals = strings.TrimPrefix(extra, "slots=")
		case strings.HasPrefix(extra, "name="):
			name = strings.TrimPrefix(extra, "name=")
		case strings.HasPrefix(extra, "joined="):
			joined = strings.TrimPrefix(extra, "joined=")
		}
		q := fmt.Sprintf(`INSERT INTO %s (namespace, replica_id, name, cancel_addr, %s, demand, waiting, control_pid, server_pids, joined, heartbeat)
			VALUES (%d, %d, %s, '127.0.0.1:9', %s, 1, 0, 1, '{}', %s, %s)`, table, cols, ns, id, name, vals, joined, heartbeat)
		if _, err := server.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	insert(901, "'infinity'", "")
	insert(902, "'-infinity'", "")
	insert(903, "now() + interval '100 years'", "")
	insert(904, "now()", "slots=array_fill(5, ARRAY[100000])")
	insert(905, "now()", "slots='{{1,2},{3,4}}'")
	insert(906, "now()", "slots='{1,NULL}'")
	insert(907, "now()", "name=repeat('n', 100000)")
	insert(908, "now()", "joined='infinity'")
	insert(909, "now()", "slots='{3,3}'")
	insert(-5, "now()", "")
	insert(5000, "now()", "")

	rules := Rules{MaxID: 1023, Timeout: timeout}
	want := map[int]string{901: IgnoredHeartbeat, 902: IgnoredHeartbeat, 903: IgnoredHeartbeat, 904: IgnoredSlots, 905: IgnoredSlots,
		906: IgnoredSlots, 907: IgnoredMalformed, 908: IgnoredMalformed, 909: IgnoredSlots}
	rows, err := sess.Members(ctx)
	if err != nil {
		t.Fatalf("reading bad rows: %v", err)
	}
	got := map[int]string{}
	for _, m := range rows {
		reason, _ := rules.Check(&m)
		got[m.ID] = reason
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("rows read and why they are ignored: want = %v (numbers out of range not read), got = %v", want, got)
	}

	// Slot 7, listed by the future and infinite rows only, is free.
	if got, err := sess.Lock(ctx, 1, []int{7}, timeout); err != nil || !slices.Equal(got, []int{7}) {
		t.Fatalf("lock of a slot only rows with bad heartbeats list: want = [7], got = %v (%v)", got, err)
	}

	// A squatter holds a lease lock and a membership lock.
	squatter, err := pgx.Connect(ctx, server.SuperuserDSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer squatter.Close(ctx)
	var pid int
	if err := squatter.QueryRow(ctx, "SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock($1, 11), pg_advisory_lock($1, -3)) x", int32(ns)).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	v, err := sess.Heartbeat(ctx, Beat{ID: 1, Name: "a", Addr: "127.0.0.1:1", Slots: []int{7}, Joined: time.Now(), Timeout: timeout, ProbeLocks: true})
	if err != nil {
		t.Fatalf("heartbeat with bad rows: %v", err)
	}
	if want := map[string]int{IgnoredHeartbeat: 3, IgnoredReplicaID: 2}; fmt.Sprint(v.Purged) != fmt.Sprint(want) {
		t.Fatalf("rows the heartbeat deleted: want = %v, got = %v", want, v.Purged)
	}
	var ids []int
	for _, m := range v.Members {
		ids = append(ids, m.ID)
	}
	if want := []int{1, 904, 905, 906, 907, 908, 909}; !slices.Equal(ids, want) {
		t.Fatalf("rows after the heartbeat: want = %v, got = %v", want, ids)
	}
	if want := []LockHolder{{PID: pid, Leases: 1, Members: 1}}; !slices.Equal(v.LockHolders, want) {
		t.Fatalf("sessions holding locks of the namespace that are not members: want = %v, got = %v", want, v.LockHolders)
	}
	if err := sess.Leave(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Exec(ctx, fmt.Sprintf("DELETE FROM %s WHERE namespace = %d", table, ns)); err != nil {
		t.Fatal(err)
	}
}

// TestStoreCreatesTheTableDespiteASquatter: a session holding the lock that
// serialises the creation of the membership table does not stop a replica
// from creating it (on today's main, Open waited for the lock until its
// deadline, at every heartbeat).
func TestStoreCreatesTheTableDespiteASquatter(t *testing.T) {
	ctx := context.Background()
	const ns = 4444
	squatter, err := pgx.Connect(ctx, server.SuperuserDSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer squatter.Close(ctx)
	if _, err := squatter.Exec(ctx, "SELECT pg_advisory_lock($1, $2)", int32(ns), int32(createLockKey)); err != nil {
		t.Fatal(err)
	}
	st := newStore(t, ns)
	st.Table = "squatted_create_members"
	octx, cancel := context.WithTimeout(ctx, 500*time.Millisecond) // as a heartbeat's bound
	defer cancel()
	sess, err := st.Open(octx)
	if err != nil {
		t.Fatalf("opening with the creation lock squatted: %v", err)
	}
	sess.Close()
	if _, err := server.Exec(ctx, "DROP TABLE squatted_create_members"); err != nil {
		t.Fatal(err)
	}
}
