package main

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// clientsPerSourceIP bounds the connections made from one loopback source
// address: Linux picks ephemeral ports per (source address, destination),
// and ip_local_port_range holds about 28,000 of them by default.
const clientsPerSourceIP = 10000

// idleResult is the memory cost of idle clients on one pooler.
type idleResult struct {
	Target  string
	Want    int
	Opened  int
	RSS0    int64 // VmRSS with no clients, bytes
	RSS1    int64 // VmRSS with Opened clients logged in and idle
	Connect time.Duration
	Err     string
}

// perClientKiB is (RSS with N clients − RSS with none) / N in KiB.
func (r idleResult) perClientKiB() float64 {
	if r.Opened == 0 {
		return 0
	}
	return float64(r.RSS1-r.RSS0) / float64(r.Opened) / 1024
}

// runIdle measures, pooler by pooler, the RSS of n idle clients: each one
// fully logged in (md5, which costs one hash), then left idle. The poolers
// are restarted with md5 client authentication and room for n clients.
func runIdle(ctx context.Context, e *env, targets []target, n int, logf func(string, ...any)) ([]idleResult, error) {
	var out []idleResult
	for _, t := range targets {
		if t.Name() == targetDirect {
			continue
		}
		t.Stop()
		if err := t.Start(ctx, authMD5, n+100); err != nil {
			return out, fmt.Errorf("starting %s: %w", t.Name(), err)
		}
		// Each pooler gets its own source addresses 127.0.<10+k>.x: the
		// previous one's closed connections linger in TIME_WAIT on theirs.
		r := idleOne(ctx, t, n, byte(10+len(out)))
		t.Stop() // frees the memory and file descriptors for the next one
		out = append(out, r)
		logf("idle %s: %d/%d clients, RSS %.1f → %.1f MiB, %.2f KiB per client, connecting took %s %s",
			r.Target, r.Opened, r.Want, float64(r.RSS0)/(1<<20), float64(r.RSS1)/(1<<20), r.perClientKiB(), r.Connect.Round(time.Millisecond), r.Err)
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
	}
	return out, nil
}

// idleOne opens n clients to one pooler, from source addresses
// 127.0.<net>.2 and up, and measures its RSS.
func idleOne(ctx context.Context, t target, n int, net3 byte) idleResult {
	r := idleResult{Target: t.Name(), Want: n}
	pid := t.PID()
	time.Sleep(500 * time.Millisecond) // let the start-up settle
	var err error
	if r.RSS0, err = statusBytes(pid, "VmRSS"); err != nil {
		r.Err = err.Error()
		return r
	}
	cfg, err := pgconn.ParseConfig(t.Endpoint().dsn())
	if err != nil {
		r.Err = err.Error()
		return r
	}
	var next atomic.Int64
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		// Spread connections over 127.0.<net3>.2, .3, ... so that more
		// than ~28,000 fit in the ephemeral port range.
		i := next.Add(1) - 1
		d := *dialer
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, net3, byte(2+i/clientsPerSourceIP))}
		return d.DialContext(ctx, network, addr)
	}

	conns := make([]*pgconn.PgConn, n)
	var failures atomic.Int64
	var firstErr sync.Once
	var work atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range 32 {
		wg.Add(1)
		go func() { // owner: idleOne; ends when the work is handed out
			defer wg.Done()
			for {
				i := int(work.Add(1) - 1)
				if i >= n || ctx.Err() != nil || failures.Load() > 100 {
					return
				}
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				c, err := pgconn.ConnectConfig(cctx, cfg)
				cancel()
				if err != nil {
					failures.Add(1)
					firstErr.Do(func() { r.Err = "first failure: " + err.Error() })
					continue
				}
				conns[i] = c
			}
		}()
	}
	wg.Wait()
	r.Connect = time.Since(start)
	for _, c := range conns {
		if c != nil {
			r.Opened++
		}
	}
	if f := failures.Load(); f > 0 {
		r.Err = fmt.Sprintf("%d connections failed; %s", f, r.Err)
	}
	time.Sleep(time.Second) // let the pooler finish with the logins
	r.RSS1, err = statusBytes(pid, "VmRSS")
	if err != nil && r.Err == "" {
		r.Err = err.Error()
	}
	closeAll(conns)
	return r
}

// closeAll closes the connections, 32 at a time.
func closeAll(conns []*pgconn.PgConn) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for _, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() { // owner: closeAll; ends after one close
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = c.Close(ctx)
			cancel()
			<-sem
		}()
	}
	wg.Wait()
}

// writeIdleTable writes the idle-mode results.
func writeIdleTable(b *strings.Builder, res []idleResult) {
	fmt.Fprintf(b, "## Idle clients\n\n")
	fmt.Fprintf(b, "Each client logged in with md5 and then idle; RSS per client = (VmRSS with N clients − VmRSS with none) / N.\n\n")
	fmt.Fprintf(b, "| target | clients wanted | clients open | RSS idle MiB | RSS with clients MiB | KiB per client | connect time | errors |\n")
	fmt.Fprintf(b, "|---|---:|---:|---:|---:|---:|---:|---|\n")
	for _, r := range res {
		fmt.Fprintf(b, "| %s | %d | %d | %.1f | %.1f | %.2f | %s | %s |\n", r.Target, r.Want, r.Opened,
			float64(r.RSS0)/(1<<20), float64(r.RSS1)/(1<<20), r.perClientKiB(), r.Connect.Round(time.Millisecond), r.Err)
	}
	fmt.Fprintf(b, "\n")
}
