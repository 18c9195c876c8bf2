package cluster

import (
	"fmt"

	"github.com/pggovernor/pggovernor/pool/budget"
)

// JoinHeadroom is the number of connection slots the cluster budget keeps
// free so that a replica that holds no lease yet can open its control
// connection, ask for a lease and take one: without it, a fleet using the
// whole budget would leave a newcomer refused by the server ("too many
// clients") and unknown to the others, who would never make room for it.
const JoinHeadroom = 1

// Floor is the number of leases every member is entitled to however idle
// it is (when the budget allows): one for its control connection and one
// for a server connection, so that its first client never waits for a
// rebalance.
const Floor = 2

// Budget is the cluster-wide budget as one replica computes it from what
// it read at its last heartbeat.
type Budget struct {
	// Total is the number of leases: of connections all replicas together
	// may hold, each replica's control connection holding one of them.
	// Capacity − JoinHeadroom − Foreign, at least 0.
	Total int
	// Capacity is the number of connections every replica's connections
	// may use: budget.max, or max_connections −
	// superuser_reserved_connections − reserved_connections −
	// budget.reserve.
	Capacity int
	// Members counts the live replicas.
	Members int
	// Foreign counts the connections of other applications subtracted
	// (budget.cluster.count_foreign; 0 otherwise).
	Foreign int
	// Limits are the server's settings the budget was derived from.
	Limits budget.Limits
	// Max and Reserve are budget.max and budget.reserve.
	Max, Reserve int
}

// Servers is the number of server connections the budget leaves once
// every live member's control connection has its lease.
func (b Budget) Servers() int { return max(b.Total-b.Members, 0) }

// ComputeBudget derives the cluster budget. max is budget.max (0: derive
// from l), reserve budget.reserve, members the live replicas and foreign
// the other applications' connections (0 unless counted).
func ComputeBudget(l budget.Limits, max, reserve, members, foreign int) Budget {
	b := Budget{Members: members, Foreign: foreign, Limits: l, Max: max, Reserve: reserve}
	if max > 0 {
		b.Capacity = max
	} else {
		b.Capacity = l.MaxConnections - l.SuperuserReserved - l.Reserved - reserve
	}
	b.Total = b.Capacity - JoinHeadroom - foreign
	if b.Total < 0 {
		b.Total = 0
	}
	return b
}

// String shows how the budget was derived, for logs and pggovernor doctor.
func (b Budget) String() string {
	var s string
	if b.Max > 0 {
		s = fmt.Sprintf("%d leases = %d budget.max", b.Total, b.Max)
	} else {
		s = fmt.Sprintf("%d leases = %d max_connections − %d superuser_reserved − %d reserved − %d budget.reserve",
			b.Total, b.Limits.MaxConnections, b.Limits.SuperuserReserved, b.Limits.Reserved, b.Reserve)
	}
	s += fmt.Sprintf(" − %d kept free for a joining replica", JoinHeadroom)
	if b.Foreign > 0 {
		s += fmt.Sprintf(" − %d connections of other applications", b.Foreign)
	}
	return s + fmt.Sprintf("; %d for the control connections of %d replicas, %d for server connections", min(b.Members, b.Total), b.Members, b.Servers())
}

// Targets divides total leases among members, given in replica-number
// order with what each wants (its demand), by max-min fairness: nobody
// gets more than it wants (at least Floor), what one leaves is shared by
// the others, and when everyone wants more than an equal part the leases
// are split equally, the lowest replica numbers taking the remainder.
// Every replica computes the same targets from the same rows.
func Targets(total int, demands []int) []int {
	out := make([]int, len(demands))
	if len(demands) == 0 || total <= 0 {
		return out
	}
	active := make([]int, len(demands))
	for i := range active {
		active[i] = i
	}
	remaining := total
	for len(active) > 0 {
		share := remaining / len(active)
		next := active[:0:0]
		for _, i := range active {
			if w := max(demands[i], Floor); w <= share {
				out[i] = w
				remaining -= w
			} else {
				next = append(next, i)
			}
		}
		if len(next) == len(active) {
			extra := remaining % len(active)
			for k, i := range active {
				out[i] = share
				if k < extra {
					out[i]++
				}
			}
			break
		}
		active = next
	}
	return out
}

// FairShare is member i's equal part of total among n members (in
// replica-number order, the lowest taking the remainder): what it is
// entitled to whatever the others want. Leases held beyond it are
// borrowed.
func FairShare(total, n, i int) int {
	if n <= 0 || total <= 0 {
		return 0
	}
	s := total / n
	if i < total%n {
		s++
	}
	return s
}
