package proxy

// This file bounds the connections that have not finished logging in
// (clients.max_pending_logins). A connection counts from accept until the
// welcome is about to be written; when one more arrives than the bound
// allows, the oldest is dropped, so that connections that say nothing, or
// stall their password exchange, can never keep a real client out: they
// are the oldest once enough others arrived after them.

import (
	"container/list"
	"context"
	"net"
	"sync"
	"time"
)

// pendingLogins is the list of connections logging in, oldest first. Its
// methods are safe for concurrent use; none does I/O under its lock.
type pendingLogins struct {
	mu   sync.Mutex
	list list.List // of *pendingLogin
}

// pendingLogin is one connection logging in.
type pendingLogin struct {
	conn   net.Conn           // the client's socket, for a deadline
	cancel context.CancelFunc // ends the login's context
	elem   *list.Element      // nil once it left the list; guarded by pendingLogins.mu
	// dropped reports that it was dropped to make room; guarded by
	// pendingLogins.mu.
	dropped bool
}

// add counts a new connection; if that makes more than max, the oldest
// one is dropped: its reads and writes fail at once and its login's
// context ends, and its own goroutine tells the client and counts it
// (session.loginFailed). It returns whether one was dropped.
func (p *pendingLogins) add(pl *pendingLogin, max int) bool {
	p.mu.Lock()
	pl.elem = p.list.PushBack(pl)
	var victim *pendingLogin
	if p.list.Len() > max {
		victim = p.list.Remove(p.list.Front()).(*pendingLogin)
		victim.elem, victim.dropped = nil, true
	}
	p.mu.Unlock()
	if victim == nil {
		return false
	}
	// A deadline in the past wakes a blocked read or write; the session
	// sets a short write deadline of its own to send the error.
	_ = victim.conn.SetDeadline(time.Unix(1, 0))
	victim.cancel()
	return true
}

// leave takes a connection out of the list (its login is over, or it
// failed). ok is false when it had been dropped: the login must not go on.
func (p *pendingLogins) leave(pl *pendingLogin) (ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pl.elem != nil {
		p.list.Remove(pl.elem)
		pl.elem = nil
	}
	return !pl.dropped
}

// wasDropped reports whether the connection was dropped to make room.
func (p *pendingLogins) wasDropped(pl *pendingLogin) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return pl.dropped
}

// len is the number of connections logging in.
func (p *pendingLogins) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.list.Len()
}
