package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// The switchover suite: a primary and a synchronous streaming replica (so
// that, as with RDS Multi-AZ and Aurora, an acknowledged commit is on the
// replica), writers through the governor recording every acknowledged
// commit, then the primary's role moves:
//
//   - aurora: the old primary is made read-only (default_transaction_read_only
//     on, reloaded: connections still open to it answer writes with 25006,
//     as an Aurora writer that came back as a reader does; it is not a
//     standby, which would need rebuilding it from the new primary), its
//     writes drain, the replica is promoted. upstream.url names both hosts
//     with target_session_attrs=read-write.
//   - multi-az: the old primary is stopped (fast shutdown: its connections
//     are terminated, 57P01), the replica is promoted. Same URL.
//   - dns: upstream.url is one name, a forwarder standing for a DNS record;
//     the old primary is made read-only, the replica promoted, and the
//     forwarder moved to it (connections made before stay with the old
//     server, as TCP connections outlive a DNS change).
//
// For each: no acknowledged commit is missing on the new primary, no
// client gets more than one error, every client writes again soon after
// the promotion, and no connection the governor opened to the old server
// before the promotion is left. `make test` runs a short version and
// reports the times; `make faults-switchover` (PGGOVERNOR_FAULTS=full) a
// longer one, repeated, which also holds the times to 2 s.

// switchoverSettings are the suite's sizes.
type switchoverSettings struct {
	clients int
	// warmup and after are the commits per client before the fault and
	// after the promotion.
	warmup, after int
	reps          int
	// bound is the time within which every client must write again and
	// the old server's connections be gone.
	bound time.Duration
}

func switchoverSizes() (switchoverSettings, bool) {
	if os.Getenv("PGGOVERNOR_FAULTS") == "full" {
		return switchoverSettings{clients: 32, warmup: 100, after: 100, reps: 3, bound: 2 * time.Second}, true
	}
	// make test: short, under -race, on a machine shared with other work:
	// the times are reported; the bound only catches a client left waiting
	// for timeouts.query_wait.
	return switchoverSettings{clients: 8, warmup: 20, after: 20, reps: 1, bound: 8 * time.Second}, false
}

type switchoverCase struct {
	name, what string
	// forwarder: upstream.url is a forwarder's address, not both hosts.
	forwarder bool
	// fault moves the primary's role to the replica and returns when the
	// replica is promoted (and the forwarder moved).
	fault func(t *testing.T, old, replica *pgtest.Cluster, fw *movableForwarder)
}

// switchoverRow is one line of the suite's table.
type switchoverRow struct {
	name                      string
	clients                   int
	rep                       writerReport
	oldGone                   time.Duration
	switches                  int64
	promotedAt, faultDuration time.Duration
}

func TestSwitchover(t *testing.T) {
	size, full := switchoverSizes()
	var promoting time.Time // when the promotion was asked for: times are measured from it
	makeReadOnly := func(t *testing.T, old *pgtest.Cluster) {
		if err := old.Reconfigure(context.Background(), map[string]string{"default_transaction_read_only": "on"}); err != nil {
			t.Fatal(err)
		}
		// Transactions that began before the reload may still write; they
		// commit (acknowledged once on the replica) before it is promoted.
		waitFor(t, 10*time.Second, "the writes in flight on the old primary to end", func() bool {
			rows, err := old.ExecIn(context.Background(), "appdb", "SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND usename = 'app'")
			return err == nil && rows[0][0] == "0"
		})
	}
	promote := func(t *testing.T, replica *pgtest.Cluster) {
		promoting = time.Now()
		if err := replica.Promote(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	cases := []switchoverCase{
		{name: "aurora", what: "old primary read-only, replica promoted; 2 hosts, read-write",
			fault: func(t *testing.T, old, replica *pgtest.Cluster, _ *movableForwarder) {
				makeReadOnly(t, old)
				promote(t, replica)
			}},
		{name: "multi-az", what: "old primary stopped, replica promoted; 2 hosts, read-write",
			fault: func(t *testing.T, old, replica *pgtest.Cluster, _ *movableForwarder) {
				old.Stop()
				promote(t, replica)
			}},
		{name: "dns", what: "old primary read-only, replica promoted, the name moved; 1 name, read-write", forwarder: true,
			fault: func(t *testing.T, old, replica *pgtest.Cluster, fw *movableForwarder) {
				makeReadOnly(t, old)
				promote(t, replica)
				fw.Move(replica.Addr())
			}},
	}
	var rows []switchoverRow
	for _, sc := range cases {
		for i := 0; i < size.reps; i++ {
			name := sc.name
			if size.reps > 1 {
				name += "#" + strconv.Itoa(i+1)
			}
			t.Run(name, func(t *testing.T) {
				row := runSwitchover(t, sc, size, &promoting)
				row.name = name
				rows = append(rows, row)
			})
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "switchover under load (%d writers through pggovernor, synchronous replica; times from the promotion):\n", size.clients)
	fmt.Fprintf(&b, "%-12s %12s %8s %22s %16s %16s %9s  %s\n", "case", "acknowledged", "missing", "errors (max/client)", "writes resumed", "old host left", "switches", "errors by SQLSTATE")
	for _, r := range rows {
		fmt.Fprintf(&b, "%-12s %12d %8d %14d (max %d) %16s %16s %9d  %s\n", r.name, r.rep.acked, r.rep.missing, r.rep.errors, r.rep.maxErrors,
			r.rep.resumed.Round(time.Millisecond), r.oldGone.Round(time.Millisecond), r.switches, codesString(r.rep.codes))
	}
	for _, sc := range cases {
		fmt.Fprintf(&b, "  %s: %s\n", sc.name, sc.what)
	}
	t.Log("\n" + b.String())
	if full && testing.Verbose() {
		fmt.Println(b.String())
	}
}

// runSwitchover runs one case: a primary and its synchronous replica, the
// governor and the writers, the fault, the checks.
func runSwitchover(t *testing.T, sc switchoverCase, size switchoverSettings, promoting *time.Time) switchoverRow {
	ctx := context.Background()
	old, replica := primaryAndReplica(t, true)
	if _, err := old.ExecIn(ctx, "appdb", "CREATE TABLE acks (client int, seq bigint, PRIMARY KEY (client, seq)); GRANT ALL ON acks TO app"); err != nil {
		t.Fatal(err)
	}
	url := multiHostURL("target_session_attrs=read-write", old, replica)
	var fw *movableForwarder
	if sc.forwarder {
		fw = startForwarder(t, old.Addr())
		url = "postgres://app@" + fw.Addr() + "/appdb?sslmode=disable&target_session_attrs=read-write"
	}
	g := startGov(t, old, func(c *config.Config) {
		c.Upstream.URL = url
	})
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		entries := g.logs.All()
		if len(entries) > 300 {
			entries = entries[len(entries)-300:]
		}
		var b strings.Builder
		for _, e := range entries {
			fmt.Fprintf(&b, "%s %s %s %v\n", e.Time.Format("15:04:05.000"), e.Level, e.Message, e.ContextMap())
		}
		t.Logf("the governor's last log lines:\n%s", b.String())
	})
	w := startAckedWriters(t, g.url("app", appPass, "appdb"), "acks", size.clients, 2*time.Millisecond)
	waitFor(t, 60*time.Second, "the writers to commit before the fault", func() bool { return w.acks() >= size.clients*size.warmup })

	began := time.Now()
	sc.fault(t, old, replica, fw)
	promoted := *promoting // times are measured from when the promotion was asked for
	var oldClock string
	if sc.name != "multi-az" {
		rows, err := old.Exec(ctx, "SELECT clock_timestamp()")
		if err != nil {
			t.Fatal(err)
		}
		oldClock = rows[0][0]
	}
	// No connection the governor holds or opened before the promotion is
	// left on the old server: in the pool, or (the control connection,
	// and behind a forwarder, where every connection has the same
	// address) in the old server's pg_stat_activity. Connection attempts
	// that try the old server first and leave it (target_session_attrs)
	// are not kept. It is polled from when the promotion returned: the
	// time is an upper bound.
	oldLeft := func() bool {
		for _, s := range g.g.pool.Servers() {
			if s.RemoteAddr.String() == old.Addr() {
				return true
			}
		}
		if oldClock == "" {
			return false
		}
		rows, err := old.Exec(ctx, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_start < "+pgtest.QuoteLiteral(oldClock)+"::timestamptz")
		return err != nil || rows[0][0] != "0"
	}
	waitFor(t, 30*time.Second, "the old server's connections to be gone", func() bool { return !oldLeft() })
	oldGone := max(time.Since(promoted), 0)
	waitFor(t, 60*time.Second, "every writer to commit after the promotion", func() bool { return w.ackedSince(promoted) })
	target := w.acks() + size.clients*size.after
	waitFor(t, 60*time.Second, "the writers to commit after the promotion", func() bool { return w.acks() >= target })

	w.stop()
	got, err := replica.ExecIn(ctx, "appdb", "SELECT client, seq FROM acks")
	if err != nil {
		t.Fatal(err)
	}
	have := make(map[[2]int64]bool, len(got))
	for _, r := range got {
		c, _ := strconv.ParseInt(r[0], 10, 64)
		s, _ := strconv.ParseInt(r[1], 10, 64)
		have[[2]int64{c, s}] = true
	}
	rep := w.report(promoted, have)
	row := switchoverRow{clients: size.clients, rep: rep, oldGone: oldGone, switches: g.g.pool.Stats().UpstreamSwitches,
		faultDuration: promoted.Sub(began)}
	t.Logf("%s: %d acknowledged, %d missing, %d errors (max %d per client: %s), writes resumed %s and the old server's connections gone %s after the promotion (the fault began %s before the promotion), %d switch(es)",
		sc.name, rep.acked, rep.missing, rep.errors, rep.maxErrors, codesString(rep.codes), rep.resumed.Round(time.Millisecond),
		oldGone.Round(time.Millisecond), row.faultDuration.Round(time.Millisecond), row.switches)
	if rep.missing > 0 {
		t.Errorf("%d acknowledged commits missing on the new primary, e.g. %v", rep.missing, rep.firstMissing)
	}
	if rep.maxErrors > 1 {
		t.Errorf("a client got %d errors, want at most 1:\n%s", rep.maxErrors, w.errorSummary(1))
	}
	if rep.resumed > size.bound {
		t.Errorf("writes resumed %s after the promotion, want within %s", rep.resumed, size.bound)
	}
	if oldGone > size.bound {
		t.Errorf("the old server's connections were gone %s after the promotion, want within %s", oldGone, size.bound)
	}
	if row.switches != 1 {
		t.Errorf("pggovernor_upstream_switches_total: want = 1, got = %d", row.switches)
	}
	if st := g.g.pool.Stats(); !sc.forwarder && st.UpstreamAddr != replica.Addr() {
		t.Errorf("the upstream in use: want = %s, got = %s", replica.Addr(), st.UpstreamAddr)
	}
	return row
}
