package gnetspike

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"testing"

	"github.com/panjf2000/gnet/v2"
	"github.com/panjf2000/gnet/v2/pkg/logging"

	"github.com/pggovernor/pggovernor/internal/relaybench"
)

func TestMain(m *testing.M) {
	if code, ok := relaybench.DriverMain(); ok {
		os.Exit(code)
	}
	logging.SetDefaultLoggerAndFlusher(quiet{}, nil)
	os.Exit(m.Run())
}

// quiet is a gnet logger that drops everything but errors.
type quiet struct{}

func (quiet) Debugf(string, ...any)        {}
func (quiet) Infof(string, ...any)         {}
func (quiet) Warnf(string, ...any)         {}
func (quiet) Errorf(f string, args ...any) { fmt.Fprintf(os.Stderr, "gnet: "+f+"\n", args...) }
func (quiet) Fatalf(f string, args ...any) {
	fmt.Fprintf(os.Stderr, "gnet: "+f+"\n", args...)
	os.Exit(1)
}

// pair is a session: its two gnet connections, on one loop.
type pair struct {
	client, server gnet.Conn
	// partLeft is what remains of a frame longer than the buffer being
	// forwarded in parts, per side.
	clientPart, serverPart int
}

// handler forwards whole frames (and frames longer than 8 KiB in parts) to
// the other connection of the pair, one Write per OnTraffic: gnet writes at
// once when nothing is pending, so this is its coalescing.
type handler struct {
	gnet.BuiltinEventEngine
}

func (*handler) OnTraffic(c gnet.Conn) gnet.Action {
	p, _ := c.Context().(*pair)
	if p == nil || p.client == nil || p.server == nil {
		return gnet.None // not paired yet: gnet keeps the bytes
	}
	peer, part := p.server, &p.clientPart
	if c == p.server {
		peer, part = p.client, &p.serverPart
	}
	buf, _ := c.Peek(-1)
	n := 0
	for n < len(buf) {
		if *part > 0 {
			k := min(*part, len(buf)-n)
			*part -= k
			n += k
			continue
		}
		if len(buf)-n < 5 {
			break
		}
		total := 1 + int(binary.BigEndian.Uint32(buf[n+1:]))
		if total <= len(buf)-n {
			n += total
			continue
		}
		if total <= 8192 {
			break
		}
		*part = total - (len(buf) - n)
		n = len(buf)
	}
	if n > 0 {
		if _, err := peer.Write(buf[:n]); err != nil {
			return gnet.Close
		}
		_, _ = c.Discard(n)
	}
	return gnet.None
}

func (*handler) OnClose(c gnet.Conn, _ error) gnet.Action {
	if p, _ := c.Context().(*pair); p != nil {
		peer := p.server
		if c == p.server {
			peer = p.client
		}
		if peer != nil {
			_ = peer.Close()
		}
	}
	return gnet.None
}

// relay is relaybench.Relay on a gnet Client: the client connection
// enrolled on a loop (round robin), its server connection enrolled on the
// same loop (EventLoop.Enroll), the pair set on the loop.
type relay struct{ cli *gnet.Client }

func newRelay(b *testing.B, loops int, et bool) *relay {
	cli, err := gnet.NewClient(&handler{}, gnet.WithMulticore(true), gnet.WithNumEventLoop(loops),
		gnet.WithLockOSThread(true), gnet.WithEdgeTriggeredIO(et), gnet.WithLoadBalancing(gnet.RoundRobin),
		gnet.WithReadBufferCap(8192), gnet.WithLogLevel(logging.ErrorLevel))
	if err != nil {
		b.Fatal(err)
	}
	if err := cli.Start(); err != nil {
		b.Fatal(err)
	}
	return &relay{cli: cli}
}

func (r *relay) Pair(client, server net.Conn) error {
	p := &pair{}
	gc, err := r.cli.EnrollContext(client, p)
	if err != nil {
		return err
	}
	res, err := gc.EventLoop().Enroll(gnet.NewContext(context.Background(), p), server)
	if err != nil {
		return err
	}
	got := <-res
	if got.Err != nil {
		return got.Err
	}
	done := make(chan struct{})
	if err := gc.EventLoop().Execute(context.Background(), gnet.RunnableFunc(func(context.Context) error {
		p.client, p.server = gc, got.Conn
		close(done)
		return nil
	})); err != nil {
		return err
	}
	<-done
	return nil
}

func (r *relay) Close() { _ = r.cli.Stop() }

// BenchmarkRelay is internal/evloop's BenchmarkRelay on gnet:
//
//	cd bench/gnetspike && go test -run '^$' -bench Relay -benchtime 20000x .
func BenchmarkRelay(b *testing.B) {
	for _, et := range []bool{false, true} {
		name := "gnet-level"
		if et {
			name = "gnet-edge"
		}
		for _, loops := range []int{1, 2} {
			for _, k := range []int{1, 8, 64, 1000} {
				b.Run(fmt.Sprintf("%s/loops=%d/clients=%d", name, loops, k), func(b *testing.B) {
					relaybench.Run(b, func() relaybench.Relay { return newRelay(b, loops, et) }, k)
				})
			}
		}
	}
}

// BenchmarkIdle is internal/evloop's BenchmarkIdle on gnet: the resident
// memory of 10,000 idle client sockets enrolled on its loops (measured once,
// whatever b.N):
//
//	cd bench/gnetspike && go test -run '^$' -bench Idle -benchtime 1x .
func BenchmarkIdle(b *testing.B) {
	b.Run("gnet", func(b *testing.B) {
		const n = 10000
		d, err := relaybench.StartDriver()
		if err != nil {
			b.Fatal(err)
		}
		defer d.Close()
		r := newRelay(b, 2, false)
		defer r.Close()
		per, err := relaybench.Idle(d, n, func(c net.Conn) error {
			_, err := r.cli.EnrollContext(c, &pair{})
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(per, "RSS-B/socket")
	})
}
