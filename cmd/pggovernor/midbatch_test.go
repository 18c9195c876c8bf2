package main

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pggovernor/pggovernor/config"
)

// leaveMidBatch runs an INSERT of row in an extended-protocol batch on a
// connection to url, reads its CommandComplete (sent after a Flush), and
// closes the connection without the batch's Sync, as a client that is
// killed or loses its network in the middle of a pipeline.
func leaveMidBatch(t *testing.T, url string, row int) {
	t.Helper()
	ctx := context.Background()
	pc, err := pgconn.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	hc, err := pc.Hijack()
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Conn.Close()
	fe := pgproto3.NewFrontend(hc.Conn, hc.Conn)
	fe.Send(&pgproto3.Parse{Query: fmt.Sprintf("INSERT INTO unsynced_rows VALUES (%d)", row)})
	fe.Send(&pgproto3.Bind{})
	fe.Send(&pgproto3.Execute{})
	fe.Send(&pgproto3.Flush{})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	_ = hc.Conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		msg, err := fe.Receive()
		if err != nil {
			t.Fatalf("waiting for the INSERT's CommandComplete: %v", err)
		}
		switch m := msg.(type) {
		case *pgproto3.CommandComplete:
			if string(m.CommandTag) != "INSERT 0 1" {
				t.Fatalf("CommandComplete %q", m.CommandTag)
			}
			if tc, ok := hc.Conn.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // gone, as a killed client's host
			}
			return
		case *pgproto3.ErrorResponse:
			t.Fatalf("INSERT: %s %s", m.Code, m.Message)
		}
	}
}

// TestClientGoneMidBatchCommitsNothing: a client that leaves after an
// Execute and before the Sync that ends its implicit transaction has
// committed nothing on Postgres (the backend exits at the client's EOF and
// the transaction aborts); through pggovernor the same. The governor used
// to complete the batch with a Sync of its own, which committed the row.
func TestClientGoneMidBatchCommitsNothing(t *testing.T) {
	ctx := context.Background()
	if _, err := shared.ExecIn(ctx, "appdb", "DROP TABLE IF EXISTS unsynced_rows; CREATE TABLE unsynced_rows (id int); GRANT ALL ON unsynced_rows TO app"); err != nil {
		t.Fatal(err)
	}
	count := func(id int) string {
		rows, err := shared.ExecIn(ctx, "appdb", fmt.Sprintf("SELECT count(*) FROM unsynced_rows WHERE id = %d", id))
		if err != nil {
			t.Fatal(err)
		}
		return rows[0][0]
	}
	// Directly against Postgres: the reference.
	leaveMidBatch(t, shared.URL("app", appPass, "appdb")+"&application_name=unsynced_direct", 1)
	waitFor(t, 30*time.Second, "the direct backend to exit", func() bool {
		rows, err := shared.Exec(ctx, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'unsynced_direct'")
		return err == nil && rows[0][0] == "0"
	})
	if n := count(1); n != "0" {
		t.Fatalf("directly against Postgres, %s rows of the unsynced batch committed; this test's premise is wrong", n)
	}

	for _, mode := range []string{config.PoolModeTransaction, config.PoolModeSession} {
		t.Run(mode, func(t *testing.T) {
			row := 2
			if mode == config.PoolModeSession {
				row = 3
			}
			g := startGov(t, nil, func(c *config.Config) { c.Budget.Max = 1; c.PoolMode = mode })
			leaveMidBatch(t, g.url("alice", userPass, "appdb"), row)
			waitFor(t, 30*time.Second, "the departed client's server connection to be given back or closed", func() bool {
				return g.g.pool.Stats().InUse == 0
			})
			// The next client gets a clean connection, outside any
			// transaction, and sees no row of the departed one.
			next := connectPgx(t, g.url("alice", userPass, "appdb"))
			var n int
			if err := next.QueryRow(ctx, fmt.Sprintf("SELECT count(*) FROM unsynced_rows WHERE id = %d", row)).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n != 0 {
				t.Fatalf("the client left before its Sync, yet its INSERT committed (%d rows); Postgres commits nothing", n)
			}
			if c := count(row); c != "0" {
				t.Fatalf("%s rows of the unsynced batch committed", c)
			}
		})
	}
}
