package dataplane

import (
	"net"
	"testing"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestAccountOnlyListenerLeavesNoPairs: connections from a cgroup that is
// not enabled to a listener of an account-only cgroup, each closed at once,
// leave no entry in pairs (each SYN offers one; the server end frees an
// offer that no client took).
func TestAccountOnlyListenerLeavesNoPairs(t *testing.T) {
	dp := install(t)
	servers, clients := testutil.NewCgroup(t), testutil.NewCgroup(t)
	if _, err := dp.Enable(servers, EnableOptions{AccountOnly: true}); err != nil {
		t.Fatal(err)
	}
	l := testutil.ListenIn(t, servers, "tcp4", "127.0.0.1:0")
	before := entries(t, dp, PinPairs)
	const conns = 300
	for i := 0; i < conns; i++ {
		c, s := acceptDialed(t, l, "the server", func() net.Conn { return testutil.DialIn(t, clients, "tcp4", l.Addr().String()) })
		c.Close()
		s.Close()
	}
	if after := entries(t, dp, PinPairs); after > before {
		t.Errorf("%d connections from a cgroup that is not enabled to an account-only listener left %d entries in pairs (%d before)", conns, after, before)
	}
}
