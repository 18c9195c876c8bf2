package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pggovernor/pggovernor/config"
)

// TestUnlistenDeliversWhatCommittedBefore: notifications committed (by
// another connection, straight to Postgres) just before a client's UNLISTEN
// reach the client, as they do on a direct connection — whether the
// UNLISTEN names the channel or is UNLISTEN *, and whether the hub's
// connection stops listening (the client was the channel's last listener)
// or keeps listening for another client.
func TestUnlistenDeliversWhatCommittedBefore(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	notifier, err := pgx.Connect(ctx, shared.URL("app", appPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer notifier.Close(ctx)
	// A burst the hub's connection takes a while to read, so that on a
	// governor that drops the subscription at once most of it is lost.
	const burst = 1000
	payload := strings.Repeat("p", 200)
	for _, unlisten := range []string{"UNLISTEN burst", "UNLISTEN *"} {
		for _, others := range []bool{false, true} {
			name := fmt.Sprintf("%s, another client listening=%v", unlisten, others)
			t.Run(name, func(t *testing.T) {
				c := connectPgx(t, g.url("alice", userPass, "appdb"))
				mustExec(t, c, "LISTEN burst")
				if others {
					other := connectPgx(t, g.url("alice", userPass, "appdb"))
					mustExec(t, other, "LISTEN burst")
				}
				tx, err := notifier.Begin(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := tx.Exec(ctx, "SELECT pg_notify('burst', g::text || ':' || $1) FROM generate_series(1, $2) g", payload, burst); err != nil {
					t.Fatal(err)
				}
				if err := tx.Commit(ctx); err != nil {
					t.Fatal(err)
				}
				mustExec(t, c, unlisten) // right after the COMMIT returned
				for k := 1; k <= burst; k++ {
					wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
					n, err := c.WaitForNotification(wctx)
					cancel()
					if err != nil {
						t.Fatalf("notification %d of %d committed before %s: not delivered (%v)", k, burst, unlisten, err)
					}
					if want := fmt.Sprintf("%d:%s", k, payload); n.Channel != "burst" || n.Payload != want {
						t.Fatalf("notification %d: want = burst/%.12s…, got = %s/%.12s…", k, want, n.Channel, n.Payload)
					}
				}
			})
		}
	}
}

// TestStalledListenerDelaysNobody: one of 20 listeners of a route stops
// reading its socket. The other 19 receive every notification (the test
// reports how many arrived later than 100 ms after the NOTIFY's commit,
// the figure, and the worst; it fails only when one waits 5 s, as
// fan-out blocked by the stalled client would: a 2-core machine under
// -race delays a goroutine by more than 100 ms now and then whatever the
// code does), a new client's LISTEN and UNLISTEN
// (round trips on the hub's connection) complete while the stalled one is
// stuck, and the stalled one, once more than clients.notify_backlog_size
// waits for it, is disconnected with 53200, counted and logged once.
func TestStalledListenerDelaysNobody(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 4 })
	ctx := context.Background()
	const (
		readers    = 19
		channel    = "fanout"
		maxLatency = 100 * time.Millisecond
		threshold  = 256 << 10 // queued for the stalled client: its socket is full
	)

	// The stalled client: a raw connection that logs in, listens and then
	// never reads. Its receive buffer is small and so is the segment size
	// it announces (both set before connecting): the governor's side of a
	// loopback connection sizes its send buffer from the segment size, so
	// the socket holds ~90 KB instead of ~3 MB before writes block.
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var rerr, merr error
		err := rc.Control(func(fd uintptr) {
			rerr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
			merr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 536)
		})
		return errors.Join(err, rerr, merr)
	}}
	stalled, err := d.Dial("tcp", g.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	_ = stalled.SetDeadline(time.Now().Add(10 * time.Second))
	stalledFE := pgproto3.NewFrontend(bufio.NewReaderSize(stalled, 1024), stalled)
	loginRaw(t, stalled, stalledFE, "alice", userPass)
	stalledFE.Send(&pgproto3.Query{String: "LISTEN " + channel})
	if err := stalledFE.Flush(); err != nil {
		t.Fatal(err)
	}
	for {
		msg, err := stalledFE.Receive()
		if err != nil {
			t.Fatalf("LISTEN on the stalled client: %v", err)
		}
		if _, ok := msg.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
	_ = stalled.SetDeadline(time.Time{})

	// The 19 readers, each reporting every notification it receives.
	type arrival struct {
		reader, seq int
		at          time.Time
	}
	arrivals := make(chan arrival, readers*4)
	lctx, stopReaders := context.WithCancel(ctx)
	var (
		wg    sync.WaitGroup
		conns []*pgx.Conn
	)
	defer func() {
		stopReaders()
		wg.Wait()
		for _, c := range conns {
			c.Close(ctx)
		}
	}()
	for i := 0; i < readers; i++ {
		c, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		mustExec(t, c, "LISTEN "+channel)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				n, err := c.WaitForNotification(lctx)
				if err != nil {
					return
				}
				at := time.Now()
				seq, _ := strconv.Atoi(n.Payload[:strings.IndexByte(n.Payload, ':')])
				select {
				case arrivals <- arrival{reader: i, seq: seq, at: at}:
				case <-lctx.Done():
					return
				}
			}
		}()
	}

	notifier, err := pgx.Connect(ctx, shared.URL("app", appPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer notifier.Close(ctx)
	payload := strings.Repeat("n", 7000) // near the 8000-byte limit: fewer round trips to fill the backlog
	const (
		backlogMetric  = "pggovernor_notify_backlog_bytes"
		overflowMetric = "pggovernor_notify_backlog_overflows_total"
	)
	var (
		late         []string
		worst        time.Duration
		checkedStuck bool
		overflows    float64
		sent         int
	)
	for k := 1; overflows == 0; k++ {
		if k > 3000 {
			t.Fatalf("the stalled client was not disconnected after %d notifications of %d bytes", k-1, len(payload))
		}
		if _, err := notifier.Exec(ctx, "SELECT pg_notify($1, $2)", channel, strconv.Itoa(k)+":"+payload); err != nil {
			t.Fatal(err)
		}
		committed := time.Now()
		sent = k
		deadline := time.NewTimer(5 * time.Second)
		for got := 0; got < readers; {
			select {
			case a := <-arrivals:
				if a.seq != k {
					t.Fatalf("reader %d: notification %d arrived while %d was awaited", a.reader, a.seq, k)
				}
				lat := a.at.Sub(committed)
				worst = max(worst, lat)
				if lat > maxLatency {
					late = append(late, fmt.Sprintf("#%d reader %d: %s", k, a.reader, lat))
				}
				got++
			case <-deadline.C:
				t.Fatalf("notification %d: %d of %d readers received it within 5s of its commit (fan-out blocked by the stalled client?)", k, got, readers)
			}
		}
		deadline.Stop()
		if k%10 != 0 {
			continue
		}
		mfs := g.scrape(t)
		backlog, _ := value(mfs, backlogMetric, nil)
		overflows, _ = value(mfs, overflowMetric, nil)
		if overflows == 0 && backlog >= threshold && !checkedStuck {
			checkHubWhileStuck(t, g, k)
			mfs = g.scrape(t)
			if v, _ := value(mfs, overflowMetric, nil); v != 0 {
				t.Fatal("the stalled client was disconnected during the check: the check proves nothing")
			}
			checkedStuck = true
		}
	}
	t.Logf("%d notifications of %d bytes to %d readers: worst latency from commit %s; %d of %d deliveries later than %s %v",
		sent, len(payload), readers, worst, len(late), sent*readers, maxLatency, late[:min(len(late), 10)])
	if !checkedStuck {
		t.Fatal("the hub's LISTEN/UNLISTEN was never checked while the stalled client was stuck")
	}
	if overflows != 1 {
		t.Fatalf("%s: want = 1, got = %v", overflowMetric, overflows)
	}
	const logMsg = "client disconnected: notifications for it exceeded clients.notify_backlog_size"
	if n := g.logs.FilterMessage(logMsg).Len(); n != 1 {
		t.Fatalf("log lines %q: want = 1, got = %d", logMsg, n)
	}
	// The stalled client reads at last: the notifications its socket held,
	// then the error, then the end.
	_ = stalled.SetReadDeadline(time.Now().Add(20 * time.Second))
	var last pgproto3.BackendMessage
	for {
		msg, err := stalledFE.Receive()
		if err != nil {
			break
		}
		last = msg
	}
	er, ok := last.(*pgproto3.ErrorResponse)
	if !ok {
		t.Fatalf("the stalled client's last message: want = ErrorResponse, got = %T", last)
	}
	if er.Severity != "FATAL" || er.Code != "53200" || !strings.Contains(er.Message+er.Hint, "clients.notify_backlog_size") {
		t.Fatalf("want = FATAL 53200 naming clients.notify_backlog_size, got = %s %s: %s (%s)", er.Severity, er.Code, er.Message, er.Hint)
	}
}

// checkHubWhileStuck runs, on a new client, LISTEN of a channel the hub
// does not listen on yet, then UNLISTEN *: each a round trip on the hub's
// connection, which must not wait for the stalled client.
func checkHubWhileStuck(t *testing.T, g *gov, k int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	for _, q := range []string{"LISTEN newcomer", "UNLISTEN *"} {
		if _, err := c.Exec(ctx, q); err != nil {
			t.Fatalf("%s on a new client while a listener is stalled (after notification %d): %v", q, k, err)
		}
	}
	t.Logf("a new client's LISTEN and UNLISTEN completed while the stalled listener was stuck (after notification %d)", k)
}
