package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/bench/internal/harness"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// options shape one run of the suite.
type options struct {
	short     bool          // make test's suite: the faults marked full are left out
	clients   int           // writer clients of a case (shared out among replicas)
	hold      time.Duration // how long a fault lasts
	partition time.Duration // how long the partition of a replica lasts
	rounds    int           // times each fault runs
	recovery  time.Duration // the longest recovery that is not a violation
	queryWait time.Duration // timeouts.query_wait
	opTimeout time.Duration // the clients' deadline for one operation
	only      string        // run the faults whose name contains this
	race      bool          // build the governor with the race detector
	governor  string        // a pggovernor binary to use instead of building one
	netns     string        // auto, on, off: governors in network namespaces for silent drops
	keep      bool          // keep the logs' directory
	verbose   bool          // print each case's phases and error messages
	logLevel  string        // the governors' log.level
	out       io.Writer     // progress and the table
}

// shortOptions are make test's: each fault once, briefly.
func shortOptions() options {
	return options{short: true, clients: 12, hold: 1500 * time.Millisecond, partition: 6 * time.Second, rounds: 1,
		recovery: 20 * time.Second, queryWait: 10 * time.Second, opTimeout: 30 * time.Second, netns: "auto", logLevel: "info", out: io.Discard}
}

// fullOptions are make faults': more clients, longer faults, three
// rounds.
func fullOptions() options {
	return options{clients: 32, hold: 5 * time.Second, partition: 10 * time.Second, rounds: 3,
		recovery: 30 * time.Second, queryWait: 10 * time.Second, opTimeout: 60 * time.Second, netns: "auto", logLevel: "info", out: os.Stdout}
}

// fault is one case of the suite. inject starts the fault and returns
// once it is in effect (it may last: a restart, a kill); heal ends it, and
// the recovery clock starts when it returns; verify, if set, adds
// violations of the fault's own. The suite runs the workload, samples the
// budget and checks the invariants around them.
type fault struct {
	name string
	// replicas is the number of governors, sharing a budget
	// (budget.cluster) when more than one.
	replicas int
	// full is set on the faults only make faults runs (too long for make
	// test's short suite).
	full bool
	// links makes the link of each replica (index i); nil: a forwarder for
	// a governor alone, direct for replicas.
	links  func(s *suite, i int) (link, error)
	inject func(ctx context.Context, e *env) error
	heal   func(ctx context.Context, e *env) error
	verify func(ctx context.Context, e *env) []string
}

// env is one running case: its governors and workload.
type env struct {
	s     *suite
	f     fault
	table string
	govs  []*gov
	wl    *workload
	stop  chan struct{} // closed when the fault's goroutines must end
}

// result is one row of the table.
type result struct {
	fault                                string
	round                                int
	acked, missing, unknown, unknownInDB int
	aborted, phantom                     int
	errs                                 map[string]int
	examples                             map[string][]string
	first, all                           time.Duration
	recovered                            bool
	longest                              time.Duration // the longest client operation
	budget                               harness.Summary
	violations                           []string
	took                                 time.Duration
}

// suite is one run: a Postgres, the binary, the faults.
type suite struct {
	o      options
	dir    string
	bin    string
	users  string
	pg     *pgtest.Cluster
	netErr error // why governors cannot run in network namespaces; nil when they can
	nsN    int   // network namespaces made so far
	caseN  int
}

// newSuite builds the binary (unless given) and starts Postgres. The
// caller must call close.
func newSuite(ctx context.Context, o options) (*suite, error) {
	s := &suite{o: o}
	var err error
	if s.dir, err = os.MkdirTemp("", "pggovernor-faults-"); err != nil {
		return nil, err
	}
	if err := os.Chmod(s.dir, 0o755); err != nil {
		return nil, err
	}
	s.bin = o.governor
	if s.bin == "" {
		if s.bin, err = harness.Build(ctx, s.dir, o.race); err != nil {
			s.close()
			return nil, err
		}
	}
	switch o.netns {
	case "off":
		s.netErr = errors.New("-netns off")
	default:
		// Postgres is not started yet: the check's pair carries nothing.
		s.netErr = netnsWorks(1)
		if s.netErr != nil && o.netns == "on" {
			s.close()
			return nil, fmt.Errorf("-netns on: %w", s.netErr)
		}
	}
	po := pgtest.Options{MaxConnections: maxConnections}
	if s.netErr == nil {
		// The governors in namespaces reach Postgres through their pairs.
		po.Settings = map[string]string{"listen_addresses": "'*'"}
		po.HBA = []string{"host all all 127.0.0.1/32 scram-sha-256", "host all all " + nsSubnet + " scram-sha-256"}
	}
	if s.pg, err = pgtest.Start(ctx, po); err != nil {
		s.close()
		return nil, err
	}
	if err := s.setup(ctx); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// governorRoles are the upstream roles: fsingle for a governor alone,
// frep1 to frep3 for replicas.
var governorRoles = []string{"fsingle", "frep1", "frep2", "frep3"}

func (s *suite) setup(ctx context.Context) error {
	stmts := []string{"CREATE DATABASE " + database}
	for _, r := range governorRoles {
		stmts = append(stmts, fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'", r, password))
	}
	for _, q := range stmts {
		if _, err := s.pg.Exec(ctx, q); err != nil {
			return err
		}
	}
	all := strings.Join(governorRoles, ", ")
	// Whichever replica creates the membership table, the others may use it.
	if _, err := s.pg.ExecIn(ctx, database, "GRANT USAGE, CREATE ON SCHEMA public TO "+all+
		"; ALTER DEFAULT PRIVILEGES FOR ROLE "+all+" IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "+all); err != nil {
		return err
	}
	s.users = filepath.Join(s.dir, "userlist.txt")
	return os.WriteFile(s.users, []byte(fmt.Sprintf("%q %q\n", clientUser, password)), 0o600)
}

func (s *suite) close() {
	if s.pg != nil {
		s.pg.Close()
	}
	if s.dir != "" && !s.o.keep {
		_ = os.RemoveAll(s.dir)
	}
}

// dropLink is the link of a governor that a fault partitions: a network
// namespace where the machine allows, else a stalling forwarder.
func (s *suite) dropLink() (link, error) {
	if s.netErr == nil {
		s.nsN++
		return newNetns(s.nsN, s.pg.Port)
	}
	return newForwarder(s.pg.Addr())
}

// dropKind says how dropLink drops, for the fault's name.
func (s *suite) dropKind() string {
	if s.netErr == nil {
		return "packets dropped"
	}
	return "forwarder stalled"
}

// runCase runs one fault once and checks the invariants.
func (s *suite) runCase(ctx context.Context, f fault, round int) (r result) {
	began := time.Now()
	s.caseN++
	r = result{fault: f.name, round: round}
	defer func() { r.took = time.Since(began) }()
	violate := func(format string, args ...any) { r.violations = append(r.violations, fmt.Sprintf(format, args...)) }
	phase := func(what string) {
		if s.o.verbose {
			fmt.Fprintf(s.o.out, "    %6.2fs %s\n", time.Since(began).Seconds(), what)
		}
	}
	e := &env{s: s, f: f, table: fmt.Sprintf("writes_%d", s.caseN), stop: make(chan struct{})}
	name := fmt.Sprintf("case%d", s.caseN)
	if _, err := s.pg.ExecIn(ctx, database, fmt.Sprintf(`CREATE TABLE %s (id bigint PRIMARY KEY, client int NOT NULL);
		GRANT INSERT, SELECT ON %s TO %s`, e.table, e.table, strings.Join(governorRoles, ", "))); err != nil {
		violate("setup: %v", err)
		return r
	}
	roles := []string{"fsingle"}
	var ns int32
	if f.replicas > 1 {
		roles = governorRoles[1 : 1+f.replicas]
		ns = 0x6661 + int32(s.caseN)
	}
	defer func() {
		for _, g := range e.govs {
			_ = g.stop()
			g.link.close()
		}
	}()
	for i, role := range roles {
		var l link
		var err error
		switch {
		case f.links != nil:
			l, err = f.links(s, i)
		case f.replicas > 1:
			l = direct(s.pg.Addr())
		default:
			l, err = newForwarder(s.pg.Addr())
		}
		if err != nil {
			violate("link of %s: %v", role, err)
			return r
		}
		g, err := s.newGov(name, role, ns, l)
		if err != nil {
			l.close()
			violate("%v", err)
			return r
		}
		e.govs = append(e.govs, g)
		if err := g.start(ctx); err != nil {
			violate("%v", err)
			return r
		}
	}
	limit := harness.SamplerOptions{DSN: s.pg.SuperuserDSN("postgres"), Governor: func(role string) bool { return slices.Contains(roles, role) },
		Servers: capacity - 1, Governors: capacity}
	if f.replicas > 1 {
		limit.Servers = capacity - 1 // the leases: one slot is kept free for a joining replica
	}
	sampler := harness.StartSampler(limit)
	dsns := make([]string, s.o.clients)
	for i := range dsns {
		dsns[i] = e.govs[i%len(e.govs)].dsn()
	}
	e.wl = startWorkload(e.table, dsns, s.o.opTimeout)
	stopped := false
	stopWorkload := func() {
		if !stopped {
			stopped = true
			if stuck := e.wl.stop(10 * time.Second); len(stuck) > 0 {
				violate("clients stuck in an operation 10 s after the workload ended: %s", strings.Join(stuck, ", "))
			}
		}
	}
	defer stopWorkload()
	if err := e.wl.waitEveryClient(30 * time.Second); err != nil {
		violate("before the fault: %v", err)
		return r
	}
	e.wl.waitCommits(int64(3*s.o.clients), 10*time.Second)
	phase("workload running")
	if err := f.inject(ctx, e); err != nil {
		violate("inject: %v", err)
	}
	if err := f.heal(ctx, e); err != nil {
		violate("heal: %v", err)
	}
	close(e.stop)
	e.wl.healed(time.Now())
	phase("fault healed")
	r.first, r.all, r.recovered = e.wl.recovery(s.o.recovery)
	if !r.recovered {
		var late []string
		for _, c := range e.wl.clients {
			if c.recovered.Load() == 0 {
				late = append(late, fmt.Sprintf("%d (%s, via %s)", c.n, c.driver, e.govs[c.n%len(e.govs)].role))
			}
		}
		violate("no commit within %s of the end of the fault from clients %s", s.o.recovery, strings.Join(late, ", "))
	} else {
		e.wl.waitCommits(int64(3*s.o.clients), 10*time.Second)
	}
	phase("recovered")
	if f.verify != nil {
		r.violations = append(r.violations, f.verify(ctx, e)...)
	}
	stopWorkload()
	phase("workload stopped")

	// No governor connection may stay in a transaction once its clients
	// are gone.
	if left := s.waitNoneInTransaction(ctx, roles, 5*time.Second); left != "" {
		violate("connections left in a transaction after the clients left: %s", left)
	}
	for _, g := range e.govs {
		if err := g.stop(); err != nil {
			violate("%v", err)
		}
	}
	phase("governors stopped")
	if left := s.waitNoBackends(ctx, roles, 10*time.Second); left != "" {
		violate("backends left behind 10 s after the governors stopped: %s", left)
	}
	phase("no backend left")
	r.budget = sampler.Stop()
	if r.budget.Over > 0 {
		violate("the budget was exceeded in %d samples of %d, first at %s", r.budget.Over, r.budget.Samples, r.budget.FirstOver)
	}
	s.account(ctx, e, &r, violate)
	return r
}

// account compares the workload's record with the table.
func (s *suite) account(ctx context.Context, e *env, r *result, violate func(string, ...any)) {
	w := e.wl
	w.mu.Lock()
	acked, aborted, unknown := slices.Clone(w.acked), slices.Clone(w.aborted), slices.Clone(w.unknown)
	r.errs, r.examples = w.errs, w.example
	w.mu.Unlock()
	r.acked, r.unknown, r.aborted = len(acked), len(unknown), len(aborted)
	r.longest = time.Duration(w.longest.Load())
	conn, err := pgx.Connect(ctx, s.pg.SuperuserDSN(database))
	if err != nil {
		violate("reading the table: %v", err)
		return
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, "SELECT id FROM "+e.table)
	if err != nil {
		violate("reading the table: %v", err)
		return
	}
	present := map[int64]bool{}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			violate("reading the table: %v", err)
			return
		}
		present[id] = true
	}
	if err := rows.Err(); err != nil {
		violate("reading the table: %v", err)
		return
	}
	var missing, phantom []string
	for _, id := range acked {
		if !present[id] {
			r.missing++
			if len(missing) < 10 {
				missing = append(missing, strconv.FormatInt(id, 10))
			}
		}
	}
	for _, id := range aborted {
		if present[id] {
			r.phantom++
			if len(phantom) < 10 {
				phantom = append(phantom, strconv.FormatInt(id, 10))
			}
		}
	}
	for _, id := range unknown {
		if present[id] {
			r.unknownInDB++
		}
	}
	if r.missing > 0 {
		violate("%d acknowledged commits missing from the table (ids %s)", r.missing, strings.Join(missing, ", "))
	}
	if r.phantom > 0 {
		violate("%d rows of transactions that failed before COMMIT are in the table (ids %s)", r.phantom, strings.Join(phantom, ", "))
	}
	if r.acked == 0 {
		violate("nothing was acknowledged")
	}
	if n := r.errs["protocol"]; n > 0 {
		violate("%d client errors are protocol violations: %s", n, strings.Join(r.examples["protocol"], "; "))
	}
}

// waitNoneInTransaction waits until no backend of roles is in a
// transaction with nothing running, and describes those left otherwise.
func (s *suite) waitNoneInTransaction(ctx context.Context, roles []string, limit time.Duration) string {
	return s.waitEmpty(ctx, `SELECT usename || ' pid ' || pid || ' ' || state || ' for ' || round(extract(epoch FROM now() - state_change)::numeric, 1) || ' s after ' || left(query, 60)
		FROM pg_stat_activity WHERE usename IN (`+roleList(roles)+`) AND state LIKE 'idle in transaction%'`, limit)
}

// waitNoBackends waits until no backend of roles is left.
func (s *suite) waitNoBackends(ctx context.Context, roles []string, limit time.Duration) string {
	return s.waitEmpty(ctx, `SELECT usename || ' pid ' || pid || ' ' || coalesce(state, '') || ' ' || application_name
		FROM pg_stat_activity WHERE usename IN (`+roleList(roles)+`)`, limit)
}

// waitEmpty polls a query until it returns no row, up to limit, and
// returns its last rows otherwise.
func (s *suite) waitEmpty(ctx context.Context, q string, limit time.Duration) string {
	deadline := time.Now().Add(limit)
	for {
		rows, err := s.pg.Exec(ctx, q)
		if err == nil && len(rows) == 0 {
			return ""
		}
		if time.Now().After(deadline) {
			if err != nil {
				return err.Error()
			}
			var out []string
			for _, r := range rows {
				out = append(out, r[0])
			}
			return strings.Join(out, "; ")
		}
		time.Sleep(50 * time.Millisecond) // rows of pg_stat_activity: nothing announces them
	}
}

// run runs every fault o.rounds times and returns the results.
func (s *suite) run(ctx context.Context, faults []fault) []result {
	var out []result
	for round := 1; round <= s.o.rounds; round++ {
		for _, f := range faults {
			if s.o.only != "" && !strings.Contains(f.name, s.o.only) || f.full && s.o.short {
				continue
			}
			if ctx.Err() != nil {
				return out
			}
			r := s.runCase(ctx, f, round)
			out = append(out, r)
			status := "ok"
			if len(r.violations) > 0 {
				status = "VIOLATED"
			}
			fmt.Fprintf(s.o.out, "%s  round %d  %-45s %s in %s\n", time.Now().Format("15:04:05"), round, f.name, status, r.took.Round(100*time.Millisecond))
			for _, v := range r.violations {
				fmt.Fprintf(s.o.out, "    %s\n", v)
			}
			if s.o.verbose {
				for class, ms := range r.examples {
					for _, m := range ms {
						fmt.Fprintf(s.o.out, "    error %s: %s\n", class, m)
					}
				}
			}
		}
	}
	return out
}

// table writes the results as a Markdown table.
func table(w io.Writer, rs []result) {
	fmt.Fprintln(w, "| fault | round | acknowledged | missing | unknown (in table) | aborted (in table) | errors by SQLSTATE | recovery: first / every client | longest operation | peak servers / all (limit) | result |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range rs {
		rec := "—"
		switch {
		case r.recovered:
			rec = fmt.Sprintf("%s / %s", r.first.Round(time.Millisecond), r.all.Round(time.Millisecond))
		case r.first > 0:
			rec = fmt.Sprintf("%s / not all", r.first.Round(time.Millisecond))
		}
		status := "ok"
		if len(r.violations) > 0 {
			status = fmt.Sprintf("**%d violation(s)**", len(r.violations))
		}
		fmt.Fprintf(w, "| %s | %d | %d | %d | %d (%d) | %d (%d) | %s | %s | %s | %d / %d (%d) | %s |\n", r.fault, r.round, r.acked, r.missing,
			r.unknown, r.unknownInDB, r.aborted, r.phantom, formatErrors(r.errs, nil), rec, r.longest.Round(time.Millisecond),
			r.budget.MaxServers, r.budget.MaxGovernors, capacity, status)
	}
}
