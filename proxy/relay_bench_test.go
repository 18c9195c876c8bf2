package proxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
	"github.com/pggovernor/pggovernor/pool"
)

// relayRig is a governor (trust auth, transaction mode) in front of the
// scripted backend, and one raw client connection logged in through it.
type relayRig struct {
	// queries and transactions are the histograms the session reports
	// to, so that the allocation test covers the metrics too.
	queries, transactions prometheus.Histogram
	conn                  net.Conn
	r                     *bufio.Reader
	query                 []byte
	hdr                   [5]byte
	done                  func()
}

func newRelayRig(tb testing.TB, mode string, mutate ...func(*config.Config)) *relayRig {
	tb.Helper()
	fb, err := pgtest.StartFakeBackend()
	if err != nil {
		tb.Fatal(err)
	}
	base, err := pgconn.ParseConfig("postgres://bench@" + fb.Addr() + "/bench?sslmode=disable")
	if err != nil {
		tb.Fatal(err)
	}
	p := pool.New(pool.Options{Connector: &pool.UpstreamConnector{Base: base}, Logger: zap.NewNop()})
	p.SetLimit(2)
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	cfg.PoolMode = mode
	cfg.Clients.Auth = config.AuthTrust
	for _, m := range mutate {
		m(&cfg)
	}
	users, _ := auth.NewUsers("")
	queries := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "q", Help: "q", Buckets: prometheus.DefBuckets})
	transactions := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "t", Help: "t", Buckets: prometheus.DefBuckets})
	srv := NewServer(Options{Config: &cfg, Pool: p, Verifier: auth.NewVerifier("trust", users), UpstreamUser: "bench", Logger: zap.NewNop(),
		Metrics: Metrics{QueryDuration: queries, TransactionDuration: transactions}})
	if err := srv.Listen(); err != nil {
		tb.Fatal(err)
	}
	go func() { _ = srv.Serve() }()
	c, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	startup, _ := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": "bench", "database": "bench"}}).Encode(nil)
	if _, err := c.Write(startup); err != nil {
		tb.Fatal(err)
	}
	rig := &relayRig{conn: c, r: bufio.NewReaderSize(c, 8192), queries: queries, transactions: transactions}
	if err := rig.readUntilReady(); err != nil {
		tb.Fatal(err)
	}
	rig.query, _ = (&pgproto3.Query{String: "SELECT 1"}).Encode(nil)
	rig.done = func() {
		_ = c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		p.Close(ctx)
		_ = p.Wait(ctx)
		fb.Close()
	}
	return rig
}

// readUntilReady reads backend frames until ReadyForQuery, without
// allocating.
func (r *relayRig) readUntilReady() error {
	hdr := r.hdr[:]
	for {
		if _, err := io.ReadFull(r.r, hdr); err != nil {
			return err
		}
		n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
		if _, err := r.r.Discard(n); err != nil {
			return err
		}
		if hdr[0] == 'Z' {
			return nil
		}
		if hdr[0] == 'E' {
			return io.ErrUnexpectedEOF
		}
	}
}

func (r *relayRig) roundTrip() error {
	if _, err := r.conn.Write(r.query); err != nil {
		return err
	}
	return r.readUntilReady()
}

// BenchmarkRelayRoundTrip: one simple query and its DataRow, CommandComplete
// and ReadyForQuery through a session in each pool mode; in transaction mode
// every round trip also acquires and releases the server connection.
func BenchmarkRelayRoundTrip(b *testing.B) {
	for _, mode := range []string{config.PoolModeTransaction, config.PoolModeSession} {
		b.Run(mode, func(b *testing.B) {
			rig := newRelayRig(b, mode)
			defer rig.done()
			b.ReportAllocs()
			for b.Loop() {
				if err := rig.roundTrip(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestRelayDoesNotAllocate guards the hot path: relaying a query and its
// DataRow/ReadyForQuery response, including the acquire and release of the
// server connection in transaction mode, allocates nothing.
func TestRelayDoesNotAllocate(t *testing.T) {
	for _, mode := range []string{config.PoolModeTransaction, config.PoolModeSession} {
		t.Run(mode, func(t *testing.T) {
			rig := newRelayRig(t, mode)
			defer rig.done()
			for i := 0; i < 100; i++ { // warm up buffers and the server connection
				if err := rig.roundTrip(); err != nil {
					t.Fatal(err)
				}
			}
			allocs := testing.AllocsPerRun(1000, func() {
				if err := rig.roundTrip(); err != nil {
					t.Fatal(err)
				}
			})
			if allocs != 0 {
				t.Fatalf("allocations per round trip: want = 0, got = %v", allocs)
			}
			if got := histogramCount(t, rig.queries); got < 1100 {
				t.Fatalf("queries observed: want >= 1100 (every round trip), got = %d", got)
			}
			if got := histogramCount(t, rig.transactions); got < 1100 {
				t.Fatalf("transactions observed: want >= 1100, got = %d", got)
			}
		})
	}
}

func histogramCount(t *testing.T, h prometheus.Histogram) uint64 {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}
