package pgtest

import (
	"context"
	"testing"
)

func TestStartExecRestart(t *testing.T) {
	ctx := context.Background()
	c, err := Start(ctx, Options{MaxConnections: 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rows, err := c.Exec(ctx, "SHOW max_connections")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := rows[0][0], "20"; got != want {
		t.Fatalf("max_connections: want = %s, got = %s", want, got)
	}
	if err := c.Restart(ctx, map[string]string{"max_connections": "30"}); err != nil {
		t.Fatal(err)
	}
	rows, err = c.Exec(ctx, "SHOW max_connections")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := rows[0][0], "30"; got != want {
		t.Fatalf("after restart max_connections: want = %s, got = %s", want, got)
	}
}

// TestReplicaPromote: a synchronous replica has every acknowledged commit
// of its primary, refuses writes until promoted, and takes them after.
func TestReplicaPromote(t *testing.T) {
	ctx := context.Background()
	c, err := Start(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r, err := c.StartReplica(ctx, ReplicaOptions{Synchronous: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if rows, err := c.Exec(ctx, "SHOW synchronous_commit"); err != nil || rows[0][0] != "on" {
		t.Fatalf("primary's synchronous_commit: want = on, got = %v %v", rows, err)
	}
	if _, err := c.Exec(ctx, "CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 100)"); err != nil {
		t.Fatal(err)
	}
	// Synchronous (remote_flush): flushed on the replica, not yet
	// necessarily replayed; a promotion replays everything received.
	if rec, err := r.InRecovery(ctx); err != nil || !rec {
		t.Fatalf("replica in recovery: want = true, got = %v %v", rec, err)
	}
	if _, err := r.Exec(ctx, "INSERT INTO t VALUES (0)"); err == nil {
		t.Fatal("a write on the standby succeeded")
	}
	if err := c.Reconfigure(ctx, map[string]string{"default_transaction_read_only": "on"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "INSERT INTO t VALUES (0)"); err == nil {
		t.Fatal("a write on the primary made read-only succeeded")
	}
	if err := r.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	rows, err := r.Exec(ctx, "INSERT INTO t VALUES (101); SELECT count(*) FROM t")
	if err != nil {
		t.Fatal(err)
	}
	if rows[0][0] != "101" {
		t.Fatalf("rows on the promoted replica: want = 101, got = %s", rows[0][0])
	}
}
