package pool_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/internal/pgtest"
	"github.com/pggovernor/pggovernor/pool"
)

// newFakePool is a pool over the scripted backend, so that a benchmark
// measures the pool and not a server.
func newFakePool(b *testing.B, limit int) (*pool.Pool, func()) {
	b.Helper()
	fb, err := pgtest.StartFakeBackend()
	if err != nil {
		b.Fatal(err)
	}
	base, err := pgconn.ParseConfig("postgres://bench@" + fb.Addr() + "/bench?sslmode=disable")
	if err != nil {
		b.Fatal(err)
	}
	p := pool.New(pool.Options{Connector: &pool.UpstreamConnector{Base: base}, Logger: zap.NewNop()})
	p.SetLimit(limit)
	return p, func() {
		p.Close(context.Background())
		_ = p.Wait(context.Background())
		fb.Close()
	}
}

// BenchmarkAcquireRelease: an idle connection taken and given back, the
// path every transaction takes in transaction mode.
func BenchmarkAcquireRelease(b *testing.B) {
	p, done := newFakePool(b, 4)
	defer done()
	ctx := context.Background()
	route := pool.Route{Database: "bench", User: "bench"}
	s, err := p.Acquire(ctx, route, nil) // open one connection first
	if err != nil {
		b.Fatal(err)
	}
	p.Release(s)
	b.ReportAllocs()
	for b.Loop() {
		s, err := p.Acquire(ctx, route, nil)
		if err != nil {
			b.Fatal(err)
		}
		p.Release(s)
	}
}

// BenchmarkAcquireReleaseContended: more goroutines than connections, so
// that acquires queue and releases hand connections to waiters.
func BenchmarkAcquireReleaseContended(b *testing.B) {
	p, done := newFakePool(b, 2)
	defer done()
	ctx := context.Background()
	route := pool.Route{Database: "bench", User: "bench"}
	b.ReportAllocs()
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			s, err := p.Acquire(ctx, route, nil)
			if err != nil {
				b.Error(err)
				return
			}
			p.Release(s)
		}
	})
}
