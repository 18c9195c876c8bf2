package main

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/config"
)

func TestSmoke(t *testing.T) {
	for _, mode := range []string{config.PoolModeTransaction, config.PoolModeSession} {
		t.Run(mode, func(t *testing.T) {
			g := startGov(t, nil, func(c *config.Config) { c.PoolMode = mode })
			ctx := context.Background()
			conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			var n int
			if err := conn.QueryRow(ctx, "SELECT $1::int + 1", 41).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n != 42 {
				t.Fatalf("want = 42, got = %d", n)
			}
		})
	}
}
