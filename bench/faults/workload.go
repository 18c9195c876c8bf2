package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/lib/pq"
)

// workload is the writer clients of one case: each inserts unique ids
// through a governor, alternately one INSERT in autocommit and BEGIN;
// INSERT; INSERT; COMMIT, half of them with pgx and half with lib/pq
// through database/sql, and records the outcome of every id:
//
//   - acknowledged: its COMMIT (or its autocommit INSERT) succeeded, so it
//     must be in the table;
//   - aborted: its transaction failed before COMMIT was sent, or the
//     server answered COMMIT with ROLLBACK, so it must not be;
//   - unknown: the outcome was lost with the connection (an error at COMMIT
//     or at the autocommit INSERT); it may be either.
type workload struct {
	table     string
	opTimeout time.Duration
	clients   []*writer
	stopc     chan struct{}
	wg        sync.WaitGroup
	nextID    atomic.Int64
	commits   atomic.Int64
	healedAt  atomic.Int64 // UnixNano of the end of the fault; 0 before
	longest   atomic.Int64 // the longest operation (connect, transaction), in ns
	longWhat  atomic.Pointer[string]

	mu      sync.Mutex
	acked   []int64
	aborted []int64
	unknown []int64
	errs    map[string]int      // client errors by SQLSTATE or class
	example map[string][]string // the first messages of each class
}

// writer is one client.
type writer struct {
	n      int
	driver string // "pgx" or "lib/pq"
	dsn    string
	// recovered is when its first commit after the end of the fault
	// completed (UnixNano), 0 until then.
	recovered atomic.Int64
	commits   atomic.Int64
	exited    atomic.Bool
}

// startWorkload starts one writer per DSN, alternating drivers.
func startWorkload(table string, dsns []string, opTimeout time.Duration) *workload {
	w := &workload{table: table, opTimeout: opTimeout, stopc: make(chan struct{}),
		errs: map[string]int{}, example: map[string][]string{}}
	for i, dsn := range dsns {
		c := &writer{n: i, driver: "pgx", dsn: dsn}
		if i%2 == 1 {
			c.driver = "lib/pq"
		}
		w.clients = append(w.clients, c)
		w.wg.Add(1)
		go func() { // owner: w; exits at stop
			defer w.wg.Done()
			defer c.exited.Store(true)
			if c.driver == "pgx" {
				w.runPgx(c)
			} else {
				w.runPq(c)
			}
		}()
	}
	return w
}

func (w *workload) stopped() bool {
	select {
	case <-w.stopc:
		return true
	default:
		return false
	}
}

// pause paces a client's retries after an error (the governor or the
// server restarting: nothing announces when it is back).
func (w *workload) pause() {
	t := time.NewTimer(50 * time.Millisecond)
	defer t.Stop()
	select {
	case <-w.stopc:
	case <-t.C:
	}
}

// stop ends the workload and waits up to limit for the clients to return;
// it lists the ones that did not (stuck in an operation), then waits for
// them anyway (every operation is bounded by opTimeout).
func (w *workload) stop(limit time.Duration) (stuck []string) {
	close(w.stopc)
	done := make(chan struct{})
	go func() { w.wg.Wait(); close(done) }() // owner: stop; exits when every client has
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
	}
	for _, c := range w.clients {
		if !c.exited.Load() {
			stuck = append(stuck, fmt.Sprintf("%d (%s)", c.n, c.driver))
		}
	}
	<-done
	return stuck
}

// ids hands out n unique ids.
func (w *workload) ids(n int) []int64 {
	last := w.nextID.Add(int64(n))
	out := make([]int64, n)
	for i := range out {
		out[i] = last - int64(n) + int64(i) + 1
	}
	return out
}

// record files the ids of one transaction under its outcome and counts
// the error, if any; op names the operation for the error's example.
func (w *workload) record(c *writer, op string, ids []int64, outcome string, err error) {
	w.mu.Lock()
	switch outcome {
	case "acked":
		w.acked = append(w.acked, ids...)
	case "aborted":
		w.aborted = append(w.aborted, ids...)
	case "unknown":
		w.unknown = append(w.unknown, ids...)
	}
	if err != nil {
		w.countLocked(c, op, err)
	}
	w.mu.Unlock()
	if outcome == "acked" {
		w.commits.Add(1)
		c.commits.Add(1)
		if h := w.healedAt.Load(); h != 0 && c.recovered.Load() == 0 {
			if now := time.Now().UnixNano(); now >= h {
				c.recovered.CompareAndSwap(0, now)
			}
		}
	}
}

// fail counts an error that concerned no id (connecting, BEGIN).
func (w *workload) fail(c *writer, op string, err error) {
	w.mu.Lock()
	w.countLocked(c, op, err)
	w.mu.Unlock()
}

func (w *workload) countLocked(c *writer, op string, err error) {
	class := errClass(err)
	w.errs[class]++
	if len(w.example[class]) < 3 {
		w.example[class] = append(w.example[class], fmt.Sprintf("client %d (%s) %s at %s: %v", c.n, c.driver, op, time.Now().Format("15:04:05.000"), err))
	}
}

// errClass is an error's SQLSTATE, or what kind of failure it was when the
// client has none: "timeout" (the client's own deadline), "refused" (the
// governor down), "io" (the connection lost), "connect", "protocol" (a
// message the driver did not expect: a violation), "other".
func errClass(err error) string {
	var pgErr *pgconn.PgError
	var pqErr *pq.Error
	var connErr *pgconn.ConnectError
	switch {
	case errors.As(err, &pgErr):
		return pgErr.Code
	case errors.As(err, &pqErr):
		return string(pqErr.Code)
	case errors.Is(err, context.DeadlineExceeded) || os.IsTimeout(err):
		return "timeout"
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ENOENT): // TCP, Unix socket
		return "refused"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.EPIPE), errors.Is(err, net.ErrClosed), errors.Is(err, sql.ErrConnDone),
		errors.Is(err, driver.ErrBadConn), strings.Contains(err.Error(), "conn closed"):
		return "io"
	case errors.As(err, &connErr):
		return "connect"
	case protocolConfusion(err):
		return "protocol"
	}
	return "other"
}

// protocolConfusion reports whether a driver found a message it did not
// expect where it was (lib/pq's "unexpected Bind response", pgx's
// "unexpected message"): the governor broke the protocol.
func protocolConfusion(err error) bool {
	m := err.Error()
	return strings.Contains(m, "unexpected") && (strings.Contains(m, "response") || strings.Contains(m, "message")) ||
		strings.Contains(m, "expected ReadyForQuery")
}

// runPgx is a pgx client: one connection, opened again when it is lost.
func (w *workload) runPgx(c *writer) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	for n := 0; !w.stopped(); n++ {
		if conn == nil || conn.IsClosed() {
			ctx, cancel := context.WithTimeout(context.Background(), w.opTimeout)
			began := time.Now()
			var err error
			conn, err = pgx.Connect(ctx, c.dsn)
			w.took(c, -1, began)
			cancel()
			if err != nil {
				conn = nil
				w.fail(c, "connect", err)
				w.pause()
				continue
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), w.opTimeout)
		began := time.Now()
		if n%2 == 0 {
			w.pgxSingle(ctx, c, conn)
		} else {
			w.pgxTx(ctx, c, conn)
		}
		w.took(c, n, began)
		cancel()
	}
}

func (w *workload) pgxSingle(ctx context.Context, c *writer, conn *pgx.Conn) {
	ids := w.ids(1)
	if _, err := conn.Exec(ctx, "INSERT INTO "+w.table+" (id, client) VALUES ($1, $2)", ids[0], c.n); err != nil {
		w.record(c, "autocommit INSERT", ids, "unknown", err)
		w.pause()
		return
	}
	w.record(c, "autocommit INSERT", ids, "acked", nil)
}

func (w *workload) pgxTx(ctx context.Context, c *writer, conn *pgx.Conn) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		w.fail(c, "BEGIN", err)
		w.pause()
		return
	}
	ids := w.ids(2)
	for _, id := range ids {
		if _, err := tx.Exec(ctx, "INSERT INTO "+w.table+" (id, client) VALUES ($1, $2)", id, c.n); err != nil {
			_ = tx.Rollback(ctx)
			w.record(c, "INSERT in a transaction", ids, "aborted", err)
			w.pause()
			return
		}
	}
	switch err := tx.Commit(ctx); {
	case err == nil:
		w.record(c, "COMMIT", ids, "acked", nil)
	case errors.Is(err, pgx.ErrTxCommitRollback):
		w.record(c, "COMMIT", ids, "aborted", err)
	default:
		w.record(c, "COMMIT", ids, "unknown", err)
		w.pause()
	}
}

// runPq is a lib/pq client through database/sql, one connection at most
// (database/sql opens it again when it is lost).
func (w *workload) runPq(c *writer) {
	db, err := sql.Open("postgres", c.dsn)
	if err != nil {
		w.fail(c, "open", err)
		return
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	for n := 0; !w.stopped(); n++ {
		ctx, cancel := context.WithTimeout(context.Background(), w.opTimeout)
		began := time.Now()
		if n%2 == 0 {
			w.pqSingle(ctx, c, db)
		} else {
			w.pqTx(ctx, c, db)
		}
		w.took(c, n, began)
		cancel()
	}
}

func (w *workload) pqSingle(ctx context.Context, c *writer, db *sql.DB) {
	ids := w.ids(1)
	if _, err := db.ExecContext(ctx, "INSERT INTO "+w.table+" (id, client) VALUES ($1, $2)", ids[0], c.n); err != nil {
		w.record(c, "autocommit INSERT", ids, "unknown", err)
		w.pause()
		return
	}
	w.record(c, "autocommit INSERT", ids, "acked", nil)
}

func (w *workload) pqTx(ctx context.Context, c *writer, db *sql.DB) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		w.fail(c, "BEGIN", err)
		w.pause()
		return
	}
	ids := w.ids(2)
	for _, id := range ids {
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+w.table+" (id, client) VALUES ($1, $2)", id, c.n); err != nil {
			_ = tx.Rollback()
			w.record(c, "INSERT in a transaction", ids, "aborted", err)
			w.pause()
			return
		}
	}
	switch err := tx.Commit(); {
	case err == nil:
		w.record(c, "COMMIT", ids, "acked", nil)
	case errors.Is(err, pq.ErrInFailedTransaction):
		w.record(c, "COMMIT", ids, "aborted", err)
	default:
		w.record(c, "COMMIT", ids, "unknown", err)
		w.pause()
	}
}

// took records how long an operation that began then took (with the
// pause after an error).
func (w *workload) took(c *writer, n int, began time.Time) {
	d := int64(time.Since(began))
	for {
		cur := w.longest.Load()
		if d <= cur {
			return
		}
		if w.longest.CompareAndSwap(cur, d) {
			what := "a transaction"
			switch {
			case n < 0:
				what = "connecting"
			case n%2 == 0:
				what = "an autocommit INSERT"
			}
			desc := fmt.Sprintf("client %d (%s), %s from %s", c.n, c.driver, what, began.Format("15:04:05.000"))
			w.longWhat.Store(&desc)
			return
		}
	}
}

// healed starts the recovery clock.
func (w *workload) healed(at time.Time) { w.healedAt.Store(at.UnixNano()) }

// recovery waits until every client has committed since the end of the
// fault, up to limit, and returns how long after it the first and the
// last of them did; ok is false when some had not within limit.
func (w *workload) recovery(limit time.Duration) (first, all time.Duration, ok bool) {
	h := w.healedAt.Load()
	deadline := time.Now().Add(limit)
	for {
		var times []int64
		for _, c := range w.clients {
			if r := c.recovered.Load(); r != 0 {
				times = append(times, r)
			}
		}
		if len(times) > 0 {
			first = time.Duration(slices.Min(times) - h)
		}
		if len(times) == len(w.clients) {
			return first, time.Duration(slices.Max(times) - h), true
		}
		if time.Now().After(deadline) {
			return first, 0, false
		}
		time.Sleep(10 * time.Millisecond) // commits are counted, not announced
	}
}

// waitCommits waits until n more transactions have committed, up to limit.
func (w *workload) waitCommits(n int64, limit time.Duration) bool {
	want := w.commits.Load() + n
	deadline := time.Now().Add(limit)
	for w.commits.Load() < want {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond) // commits are counted, not announced
	}
	return true
}

// waitEveryClient waits until every client has committed at least once.
func (w *workload) waitEveryClient(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		var idle []string
		for _, c := range w.clients {
			if c.commits.Load() == 0 {
				idle = append(idle, fmt.Sprintf("%d (%s)", c.n, c.driver))
			}
		}
		if len(idle) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			w.mu.Lock()
			defer w.mu.Unlock()
			return fmt.Errorf("clients %s committed nothing within %s; errors: %s", strings.Join(idle, ", "), limit, formatErrors(w.errs, w.example))
		}
		time.Sleep(10 * time.Millisecond) // commits are counted, not announced
	}
}

// formatErrors lists error counts by class, most frequent first.
func formatErrors(errs map[string]int, examples map[string][]string) string {
	if len(errs) == 0 {
		return "none"
	}
	classes := make([]string, 0, len(errs))
	for k := range errs {
		classes = append(classes, k)
	}
	sort.Slice(classes, func(i, j int) bool {
		if errs[classes[i]] != errs[classes[j]] {
			return errs[classes[i]] > errs[classes[j]]
		}
		return classes[i] < classes[j]
	})
	parts := make([]string, len(classes))
	for i, k := range classes {
		parts[i] = fmt.Sprintf("%s×%d", k, errs[k])
		if examples != nil && len(examples[k]) > 0 {
			parts[i] += fmt.Sprintf(" (%q)", examples[k][0])
		}
	}
	return strings.Join(parts, " ")
}
