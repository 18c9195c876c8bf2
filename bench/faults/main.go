// Command faults is pggovernor's fault suite: a writer workload (clients
// inserting unique ids through the real binary, half with pgx and half
// with lib/pq, in autocommit and in transactions, every acknowledged
// COMMIT recorded) while it injects a fault — Postgres restarted,
// pg_terminate_backend on random server connections, a black-hole between
// the governor and Postgres, a hard cut of that path, SIGKILL and SIGTERM
// of the governor, and in cluster mode the partition of one replica from
// Postgres — then heals it. For every fault it checks that no acknowledged
// row is missing (and no row of a transaction that failed before COMMIT
// is present), that the governors' connections never exceeded the budget
// (pg_stat_activity sampled every 50 ms), that no connection was left idle
// in a transaction, and that every client committed again within
// -recovery; it prints a table of fault, acknowledged, missing, unknown,
// errors by SQLSTATE and recovery time, and exits non-zero on any
// violation.
//
// Black-holes and partitions drop packets for real where the machine
// allows it (root: the governor runs in a network namespace of its own,
// joined by a veth pair whose frames are then silently discarded, so that
// both kernels see their segments go unanswered); elsewhere a forwarder
// in the suite stops relaying without closing anything, which only the
// governor's own deadlines can notice. The name of the fault says which.
//
//	make faults                               # the full suite: 3 rounds, 32 clients
//	cd bench && go run ./faults -short        # what make test runs
//	cd bench && go run ./faults -only SIGKILL -rounds 10 -keep
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	short := flag.Bool("short", false, "each fault once, briefly (what make test runs)")
	o := fullOptions()
	flag.IntVar(&o.clients, "clients", o.clients, "writer clients per fault")
	flag.DurationVar(&o.hold, "hold", o.hold, "how long a fault lasts")
	flag.DurationVar(&o.partition, "partition", o.partition, "how long a replica's partition lasts")
	flag.IntVar(&o.rounds, "rounds", o.rounds, "times each fault runs")
	flag.DurationVar(&o.recovery, "recovery", o.recovery, "the longest recovery that is not a violation")
	flag.StringVar(&o.only, "only", "", "run only the faults whose name contains this")
	flag.BoolVar(&o.race, "race", false, "build the governor with the race detector")
	flag.StringVar(&o.governor, "governor", "", "pggovernor binary (default: build ./cmd/pggovernor)")
	flag.StringVar(&o.netns, "netns", "auto", "run partitioned governors in network namespaces: auto, on, off")
	flag.BoolVar(&o.keep, "keep", false, "keep the governors' logs (their directory is printed)")
	flag.StringVar(&o.logLevel, "log-level", o.logLevel, "the governors' log.level (their logs are kept with -keep)")
	flag.BoolVar(&o.verbose, "v", false, "print each fault's phases and the clients' error messages")
	flag.Parse()
	if *short {
		// -short sets the defaults; flags given explicitly still win.
		set := map[string]bool{}
		flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
		s := shortOptions()
		if !set["clients"] {
			o.clients = s.clients
		}
		if !set["hold"] {
			o.hold = s.hold
		}
		if !set["partition"] {
			o.partition = s.partition
		}
		if !set["rounds"] {
			o.rounds = s.rounds
		}
		if !set["recovery"] {
			o.recovery = s.recovery
		}
		o.opTimeout = s.opTimeout
		o.short = true
	}
	o.out = os.Stdout
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "faults:", err)
		os.Exit(1)
	}
}

// run runs the suite and prints the table; the error lists the
// violations.
func run(ctx context.Context, o options) error {
	s, err := newSuite(ctx, o)
	if err != nil {
		return err
	}
	defer s.close()
	if s.netErr != nil {
		fmt.Fprintf(o.out, "black-holes and partitions through a stalling forwarder: network namespaces are not available (%v)\n", s.netErr)
	}
	if o.keep {
		fmt.Fprintf(o.out, "logs in %s\n", s.dir)
	}
	rs := s.run(ctx, s.faults())
	fmt.Fprintln(o.out)
	table(o.out, rs)
	n := 0
	for _, r := range rs {
		n += len(r.violations)
	}
	if n > 0 {
		return fmt.Errorf("%d violation(s); run with -keep for the governors' logs", n)
	}
	if len(rs) == 0 {
		return fmt.Errorf("no fault matched -only %q (faults: %s)", o.only, names(s.faults()))
	}
	return ctx.Err()
}
