package main

import (
	"regexp"
	"strings"
	"testing"

	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// TestStatusCountersNameTheirUnit: sockets and connections are different
// units (a connection left plain counts once per end in the socket
// counters), so each status counter says which it counts.
func TestStatusCountersNameTheirUnit(t *testing.T) {
	out := formatCounters(dataplane.CgroupCounters{SocketsUnpaired: 44, SocketsBlocking: 3, SocketsStackPort: 5,
		PairsAbandoned: 7, ConnectionsShortLived: 22, MembersLeft: 9, LateBlocking: 11, LateStackOptions: 13,
		RedirectFailures: 15, FallbackRcvlowat: 1})
	for _, want := range []string{
		"peer not joining 44 sockets", "blocking 3 sockets", "stack port 5 sockets",
		"client sent first 7 connections", "short-lived listener 22 connections",
		"that left the sockhash: 9 sockets", "turned blocking 11 sockets", "set a reader option 13 sockets",
		"redirect failures 15 msgs", "reader option before joining 1 sockets",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status counters do not say %q:\n%s", want, out)
		}
	}
}

// TestUsageLinesNameEveryFlag: each command's usage line (the first line
// of --help) names every flag the command takes, but the global ones.
func TestUsageLinesNameEveryFlag(t *testing.T) {
	flagLine := regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`)
	for name, cmd := range commands {
		code, out, errOut := sockbypass(t, name, "--help")
		if code != 0 {
			t.Fatalf("%s --help: exit %d: %s", name, code, errOut)
		}
		for _, m := range flagLine.FindAllStringSubmatch(out, -1) {
			f := m[1]
			if f == "bpffs-dir" || f == "log-level" {
				continue
			}
			if !strings.Contains(cmd.usage, "--"+f) {
				t.Errorf("the usage line of %s does not name --%s: %s", name, f, cmd.usage)
			}
		}
	}
}
