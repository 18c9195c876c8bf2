package main

import (
	"context"
	"testing"
	"time"

	"github.com/pggovernor/pggovernor/config"
)

// TestServerUnreachableReachesTheServer: timeouts.server_unreachable asks
// the server, in the startup packet of every server connection, to drop a
// pggovernor it cannot reach within half of it (the fault suite's long
// black-hole shows why: without it an abandoned backend kept its slot and
// the governors' connections exceeded the budget after the path healed);
// 0 leaves the server's settings alone.
func TestServerUnreachableReachesTheServer(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name                 string
		unreachable          time.Duration // 0: the default
		userTimeout, keepIdl string
	}{
		{"default", 0, "5000", "2"},             // milliseconds, seconds
		{"30s", 30 * time.Second, "15000", "7"}, // ⌊T/4⌋ s idle, T/2 unacknowledged
		{"off", -1, "0", ""},                    // the server's own (the kernel's default)
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := txGov(t, func(c *config.Config) {
				switch {
				case tc.unreachable > 0:
					c.Timeouts.ServerUnreachable = tc.unreachable
				case tc.unreachable < 0:
					c.Timeouts.ServerUnreachable = 0
				}
			})
			conn := connectPgx(t, g.url("alice", userPass, "appdb"))
			var ut, idle string
			if err := conn.QueryRow(ctx, "SELECT current_setting('tcp_user_timeout'), current_setting('tcp_keepalives_idle')").Scan(&ut, &idle); err != nil {
				t.Fatal(err)
			}
			if ut != tc.userTimeout || (tc.keepIdl != "" && idle != tc.keepIdl) {
				t.Fatalf("the server connection's tcp_user_timeout, tcp_keepalives_idle: want = %s, %s, got = %s, %s", tc.userTimeout, tc.keepIdl, ut, idle)
			}
		})
	}
}
