package main

import (
	"database/sql"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/pggovernor/pggovernor/config"
)

// BenchmarkUnnamedAcrossSync measures the two ways to carry lib/pq's
// unnamed statement across its Sync (Parse+Describe+Sync, then
// Bind+Execute+Sync) on a pool much smaller than the clients: "replay"
// releases the server at the first ReadyForQuery and, when the Bind lands
// on a connection holding another statement, prepares it again there and
// waits for its description to check it; "link" (the default) keeps the
// server until the Execute (at most unnamedLinger after the Sync). Each op is one
// parameterised query from one of `clients` concurrent database/sql
// connections, through a budget of 2, against real Postgres. replays/op is
// how often the Parse had to be sent again.
func BenchmarkUnnamedAcrossSync(b *testing.B) {
	for _, mode := range []string{"replay", "link"} {
		for _, clients := range []int{2, 8, 32} {
			b.Run(fmt.Sprintf("%s/clients=%d", mode, clients), func(b *testing.B) {
				var opts []option
				if mode == "replay" {
					opts = append(opts, withReplayUnnamed())
				}
				g := startGov(b, nil, func(c *config.Config) {
					c.Budget.Max = 2
					c.Clients.MaxConnections = 500
					c.Log.Level = "warn"
				}, opts...)
				defer g.stop()
				db, err := sql.Open("postgres", g.url("alice", userPass, "appdb"))
				if err != nil {
					b.Fatal(err)
				}
				defer db.Close()
				db.SetMaxOpenConns(clients)
				db.SetMaxIdleConns(clients)
				var id atomic.Int64
				before := g.g.proxy.Stats().PrepareMisses
				b.SetParallelism((clients + 1) / 2) // GOMAXPROCS is 2
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					n := id.Add(1)
					q := fmt.Sprintf("SELECT $1::int + %d", n) // a statement per client
					var v int
					for pb.Next() {
						if err := db.QueryRow(q, 1).Scan(&v); err != nil {
							b.Error(err)
							return
						}
					}
				})
				b.StopTimer()
				b.ReportMetric(float64(g.g.proxy.Stats().PrepareMisses-before)/float64(b.N), "replays/op")
			})
		}
	}
}
