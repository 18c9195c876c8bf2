package auth

import (
	"container/list"
	"context"
	"fmt"
	"hash/maphash"
	"sync"
	"sync/atomic"
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
	// DefaultFreeFailures is how many failed logins of one user from one
	// address are answered at once before the answers to further ones are
	// delayed.
	DefaultFreeFailures = 10
	// DefaultFirstDelay is the delay of the first failure beyond the free
	// ones; it doubles with each further failure.
	DefaultFirstDelay = 500 * time.Millisecond
	// DefaultMaxDelay bounds the delay.
	DefaultMaxDelay = 10 * time.Second
	// DefaultForget is how long after its last failure a user and address
	// are forgotten.
	DefaultForget = 15 * time.Minute
	// maxThrottleEntries bounds the memory the throttle uses: about 100
	// bytes an entry, whatever the length of the names.
	maxThrottleEntries = 100_000
	// LocalAddr is the address of a client on the Unix socket, as
	// Postgres names it.
	LocalAddr = "[local]"
)

// ThrottleOptions configure a Throttle; zero fields take the defaults.
type ThrottleOptions struct {
	// FreeFailures is how many failures of one user from one address are
	// answered at once.
	FreeFailures int
	// FirstDelay is the first delay; it doubles with each further
	// failure, up to MaxDelay.
	FirstDelay, MaxDelay time.Duration
	// Forget is how long after the last failure the count starts again.
	Forget time.Duration
	// Clock is the time source of the counts; nil is the system clock.
	// The delays themselves are real time.
	Clock Clock
}

// Throttle slows down password guessing, as Postgres' auth_delay does but
// only beyond a number of free failures: it counts failed logins per
// source address and user name, and after FreeFailures of them the answer
// to each further failure of that user from that address is delayed
// (FirstDelay, doubling with each failure, up to MaxDelay), the failing
// connection held open meanwhile. The count starts again Forget after the
// last failure.
//
// It never refuses or delays an attempt before its credentials are
// checked, and never delays a success: a correct password logs in at its
// usual cost whatever others failed, so that nobody can lock a user out by
// failing logins in their name, or hold anything by stalling an exchange.
// Every user name has its own count, whether or not the user exists, so
// failures as one name never touch another, and the delays do not tell
// which users exist. Its methods are safe for concurrent use.
type Throttle struct {
	opts ThrottleOptions
	seed maphash.Seed

	mu struct {
		sync.Mutex
		entries map[uint64]*list.Element // of *throttleEntry
		lru     list.List                // least recently failed first
	}
	delayed atomic.Uint64 // failures answered after a delay
	holding atomic.Int64  // failures being delayed now
}

type throttleEntry struct {
	key      uint64
	failures int
	last     time.Time // of the last failure
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
	if o.Forget <= 0 {
		o.Forget = DefaultForget
	}
	if o.Clock == nil {
		o.Clock = SystemClock{}
	}
	t := &Throttle{opts: o, seed: maphash.MakeSeed()}
	t.mu.entries = map[uint64]*list.Element{}
	return t
}

// key hashes an address and a user name into a fixed-size key: the memory
// an entry takes does not depend on what the client sent. Two pairs that
// collide (one chance in 2^64) share a count.
func (t *Throttle) key(addr, user string) uint64 {
	var h maphash.Hash
	h.SetSeed(t.seed)
	_, _ = h.WriteString(addr)
	_ = h.WriteByte(0)
	_, _ = h.WriteString(user)
	return h.Sum64()
}

// Failed records a failed login of user from addr ("" is the Unix socket,
// counted as LocalAddr) and returns how long its answer must be delayed (0
// for the free failures) and the number of failures counted so far.
func (t *Throttle) Failed(addr, user string) (delay time.Duration, failures int) {
	if t == nil {
		return 0, 0
	}
	if addr == "" {
		addr = LocalAddr
	}
	k := t.key(addr, user)
	now := t.opts.Clock.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.forgetLocked(now)
	var e *throttleEntry
	if el, ok := t.mu.entries[k]; ok {
		e = el.Value.(*throttleEntry)
		t.mu.lru.MoveToBack(el)
	} else {
		if len(t.mu.entries) >= maxThrottleEntries {
			oldest := t.mu.lru.Front()
			delete(t.mu.entries, oldest.Value.(*throttleEntry).key)
			t.mu.lru.Remove(oldest)
		}
		e = &throttleEntry{key: k}
		t.mu.entries[k] = t.mu.lru.PushBack(e)
	}
	e.failures++
	e.last = now
	over := e.failures - t.opts.FreeFailures
	if over <= 0 {
		return 0, e.failures
	}
	d := t.opts.FirstDelay
	for i := 1; i < over && d < t.opts.MaxDelay; i++ {
		d *= 2
	}
	return min(d, t.opts.MaxDelay), e.failures
}

// forgetLocked drops the entries whose last failure is older than Forget:
// the least recently failed come first.
func (t *Throttle) forgetLocked(now time.Time) {
	for el := t.mu.lru.Front(); el != nil; el = t.mu.lru.Front() {
		e := el.Value.(*throttleEntry)
		if now.Sub(e.last) <= t.opts.Forget {
			return
		}
		delete(t.mu.entries, e.key)
		t.mu.lru.Remove(el)
	}
}

// Hold waits d (the delay Failed returned) or until ctx ends, counting the
// failure as delayed.
func (t *Throttle) Hold(ctx context.Context, d time.Duration) {
	if t == nil || d <= 0 {
		return
	}
	t.delayed.Add(1)
	t.holding.Add(1)
	defer t.holding.Add(-1)
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-ctx.Done():
	}
}

// DelayedError is a failed login whose answer the throttle delayed. It
// wraps the failure (ErrAuthFailed, ErrCertAuthFailed, a *RefusedError):
// the client gets the same answer as for any failure, only later.
type DelayedError struct {
	// Err is the failure.
	Err error
	// Delay is how long the answer was held; Failures the failures of
	// this user from this address counted then.
	Delay    time.Duration
	Failures int
}

func (e *DelayedError) Error() string {
	return fmt.Sprintf("%v (answered after %s: %d failed logins of this user from this address)", e.Err, e.Delay.Round(time.Millisecond), e.Failures)
}

func (e *DelayedError) Unwrap() error { return e.Err }

// ThrottleStats are the throttle's numbers, kept for metrics.
type ThrottleStats struct {
	// Entries is the number of (address, user) pairs remembered;
	// Throttled how many of them have used their free failures (their
	// next failure is delayed).
	Entries, Throttled int
	// Delayed counts the failures whose answer was delayed; Holding is the
	// number being delayed now.
	Delayed uint64
	Holding int64
}

// Stats returns the current numbers.
func (t *Throttle) Stats() ThrottleStats {
	if t == nil {
		return ThrottleStats{}
	}
	now := t.opts.Clock.Now()
	t.mu.Lock()
	s := ThrottleStats{Entries: len(t.mu.entries)}
	for _, el := range t.mu.entries {
		if e := el.Value.(*throttleEntry); e.failures >= t.opts.FreeFailures && now.Sub(e.last) <= t.opts.Forget {
			s.Throttled++
		}
	}
	t.mu.Unlock()
	s.Delayed, s.Holding = t.delayed.Load(), t.holding.Load()
	return s
}
