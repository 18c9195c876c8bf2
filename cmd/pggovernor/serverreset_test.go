package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/config"
)

// resetForwarder relays TCP between a client and addr and, once armed,
// resets both connections (RST) at the first CommandComplete of an INSERT
// the server sends, instead of relaying it: the statement has committed
// (Postgres sends nothing before its ReadyForQuery, which follows the
// commit), but its answer never arrives — a network path cut at the worst
// moment.
type resetForwarder struct {
	ln     net.Listener
	addr   string
	armed  atomic.Bool
	resets atomic.Int32
}

func startResetForwarder(t *testing.T, addr string) *resetForwarder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &resetForwarder{ln: ln, addr: addr}
	serveRelays(t, ln, f.relay)
	return f
}

// serveRelays accepts connections on ln and runs relay for each until the
// test ends, when ln is closed and every relay awaited.
func serveRelays(t *testing.T, ln net.Listener, relay func(net.Conn)) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // owner: the test; exits when its cleanup closes ln
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); relay(c) }() // owner: the test; exits when either side closes
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
}

func (f *resetForwarder) relay(c net.Conn) {
	up, err := net.Dial("tcp", f.addr)
	if err != nil {
		_ = c.Close()
		return
	}
	done := make(chan struct{})
	go func() { _, _ = io.Copy(up, c); _ = up.Close(); close(done) }() // owner: relay; exits when c or up closes
	f.fromServer(c, up)
	_ = c.Close()
	<-done
}

// fromServer relays the server's frames to c, or resets both at the
// armed INSERT's CommandComplete.
func (f *resetForwarder) fromServer(c, up net.Conn) {
	var hdr [5]byte
	for {
		if _, err := io.ReadFull(up, hdr[:]); err != nil {
			return
		}
		body := make([]byte, binary.BigEndian.Uint32(hdr[1:])-4)
		if _, err := io.ReadFull(up, body); err != nil {
			return
		}
		if hdr[0] == 'C' && strings.HasPrefix(string(body), "INSERT") && f.armed.CompareAndSwap(true, false) {
			f.resets.Add(1)
			for _, x := range []net.Conn{c, up} {
				_ = x.(*net.TCPConn).SetLinger(0)
				_ = x.Close()
			}
			return
		}
		if _, err := c.Write(append(hdr[:], body...)); err != nil {
			return
		}
	}
}

// TestServerResetAfterCommitIsNotRetried: the path to the server is reset
// after an autocommit INSERT committed and before its answer arrived. A
// lib/pq client talking to Postgres directly gets "connection reset by
// peer", which database/sql does not retry: one Exec, one row, and an
// error saying the outcome is unknown. Through the governor the client
// must see the same — not a clean end of its connection, which lib/pq
// reports as driver.ErrBadConn, on which database/sql runs the INSERT
// again on a new connection: one Exec, two rows, and success.
func TestServerResetAfterCommitIsNotRetried(t *testing.T) {
	ctx := context.Background()
	if _, err := shared.ExecIn(ctx, "appdb", "DROP TABLE IF EXISTS reset_once; CREATE TABLE reset_once (tag text); GRANT ALL ON reset_once TO app"); err != nil {
		t.Fatal(err)
	}
	fwd := startResetForwarder(t, shared.Addr())
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 2
		c.Upstream.URL = fmt.Sprintf("postgres://app@%s/appdb?sslmode=disable", fwd.ln.Addr())
	})
	host, port, _ := net.SplitHostPort(fwd.ln.Addr().String())
	for _, via := range []struct{ name, url string }{
		{"direct", fmt.Sprintf("postgres://app:%s@%s:%s/appdb?sslmode=disable", appPass, host, port)},
		{"governor", g.url("alice", userPass, "appdb")},
	} {
		t.Run(via.name, func(t *testing.T) {
			db := openPq(t, via.url, 1)
			if err := db.PingContext(ctx); err != nil {
				t.Fatal(err)
			}
			fwd.armed.Store(true)
			before := fwd.resets.Load()
			_, err := db.ExecContext(ctx, "INSERT INTO reset_once VALUES ('"+via.name+"')")
			if fwd.resets.Load() != before+1 {
				t.Fatalf("the forwarder did not reset the connection (err %v)", err)
			}
			rows, qerr := shared.ExecIn(ctx, "appdb", "SELECT count(*) FROM reset_once WHERE tag = '"+via.name+"'")
			if qerr != nil {
				t.Fatal(qerr)
			}
			if rows[0][0] != "1" || err == nil || errors.Is(err, context.Canceled) {
				t.Fatalf("one INSERT whose answer was lost: want = an error and 1 row, got = error %v and %s rows", err, rows[0][0])
			}
			t.Logf("%s: %v", via.name, err)
		})
	}
}

// toServerResetter relays TCP to addr and, once armed, resets both sides
// at the first message of type typ the client sends, before relaying it.
type toServerResetter struct {
	ln     net.Listener
	addr   string
	typ    byte
	armed  atomic.Bool
	resets atomic.Int32
}

func startToServerResetter(t *testing.T, addr string, typ byte) *toServerResetter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &toServerResetter{ln: ln, addr: addr, typ: typ}
	serveRelays(t, ln, f.relay)
	return f
}

func (f *toServerResetter) relay(c net.Conn) {
	up, err := net.Dial("tcp", f.addr)
	if err != nil {
		_ = c.Close()
		return
	}
	done := make(chan struct{})
	go func() { _, _ = io.Copy(c, up); _ = c.Close(); close(done) }() // owner: relay; exits when c or up closes
	defer func() { _ = up.Close(); <-done }()
	var n [4]byte
	if _, err := io.ReadFull(c, n[:]); err != nil { // the startup packet has no type byte
		return
	}
	startup := make([]byte, binary.BigEndian.Uint32(n[:])-4)
	if _, err := io.ReadFull(c, startup); err != nil {
		return
	}
	if _, err := up.Write(append(n[:], startup...)); err != nil {
		return
	}
	var hdr [5]byte
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		body := make([]byte, binary.BigEndian.Uint32(hdr[1:])-4)
		if _, err := io.ReadFull(c, body); err != nil {
			return
		}
		if hdr[0] == f.typ && f.armed.CompareAndSwap(true, false) {
			f.resets.Add(1)
			for _, x := range []net.Conn{c, up} {
				_ = x.(*net.TCPConn).SetLinger(0)
				_ = x.Close()
			}
			return
		}
		if _, err := up.Write(append(hdr[:], body...)); err != nil {
			return
		}
	}
}

// TestServerResetUnderAPipeline: a pipeline whose first request is the
// Bind of a prepared statement the governor must prepare again on the
// connection it attaches (it waits for the server's answer before
// sending the Bind), followed by 200 autocommit INSERTs, each with its
// Sync; the path to the server is reset at the next Parse on it. Directly,
// the client gets "connection reset by peer" and none of the INSERTs runs.
// Through the governor the same: what it had read of the client's
// pipeline when its server connection was lost must not run on another
// connection for a client it disconnected. Before the fix it did when the
// pump, told the statement could not be prepared, got past the failed
// request before the client's connection was closed: about one time in
// six, hence 20 rounds.
func TestServerResetUnderAPipeline(t *testing.T) {
	ctx := context.Background()
	fwd := startToServerResetter(t, shared.Addr(), 'P')
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 2
		c.Upstream.URL = fmt.Sprintf("postgres://app@%s/appdb?sslmode=disable", fwd.ln.Addr())
	})
	if _, err := shared.ExecIn(ctx, "appdb", "DROP TABLE IF EXISTS reset_pipeline; CREATE TABLE reset_pipeline (round int, n int); GRANT ALL ON reset_pipeline TO app"); err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(fwd.ln.Addr().String())
	direct := fmt.Sprintf("postgres://app:%s@%s:%s/appdb?sslmode=disable", appPass, host, port)
	for round := 0; round <= 20; round++ {
		url, via := g.url("alice", userPass, "appdb"), "governor"
		if round == 0 {
			url, via = direct, "direct"
		}
		conn, err := pgconn.Connect(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		insert := fmt.Sprintf("INSERT INTO reset_pipeline VALUES (%d, $1)", round)
		if _, err := conn.Prepare(ctx, "ins", insert, nil); err != nil {
			t.Fatal(err)
		}
		if round > 0 {
			// The connection that has the statement is gone: the next Bind
			// goes to a new one, where the governor prepares it again first.
			waitFor(t, 10*time.Second, "the governor's idle connections to be terminated", func() bool {
				terminateIdleBackends(t)
				return g.g.pool.Stats().Open == 0
			})
		}
		fwd.armed.Store(true)
		p := conn.StartPipeline(ctx)
		p.SendQueryPrepared("ins", [][]byte{[]byte("0")}, nil, nil)
		p.SendPipelineSync()
		for i := 1; i <= 200; i++ {
			p.SendQueryParams(insert, [][]byte{[]byte(fmt.Sprint(i))}, nil, nil, nil)
			p.SendPipelineSync()
		}
		perr := p.Flush()
		results := 0
		for perr == nil {
			r, err := p.GetResults()
			if err == nil {
				if rr, ok := r.(*pgconn.ResultReader); ok {
					_, err = rr.Close()
				}
			}
			if err != nil {
				perr = err
				break
			}
			results++
		}
		_ = p.Close()
		conn.Close(ctx)
		if !fwd.armed.CompareAndSwap(false, false) || perr == nil {
			t.Fatalf("%s, round %d: the path was not reset (pipeline error %v)", via, round, perr)
		}
		// Whatever the governor does for the client happens before its
		// server connections are back in the pool.
		waitFor(t, 10*time.Second, "no server connection in use", func() bool { return g.g.pool.Stats().InUse == 0 })
		// Directly, the first request runs (the statement is there) and the
		// path is reset at the next Parse; through the governor it is
		// reset before the first request. Neither runs the INSERTs after.
		rows, err := shared.ExecIn(ctx, "appdb", fmt.Sprintf("SELECT count(*) FROM reset_pipeline WHERE round = %d AND n >= 1", round))
		if err != nil {
			t.Fatal(err)
		}
		if rows[0][0] != "0" {
			t.Fatalf("%s, round %d: INSERTs run after the client's connection was reset: want = 0, got = %s (the client saw %d results, then %v)",
				via, round, rows[0][0], results, perr)
		}
	}
}
