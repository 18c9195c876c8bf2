package pool_test

import (
	"testing"

	"github.com/pggovernor/pggovernor/pool"
)

// TestRetireHoldsTheLimitInClusterMode: with HoldOnSwitch (budget.cluster:
// the limit is leases held on the server), a retirement for a role change
// sets the limit to 0 in the same step as it retires the connections, so
// that no connection opens on the next server before the lease manager has
// leases there; the idle connection to the retired server is closed at
// once, the busy one at its release. Without HoldOnSwitch the limit stays.
func TestRetireHoldsTheLimitInClusterMode(t *testing.T) {
	for _, hold := range []bool{true, false} {
		p := newTestPoolWith(t, 3, pool.Options{HoldOnSwitch: hold})
		busy, idle := mustAcquire(t, p), mustAcquire(t, p)
		addr := busy.Addr()
		p.Release(idle)
		p.RetireAddr(addr, "test: the server was demoted")
		if n, _ := p.Limit(); hold && n != 0 || !hold && n != 3 {
			t.Fatalf("HoldOnSwitch %v: limit after the retirement: want = %d, got = %d", hold, map[bool]int{true: 0, false: 3}[hold], n)
		}
		if !busy.Retired() {
			t.Fatalf("HoldOnSwitch %v: the busy connection: want retired", hold)
		}
		waitUntil(t, "the idle connection to close", func() bool { return p.Stats().Open == 1 })
		p.Release(busy)
		waitUntil(t, "the busy connection to close at its release", func() bool { return p.Stats().Open == 0 })
		if hold {
			p.SetLimit(3) // the lease manager, joined again
			p.Release(mustAcquire(t, p))
		}
	}
}
