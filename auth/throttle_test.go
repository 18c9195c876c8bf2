package auth

import (
	"errors"
	"testing"
	"time"
)

func TestThrottle(t *testing.T) {
	clock := newFakeClock()
	th := NewThrottle(ThrottleOptions{FreeFailures: 3, FirstDelay: time.Second, MaxDelay: 4 * time.Second, Clock: clock})
	fail := func(addr string) {
		t.Helper()
		end, err := th.Begin(addr)
		if err != nil {
			t.Fatalf("attempt from %s: want = allowed, got = %v", addr, err)
		}
		end(true)
	}
	refused := func(addr string, wantWait time.Duration) {
		t.Helper()
		_, err := th.Begin(addr)
		var te *ThrottledError
		if !errors.As(err, &te) || te.Wait != wantWait {
			t.Fatalf("attempt from %s: want = refused for %s, got = %v", addr, wantWait, err)
		}
	}
	const a, b = "192.0.2.1", "192.0.2.2"
	for i := 0; i < 3; i++ { // the free failures
		fail(a)
	}
	refused(a, time.Second)
	// Another address is not affected, nor is a Unix socket client.
	fail(b)
	if end, err := th.Begin(""); err != nil {
		t.Fatalf("unix socket client: want = never throttled, got = %v", err)
	} else {
		end(true)
	}
	clock.Advance(time.Second)
	// Allowed again, but one attempt at a time.
	end, err := th.Begin(a)
	if err != nil {
		t.Fatalf("after the wait: want = allowed, got = %v", err)
	}
	refused(a, 0)
	end(true)
	refused(a, 2*time.Second) // doubled
	clock.Advance(2 * time.Second)
	fail(a)
	refused(a, 4*time.Second)
	clock.Advance(4 * time.Second)
	fail(a)
	refused(a, 4*time.Second) // capped at MaxDelay
	if st := th.Stats(); st.Throttled != 1 || st.Addresses != 2 {
		t.Fatalf("stats: want = 1 throttled of 2 addresses, got = %+v", st)
	}
	// A success clears the address.
	clock.Advance(4 * time.Second)
	end, err = th.Begin(a)
	if err != nil {
		t.Fatal(err)
	}
	end(false)
	for i := 0; i < 3; i++ {
		fail(a)
	}
	refused(a, time.Second)
	// Addresses not seen for a while are forgotten.
	clock.Advance(defaultForget + time.Second)
	fail(a)
	if st := th.Stats(); st.Throttled != 0 {
		t.Fatalf("after %s: want = forgotten, got = %+v", defaultForget, st)
	}
}
