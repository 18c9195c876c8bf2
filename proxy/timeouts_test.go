package proxy

import (
	"testing"
	"time"

	"github.com/pggovernor/pggovernor/config"
)

// TestRelayWithTimeoutsDoesNotAllocate: with timeouts.query and
// timeouts.idle_in_transaction set (and timeouts.client_write, on by
// default), relaying a request still allocates nothing: the session's
// timer is made once and reset only when a due time comes earlier.
func TestRelayWithTimeoutsDoesNotAllocate(t *testing.T) {
	for _, mode := range []string{config.PoolModeTransaction, config.PoolModeSession} {
		t.Run(mode, func(t *testing.T) {
			rig := newRelayRig(t, mode, func(c *config.Config) {
				c.Timeouts.Query = time.Minute
				c.Timeouts.IdleInTransaction = time.Minute
			})
			defer rig.done()
			for i := 0; i < 100; i++ { // warm up buffers, the server connection and the timer
				if err := rig.roundTrip(); err != nil {
					t.Fatal(err)
				}
			}
			allocs := testing.AllocsPerRun(1000, func() {
				if err := rig.roundTrip(); err != nil {
					t.Fatal(err)
				}
			})
			if allocs != 0 {
				t.Fatalf("allocations per round trip: want = 0, got = %v", allocs)
			}
		})
	}
}
