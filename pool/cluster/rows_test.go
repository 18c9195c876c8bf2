package cluster

import (
	"net/netip"
	"testing"
	"time"
)

func TestRulesCheck(t *testing.T) {
	ps, err := ParsePrefixes([]string{"10.0.0.0/8", "fc00::/7", "127.0.0.0/8"})
	if err != nil {
		t.Fatal(err)
	}
	rules := Rules{MaxID: 1023, Timeout: 4 * time.Second, PeerAllowed: ps.Allows}
	good := func() Member {
		return Member{ID: 3, Name: "a", Addr: "10.1.2.3:6432", Slots: []int{0, 5}, Demand: 4, ControlPID: 77, ServerPIDs: []int{78}}
	}
	for _, tc := range []struct {
		name string
		edit func(*Member)
		want string
	}{
		{"a replica's row", func(*Member) {}, ""},
		{"no cancel address", func(m *Member) { m.Addr = "" }, ""},
		{"a DNS name", func(m *Member) { m.Addr = "coder-1.coder.svc:6432" }, ""},
		{"IPv6 inside", func(m *Member) { m.Addr = "[fd00::1]:6432" }, ""},
		{"IPv4-mapped inside", func(m *Member) { m.Addr = "[::ffff:10.0.0.1]:6432" }, ""},
		{"heartbeat just ahead", func(m *Member) { m.Age = -time.Second }, ""},
		{"marked by the store", func(m *Member) { m.Invalid = IgnoredHeartbeat }, IgnoredHeartbeat},
		{"heartbeat beyond the skew", func(m *Member) { m.Age = -2 * time.Second }, IgnoredHeartbeat},
		{"replica 0", func(m *Member) { m.ID = 0 }, IgnoredReplicaID},
		{"replica beyond the max", func(m *Member) { m.ID = 1024 }, IgnoredReplicaID},
		{"control PID 0", func(m *Member) { m.ControlPID = 0 }, IgnoredMalformed},
		{"server PID negative", func(m *Member) { m.ServerPIDs = []int{-1} }, IgnoredMalformed},
		{"slot negative", func(m *Member) { m.Slots = []int{-1} }, IgnoredSlots},
		{"slot at MAX_BACKENDS", func(m *Member) { m.Slots = []int{MaxBackends} }, IgnoredSlots},
		{"slot twice", func(m *Member) { m.Slots = []int{2, 2} }, IgnoredSlots},
		{"address outside", func(m *Member) { m.Addr = "203.0.113.9:6432" }, IgnoredAddress},
		{"address without a port", func(m *Member) { m.Addr = "10.0.0.1" }, IgnoredAddress},
		{"port 0", func(m *Member) { m.Addr = "10.0.0.1:0" }, IgnoredAddress},
		{"port beyond 65535", func(m *Member) { m.Addr = "10.0.0.1:70000" }, IgnoredAddress},
		{"a host that is no name", func(m *Member) { m.Addr = "a b:6432" }, IgnoredAddress},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := good()
			tc.edit(&m)
			if got, detail := rules.Check(&m); got != tc.want {
				t.Fatalf("Check: want = %q, got = %q (%s)", tc.want, got, detail)
			}
		})
	}
	m := good()
	m.Demand, m.Waiting = -3, 1<<40
	if reason, _ := rules.Check(&m); reason != "" || m.Demand != 0 || m.Waiting != maxFigure {
		t.Fatalf("clamped figures: want = 0 and %d, got = %d and %d (%s)", maxFigure, m.Demand, m.Waiting, reason)
	}
	if !ps.Allows(netip.MustParseAddr("::ffff:127.0.0.1")) || ps.Allows(netip.MustParseAddr("192.168.1.1")) {
		t.Fatal("Allows: want 4-in-6 loopback allowed and 192.168.1.1 refused")
	}
	if _, err := ParsePrefixes([]string{"10.0.0.1"}); err == nil {
		t.Fatal("ParsePrefixes of an address without a length: want an error")
	}
}
