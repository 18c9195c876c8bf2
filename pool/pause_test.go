package pool_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/internal/pgtest"
	"github.com/pggovernor/pggovernor/pool"
)

var route = pool.Route{Database: "bench", User: "bench"}

// newTestPool is a pool of limit connections over the scripted backend,
// closed at the end of the test.
func newTestPool(t *testing.T, limit int, events pool.Events) *pool.Pool {
	t.Helper()
	return newTestPoolWith(t, limit, pool.Options{Events: events})
}

// newTestPoolWith is newTestPool with options (its connector and logger
// are the test's).
func newTestPoolWith(t *testing.T, limit int, o pool.Options) *pool.Pool {
	t.Helper()
	fb, err := pgtest.StartFakeBackend()
	if err != nil {
		t.Fatal(err)
	}
	base, err := pgconn.ParseConfig("postgres://bench@" + fb.Addr() + "/bench?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	o.Connector, o.Logger = &pool.UpstreamConnector{Base: base}, zap.NewNop()
	p := pool.New(o)
	p.SetLimit(limit)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		p.Close(ctx)
		if err := p.Wait(ctx); err != nil {
			t.Errorf("connections left at the end: %v", err)
		}
		fb.Close()
	})
	return p
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func maxWait(p *pool.Pool) time.Duration {
	var d time.Duration
	for _, r := range p.Routes() {
		d = max(d, r.MaxWait)
	}
	return d
}

func mustAcquire(t *testing.T, p *pool.Pool) *pool.Server {
	t.Helper()
	s, err := p.Acquire(context.Background(), route, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestPauseHoldsAcquirePastItsDeadline: a request for a paused database
// waits for Resume however long it takes, and its deadline is moved by the
// time paused; the connection in use when the pause began is closed when
// released.
func TestPauseHoldsAcquirePastItsDeadline(t *testing.T) {
	p := newTestPool(t, 2, pool.Events{})
	held := mustAcquire(t, p)
	p.Pause("bench")
	if !p.IsPaused("bench") || p.IsPaused("other") || !p.Stats().Paused {
		t.Fatal("pause state not reported")
	}
	const deadline = 50 * time.Millisecond
	got := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		s, err := p.Acquire(ctx, route, nil)
		if err == nil {
			p.Release(s)
		}
		got <- err
	}()
	waitUntil(t, "the request to be held 4 × its deadline", func() bool { return maxWait(p) > 4*deadline })
	select {
	case err := <-got:
		t.Fatalf("Acquire returned while paused: %v", err)
	default:
	}
	if st := p.Stats(); st.Waiting != 1 {
		t.Fatalf("waiting while paused: want = 1, got = %d", st.Waiting)
	}
	// The connection in use finishes; it is closed, not kept.
	p.Release(held)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.WaitQuiet(ctx, "bench"); err != nil {
		t.Fatalf("WaitQuiet after the last connection was released: %v", err)
	}
	if err := p.Resume("bench"); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatalf("Acquire after Resume: %v", err)
	}
	if r := p.Routes(); len(r) != 1 || r[0].WaitCount != 1 || r[0].WaitDuration < 4*deadline || r[0].WaitTimeouts != 0 {
		t.Fatalf("route figures after a paused wait: %+v", r)
	}
}

// TestPauseTakesQueuedRequestsOutOfTheQueue: requests queued behind the
// budget when the pause begins wait for Resume too, instead of timing out
// for lack of released connections.
func TestPauseTakesQueuedRequestsOutOfTheQueue(t *testing.T) {
	p := newTestPool(t, 1, pool.Events{})
	held := mustAcquire(t, p)
	const deadline = 100 * time.Millisecond
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			defer cancel()
			s, err := p.Acquire(ctx, route, nil)
			if err == nil {
				p.Release(s)
			}
			errs <- err
		}()
	}
	waitUntil(t, "three queued requests", func() bool { return p.Stats().Waiting == 3 })
	p.Pause("")
	p.Release(held)
	waitUntil(t, "the requests to be held 3 × their deadline", func() bool { return maxWait(p) > 3*deadline })
	if err := p.Resume(""); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("a request queued at the pause: %v", err)
		}
	}
}

// TestPauseWaitEndsWithItsContext: cancelling (not a deadline) ends a
// paused wait; WaitQuiet ends with its context; Resume says what is not
// paused.
func TestPauseWaitEndsWithItsContext(t *testing.T) {
	var mu sync.Mutex
	var timedOut int
	p := newTestPool(t, 1, pool.Events{Waited: func(_ time.Duration, to bool) {
		mu.Lock()
		defer mu.Unlock()
		if to {
			timedOut++
		}
	}})
	held := mustAcquire(t, p)
	p.Pause("bench")
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan error, 1)
	go func() { _, err := p.Acquire(ctx, route, nil); got <- err }()
	waitUntil(t, "the request to be held", func() bool { return p.Stats().Waiting == 1 })
	cancel()
	if err := <-got; !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled paused wait: want = context.Canceled, got = %v", err)
	}
	mu.Lock()
	if timedOut != 1 {
		t.Fatalf("Events.Waited with timedOut: want = 1 call, got = %d", timedOut)
	}
	mu.Unlock()
	qctx, qcancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer qcancel()
	if err := p.WaitQuiet(qctx, "bench"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitQuiet with a connection in use: want = deadline exceeded, got = %v", err)
	}
	p.Release(held)
	if err := p.Resume("other"); !errors.Is(err, pool.ErrNotPaused) {
		t.Fatalf("Resume of a database not paused: want = ErrNotPaused, got = %v", err)
	}
	p.Pause("")
	if err := p.Resume("bench"); err == nil || !strings.Contains(err.Error(), "every database is paused") {
		t.Fatalf("Resume of one database under a global pause: got %v", err)
	}
	if all, dbs := p.Paused(); !all || len(dbs) != 1 {
		t.Fatalf("Paused: want = every database and bench, got = %v %v", all, dbs)
	}
	if err := p.Resume(""); err != nil {
		t.Fatal(err)
	}
	if err := p.Resume(""); !errors.Is(err, pool.ErrNotPaused) {
		t.Fatalf("second Resume: want = ErrNotPaused, got = %v", err)
	}
}

// TestRouteCountersAndEvents: surplus closes when the budget shrinks,
// connects and waits are counted per route and reported to Events;
// Servers lists the connections.
func TestRouteCountersAndEvents(t *testing.T) {
	var mu sync.Mutex
	var connects, waits int
	p := newTestPool(t, 2, pool.Events{
		Connected: func(_ pool.Route, _ time.Duration, err error) {
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				connects++
			}
		},
		Waited: func(time.Duration, bool) { mu.Lock(); waits++; mu.Unlock() },
	})
	a, b := mustAcquire(t, p), mustAcquire(t, p)
	if srv := p.Servers(); len(srv) != 2 || srv[0].Idle || srv[0].PID != 4242 || srv[0].Route != route {
		t.Fatalf("Servers with two in use: %+v", srv)
	}
	// A third request queues, then gets a released connection.
	got := make(chan *pool.Server, 1)
	go func() { got <- mustAcquire(t, p) }()
	waitUntil(t, "the third request to queue", func() bool { return p.Stats().Waiting == 1 })
	p.Release(a)
	c := <-got
	p.Release(b)
	p.Release(c)
	p.SetLimit(0) // both idle connections are now surplus
	waitUntil(t, "the surplus connections to close", func() bool { return p.Stats().Open == 0 })
	r := p.Routes()
	if len(r) != 1 || r[0].Connects != 2 || r[0].WaitCount != 1 || r[0].ClosedSurplus != 2 || r[0].Open != 0 {
		t.Fatalf("route figures: %+v", r)
	}
	mu.Lock()
	defer mu.Unlock()
	if connects != 2 || waits != 1 {
		t.Fatalf("events: want = 2 connects and 1 wait, got = %d and %d", connects, waits)
	}
}

// TestProbeUsesOnlyLongIdleConnections: Probe makes a round trip on a
// connection idle long enough, without counting it as a use.
func TestProbeUsesOnlyLongIdleConnections(t *testing.T) {
	var checks int
	var mu sync.Mutex
	p := newTestPool(t, 1, pool.Events{Checked: func(_ time.Duration, err error) {
		mu.Lock()
		defer mu.Unlock()
		if err == nil {
			checks++
		}
	}})
	ctx := context.Background()
	if _, probed, _ := p.Probe(ctx, 0); probed {
		t.Fatal("Probe with no connection: want nothing probed")
	}
	p.Release(mustAcquire(t, p))
	if _, probed, _ := p.Probe(ctx, time.Hour); probed {
		t.Fatal("Probe of a connection idle less than minIdle: want nothing probed")
	}
	before := p.Servers()[0].LastUsed
	rtt, probed, err := p.Probe(ctx, 0)
	if !probed || err != nil || rtt <= 0 {
		t.Fatalf("Probe: want a round trip, got probed = %v, rtt = %v, err = %v", probed, rtt, err)
	}
	if after := p.Servers(); len(after) != 1 || !after[0].Idle || !after[0].LastUsed.Equal(before) {
		t.Fatalf("after Probe: want the connection idle with its last use unchanged, got %+v (before %v)", after, before)
	}
	mu.Lock()
	defer mu.Unlock()
	if checks != 1 {
		t.Fatalf("Events.Checked: want = 1, got = %d", checks)
	}
}

// TestPauseCountsBoundsAPausedWait: a request marked with PauseCounts (a
// login) gives up at its deadline, with a WaitError that says the
// database is paused.
func TestPauseCountsBoundsAPausedWait(t *testing.T) {
	p := newTestPool(t, 1, pool.Events{})
	p.Pause("bench")
	ctx, cancel := context.WithTimeout(pool.PauseCounts(context.Background()), 30*time.Millisecond)
	defer cancel()
	deadline, _ := ctx.Deadline()
	began := time.Now()
	_, err := p.Acquire(ctx, route, nil)
	returned := time.Now()
	var we *pool.WaitError
	// Waited is counted from inside Acquire, a little after the deadline
	// was set: what must hold is that the wait ended at the deadline, not
	// before, and that Waited is the time spent in Acquire.
	if !errors.As(err, &we) || !we.Paused || returned.Before(deadline) || we.Waited <= 0 || we.Waited > returned.Sub(began) {
		t.Fatalf("a login's wait behind a pause: want = a WaitError saying paused, returned at the deadline (%v after the call began), got = %v after %v", deadline.Sub(began), err, returned.Sub(began))
	}
	if st := p.Stats(); st.WaitTimeouts != 1 || st.Waiting != 0 {
		t.Fatalf("after the timeout: %+v", st)
	}
	if err := p.Resume("bench"); err != nil {
		t.Fatal(err)
	}
}
