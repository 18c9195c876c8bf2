package cluster

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The membership table is input from whoever may write it: every row is
// checked before it counts, and a row that fails is ignored — it is no
// member, reserves no lease in the plan and receives no forwarded cancel
// request — logged and counted (pggovernor_cluster_rows_ignored_total), never
// fatal. The reasons, the label values of that counter:
const (
	// IgnoredHeartbeat: the heartbeat is not finite, or later than the
	// server's clock by more than a quarter of the member timeout (see
	// FutureSkew).
	IgnoredHeartbeat = "heartbeat"
	// IgnoredReplicaID: the replica number is outside 1 to the largest a
	// cancel key carries.
	IgnoredReplicaID = "replica_id"
	// IgnoredSlots: the leases listed are more than max_connections, not a
	// one-dimensional array, hold a NULL, a number outside 0 to
	// MaxBackends, or one twice.
	IgnoredSlots = "slots"
	// IgnoredAddress: the cancel address is not host:port, or its host is
	// an IP address outside budget.cluster.peer_cidrs.
	IgnoredAddress = "address"
	// IgnoredMalformed: a NULL, a name or address longer than a replica
	// writes, a PID that is not positive, a join time that is not finite,
	// more server PIDs than max_connections.
	IgnoredMalformed = "malformed"
)

// IgnoredReasons lists every reason, so that a counter can start each at
// zero.
func IgnoredReasons() []string {
	return []string{IgnoredHeartbeat, IgnoredReplicaID, IgnoredSlots, IgnoredAddress, IgnoredMalformed}
}

const (
	// MaxBackends is Postgres' MAX_BACKENDS (2^18 − 1): max_connections
	// cannot exceed it, so no lease number reaches it.
	MaxBackends = 1<<18 - 1
	// maxFigure clamps a row's demand and waiting clients: far more than a
	// replica can have, small enough that sums cannot overflow.
	maxFigure = 1 << 24
	// maxNameLen and maxAddrLen bound the text columns read (a replica
	// writes a host name and a PID, and host:port).
	maxNameLen = 512
	maxAddrLen = 300
)

// FutureSkew is how far in the future of the server's clock a heartbeat
// may be and still count: a quarter of the member timeout, the bound of
// one exchange with the server (another replica's heartbeat committed
// while this one's exchange runs is later than this one's now()). A row
// with a heartbeat beyond it is ignored, and deleted by the next
// heartbeat: it would otherwise never expire.
func FutureSkew(timeout time.Duration) time.Duration { return timeout / 4 }

// Rules decide which rows of the membership table are members'.
type Rules struct {
	// MaxID is the largest replica number.
	MaxID int
	// Timeout is budget.cluster.member_timeout.
	Timeout time.Duration
	// PeerAllowed reports whether an IP address may receive forwarded
	// cancel requests (budget.cluster.peer_cidrs); nil allows every one.
	PeerAllowed func(netip.Addr) bool
}

// Check returns why the row m is to be ignored (one of the Ignored*
// reasons) and what was wrong, or "" when it is a member's. It clamps the
// row's demand and waiting clients to [0, 2^24].
func (r Rules) Check(m *Member) (reason, detail string) {
	switch {
	case m.Invalid != "":
		return m.Invalid, m.InvalidDetail
	case m.ID < 1 || m.ID > r.MaxID:
		return IgnoredReplicaID, fmt.Sprintf("replica number %d is outside 1 to %d", m.ID, r.MaxID)
	case m.Age < -FutureSkew(r.Timeout):
		return IgnoredHeartbeat, fmt.Sprintf("heartbeat %s in the future of the server's clock", (-m.Age).Round(time.Millisecond))
	case m.ControlPID <= 0:
		return IgnoredMalformed, fmt.Sprintf("control_pid %d", m.ControlPID)
	}
	if len(m.Slots) > MaxBackends {
		return IgnoredSlots, fmt.Sprintf("%d leases listed", len(m.Slots))
	}
	seen := make(map[int]bool, len(m.Slots))
	for _, s := range m.Slots {
		if s < 0 || s >= MaxBackends {
			return IgnoredSlots, fmt.Sprintf("lease %d is outside 0 to %d", s, MaxBackends-1)
		}
		if seen[s] {
			return IgnoredSlots, fmt.Sprintf("lease %d listed twice", s)
		}
		seen[s] = true
	}
	if slices.ContainsFunc(m.ServerPIDs, func(p int) bool { return p <= 0 }) {
		return IgnoredMalformed, "a server_pids entry is not positive"
	}
	if err := CheckAddr(m.Addr, r.PeerAllowed); err != nil {
		return IgnoredAddress, err.Error()
	}
	m.Demand = min(max(m.Demand, 0), maxFigure)
	m.Waiting = min(max(m.Waiting, 0), maxFigure)
	return "", ""
}

// CheckAddr checks a cancel address: empty (the replica takes no
// forwarded cancel requests), or host:port with a port from 1 to 65535 and
// a host that is an IP address allowed (nil allows all) or a DNS name
// (whose addresses the sender checks when it dials).
func CheckAddr(addr string, allowed func(netip.Addr) bool) error {
	if addr == "" {
		return nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("cancel address %q is not host:port", addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("cancel address %q has no valid port", addr)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if allowed != nil && !allowed(ip.WithZone("").Unmap()) {
			return fmt.Errorf("cancel address %q is outside budget.cluster.peer_cidrs", addr)
		}
		return nil
	}
	if !isDNSName(host) {
		return fmt.Errorf("cancel address %q: the host is neither an IP address nor a DNS name", addr)
	}
	return nil
}

// isDNSName reports whether s is a syntactically valid DNS name: labels of
// 1 to 63 letters, digits, '-' and '_', 253 characters at most.
func isDNSName(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// Prefixes are the networks forwarded cancel requests may go to
// (budget.cluster.peer_cidrs).
type Prefixes []netip.Prefix

// ParsePrefixes parses CIDRs such as 10.0.0.0/8 and fc00::/7.
func ParsePrefixes(cidrs []string) (Prefixes, error) {
	out := make(Prefixes, 0, len(cidrs))
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(strings.TrimSpace(c))
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR (such as 10.0.0.0/8 or fc00::/7)", c)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// Allows reports whether ip is in one of the networks.
func (ps Prefixes) Allows(ip netip.Addr) bool {
	ip = ip.WithZone("").Unmap()
	for _, p := range ps {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}
