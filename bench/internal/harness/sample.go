package harness

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// ControlApplication is the application_name of a governor's control
// connection.
const ControlApplication = "pggovernor-control"

// SamplerOptions configure a Sampler.
type SamplerOptions struct {
	// DSN connects as a superuser (the Unix socket of pgtest's clusters:
	// it needs no slot of the governors' budget).
	DSN string
	// Governor reports whether a role is one a governor logs in as; their
	// client backends are counted.
	Governor func(role string) bool
	// Servers is the most server connections (control connections apart)
	// the governors may have at once; 0 does not check.
	Servers int
	// Governors is the most connections the governors may have at once,
	// control connections included; 0 does not check.
	Governors int
	// Interval is the time between samples; 0 is 50 ms.
	Interval time.Duration
}

// Summary is what a Sampler saw.
type Summary struct {
	// Samples is the number of samples taken; Failed the attempts that
	// failed (the server down).
	Samples, Failed int
	// MaxServers and MaxGovernors are the most server connections, and
	// governor connections in all, seen in one sample.
	MaxServers, MaxGovernors int
	// Over is the number of samples above Servers or Governors; FirstOver
	// describes the first.
	Over      int
	FirstOver string
}

// Sampler counts the governors' connections in pg_stat_activity every
// interval until stopped, reconnecting when the server restarts.
type Sampler struct {
	o    SamplerOptions
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex
	sum  Summary
}

// StartSampler starts sampling. The caller must call Stop.
func StartSampler(o SamplerOptions) *Sampler {
	if o.Interval == 0 {
		o.Interval = 50 * time.Millisecond
	}
	s := &Sampler{o: o, stop: make(chan struct{}), done: make(chan struct{})}
	go s.run() // owner: s; exits at Stop
	return s
}

func (s *Sampler) run() {
	defer close(s.done)
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	t := time.NewTicker(s.o.Interval)
	defer t.Stop()
	for {
		if conn == nil || conn.IsClosed() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			conn, _ = pgx.Connect(ctx, s.o.DSN)
			cancel()
		}
		if conn != nil {
			s.sample(conn)
		} else {
			s.mu.Lock()
			s.sum.Failed++
			s.mu.Unlock()
		}
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
	}
}

// sample takes one sample.
func (s *Sampler) sample(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	rows, err := conn.Query(ctx, `SELECT coalesce(usename, ''), application_name = '`+ControlApplication+`', count(*)
		FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1, 2`)
	if err != nil {
		s.failed(conn)
		return
	}
	defer rows.Close()
	byRole := map[string]int{}
	servers, governors := 0, 0
	for rows.Next() {
		var role string
		var control bool
		var n int
		if err := rows.Scan(&role, &control, &n); err != nil {
			break
		}
		if !s.o.Governor(role) {
			continue
		}
		governors += n
		if !control {
			servers += n
			byRole[role] += n
		}
	}
	if rows.Err() != nil {
		s.failed(conn)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sum.Samples++
	s.sum.MaxServers, s.sum.MaxGovernors = max(s.sum.MaxServers, servers), max(s.sum.MaxGovernors, governors)
	if (s.o.Servers > 0 && servers > s.o.Servers) || (s.o.Governors > 0 && governors > s.o.Governors) {
		s.sum.Over++
		if s.sum.FirstOver == "" {
			s.sum.FirstOver = fmt.Sprintf("%s: %d server connections (limit %d), %d in all (limit %d): %s",
				time.Now().Format("15:04:05.000"), servers, s.o.Servers, governors, s.o.Governors, formatRoles(byRole))
		}
	}
}

func (s *Sampler) failed(conn *pgx.Conn) {
	if !conn.IsClosed() {
		// A query that failed on an open connection (a timeout): start
		// afresh rather than read a late answer as the next one's.
		conn.Close(context.Background())
	}
	s.mu.Lock()
	s.sum.Failed++
	s.mu.Unlock()
}

// Summary returns what was seen so far.
func (s *Sampler) Summary() Summary {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sum
}

// Stop ends sampling and returns what was seen.
func (s *Sampler) Stop() Summary {
	close(s.stop)
	<-s.done
	return s.Summary()
}

func formatRoles(m map[string]int) string {
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	parts := make([]string, len(names))
	for i, k := range names {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	return strings.Join(parts, " ")
}
