package pool

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"
)

// ErrNotPaused is returned by Resume for a database that is not paused.
var ErrNotPaused = errors.New("not paused")

// Pause holds new transactions of database db ("" for every database):
// from now on Acquire waits for Resume instead of handing out a connection
// of the database, without timeouts.query_wait running (see Acquire).
// Connections in use stay with their clients, so transactions in flight
// finish; they are closed, not kept, when released, and idle ones are
// closed now, so that the database can be restarted or failed over.
// WaitQuiet tells when none is left.
func (p *Pool) Pause(db string) {
	var retired []*Server
	defer func() { terminateAll(retired) }() // after the unlock below
	p.mu.Lock()
	defer p.mu.Unlock()
	if db == "" {
		p.pauseAll = true
	} else {
		p.pausedDBs[db] = true
	}
	for r, rs := range p.routes {
		if !p.pausedLocked(r) {
			continue
		}
		for _, s := range rs.idle {
			if s.retire() {
				retired = append(retired, s)
			}
		}
		rs.idle = nil
	}
	// Clients queued for a paused database leave the queue and wait for
	// Resume instead, where their query_wait does not run.
	kept := p.waiters.items[:0]
	for _, w := range p.waiters.items {
		if p.pausedLocked(w.route) {
			w.ch <- grant{paused: true}
			continue
		}
		kept = append(kept, w)
	}
	clear(p.waiters.items[len(kept):])
	p.waiters.items = kept
}

// Resume ends a Pause of database db ("" ends every pause) and lets the
// clients it held go on, in the order they arrived. It returns
// ErrNotPaused when there is nothing to resume.
func (p *Pool) Resume(db string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case db == "":
		if !p.pauseAll && len(p.pausedDBs) == 0 {
			return ErrNotPaused
		}
		p.pauseAll = false
		clear(p.pausedDBs)
	case p.pauseAll:
		return fmt.Errorf("every database is paused, not %s alone: resume them all", db)
	case p.pausedDBs[db]:
		delete(p.pausedDBs, db)
	default:
		return ErrNotPaused
	}
	close(p.resumed)
	p.resumed = make(chan struct{})
	return nil
}

// Paused reports what is paused: every database (all), or the databases
// listed.
func (p *Pool) Paused() (all bool, dbs []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for db := range p.pausedDBs {
		dbs = append(dbs, db)
	}
	sort.Strings(dbs)
	return p.pauseAll, dbs
}

// IsPaused reports whether database db is paused.
func (p *Pool) IsPaused(db string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pauseAll || p.pausedDBs[db]
}

func (p *Pool) pausedLocked(r Route) bool {
	return p.pauseAll || (len(p.pausedDBs) > 0 && p.pausedDBs[r.Database])
}

// pauseCountsKey marks a context whose deadline bounds a paused wait too.
type pauseCountsKey struct{}

// PauseCounts returns ctx marked so that Acquire's wait behind a PAUSE
// ends at ctx's deadline like any other wait (a login, bounded by
// timeouts.client_login), instead of not counting.
func PauseCounts(ctx context.Context) context.Context {
	return context.WithValue(ctx, pauseCountsKey{}, true)
}

// waitResumed holds a request for route r while its database is paused
// and returns how long it was held. A ctx deadline does not end the wait
// (the paused time does not count against it) unless ctx is marked by
// PauseCounts; cancellation does.
func (p *Pool) waitResumed(ctx context.Context, r Route) (time.Duration, error) {
	p.mu.Lock()
	if !p.pausedLocked(r) || p.closed {
		p.mu.Unlock()
		return 0, nil
	}
	start := p.now()
	rs := p.route(r)
	rs.waiting++
	rs.counters.WaitCount++
	p.stats.WaitCount++
	p.pausedWaiting++
	if rs.pausedSince.IsZero() {
		rs.pausedSince = start
	}
	done := ctx.Done()
	deadlineCounts := ctx.Value(pauseCountsKey{}) != nil
	var err error
	for p.pausedLocked(r) && !p.closed && err == nil {
		resumed := p.resumed
		p.mu.Unlock()
		select {
		case <-resumed:
		case <-p.done:
		case <-done:
			if errors.Is(ctx.Err(), context.DeadlineExceeded) && !deadlineCounts {
				done = nil // the deadline does not run while paused
			} else {
				err = ctx.Err()
			}
		}
		p.mu.Lock()
	}
	d := p.now().Sub(start)
	rs.waiting--
	rs.counters.WaitDuration += d
	p.stats.WaitDuration += d
	p.pausedWaiting--
	if rs.waiting == 0 || !p.pausedLocked(r) {
		rs.pausedSince = time.Time{}
	}
	closed := p.closed
	p.mu.Unlock()
	if f := p.opts.Events.Waited; f != nil {
		f(d, err != nil)
	}
	switch {
	case closed:
		return d, ErrClosed
	case err != nil:
		return d, err
	}
	return d, nil
}

// WaitQuiet blocks until database db ("" every database) has no server
// connection left, open or being opened, or ctx ends. After Pause, it
// tells when the transactions in flight have finished and the database
// may be restarted.
func (p *Pool) WaitQuiet(ctx context.Context, db string) error {
	return p.waitUntil(ctx, func() bool {
		for r, rs := range p.routes {
			if (db == "" || r.Database == db) && rs.open+rs.opening > 0 {
				return false
			}
		}
		return true
	})
}

// WaitClose blocks until the connections of database db ("" every
// database) that are due to close instead of being reused (closing,
// broken, past timeouts.server_lifetime) when it is called are gone, or
// ctx ends. In-use ones close when their client releases them.
func (p *Pool) WaitClose(ctx context.Context, db string) error {
	now := p.now()
	var due []*Server
	p.mu.Lock()
	for r, rs := range p.routes {
		if db != "" && r.Database != db {
			continue
		}
		for s := range rs.servers {
			if p.closeNeeded(s, now) {
				due = append(due, s)
			}
		}
	}
	p.mu.Unlock()
	for _, s := range due {
		select {
		case <-s.readDone:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
