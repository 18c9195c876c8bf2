package main

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"time"
)

// faults is the suite. Each is a small value: a name, how many governors
// and through which links, inject, heal and optional checks of its own;
// the workload, the budget's sampling, the accounting and the table are
// the suite's.
func (s *suite) faults() []fault {
	hold := func(ctx context.Context, d time.Duration) {
		t := time.NewTimer(d)
		defer t.Stop()
		select { // the fault lasts this long
		case <-ctx.Done():
		case <-t.C:
		}
	}
	noop := func(context.Context, *env) error { return nil }
	dropLink := func(s *suite, i int) (link, error) { return s.dropLink() }
	return []fault{
		{
			name:     "postgres restart (fast shutdown, start)",
			replicas: 1,
			inject: func(ctx context.Context, e *env) error {
				e.s.pg.Stop()
				hold(ctx, e.s.o.hold/2)
				return nil
			},
			heal: func(ctx context.Context, e *env) error { return e.s.pg.Restart(ctx, nil) },
		},
		{
			name:     "pg_terminate_backend, random server connections",
			replicas: 1,
			inject: func(ctx context.Context, e *env) error {
				return e.terminateRandomly(ctx, e.s.o.hold)
			},
			heal: noop,
		},
		{
			name:     "black-hole to postgres (" + s.dropKind() + ")",
			replicas: 1,
			links:    dropLink,
			inject: func(ctx context.Context, e *env) error {
				if err := e.govs[0].link.drop(); err != nil {
					return err
				}
				hold(ctx, e.s.o.hold)
				return nil
			},
			heal: func(ctx context.Context, e *env) error { return e.govs[0].link.heal() },
		},
		{
			// Longer than every deadline of the governor's (the control
			// connection's probe gives up after timeouts.server_connect,
			// an idle connection's check after 5 s, a silent server after
			// timeouts.server_unreachable): the governor replaces
			// connections whose server end it cannot close, which the
			// server must have dropped by then for the budget to hold.
			name:     "long black-hole to postgres (" + s.dropKind() + ")",
			replicas: 1,
			full:     true,
			links:    dropLink,
			inject: func(ctx context.Context, e *env) error {
				if err := e.govs[0].link.drop(); err != nil {
					return err
				}
				hold(ctx, 4*e.s.o.hold)
				return nil
			},
			heal: func(ctx context.Context, e *env) error { return e.govs[0].link.heal() },
		},
		{
			name:     "hard cut to postgres (forwarder resets)",
			replicas: 1,
			inject: func(ctx context.Context, e *env) error {
				if err := e.govs[0].link.cut(); err != nil {
					return err
				}
				hold(ctx, e.s.o.hold/2)
				return nil
			},
			heal: func(ctx context.Context, e *env) error { return e.govs[0].link.heal() },
		},
		{
			name:     "SIGKILL of the governor, restart",
			replicas: 1,
			inject: func(ctx context.Context, e *env) error {
				if err := e.govs[0].signal(syscall.SIGKILL, 10*time.Second); err != nil {
					return err
				}
				hold(ctx, e.s.o.hold/4)
				return nil
			},
			heal: func(ctx context.Context, e *env) error { return e.govs[0].start(ctx) },
		},
		{
			name:     "SIGTERM of the governor (drain), restart",
			replicas: 1,
			inject: func(ctx context.Context, e *env) error {
				g := e.govs[0]
				began := time.Now()
				if err := g.signal(syscall.SIGTERM, drain+5*time.Second); err != nil {
					return err
				}
				if err := g.proc.Err(); err != nil {
					return fmt.Errorf("exit status after SIGTERM: %v (after %s)", err, time.Since(began).Round(time.Millisecond))
				}
				return nil
			},
			heal: func(ctx context.Context, e *env) error { return e.govs[0].start(ctx) },
		},
		{
			name:     "cluster: one of 3 replicas partitioned from postgres (" + s.dropKind() + ")",
			replicas: 3,
			links: func(s *suite, i int) (link, error) {
				if i == 2 {
					return s.dropLink()
				}
				return direct(s.pg.Addr()), nil
			},
			inject: func(ctx context.Context, e *env) error {
				if err := e.govs[2].link.drop(); err != nil {
					return err
				}
				hold(ctx, e.s.o.partition)
				return nil
			},
			heal: func(ctx context.Context, e *env) error { return e.govs[2].link.heal() },
		},
	}
}

// terminateRandomly terminates, every 100 ms for d, a random half of the
// governors' server connections (never a control connection), and counts
// them.
func (e *env) terminateRandomly(ctx context.Context, d time.Duration) error {
	roles := make([]string, len(e.govs))
	for i, g := range e.govs {
		roles[i] = g.role
	}
	end := time.Now().Add(d)
	total := 0
	for time.Now().Before(end) && ctx.Err() == nil {
		rows, err := e.s.pg.Exec(ctx, fmt.Sprintf(`SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
			WHERE usename IN (%s) AND application_name <> 'pggovernor-control' AND backend_type = 'client backend' AND random() < 0.5`,
			roleList(roles)))
		if err != nil {
			return err
		}
		if len(rows) == 1 {
			var n int
			fmt.Sscan(rows[0][0], &n)
			total += n
		}
		time.Sleep(100 * time.Millisecond) // the fault's pace
	}
	if total == 0 {
		return fmt.Errorf("no server connection was terminated in %s", d)
	}
	return nil
}

// names lists the faults' names.
func names(fs []fault) string {
	var out []string
	for _, f := range fs {
		out = append(out, f.name)
	}
	return strings.Join(out, "; ")
}
