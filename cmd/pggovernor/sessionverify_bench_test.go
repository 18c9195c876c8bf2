package main

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/config"
)

// BenchmarkSessionStateCheck measures what verification costs a
// transaction through the governor (budget 1, real Postgres, one simple
// query per op): "plain" (SELECT 1, never verified), "opaque" (a user
// function: verified after every transaction in the default mode),
// "always" (SELECT 1 with pool.session_state_check = always), and
// "always/2 clients" (two clients taking turns: each attach also RESETs
// what the other may have left). checks/op counts verification queries.
func BenchmarkSessionStateCheck(b *testing.B) {
	ctx := context.Background()
	stateFixtures(b)
	cases := []struct {
		name    string
		mode    string
		query   string
		clients int
	}{
		{"plain", config.SessionStateCheckAuto, "SELECT 1", 1},
		{"opaque", config.SessionStateCheckAuto, "SELECT sv_pure(1)", 1},
		{"always", config.SessionStateCheckAlways, "SELECT 1", 1},
		{"always/2 clients", config.SessionStateCheckAlways, "SELECT 1", 2},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			g := startGov(b, nil, func(cfg *config.Config) {
				cfg.Budget.Max = 1
				cfg.Log.Level = "warn"
				cfg.Pool.SessionStateCheck = c.mode
			})
			defer g.stop()
			conns := make([]*pgconn.PgConn, c.clients)
			for i := range conns {
				conn, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
				if err != nil {
					b.Fatal(err)
				}
				defer conn.Close(ctx)
				conns[i] = conn
			}
			before := g.g.proxy.Stats().StateChecks
			i := 0
			for b.Loop() {
				if _, err := conns[i%len(conns)].Exec(ctx, c.query).ReadAll(); err != nil {
					b.Fatal(err)
				}
				i++
			}
			b.ReportMetric(float64(g.g.proxy.Stats().StateChecks-before)/float64(b.N), "checks/op")
			if p := g.g.proxy.Stats().Pinned; p != 0 {
				b.Fatalf("pinned clients: %d", p)
			}
		})
	}
}
