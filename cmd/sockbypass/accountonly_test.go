package main

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestAccountOnlyShowsWhatWouldBeRedirected checks issue 18 item 12:
// enable --account-only accelerates nothing, and stats shows what
// acceleration would take off the stack: the bytes of the connections
// that would have paired (both ends in enabled cgroups, non-blocking),
// not those of a connection whose peer is in no enabled cgroup.
func TestAccountOnlyShowsWhatWouldBeRedirected(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	cg := testutil.NewCgroup(t)
	outside := testutil.NewCgroup(t)
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	mustSockbypass(t, "enable", "--no-probation", "--account-only", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	const size = 4 << 20
	// The dry pair forms at ESTABLISHED; send once stats counts it.
	transferWhen(t, cg, size, "the dry pair was not counted", func() bool {
		r := statsJSON(t, pinDir)
		return len(r.Cgroups) == 1 && r.Cgroups[0].WouldPairs >= 1
	})
	r := statsJSON(t, pinDir)
	if len(r.Cgroups) != 1 {
		t.Fatalf("stats: %+v", r.Cgroups)
	}
	c := r.Cgroups[0]
	if c.Mode != "account-only" || c.RedirectedBytes != 0 || c.LiveSockets != 0 {
		t.Fatalf("account-only accelerated something: %+v", c)
	}
	if c.WouldPairs != 1 || c.WouldRedirectBytes < size || c.WouldRedirectBytes > c.StackEgressBytes || c.WouldBypassRatio == nil || *c.WouldBypassRatio < 0.99 {
		t.Errorf("would-be redirected: %d pairs, %d bytes of %d stack egress bytes (ratio %v); want 1 pair and at least %d bytes",
			c.WouldPairs, c.WouldRedirectBytes, c.StackEgressBytes, c.WouldBypassRatio, size)
	}
	code, out, _ := sockbypass(t, "stats", "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, "would 100.0%") {
		t.Errorf("stats table does not show the would-be bypass ratio:\n%s", out)
	}

	// A peer in no enabled cgroup would not pair: nothing more counted.
	before := c
	l := testutil.ListenIn(t, outside, "tcp4", "127.0.0.1:0")
	var read atomic.Int64
	go func() {
		s, err := l.Accept()
		if err == nil {
			buf := make([]byte, 64<<10)
			for {
				n, err := s.Read(buf)
				read.Add(int64(n))
				if err != nil {
					s.Close()
					return
				}
			}
		}
	}()
	conn := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	if _, err := conn.Write(make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	deadline := time.Now().Add(10 * time.Second)
	for read.Load() < 1<<20 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	after := statsJSON(t, pinDir).Cgroups[0]
	if after.WouldPairs != before.WouldPairs || after.WouldRedirectBytes != before.WouldRedirectBytes || after.StackEgressBytes < before.StackEgressBytes+1<<20 {
		t.Errorf("a connection to a peer in no enabled cgroup: would pairs %d -> %d, would bytes %d -> %d, stack egress %d -> %d",
			before.WouldPairs, after.WouldPairs, before.WouldRedirectBytes, after.WouldRedirectBytes, before.StackEgressBytes, after.StackEgressBytes)
	}
}
