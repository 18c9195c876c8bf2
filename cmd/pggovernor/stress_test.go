package main

import (
	"context"
	"fmt"
	"os"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/config"
)

// TestColdStartBurst: many clients log in at once to a governor that has
// no server connection and no cached welcome yet, and immediately run
// queries, in both protocols. No query may stall.
func TestColdStartBurst(t *testing.T) {
	rounds := 3
	if testing.Short() {
		rounds = 1
	}
	for r := 0; r < rounds; r++ {
		func() {
			g := startGov(t, nil, func(c *config.Config) { c.Budget.Max = 8; c.Clients.MaxConnections = 200 })
			defer g.stop()
			ctx := context.Background()
			var wg sync.WaitGroup
			errs := make(chan error, 64)
			for i := 0; i < 64; i++ {
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					cfg, err := pgconn.ParseConfig(g.url("alice", userPass, "appdb"))
					if err != nil {
						errs <- err
						return
					}
					cfg.RuntimeParams["application_name"] = "burst"
					conn, err := pgconn.ConnectConfig(ctx, cfg)
					if err != nil {
						errs <- fmt.Errorf("client %d connect: %w", i, err)
						return
					}
					defer conn.Close(ctx)
					for j := 0; j < 30; j++ {
						qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
						var err error
						if j%2 == 0 {
							_, err = conn.Exec(qctx, "SELECT 1").ReadAll()
						} else {
							err = conn.ExecParams(qctx, "SELECT $1::int", [][]byte{[]byte("1")}, nil, nil, nil).Read().Err
						}
						cancel()
						if err != nil {
							errs <- fmt.Errorf("client %d query %d: %w", i, j, err)
							return
						}
					}
				}(i)
			}
			wg.Wait()
			close(errs)
			failed := false
			for err := range errs {
				failed = true
				t.Error(err)
			}
			if failed {
				_ = pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
				t.Fatalf("round %d failed; pool %+v", r, g.g.pool.Stats())
			}
		}()
	}
}
