package dataplane

import (
	"net"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestMapEntryCountsFollowAPair: MapEntryCounts sees a listener, a joined
// pair (both ends in the sockhash and in socket_cgroups) and the enabled
// cgroup's slot, and the sockhash, socket_cgroups and listeners go back to
// what they held once the sockets close.
func TestMapEntryCountsFollowAPair(t *testing.T) {
	dp := install(t)
	counts := func() map[string]int {
		t.Helper()
		c, err := dp.MapEntryCounts()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	empty := counts()
	for _, name := range []string{PinSockState, PinEvents} {
		if _, ok := empty[name]; ok {
			t.Errorf("%s counted: it has no keys to walk", name)
		}
	}
	for _, name := range []string{PinSockhash, PinPairs, PinListeners, PinSocketCgs, PinCgroupSlots, PinMeshEndpoints, PinTCUsers} {
		if n, ok := empty[name]; !ok || n != 0 {
			t.Errorf("%s: %d entries (counted %v) in a new install, want 0", name, n, ok)
		}
	}

	cg := enabledCgroup(t, dp)
	if got := counts()[PinCgroupSlots]; got != 1 {
		t.Errorf("cgroup_slots: %d entries with one enabled cgroup, want 1", got)
	}
	if got := counts()[PinCgroupConfig]; got != 1 {
		t.Errorf("cgroup_config: %d slots set with one enabled cgroup (no probation), want 1", got)
	}
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	client, server := acceptDialed(t, l, "the server", func() net.Conn { return testutil.DialIn(t, cg, "tcp4", l.Addr().String()) })
	waitJoined(t, dp, client, server)
	c := counts()
	if c[PinSockhash] != 2 || c[PinSocketCgs] != 2 || c[PinListeners] != 1 {
		t.Errorf("a joined pair and its listener: sockhash %d, socket_cgroups %d, listeners %d; want 2, 2, 1", c[PinSockhash], c[PinSocketCgs], c[PinListeners])
	}
	// More than one batch of 4096: the batches add up.
	for i := uint64(0); i < 5000; i++ {
		if err := dp.maps[PinSocketCgs].Put(i+1<<40, uint64(1)); err != nil {
			t.Fatal(err)
		}
	}
	if got := counts()[PinSocketCgs]; got != 5002 {
		t.Errorf("socket_cgroups: %d entries counted, want 5002 (the pair's 2 and 5000 put)", got)
	}
	for i := uint64(0); i < 5000; i++ {
		dp.maps[PinSocketCgs].Delete(i + 1<<40)
	}
	client.Close()
	server.Close()
	l.Close()
	waitFor(t, 5*time.Second, func() bool {
		c := counts()
		return c[PinSockhash] == 0 && c[PinSocketCgs] == 0 && c[PinListeners] == 0
	})
}
