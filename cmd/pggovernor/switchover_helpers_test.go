package main

// Helpers of the switchover suite (switchover_test.go), written to be
// shared with other fault suites: a writer workload that records every
// commit the server acknowledged, and a TCP forwarder whose target can be
// moved (a DNS name that moves to another server: connections made before
// the move stay where they were).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ackedWriters are clients that each insert (client, seq) rows, one
// transaction per row, and record which commits the server acknowledged
// and which errors they got. A client whose connection was closed
// reconnects.
type ackedWriters struct {
	urls   []string
	table  string
	pause  time.Duration
	inTx   func(client int) bool
	cancel context.CancelFunc
	wg     sync.WaitGroup
	start  time.Time

	mu      sync.Mutex
	clients []*ackedClient
}

// ackedClient is one writer's record.
type ackedClient struct {
	acked  []int64 // sequence numbers acknowledged, in order
	ackAt  []time.Time
	errors []writeError
}

// writeError is an error a writer got, and when.
type writeError struct {
	at   time.Time
	code string // SQLSTATE, or "" for a connection error
	err  error
}

// startAckedWriters starts a writer through each of urls into table
// (created by the caller with columns client int, seq bigint), each
// pausing between its transactions. A writer for which inTx (if set) is
// true writes in explicit transactions that last: BEGIN, the INSERT,
// pg_sleep(0.005), COMMIT.
func startAckedWriters(t *testing.T, urls []string, table string, pause time.Duration, inTx func(client int) bool) *ackedWriters {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &ackedWriters{urls: urls, table: table, pause: pause, inTx: inTx, cancel: cancel, start: time.Now()}
	for i := range urls {
		c := &ackedClient{}
		w.clients = append(w.clients, c)
		w.wg.Add(1)
		go w.run(ctx, i, c) // owner: the test; exits at stop
	}
	t.Cleanup(w.stop)
	return w
}

func (w *ackedWriters) run(ctx context.Context, id int, c *ackedClient) {
	defer w.wg.Done()
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	insert := fmt.Sprintf("INSERT INTO %s (client, seq) VALUES ($1, $2)", w.table)
	for seq := int64(1); ctx.Err() == nil; seq++ {
		if conn == nil || conn.IsClosed() {
			var err error
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			conn, err = pgx.Connect(cctx, w.urls[id])
			cancel()
			if err != nil {
				if ctx.Err() == nil {
					w.record(c, err)
				}
				conn = nil
				time.Sleep(10 * time.Millisecond)
				continue
			}
		}
		qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		var err error
		if w.inTx != nil && w.inTx(id) {
			err = pgx.BeginFunc(qctx, conn, func(tx pgx.Tx) error {
				if _, err := tx.Exec(qctx, insert, id, seq); err != nil {
					return err
				}
				_, err := tx.Exec(qctx, "SELECT pg_sleep(0.005)")
				return err
			})
		} else {
			_, err = conn.Exec(qctx, insert, id, seq)
		}
		cancel()
		switch {
		case ctx.Err() != nil:
			return // stopped: this one's outcome is unknown, and not counted
		case err != nil:
			w.record(c, err)
		default:
			w.mu.Lock()
			c.acked = append(c.acked, seq)
			c.ackAt = append(c.ackAt, time.Now())
			w.mu.Unlock()
		}
		if w.pause > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(w.pause):
			}
		}
	}
}

func (w *ackedWriters) record(c *ackedClient, err error) {
	e := writeError{at: time.Now(), err: err}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		e.code = pgErr.Code
	}
	w.mu.Lock()
	c.errors = append(c.errors, e)
	w.mu.Unlock()
}

// stop ends the writers and waits for them. Idempotent.
func (w *ackedWriters) stop() {
	w.cancel()
	w.wg.Wait()
}

// acks counts the acknowledged commits so far.
func (w *ackedWriters) acks() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, c := range w.clients {
		n += len(c.acked)
	}
	return n
}

// ackedSince reports whether every writer had a commit acknowledged after
// since.
func (w *ackedWriters) ackedSince(since time.Time) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range w.clients {
		if n := len(c.ackAt); n == 0 || !c.ackAt[n-1].After(since) {
			return false
		}
	}
	return true
}

// writerReport is what the writers saw, checked against the rows of the
// server that holds the data now.
type writerReport struct {
	acked, missing int
	// maxErrors is the most errors one client got; errors all of them.
	maxErrors, errors int
	// resumed is, over the clients, the longest time from since to the
	// client's first acknowledged commit after it.
	resumed time.Duration
	// codes counts the errors by SQLSTATE ("conn" for connection errors).
	codes map[string]int
	// firstMissing lists a few missing rows, for the failure message.
	firstMissing []string
}

// report stops the writers and compares what they were told with rows,
// the (client, seq) pairs the server holds.
func (w *ackedWriters) report(since time.Time, rows map[[2]int64]bool) writerReport {
	w.stop()
	r := writerReport{codes: map[string]int{}}
	for id, c := range w.clients {
		for _, seq := range c.acked {
			r.acked++
			if !rows[[2]int64{int64(id), seq}] {
				r.missing++
				if len(r.firstMissing) < 5 {
					r.firstMissing = append(r.firstMissing, fmt.Sprintf("(%d, %d)", id, seq))
				}
			}
		}
		r.errors += len(c.errors)
		r.maxErrors = max(r.maxErrors, len(c.errors))
		for _, e := range c.errors {
			code := e.code
			if code == "" {
				code = "conn"
			}
			r.codes[code]++
		}
		resumed := time.Duration(-1)
		for _, at := range c.ackAt {
			if at.After(since) {
				resumed = at.Sub(since)
				break
			}
		}
		if resumed < 0 {
			resumed = time.Hour // never: shown as a failure
		}
		r.resumed = max(r.resumed, resumed)
	}
	return r
}

// errorsOf counts the errors writer client got.
func (w *ackedWriters) errorsOf(client int) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.clients[client].errors)
}

// errorSummary lists the errors of the clients that got more than allowed.
func (w *ackedWriters) errorSummary(allowed int) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var b strings.Builder
	for id, c := range w.clients {
		if len(c.errors) <= allowed {
			continue
		}
		fmt.Fprintf(&b, "client %d:", id)
		for _, e := range c.errors {
			fmt.Fprintf(&b, " [%s +%s] %v;", e.code, e.at.Sub(w.start).Round(time.Millisecond), e.err)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// codesString renders error counts by SQLSTATE.
func codesString(codes map[string]int) string {
	if len(codes) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(codes))
	for k := range codes {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s×%d", k, codes[k])
	}
	return strings.Join(parts, " ")
}

// movableForwarder accepts TCP connections and relays each one to the
// target of the moment: Move changes where new connections go, as a DNS
// name that moves; connections made before stay with the old target.
type movableForwarder struct {
	ln     net.Listener
	target atomic.Pointer[string]
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	done  bool
}

// startForwarder listens on a loopback port and relays to target. It is
// closed at the test's end.
func startForwarder(t *testing.T, target string) *movableForwarder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &movableForwarder{ln: ln, conns: map[net.Conn]struct{}{}}
	f.target.Store(&target)
	f.wg.Add(1)
	go f.accept() // owner: the forwarder; exits at Close
	t.Cleanup(f.Close)
	return f
}

// Addr is where clients connect.
func (f *movableForwarder) Addr() string { return f.ln.Addr().String() }

// Move sends new connections to target.
func (f *movableForwarder) Move(target string) { f.target.Store(&target) }

func (f *movableForwarder) accept() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.DialTimeout("tcp", *f.target.Load(), 5*time.Second)
		if err != nil {
			_ = c.Close()
			continue
		}
		if !f.track(c, s) {
			return
		}
		f.wg.Add(2)
		go f.pipe(c, s) // owner: the forwarder; exits when either side closes
		go f.pipe(s, c) // owner: the forwarder; exits when either side closes
	}
}

func (f *movableForwarder) track(cs ...net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.done {
		for _, c := range cs {
			_ = c.Close()
		}
		return false
	}
	for _, c := range cs {
		f.conns[c] = struct{}{}
	}
	return true
}

func (f *movableForwarder) pipe(dst, src net.Conn) {
	defer f.wg.Done()
	_, _ = io.Copy(dst, src)
	_ = dst.Close()
	_ = src.Close()
	f.mu.Lock()
	delete(f.conns, dst)
	delete(f.conns, src)
	f.mu.Unlock()
}

// Close stops accepting and closes every relayed connection. Idempotent.
func (f *movableForwarder) Close() {
	f.mu.Lock()
	f.done = true
	for c := range f.conns {
		_ = c.Close()
	}
	f.mu.Unlock()
	_ = f.ln.Close()
	f.wg.Wait()
}
