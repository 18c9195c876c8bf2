package cluster

import (
	"context"
	"fmt"
	"os"
	"slices"
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
