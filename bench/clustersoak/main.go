// Command clustersoak runs pggovernor replicas sharing one budget
// (budget.cluster) in front of one ephemeral Postgres for a long time,
// under load, while it injects faults: kill -9 and restart, SIGTERM and
// restart, pg_terminate_backend on a control connection, and load moving
// between replicas. It samples pg_stat_activity every 50 ms and reports
// the largest number of governor connections seen against the budget,
// the client errors that no fault explains, and how long the shares took
// to be fair again after each kind of fault. It exits non-zero when the
// budget was exceeded or a client saw an unexplained error.
//
// Run it from inside the repository (the tests of make test cover the same
// ground in a minute; this is the long run):
//
//	make soak                                        # 5 minutes, 3 replicas × 50 clients
//	cd bench && go run ./clustersoak -duration 30m -replicas 4 -fault-every 10s
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/bench/internal/harness"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

const (
	password  = "soak-pw"
	namespace = 4711
)

type options struct {
	duration, faultEvery, heartbeat, memberTimeout time.Duration
	replicas, clients, maxConns, reserve           int
	governor                                       string
	seed                                           uint64
}

func main() {
	var o options
	flag.DurationVar(&o.duration, "duration", 5*time.Minute, "how long to run")
	flag.DurationVar(&o.faultEvery, "fault-every", 15*time.Second, "time between faults")
	flag.DurationVar(&o.heartbeat, "heartbeat", 200*time.Millisecond, "budget.cluster.heartbeat_interval")
	flag.DurationVar(&o.memberTimeout, "member-timeout", 2*time.Second, "budget.cluster.member_timeout")
	flag.IntVar(&o.replicas, "replicas", 3, "pggovernor replicas")
	flag.IntVar(&o.clients, "clients", 50, "clients per replica")
	flag.IntVar(&o.maxConns, "max-connections", 30, "Postgres max_connections")
	flag.IntVar(&o.reserve, "reserve", 2, "budget.reserve (the soak's own connections)")
	flag.StringVar(&o.governor, "governor", "", "pggovernor binary (default: build ./cmd/pggovernor)")
	flag.Uint64Var(&o.seed, "seed", uint64(time.Now().UnixNano()), "seed of the fault schedule")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "clustersoak:", err)
		os.Exit(1)
	}
}

// soak is one run.
type soak struct {
	o     options
	pg    *pgtest.Cluster
	bin   string
	users string
	dir   string

	mu       sync.Mutex
	slots    []*slot
	unknown  []string // client errors no fault explains
	recovery map[string][]time.Duration
}

// slot is one replica position: its process, restarted by faults, and the
// clients driving it.
type slot struct {
	role   string
	proc   *harness.Process       // nil while a fault has it down
	addr   atomic.Pointer[string] // "" while a fault has it down
	epoch  atomic.Int64           // bumped when a fault ends the process
	active atomic.Int64           // clients that run transactions (the rest idle)
}

func run(ctx context.Context, o options) error {
	s := &soak{o: o, recovery: map[string][]time.Duration{}}
	var err error
	if s.dir, err = os.MkdirTemp("", "clustersoak-"); err != nil {
		return err
	}
	defer os.RemoveAll(s.dir)
	s.bin = o.governor
	if s.bin == "" {
		if s.bin, err = harness.Build(ctx, s.dir, false); err != nil {
			return err
		}
	}
	if s.pg, err = pgtest.Start(ctx, pgtest.Options{MaxConnections: o.maxConns}); err != nil {
		return err
	}
	defer s.pg.Close()
	if err := s.setup(ctx); err != nil {
		return err
	}
	for i := 0; i < o.replicas; i++ {
		sl := &slot{role: fmt.Sprintf("soak%d", i+1)}
		sl.active.Store(int64(o.clients))
		s.slots = append(s.slots, sl)
		if err := s.start(ctx, sl); err != nil {
			return err
		}
	}
	defer func() {
		for _, sl := range s.slots {
			if sl.proc != nil {
				sl.proc.Stop()
			}
		}
	}()
	runCtx, cancel := context.WithTimeout(ctx, o.duration)
	defer cancel()
	sampler := harness.StartSampler(harness.SamplerOptions{DSN: s.pg.SuperuserDSN("postgres"),
		Governor: func(role string) bool { return strings.HasPrefix(role, "soak") }, Governors: s.capacity()})
	var wg sync.WaitGroup
	for _, sl := range s.slots {
		for c := 0; c < o.clients; c++ {
			wg.Add(1)
			go func() { defer wg.Done(); s.client(runCtx, sl, c) }()
		}
	}
	s.faults(runCtx)
	wg.Wait()
	return s.report(sampler.Stop())
}

func (s *soak) setup(ctx context.Context) error {
	stmts := []string{"CREATE DATABASE soak"}
	var roles []string
	for i := 1; i <= s.o.replicas; i++ {
		roles = append(roles, fmt.Sprintf("soak%d", i))
		stmts = append(stmts, fmt.Sprintf("CREATE ROLE soak%d LOGIN PASSWORD '%s'", i, password))
	}
	for _, q := range stmts {
		if _, err := s.pg.Exec(ctx, q); err != nil {
			return err
		}
	}
	all := strings.Join(roles, ", ")
	if _, err := s.pg.ExecIn(ctx, "soak", `CREATE TABLE work (replica text, n bigint);
		GRANT ALL ON work TO `+all+`; GRANT USAGE, CREATE ON SCHEMA public TO `+all+`;
		ALTER DEFAULT PRIVILEGES FOR ROLE `+all+` IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO `+all); err != nil {
		return err
	}
	s.users = filepath.Join(s.dir, "userlist.txt")
	return os.WriteFile(s.users, []byte(fmt.Sprintf("%q %q\n", "client", password)), 0o600)
}

// start runs the slot's replica and waits until it listens.
func (s *soak) start(ctx context.Context, sl *slot) error {
	p, err := harness.Start(ctx, harness.Spec{Bin: s.bin, Log: filepath.Join(s.dir, sl.role+".log"),
		Env: []string{"PGGOVERNOR_UPSTREAM_PASSWORD=" + password},
		Args: []string{"--listen=127.0.0.1:0", "--admin-listen=",
			"--upstream-url=" + s.pg.URL(sl.role, "", "soak"), "--clients.users-file=" + s.users,
			"--clients.max-connections=1000", "--timeouts.query-wait=60s", "--timeouts.shutdown-drain=2s",
			"--budget.reserve=" + strconv.Itoa(s.o.reserve), "--budget.cluster.enabled",
			"--budget.cluster.namespace=" + strconv.Itoa(namespace),
			"--budget.cluster.heartbeat-interval=" + s.o.heartbeat.String(),
			"--budget.cluster.member-timeout=" + s.o.memberTimeout.String(), "--log.level=warn"}})
	if err != nil {
		return fmt.Errorf("%s: %w", sl.role, err)
	}
	sl.proc = p
	sl.addr.Store(&p.Addr)
	return nil
}

// client runs transactions through its slot's replica while it is among the
// slot's active clients; an error is explained when the slot's replica was
// ended by a fault since the client connected.
func (s *soak) client(ctx context.Context, sl *slot, i int) {
	for ctx.Err() == nil {
		epoch := sl.epoch.Load()
		addr := *sl.addr.Load()
		if addr == "" { // the replica is down
			time.Sleep(100 * time.Millisecond) // nothing announces its restart to the clients
			continue
		}
		conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://client:%s@%s/soak?sslmode=disable", password, addr))
		if err != nil {
			if ctx.Err() == nil && sl.epoch.Load() == epoch && !strings.Contains(err.Error(), "connection refused") {
				s.unexplained(fmt.Sprintf("%s client %d connect: %v", sl.role, i, err))
			}
			time.Sleep(100 * time.Millisecond) // the replica restarting; nothing announces it
			continue
		}
		q := fmt.Sprintf("BEGIN; INSERT INTO work VALUES ('%s', %d); SELECT pg_sleep(0.02); COMMIT", sl.role, i)
		for ctx.Err() == nil {
			if int64(i) >= sl.active.Load() {
				time.Sleep(50 * time.Millisecond) // an idle client; nothing to await
				continue
			}
			if _, err := conn.Exec(ctx, q); err != nil {
				if ctx.Err() == nil && sl.epoch.Load() == epoch {
					s.unexplained(fmt.Sprintf("%s client %d: %v", sl.role, i, err))
				}
				break
			}
		}
		conn.Close(context.Background())
	}
}

func (s *soak) unexplained(msg string) {
	s.mu.Lock()
	s.unknown = append(s.unknown, time.Now().Format(time.TimeOnly)+" "+msg)
	s.mu.Unlock()
}

// capacity is what every governor connection may use: max_connections −
// superuser_reserved_connections (3) − budget.reserve.
func (s *soak) capacity() int { return s.o.maxConns - 3 - s.o.reserve }

// leases reads the live members' leases, by replica address.
func (s *soak) leases(ctx context.Context) (map[string]int, error) {
	rows, err := s.pg.ExecIn(ctx, "soak", fmt.Sprintf(`SELECT cancel_addr, cardinality(slots) FROM pggovernor_members
		WHERE namespace = %d AND heartbeat > now() - interval '%d milliseconds'`, namespace, s.o.memberTimeout.Milliseconds()))
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	for _, r := range rows {
		n, _ := strconv.Atoi(r[1])
		out[r[0]] = n
	}
	return out, nil
}

// fair reports whether every slot's replica is a member and, when all are
// busy, the leases are within one of each other and add up to the budget.
func (s *soak) fair(ctx context.Context) bool {
	ls, err := s.leases(ctx)
	if err != nil || len(ls) != len(s.slots) {
		return false
	}
	var got []int
	allBusy := true
	for _, sl := range s.slots {
		n, ok := ls[*sl.addr.Load()]
		if !ok {
			return false
		}
		got = append(got, n)
		allBusy = allBusy && sl.active.Load() == int64(s.o.clients)
	}
	if !allBusy {
		return true
	}
	sum := 0
	for _, n := range got {
		sum += n
	}
	return slices.Max(got)-slices.Min(got) <= 1 && sum == s.capacity()-1
}

// faults injects one fault every fault-every and measures how long the
// shares take to be fair again.
func (s *soak) faults(ctx context.Context) {
	rng := rand.New(rand.NewPCG(s.o.seed, 1))
	t := time.NewTicker(s.o.faultEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		sl := s.slots[rng.IntN(len(s.slots))]
		kind := []string{"kill -9", "SIGTERM", "terminate control connection", "move load"}[rng.IntN(4)]
		began := time.Now()
		switch kind {
		case "kill -9", "SIGTERM":
			down := ""
			sl.addr.Store(&down) // before the epoch: a client that sees the new epoch sees the replica down
			sl.epoch.Add(1)
			sig := syscall.SIGKILL
			if kind == "SIGTERM" {
				sig = syscall.SIGTERM
			}
			_ = sl.proc.Signal(sig)
			<-sl.proc.Exited()
			sl.proc = nil
			time.Sleep(time.Duration(rng.Int64N(int64(2 * s.o.memberTimeout)))) // down for a while
			if err := s.start(ctx, sl); err != nil {
				if ctx.Err() == nil {
					s.unexplained("restarting " + sl.role + ": " + err.Error())
				}
				return
			}
			began = time.Now()
		case "terminate control connection":
			_, _ = s.pg.Exec(ctx, fmt.Sprintf("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '%s' AND application_name = 'pggovernor-control'", sl.role))
		case "move load":
			for _, x := range s.slots {
				x.active.Store(int64(s.o.clients))
			}
			if rng.IntN(2) == 0 { // one replica idle for a while, or all busy again
				sl.active.Store(0)
			}
		}
		for !s.fair(ctx) {
			if ctx.Err() != nil {
				return
			}
			time.Sleep(10 * time.Millisecond) // rows in a table: nothing announces them
		}
		d := time.Since(began)
		s.mu.Lock()
		s.recovery[kind] = append(s.recovery[kind], d)
		s.mu.Unlock()
		fmt.Fprintf(os.Stderr, "%s %-30s %s: fair again after %s\n", time.Now().Format(time.TimeOnly), kind, sl.role, d.Round(time.Millisecond))
	}
}

func (s *soak) report(sum harness.Summary) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	fmt.Printf("clustersoak: %d replicas × %d clients, max_connections %d, heartbeat %s, member timeout %s, %s, seed %d\n",
		s.o.replicas, s.o.clients, s.o.maxConns, s.o.heartbeat, s.o.memberTimeout, s.o.duration, s.o.seed)
	fmt.Printf("governor connections: at most %d (%d server connections) over %d samples; capacity %d; samples above it: %d\n",
		sum.MaxGovernors, sum.MaxServers, sum.Samples, s.capacity(), sum.Over)
	kinds := make([]string, 0, len(s.recovery))
	for k := range s.recovery {
		kinds = append(kinds, k)
	}
	slices.Sort(kinds)
	fmt.Println("| fault | count | shares fair again (after the restart, for kill -9 and SIGTERM): min | median | max |")
	fmt.Println("|---|---|---|---|---|")
	for _, k := range kinds {
		ds := slices.Clone(s.recovery[k])
		slices.Sort(ds)
		fmt.Printf("| %s | %d | %s | %s | %s |\n", k, len(ds), ds[0].Round(time.Millisecond), ds[len(ds)/2].Round(time.Millisecond), ds[len(ds)-1].Round(time.Millisecond))
	}
	for i, u := range s.unknown {
		if i == 10 {
			fmt.Printf("… %d unexplained errors in all\n", len(s.unknown))
			break
		}
		fmt.Println("unexplained:", u)
	}
	var errs []error
	if sum.Over > 0 {
		errs = append(errs, fmt.Errorf("governor connections exceeded the capacity in %d samples, first %s", sum.Over, sum.FirstOver))
	}
	if len(s.unknown) > 0 {
		errs = append(errs, fmt.Errorf("%d client errors no fault explains", len(s.unknown)))
	}
	return errors.Join(errs...)
}
