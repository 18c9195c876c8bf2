package main

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/config"
)

// TestClientGoneMidFrameFreesItsConnection: a client sends a FunctionCall
// with a 10 MB argument, which the governor streams to the server as it
// comes, and disconnects after 100 bytes of it. The server connection has part of
// a frame: nothing can make it clean, so it is closed at once (the pool
// gives the backend 5 s to exit before it frees the slot), and the next
// client gets the budget's only connection within timeouts.query_wait —
// not after the session waited 10 s more for answers the server, still
// reading the frame, would never send (then the next client got 53300).
// Found by FuzzSession.
func TestClientGoneMidFrameFreesItsConnection(t *testing.T) {
	ctx := context.Background()
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 1; c.Timeouts.QueryWait = 8 * time.Second })
	pc, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	hc, err := pc.Hijack()
	if err != nil {
		t.Fatal(err)
	}
	// A FunctionCall (length(bytea)) with a 10 MB argument: the governor
	// streams it to the server as it comes.
	const size = 10 << 20
	call := []byte{'F', 0, 0, 0, 0}
	binary.BigEndian.PutUint32(call[1:], uint32(4+4+2+2+4+size+2))
	call = binary.BigEndian.AppendUint32(call, 2010) // byteaoctetlen
	call = append(call, 0, 0, 0, 1)                  // no argument format codes, one argument
	call = binary.BigEndian.AppendUint32(call, size) // its length
	call = append(call, make([]byte, 100)...)        // and the first 100 bytes of it
	if _, err := hc.Conn.Write(call); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the FunctionCall to hold the budget's connection", func() bool { return g.g.pool.Stats().InUse == 1 })
	_ = hc.Conn.Close()

	next := connectPgx(t, g.url("alice", userPass, "appdb"))
	var n int
	began := time.Now()
	if err := next.QueryRow(ctx, "SELECT 1").Scan(&n); err != nil {
		t.Fatalf("the next client, after the first left in the middle of a frame: %v (after %s)", err, time.Since(began).Round(time.Millisecond))
	}
	t.Logf("the next client got the connection after %s", time.Since(began).Round(time.Millisecond))
}
