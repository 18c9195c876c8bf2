package auth

import (
	"fmt"
	"sync"
	"time"
)

// Clock tells the time. Tests replace it to move time without waiting.
type Clock interface {
	Now() time.Time
}

// SystemClock is the real clock.
type SystemClock struct{}

// Now returns time.Now().
func (SystemClock) Now() time.Time { return time.Now() }

// Defaults of the failed-login throttle.
const (
	// DefaultFreeFailures is how many consecutive failed logins an address
	// may have before its attempts are slowed down.
	DefaultFreeFailures = 10
	// DefaultFirstDelay is the wait after the first failure beyond the free
	// ones; it doubles with each further failure.
	DefaultFirstDelay = 500 * time.Millisecond
	// DefaultMaxDelay bounds the wait.
	DefaultMaxDelay = 10 * time.Second
	// defaultForget is how long an address with no attempt is remembered.
	defaultForget = 15 * time.Minute
	// maxThrottleEntries bounds the memory the throttle uses.
	maxThrottleEntries = 100_000
)

// ThrottleOptions configure a Throttle; zero fields take the defaults.
type ThrottleOptions struct {
	// FreeFailures is how many consecutive failures an address may have
	// before it must wait between attempts.
	FreeFailures int
	// FirstDelay is the first wait; it doubles with each further failure,
	// up to MaxDelay.
	FirstDelay, MaxDelay time.Duration
	// Clock is the time source; nil is the system clock.
	Clock Clock
}

// Throttle slows down password guessing from one source address. After
// FreeFailures consecutive failed logins, an address must wait before its
// next attempt (FirstDelay, doubling with each failure, up to MaxDelay)
// and may have only one attempt in progress at a time. A successful login
// clears the address. Addresses are forgotten after 15 minutes without an
// attempt. Clients at other addresses are never affected. Its methods are
// safe for concurrent use.
type Throttle struct {
	opts ThrottleOptions
	mu   sync.Mutex
	m    map[string]*throttleEntry
}

type throttleEntry struct {
	failures int
	inFlight int
	last     time.Time // of the last attempt or failure
	until    time.Time // attempts before this are refused
}

// NewThrottle returns a throttle.
func NewThrottle(o ThrottleOptions) *Throttle {
	if o.FreeFailures <= 0 {
		o.FreeFailures = DefaultFreeFailures
	}
	if o.FirstDelay <= 0 {
		o.FirstDelay = DefaultFirstDelay
	}
	if o.MaxDelay <= 0 {
		o.MaxDelay = DefaultMaxDelay
	}
	if o.Clock == nil {
		o.Clock = SystemClock{}
	}
	return &Throttle{opts: o, m: map[string]*throttleEntry{}}
}

// ThrottledError refuses a login attempt from an address with too many
// recent failures.
type ThrottledError struct {
	// Addr is the source address.
	Addr string
	// Wait is how long until the next attempt is accepted (0: when the
	// attempt in progress ends).
	Wait time.Duration
	// Failures is the number of consecutive failures.
	Failures int
}

func (e *ThrottledError) Error() string {
	if e.Wait <= 0 {
		return fmt.Sprintf("too many failed login attempts from %s (%d in a row): one attempt at a time", e.Addr, e.Failures)
	}
	return fmt.Sprintf("too many failed login attempts from %s (%d in a row): next attempt accepted in %s", e.Addr, e.Failures, e.Wait.Round(time.Millisecond))
}

// Begin starts a login attempt from addr ("" is never throttled). It
// returns a *ThrottledError when the address must wait; otherwise the
// caller must call the returned end function with the outcome once it is
// known: failed true for wrong credentials.
func (t *Throttle) Begin(addr string) (end func(failed bool), err error) {
	if t == nil || addr == "" {
		return func(bool) {}, nil
	}
	now := t.opts.Clock.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[addr]
	if e != nil && now.Sub(e.last) > defaultForget && e.inFlight == 0 {
		delete(t.m, addr)
		e = nil
	}
	if e != nil && e.failures >= t.opts.FreeFailures {
		if wait := e.until.Sub(now); wait > 0 {
			return nil, &ThrottledError{Addr: addr, Wait: wait, Failures: e.failures}
		}
		if e.inFlight > 0 {
			return nil, &ThrottledError{Addr: addr, Failures: e.failures}
		}
	}
	if e == nil {
		t.pruneLocked(now)
		e = &throttleEntry{}
		t.m[addr] = e
	}
	e.inFlight++
	e.last = now
	var once sync.Once
	return func(failed bool) { once.Do(func() { t.end(addr, e, failed) }) }, nil
}

func (t *Throttle) end(addr string, e *throttleEntry, failed bool) {
	now := t.opts.Clock.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	e.inFlight--
	e.last = now
	if !failed {
		if t.m[addr] == e && e.inFlight == 0 {
			delete(t.m, addr)
		} else {
			e.failures, e.until = 0, time.Time{}
		}
		return
	}
	e.failures++
	if over := e.failures - t.opts.FreeFailures; over >= 0 {
		d := t.opts.FirstDelay
		for i := 0; i < over && d < t.opts.MaxDelay; i++ {
			d *= 2
		}
		d = min(d, t.opts.MaxDelay)
		e.until = now.Add(d)
	}
}

// pruneLocked forgets stale addresses when the map is full.
func (t *Throttle) pruneLocked(now time.Time) {
	if len(t.m) < maxThrottleEntries {
		return
	}
	for a, e := range t.m {
		if e.inFlight == 0 && (now.Sub(e.last) > defaultForget || e.failures < t.opts.FreeFailures) {
			delete(t.m, a)
		}
	}
	for a, e := range t.m { // still full: forget any idle address
		if len(t.m) < maxThrottleEntries {
			break
		}
		if e.inFlight == 0 {
			delete(t.m, a)
		}
	}
}

// ThrottleStats are the throttle's numbers, kept for metrics.
type ThrottleStats struct {
	// Addresses is the number of addresses remembered; Throttled how many
	// of them must wait now.
	Addresses, Throttled int
}

// Stats returns the current numbers.
func (t *Throttle) Stats() ThrottleStats {
	now := t.opts.Clock.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	s := ThrottleStats{Addresses: len(t.m)}
	for _, e := range t.m {
		if e.failures >= t.opts.FreeFailures && e.until.After(now) {
			s.Throttled++
		}
	}
	return s
}
