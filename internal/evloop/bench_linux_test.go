package evloop

import (
	"fmt"
	"net"
	"runtime"
	"testing"

	"github.com/pggovernor/pggovernor/internal/relaybench"
)

// relayHandler forwards every frame to the linked socket and closes it
// when its own socket closes: the relay alone, the state machine's place.
type relayHandler struct{}

func (relayHandler) Frame(c *Conn, f Frame) {
	if p := c.Peer(); p != nil {
		_ = p.Write(f.Data)
	}
}

func (relayHandler) Closed(c *Conn, _ error) {
	if p := c.Peer(); p != nil {
		p.Close()
	}
}

// engineRelay is relaybench.Relay on an Engine: a pair's two sockets on
// the same loop, linked.
type engineRelay struct{ e *Engine }

func (r *engineRelay) Pair(client, server net.Conn) error {
	l := r.e.Next()
	cfd, err := Detach(client)
	if err != nil {
		return err
	}
	sfd, err := Detach(server)
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	if err := l.Submit(func() {
		c, err := l.Register(cfd, nil, relayHandler{})
		if err != nil {
			done <- err
			return
		}
		s, err := l.Register(sfd, nil, relayHandler{})
		if err != nil {
			c.Close()
			done <- err
			return
		}
		c.SetPeer(s)
		done <- nil
	}); err != nil {
		return err
	}
	return <-done
}

// Adopt registers an idle client socket.
func (r *engineRelay) Adopt(client net.Conn) error {
	return r.e.Next().Handover(client, nil, relayHandler{}, nil)
}

func (r *engineRelay) Syscalls() uint64 {
	var n uint64
	for _, l := range r.e.Loops() {
		n += l.Stats().Syscalls()
	}
	return n
}

func (r *engineRelay) Close() { r.e.Close() }

// BenchmarkRelay: simple-query round trips between K clients and K scripted
// servers (in a driver process) through a relay at N = 1 and 2 loops: this
// engine level- and edge-triggered, and the goroutine relay (with GOMAXPROCS
// = N) as the baseline. See bench/README.md, "Relay engine spike".
//
//	go test -run '^$' -bench Relay -benchtime 20000x ./internal/evloop
//	RELAYBENCH_STRACE=1 go test -run '^$' -bench 'Relay/.*/clients=64' -benchtime 20000x ./internal/evloop
func BenchmarkRelay(b *testing.B) {
	engines := []struct {
		name  string
		relay func(loops int) relaybench.Relay
	}{
		{"goroutine", func(int) relaybench.Relay { return &relaybench.GoroutineRelay{} }},
		{"evloop-level", func(n int) relaybench.Relay { return newEngineRelay(b, Options{Loops: n}) }},
		{"evloop-edge", func(n int) relaybench.Relay { return newEngineRelay(b, Options{Loops: n, EdgeTriggered: true}) }},
	}
	for _, eng := range engines {
		for _, loops := range []int{1, 2} {
			for _, k := range []int{1, 8, 64, 1000} {
				b.Run(fmt.Sprintf("%s/loops=%d/clients=%d", eng.name, loops, k), func(b *testing.B) {
					if eng.name == "goroutine" {
						defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(loops))
					}
					relaybench.Run(b, func() relaybench.Relay { return eng.relay(loops) }, k)
				})
			}
		}
	}
}

func newEngineRelay(b *testing.B, opts Options) *engineRelay {
	e, err := New(opts)
	if err != nil {
		b.Fatal(err)
	}
	return &engineRelay{e: e}
}

// BenchmarkIdle: the resident memory 10,000 idle client sockets cost once
// registered with a loop, against the goroutine relay's client pump. It
// measures once, whatever b.N:
//
//	go test -run '^$' -bench Idle -benchtime 1x ./internal/evloop
func BenchmarkIdle(b *testing.B) {
	const n = 10000
	for _, c := range []struct {
		name  string
		relay func() interface {
			relaybench.Relay
			Adopt(net.Conn) error
		}
	}{
		{"goroutine", func() interface {
			relaybench.Relay
			Adopt(net.Conn) error
		} {
			return &relaybench.GoroutineRelay{}
		}},
		{"evloop", func() interface {
			relaybench.Relay
			Adopt(net.Conn) error
		} {
			return newEngineRelay(b, Options{Loops: 2})
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			d, err := relaybench.StartDriver()
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			relay := c.relay()
			defer relay.Close()
			per, err := relaybench.Idle(d, n, relay.Adopt)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(per, "RSS-B/socket")
		})
	}
}
