package main

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

// TestFaults is the short fault suite of make test: each fault once,
// briefly, through the real binary against a real Postgres, with pgx and
// lib/pq clients. Every fault must lose no acknowledged commit, keep the
// governors within the budget, leave no connection in a transaction and
// recover within the suite's bound.
func TestFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("the fault suite takes a minute; make faults runs the full one")
	}
	o := shortOptions()
	var out strings.Builder
	o.out = &out
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s, err := newSuite(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	if s.netErr != nil {
		t.Logf("black-holes and partitions through a stalling forwarder: network namespaces are not available (%v)", s.netErr)
	}
	rs := s.run(ctx, s.faults())
	table(&out, rs)
	t.Log("\n" + out.String())
	for _, r := range rs {
		for _, v := range r.violations {
			t.Errorf("%s: %s", r.fault, v)
		}
	}
	want := 0
	for _, f := range s.faults() {
		if !f.full {
			want++
		}
	}
	if len(rs) != want {
		t.Errorf("faults run: want = %d, got = %d", want, len(rs))
	}
}

// TestForwarder checks the suite's own forwarder: it relays, a cut resets
// both sides, a drop holds everything (a close included) until heal.
func TestForwarder(t *testing.T) {
	echo := startEcho(t)
	f, err := newForwarder(echo)
	if err != nil {
		t.Fatal(err)
	}
	defer f.close()
	c := dial(t, f.upstream())
	roundTrip(t, c, "one")

	if err := f.drop(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("two")); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	buf := make([]byte, 16)
	if n, err := c.Read(buf); err == nil {
		t.Fatalf("read %q through a dropping forwarder", buf[:n])
	}
	if err := f.heal(); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "two" {
		t.Fatalf("after heal: want = %q, got = %q (%v)", "two", buf[:n], err)
	}

	if err := f.cut(); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(buf); err == nil || !strings.Contains(err.Error(), "reset") {
		t.Fatalf("after cut: want = connection reset, got = %v", err)
	}
	// A new connection is reset as soon as accepted: at connect or at the
	// first read.
	if c2, err := net.DialTimeout("tcp", f.upstream(), 5*time.Second); err == nil {
		_ = c2.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := c2.Read(buf)
		c2.Close()
		if err == nil {
			t.Fatal("a new connection through a cut forwarder was not reset")
		}
	}
	if err := f.heal(); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, dial(t, f.upstream()), "three")
}
