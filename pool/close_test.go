package pool_test

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/internal/pgtest"
	"github.com/pggovernor/pggovernor/pool"
)

// stallConn is a server connection whose writes can be held: a Write made
// while it stalls blocks, whatever its deadline, until the gate opens — a
// server whose socket takes nothing, as far as the pool can tell.
type stallConn struct {
	net.Conn
	mu      sync.Mutex
	stall   bool
	entered chan struct{} // a Write is held
	gate    chan struct{} // closed: held writes go on
}

func (c *stallConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	held := c.stall
	c.mu.Unlock()
	if held {
		select {
		case c.entered <- struct{}{}:
		default:
		}
		<-c.gate
	}
	return c.Conn.Write(p)
}

func (c *stallConn) hold() {
	c.mu.Lock()
	c.stall = true
	c.mu.Unlock()
}

// stallConnector opens connections to the scripted backend through
// stallConns, recording them.
type stallConnector struct {
	inner pool.Connector
	gate  chan struct{}
	mu    sync.Mutex
	conns map[uint32]*stallConn // by backend PID
}

func (c *stallConnector) Connect(ctx context.Context, r pool.Route, params map[string]string) (*pgconn.HijackedConn, error) {
	hc, err := c.inner.Connect(ctx, r, params)
	if err != nil {
		return nil, err
	}
	sc := &stallConn{Conn: hc.Conn, entered: make(chan struct{}, 1), gate: c.gate}
	hc.Conn = sc
	c.mu.Lock()
	c.conns[hc.PID] = sc
	c.mu.Unlock()
	return hc, nil
}

func (c *stallConnector) of(s *pool.Server) *stallConn {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conns[s.PID()]
}

// TestClosingDoesNoIOUnderThePoolLock: closing a server connection writes
// Terminate to it; when that write cannot complete (the server's socket
// takes nothing), other clients and routes still acquire, release and read
// the pool's figures — whichever path closes it: a broken connection's
// release, a budget that shrank, another route's waiter needing the slot,
// a PAUSE, the idle reaper. The pool collects what to close under its lock
// and writes after.
func TestClosingDoesNoIOUnderThePoolLock(t *testing.T) {
	other := pool.Route{Database: "bench", User: "other"}
	cases := []struct {
		name string
		// idle says whether the stalled connection is released (idle)
		// before it is held.
		idle  bool
		limit int
		// close makes the pool close the stalled connection s; it may
		// block (it runs on its own goroutine).
		close func(p *pool.Pool, s *pool.Server)
	}{
		{name: "release of a broken connection", limit: 2, close: func(p *pool.Pool, s *pool.Server) {
			s.MarkBroken()
			p.Release(s)
		}},
		{name: "budget shrinks", idle: true, limit: 2, close: func(p *pool.Pool, _ *pool.Server) { p.SetLimit(0) }},
		{name: "waiter of another route", idle: true, limit: 1, close: func(p *pool.Pool, _ *pool.Server) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if s, err := p.Acquire(ctx, other, nil); err == nil {
				p.Release(s)
			}
		}},
		{name: "pause", idle: true, limit: 2, close: func(p *pool.Pool, _ *pool.Server) { p.Pause(route.Database) }},
		{name: "idle reaper", idle: true, limit: 2, close: func(*pool.Pool, *pool.Server) {}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fb, err := pgtest.StartFakeBackend()
			if err != nil {
				t.Fatal(err)
			}
			defer fb.Close()
			base, err := pgconn.ParseConfig("postgres://bench@" + fb.Addr() + "/bench?sslmode=disable")
			if err != nil {
				t.Fatal(err)
			}
			gate := make(chan struct{})
			opened := false
			conn := &stallConnector{inner: &pool.UpstreamConnector{Base: base}, gate: gate, conns: map[uint32]*stallConn{}}
			opts := pool.Options{Connector: conn, Logger: zap.NewNop()}
			if tc.name == "idle reaper" {
				opts.ServerIdle = time.Millisecond
			}
			p := pool.New(opts)
			p.SetLimit(tc.limit)
			defer func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				p.Close(ctx)
				if err := p.Wait(ctx); err != nil {
					t.Errorf("connections left at the end: %v", err)
				}
			}()
			defer func() { // first: the pool's Close writes Terminate too
				if !opened {
					close(gate)
				}
			}()

			s := mustAcquire(t, p)
			sc := conn.of(s)
			sc.hold() // before the release: an idle connection's release writes nothing
			if tc.idle {
				p.Release(s)
			}
			go tc.close(p, s) // owner: this test; ends when the gate opens
			select {
			case <-sc.entered:
			case <-time.After(10 * time.Second):
				t.Fatal("the pool did not write Terminate to the connection it closes")
			}

			// The Terminate write is held. Everything else goes on.
			done := make(chan struct{})
			go func() { // owner: this test; ends with the pool calls
				defer close(done)
				_ = p.Stats()
				_ = p.Routes()
				if o := p.TryAcquire(other); o != nil {
					p.Release(o)
				}
			}()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("the pool's other clients were held up by a Terminate write that could not complete: I/O under the pool's lock")
			}
			close(gate)
			opened = true
		})
	}
}
