package auth

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// TestThrottle: failures are counted per address and user; beyond the free
// ones each answer is delayed, doubling up to the maximum; other users at
// the same address, the same user at another address and unknown names
// have counts of their own; the Unix socket is counted as [local]; a count
// is forgotten after Forget; memory is bounded.
func TestThrottle(t *testing.T) {
	clock := newFakeClock()
	th := NewThrottle(ThrottleOptions{FreeFailures: 3, FirstDelay: time.Second, MaxDelay: 4 * time.Second, Clock: clock})
	fail := func(addr, user string, want time.Duration) {
		t.Helper()
		if got, _ := th.Failed(addr, user); got != want {
			t.Fatalf("failure of %s from %q: want = delay %s, got = %s", user, addr, want, got)
		}
	}
	const a, b = "192.0.2.1", "192.0.2.2"
	for i := 0; i < 3; i++ { // the free failures
		fail(a, "alice", 0)
	}
	fail(a, "alice", time.Second)
	fail(a, "alice", 2*time.Second) // doubled
	fail(a, "alice", 4*time.Second)
	fail(a, "alice", 4*time.Second) // capped at MaxDelay
	// Others are not affected: another user at the same address (known or
	// not: the throttle does not know), the same user elsewhere.
	fail(a, "mallory", 0)
	fail(b, "alice", 0)
	// The Unix socket is an address like any other.
	for i := 0; i < 3; i++ {
		fail("", "alice", 0)
	}
	fail("", "alice", time.Second)
	fail(LocalAddr, "alice", 2*time.Second)
	if st := th.Stats(); st.Throttled != 2 || st.Entries != 4 {
		t.Fatalf("stats: want = 2 throttled of 4 pairs, got = %+v", st)
	}
	// Forgotten Forget after the last failure.
	clock.Advance(DefaultForget + time.Second)
	fail(a, "alice", 0)
	if st := th.Stats(); st.Throttled != 0 || st.Entries != 1 {
		t.Fatalf("after %s: want = forgotten, got = %+v", DefaultForget, st)
	}
	// Bounded: the least recently failed pairs go first.
	for i := 0; i < maxThrottleEntries+10; i++ {
		th.Failed(a, fmt.Sprint("user", i))
	}
	if st := th.Stats(); st.Entries != maxThrottleEntries {
		t.Fatalf("entries: want = at most %d, got = %d", maxThrottleEntries, st.Entries)
	}
}

// TestThrottleHold: a delay ends when its time has passed or its context
// ends, and is counted.
func TestThrottleHold(t *testing.T) {
	th := NewThrottle(ThrottleOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		th.Hold(ctx, time.Hour)
		close(done)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for th.Stats().Holding != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the hold did not begin")
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	<-done
	th.Hold(context.Background(), time.Millisecond)
	if st := th.Stats(); st.Delayed != 2 || st.Holding != 0 {
		t.Fatalf("want = 2 delayed, none holding, got = %+v", st)
	}
}
