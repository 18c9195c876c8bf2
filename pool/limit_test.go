package pool_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pggovernor/pggovernor/pool"
)

// lostHandler records that its server connection was lost.
type lostHandler struct {
	lost chan error
}

func (h *lostHandler) ServerMessage(*pool.Server, byte, []byte, int) error { return nil }
func (h *lostHandler) ServerFlush(*pool.Server) error                      { return nil }
func (h *lostHandler) ServerLost(_ *pool.Server, err error)                { h.lost <- err }

// TestQueuedEventAndLimitNote: a client that has to queue is announced by
// Events.Queued (what the cluster lease manager reacts to), and a wait that
// times out under a limit with a note says what the limit is.
func TestQueuedEventAndLimitNote(t *testing.T) {
	queued := make(chan struct{}, 10)
	p := newTestPool(t, 1, pool.Events{Queued: func() { queued <- struct{}{} }})
	held := mustAcquire(t, p)
	select {
	case <-queued:
		t.Fatal("Queued was called for an acquire that did not wait")
	default:
	}
	p.SetLimitNote("this replica's share of the cluster budget")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := p.Acquire(ctx, route, nil)
	var werr *pool.WaitError
	if !errors.As(err, &werr) {
		t.Fatalf("acquire beyond the limit: want = *pool.WaitError, got = %v", err)
	}
	if got := len(queued); got != 1 {
		t.Fatalf("Queued calls: want = 1, got = %d", got)
	}
	if want := "all 1 connections of this replica's share of the cluster budget are in use"; !strings.Contains(werr.Error(), want) || werr.Note == "" {
		t.Fatalf("wait error: want it to contain %q, got = %q (note %q)", want, werr.Error(), werr.Note)
	}
	p.Release(held)
}

// TestChangedAndShrinkAtRelease: a limit lowered below what is open closes
// idle connections at once and a held one at its release; Changed
// announces each connection gone.
func TestChangedAndShrinkAtRelease(t *testing.T) {
	p := newTestPool(t, 2, pool.Events{})
	a, b := mustAcquire(t, p), mustAcquire(t, p)
	p.Release(a) // idle
	changed := p.Changed()
	p.SetLimit(0)
	<-changed // the idle one is gone
	if st := p.Stats(); st.Open != 1 || st.Idle != 0 {
		t.Fatalf("after SetLimit(0) with one idle and one held: want = open 1 idle 0, got = open %d idle %d", st.Open, st.Idle)
	}
	changed = p.Changed()
	p.Release(b)
	<-changed
	waitUntil(t, "every connection closed", func() bool { return p.Stats().Open == 0 })
}

// TestSeverClosesHeldConnections: Sever closes an idle connection and one
// held by a client, whose handler learns it was lost; the slots are freed.
func TestSeverClosesHeldConnections(t *testing.T) {
	p := newTestPool(t, 2, pool.Events{})
	idle, held := mustAcquire(t, p), mustAcquire(t, p)
	p.Release(idle)
	h := &lostHandler{lost: make(chan error, 1)}
	held.SetHandler(pool.NewHandlerSlot(h))
	p.SetLimit(0)
	if n := p.Sever(errors.New("leases lost")); n != 1 {
		// The idle one was already closed by SetLimit(0): only the held
		// one is left to sever.
		t.Fatalf("connections severed: want = 1, got = %d", n)
	}
	select {
	case <-h.lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the holder was not told its server connection was lost")
	}
	p.Release(held)
	waitUntil(t, "every connection closed", func() bool { return p.Stats().Open == 0 })
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // a new client waits for the limit to come back
		defer wg.Done()
		s, err := p.Acquire(context.Background(), route, nil)
		if err != nil {
			t.Error(err)
			return
		}
		p.Release(s)
	}()
	waitUntil(t, "the client to queue", func() bool { return p.Stats().Waiting == 1 })
	p.SetLimit(1)
	wg.Wait()
}
