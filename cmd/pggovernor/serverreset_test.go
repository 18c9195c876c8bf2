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
	wg     sync.WaitGroup
}

func startResetForwarder(t *testing.T, addr string) *resetForwarder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &resetForwarder{ln: ln, addr: addr}
	f.wg.Add(1)
	go func() { // owner: f; exits when the test closes ln
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.wg.Add(1)
			go func() { defer f.wg.Done(); f.relay(c) }() // owner: f; exits when either side closes
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); f.wg.Wait() })
	return f
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
