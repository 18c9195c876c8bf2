package budget

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// stallingQuerier answers nothing to its first reads, until their context
// ends (a server that stopped answering), then the limits.
type stallingQuerier struct {
	stalls atomic.Int32 // reads left to stall
}

type limitsRow struct {
	ctx   context.Context
	stall bool
}

func (q *stallingQuerier) QueryRow(ctx context.Context, _ string, _ ...any) pgx.Row {
	return limitsRow{ctx: ctx, stall: q.stalls.Add(-1) >= 0}
}

func (r limitsRow) Scan(dest ...any) error {
	if r.stall {
		<-r.ctx.Done()
		return r.ctx.Err()
	}
	*dest[0].(*string) = "17.0"
	*dest[1].(*int) = 100
	*dest[2].(*int) = 3
	*dest[3].(*int) = 0
	return nil
}

// TestRunTimesOutAStalledRead: a read of the limits that the server never
// answers ends after Options.Timeout, is reported (Unknown) and retried,
// and the budget is set once the server answers; Run does not hang.
func TestRunTimesOutAStalledRead(t *testing.T) {
	q := &stallingQuerier{}
	q.stalls.Store(2)
	unknown := make(chan error, 10)
	applied := make(chan int, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Run(ctx, Options{Control: q, Timeout: 50 * time.Millisecond, Interval: time.Hour,
			Apply: func(n int) { applied <- n }, Unknown: func(err error) { unknown <- err }, Logger: zap.NewNop()})
	}()
	defer func() { cancel(); <-done }()
	select {
	case err := <-unknown:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("a stalled read: want = a deadline error, got = %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a read the server never answers: want = reported after Options.Timeout, got = nothing (Run hangs)")
	}
	select {
	case n := <-applied:
		if want := 100 - 3 - ControlConnections; n != want {
			t.Fatalf("budget: want = %d, got = %d", want, n)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("after the stalls: want = the budget applied, got = nothing")
	}
}
