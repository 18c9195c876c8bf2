package cluster

import (
	"slices"
	"testing"

	"github.com/pggovernor/pggovernor/pool/budget"
)

func TestTargets(t *testing.T) {
	for _, tc := range []struct {
		name    string
		total   int
		demands []int
		want    []int
	}{
		{"equal load splits equally, lowest numbers take the remainder", 23, []int{100, 100, 100}, []int{8, 8, 7}},
		{"one busy borrows all but the idle ones' floors", 24, []int{100, 0, 0}, []int{20, 2, 2}},
		{"what one leaves is shared by the others", 21, []int{3, 100, 100}, []int{3, 9, 9}},
		{"nobody gets more than it wants", 21, []int{2, 5, 4}, []int{2, 5, 4}},
		{"fewer leases than floors: the first ones get more", 4, []int{9, 9, 9}, []int{2, 1, 1}},
		{"no budget", 0, []int{5, 5}, []int{0, 0}},
		{"no members", 10, nil, []int{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Targets(tc.total, tc.demands)
			if !slices.Equal(got, tc.want) {
				t.Fatalf("Targets(%d, %v): want = %v, got = %v", tc.total, tc.demands, tc.want, got)
			}
			sum := 0
			for _, x := range got {
				sum += x
			}
			if sum > tc.total && tc.total > 0 {
				t.Fatalf("targets sum to %d, more than the budget %d", sum, tc.total)
			}
		})
	}
}

func TestFairShare(t *testing.T) {
	var got []int
	for i := 0; i < 3; i++ {
		got = append(got, FairShare(23, 3, i))
	}
	if want := []int{8, 8, 7}; !slices.Equal(got, want) {
		t.Fatalf("FairShare(23, 3, i): want = %v, got = %v", want, got)
	}
}

func TestComputeBudget(t *testing.T) {
	l := budget.Limits{MaxConnections: 30, SuperuserReserved: 3}
	for _, tc := range []struct {
		name                           string
		max, reserve, members, foreign int
		want, servers                  int
		text                           string
	}{
		{"derived", 0, 2, 3, 0, 30 - 3 - 2 - 1, 30 - 3 - 2 - 1 - 3,
			"24 leases = 30 max_connections − 3 superuser_reserved − 0 reserved − 2 budget.reserve − 1 kept free for a joining replica; 3 for the control connections of 3 replicas, 21 for server connections"},
		{"foreign connections", 0, 0, 3, 10, 30 - 3 - 1 - 10, 30 - 3 - 1 - 10 - 3,
			"16 leases = 30 max_connections − 3 superuser_reserved − 0 reserved − 0 budget.reserve − 1 kept free for a joining replica − 10 connections of other applications; 3 for the control connections of 3 replicas, 13 for server connections"},
		{"budget.max", 12, 0, 2, 0, 12 - 1, 12 - 1 - 2,
			"11 leases = 12 budget.max − 1 kept free for a joining replica; 2 for the control connections of 2 replicas, 9 for server connections"},
		{"never negative", 0, 0, 40, 30, 0, 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := ComputeBudget(l, tc.max, tc.reserve, tc.members, tc.foreign)
			if b.Total != tc.want || b.Servers() != tc.servers {
				t.Fatalf("leases, server connections: want = %d, %d, got = %d, %d", tc.want, tc.servers, b.Total, b.Servers())
			}
			if tc.text != "" && b.String() != tc.text {
				t.Fatalf("String: want = %q, got = %q", tc.text, b.String())
			}
		})
	}
}
