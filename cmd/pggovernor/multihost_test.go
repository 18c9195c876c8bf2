package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
	"github.com/pggovernor/pggovernor/pool"
)

// primaryAndReplica starts a cluster of the test's own (the role app owns
// appdb) and a streaming replica of it, synchronous when sync is set.
func primaryAndReplica(t *testing.T, sync bool) (primary, standby *pgtest.Cluster) {
	t.Helper()
	primary = privateCluster(t, pgtest.Options{})
	standby, err := primary.StartReplica(context.Background(), pgtest.ReplicaOptions{Synchronous: sync})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(standby.Close)
	return primary, standby
}

// multiHostURL is a URL naming every cluster's host in order, as the app
// role, with the query parameters q.
func multiHostURL(q string, cs ...*pgtest.Cluster) string {
	hosts := make([]string, len(cs))
	for i, c := range cs {
		hosts[i] = c.Addr()
	}
	return "postgres://app@" + strings.Join(hosts, ",") + "/appdb?sslmode=disable&" + q
}

// serverPort is the port of the server that answers a query through the
// governor.
func serverPort(t *testing.T, conn *pgx.Conn) int {
	t.Helper()
	var port int
	if err := conn.QueryRow(context.Background(), "SELECT inet_server_port()").Scan(&port); err != nil {
		t.Fatal(err)
	}
	return port
}

// serverAddrs are the distinct addresses of the governor's server
// connections.
func serverAddrs(g *gov) map[string]int {
	out := map[string]int{}
	for _, s := range g.g.pool.Servers() {
		out[s.RemoteAddr.String()]++
	}
	return out
}

// TestMultiHostUpstream: upstream.url naming a standby and a primary, in
// the URL and the key/value forms, with libpq's target_session_attrs: the
// server connections and the control connection go to the server that
// fits; a write refused on a standby chosen on purpose retires nothing;
// load_balance_hosts=random spreads connections over the hosts (pgconn does
// not know it: it used to go to the server as a run-time parameter, which
// the server refused); doctor prints every host and the one used now.
func TestMultiHostUpstream(t *testing.T) {
	primary, standby := primaryAndReplica(t, false)
	ctx := context.Background()
	if _, err := primary.ExecIn(ctx, "appdb", "CREATE TABLE mh (n int); GRANT ALL ON mh TO app"); err != nil {
		t.Fatal(err)
	}
	kv := fmt.Sprintf("host=%s,%s port=%d,%d user=app dbname=appdb sslmode=disable", standby.Host, primary.Host, standby.Port, primary.Port)
	for _, tc := range []struct {
		name, url string
		want      *pgtest.Cluster
	}{
		{"read-write, URL", multiHostURL("target_session_attrs=read-write", standby, primary), primary},
		{"read-write, key/value", kv + " target_session_attrs=read-write", primary},
		{"primary", multiHostURL("target_session_attrs=primary", standby, primary), primary},
		{"standby", multiHostURL("target_session_attrs=standby", primary, standby), standby},
		{"prefer-standby", multiHostURL("target_session_attrs=prefer-standby", primary, standby), standby},
		{"read-only", multiHostURL("target_session_attrs=read-only", primary, standby), standby},
		{"any", multiHostURL("", standby, primary), standby},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := startGov(t, primary, func(c *config.Config) { c.Upstream.URL = tc.url })
			conn := connectPgx(t, g.url("app", appPass, "appdb"))
			if got := serverPort(t, conn); got != tc.want.Port {
				t.Fatalf("server port: want = %d, got = %d", tc.want.Port, got)
			}
			_, err := conn.Exec(ctx, "INSERT INTO mh VALUES (1)")
			if tc.want == primary && err != nil {
				t.Fatalf("a write on the primary: %v", err)
			}
			if tc.want == standby {
				// Refused, as the server says; the standby is what was
				// asked for, so nothing is retired.
				assertCode(t, err, "25006")
				if got := serverPort(t, conn); got != standby.Port {
					t.Fatalf("after the refused write: want = the standby %d, got = %d", standby.Port, got)
				}
			}
			if got := serverAddrs(g); len(got) != 1 || got[tc.want.Addr()] == 0 {
				t.Fatalf("server connections: want = all to %s, got = %v", tc.want.Addr(), got)
			}
			if a := g.g.controlAddr.Load(); a == nil || *a != tc.want.Addr() {
				t.Fatalf("control connection: want = to %s, got = %v", tc.want.Addr(), a)
			}
			if st := g.g.pool.Stats(); st.UpstreamSwitches != 0 || st.UpstreamAddr != tc.want.Addr() {
				t.Fatalf("upstream: want = no switch, at %s; got = %d switches, at %s", tc.want.Addr(), st.UpstreamSwitches, st.UpstreamAddr)
			}
		})
	}

	t.Run("load_balance_hosts=random", func(t *testing.T) {
		const n = 8
		g := startGov(t, primary, func(c *config.Config) {
			c.Upstream.URL = multiHostURL("load_balance_hosts=random", primary, standby)
			c.Budget.Max = n
		})
		// n transactions open at once hold n server connections; each was
		// opened to a host drawn at random. All n on one host has a
		// chance of 2^-7; a few rounds make a false failure negligible.
		seen := map[int]bool{}
		for round := 0; round < 5 && len(seen) < 2; round++ {
			var wg sync.WaitGroup
			var mu sync.Mutex
			start := make(chan struct{})
			for i := 0; i < n; i++ {
				conn := connectPgx(t, g.url("app", appPass, "appdb"))
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					tx, err := conn.Begin(ctx)
					if err != nil {
						t.Error(err)
						return
					}
					defer func() { _ = tx.Rollback(ctx) }()
					var port int
					if err := tx.QueryRow(ctx, "SELECT inet_server_port() FROM pg_sleep(0.2)").Scan(&port); err != nil {
						t.Error(err)
						return
					}
					mu.Lock()
					seen[port] = true
					mu.Unlock()
				}()
			}
			close(start)
			wg.Wait()
			g.g.pool.CloseIdle(ctx, func(pool.Route) bool { return true })
		}
		if !seen[primary.Port] || !seen[standby.Port] {
			t.Fatalf("ports of the connections: want = both %d and %d, got = %v", primary.Port, standby.Port, seen)
		}
		if sw := g.g.pool.Stats().UpstreamSwitches; sw != 0 {
			t.Fatalf("switches: want = 0 (spreading is no switch), got = %d", sw)
		}
	})

	t.Run("load_balance_hosts refused", func(t *testing.T) {
		cfg := config.Default()
		cfg.Listen, cfg.AdminListen = "127.0.0.1:0", ""
		cfg.Upstream.URL = multiHostURL("load_balance_hosts=sometimes", primary, standby)
		cfg.Clients.UsersFile = usersFile(t)
		if _, err := start(ctx, &cfg, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "load_balance_hosts") ||
			!strings.Contains(err.Error(), "upstream.url") {
			t.Fatalf("an unknown load_balance_hosts: want = an error naming it and upstream.url, got = %v", err)
		}
	})

	t.Run("doctor", func(t *testing.T) {
		doctor := func(url string) string {
			t.Helper()
			var out, errOut bytes.Buffer
			err := execute(ctx, []string{"doctor", "--upstream-url=" + url,
				"--upstream.password=" + appPass, "--clients.users-file=" + usersFile(t)}, nil, &out, &errOut)
			if err != nil {
				t.Fatalf("doctor: %v\n%s%s", err, out.String(), errOut.String())
			}
			t.Logf("pggovernor doctor:\n%s", out.String())
			return out.String()
		}
		check := func(out string, wants ...string) {
			t.Helper()
			for _, want := range wants {
				if !regexp.MustCompile(want).MatchString(out) {
					t.Fatalf("doctor output lacks %q:\n%s", want, out)
				}
			}
		}
		url := multiHostURL("target_session_attrs=read-write", standby, primary)
		common := []string{
			regexp.QuoteMeta(standby.Addr()) + ` +answered from ` + regexp.QuoteMeta(standby.Addr()) + `: standby \(not used: target_session_attrs is read-write\)`,
			regexp.QuoteMeta(primary.Addr()) + ` +answered from ` + regexp.QuoteMeta(primary.Addr()) + `: primary \(fits target_session_attrs\)`,
			`upstream: server used now +` + regexp.QuoteMeta(primary.Addr()),
			`server: host +` + regexp.QuoteMeta(primary.Addr()),
			`server: port +` + strconv.Itoa(primary.Port),
		}
		out := doctor(url)
		check(out, append(common, `upstream: hosts +2 \(target_session_attrs read-write, load_balance_hosts disable\)`, `no problems found\n$`)...)

		// A third host where nothing listens: a port just freed.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := ln.Addr().String()
		ln.Close()
		out = doctor(strings.Replace(url, primary.Addr(), primary.Addr()+","+dead, 1))
		check(out, append(common, `upstream: hosts +3 \(target_session_attrs read-write, load_balance_hosts disable\)`,
			regexp.QuoteMeta(dead)+` +did not answer: .*connect: connection refused`,
			`WARNING: host `+regexp.QuoteMeta(dead)+` of upstream.url did not answer`)...)
	})
}

// TestUpstreamDNSEveryConnect: the upstream's host name is resolved at
// every connection (no cache in pggovernor; pgconn asks the resolver for
// each one): a name whose answer changes — as a DNS record moved at a
// failover — is followed by the next connection, and the move counts as a
// switch. The resolver is a test's (withLookup), as a DNS server cannot be
// run here; with the system's, Go's resolver keeps no cache of DNS answers.
func TestUpstreamDNSEveryConnect(t *testing.T) {
	other := privateCluster(t, pgtest.Options{})
	var answer atomic.Pointer[string]
	var lookups atomic.Int64
	first := shared.Addr()
	answer.Store(&first)
	lookup := func(_ context.Context, host string) ([]string, error) {
		if host != "pg-writer.test" {
			return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
		}
		lookups.Add(1)
		return []string{*answer.Load()}, nil
	}
	g := startGov(t, nil, func(c *config.Config) {
		c.Upstream.URL = "postgres://app@pg-writer.test:5432/appdb?sslmode=disable"
		c.Budget.Max = 4
	}, withLookup(lookup))
	ctx := context.Background()
	conn := connectPgx(t, g.url("app", appPass, "appdb"))
	if got := serverPort(t, conn); got != shared.Port {
		t.Fatalf("server port: want = %d, got = %d", shared.Port, got)
	}
	// Every new connection asks again.
	for i := 0; i < 3; i++ {
		before, connects := lookups.Load(), g.g.pool.Stats().Connects
		g.g.pool.CloseIdle(ctx, func(pool.Route) bool { return true })
		serverPort(t, conn)
		if n, c := lookups.Load()-before, g.g.pool.Stats().Connects-connects; c != 1 || n != 1 {
			t.Fatalf("a new connection: want = 1 connect, 1 lookup; got = %d connects, %d lookups", c, n)
		}
	}
	moved := other.Addr()
	answer.Store(&moved)
	g.g.pool.CloseIdle(ctx, func(pool.Route) bool { return true })
	if got := serverPort(t, conn); got != other.Port {
		t.Fatalf("after the name moved: want = port %d, got = %d", other.Port, got)
	}
	if st := g.g.pool.Stats(); st.UpstreamSwitches != 1 || st.UpstreamAddr != other.Addr() {
		t.Fatalf("after the name moved: want = 1 switch, to %s; got = %d, to %s", other.Addr(), st.UpstreamSwitches, st.UpstreamAddr)
	}
	if g.logs.FilterMessageSnippet("upstream switched").Len() == 0 {
		t.Fatal("no log line says the upstream switched")
	}
	t.Logf("%d lookups for %d server connections opened", lookups.Load(), g.g.pool.Stats().Connects)
}
