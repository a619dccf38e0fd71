package conns

import (
	"fmt"
	"strings"
)

// States are the states a connection can be in, in the order shown.
var States = []string{StatePaired, StatePairing, StateLeaving, StatePlain}

// Filter selects connections; its zero value selects every one.
type Filter struct {
	// Cgroup, a path relative to the cgroup v2 mount (with or without
	// the leading "/"), selects the connections of that cgroup and of the
	// cgroups below it ("" or "/": all).
	Cgroup string
	// Port selects connections whose local or remote port it is (0: all).
	Port uint16
	// State selects connections in that state (StatePaired, ...) or
	// with that reason (a Reason's Code); "" selects all.
	State string
}

// CheckState returns an error naming s and the values to use instead,
// unless s is a state or a reason code.
func CheckState(s string) error {
	for _, st := range States {
		if s == st {
			return nil
		}
	}
	if _, ok := FindReason(s); ok {
		return nil
	}
	codes := make([]string, len(Reasons))
	for i, r := range Reasons {
		codes[i] = r.Code
	}
	return fmt.Errorf("--state %q: use %s, or a reason of plain connections: %s", s, strings.Join(States, ", "), strings.Join(codes, ", "))
}

// Match reports whether f selects c.
func (f Filter) Match(c Conn) bool {
	if cg := "/" + strings.Trim(f.Cgroup, "/"); cg != "/" {
		if c.Cgroup != cg && !strings.HasPrefix(c.Cgroup, cg+"/") {
			return false
		}
	}
	if f.Port != 0 && c.Local.Port() != f.Port && c.Remote.Port() != f.Port {
		return false
	}
	if f.State != "" && c.State != f.State && c.Reason != f.State {
		return false
	}
	return true
}

// Select returns the connections of all that f selects.
func (f Filter) Select(all []Conn) []Conn {
	out := make([]Conn, 0, len(all))
	for _, c := range all {
		if f.Match(c) {
			out = append(out, c)
		}
	}
	return out
}
