package e2e

import (
	"bytes"
	"net"
	"testing"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/conns"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/stats"
)

// TestSidecarBypassRatioMatchesTheHops: with a sidecar (HAProxy, iptables
// REDIRECT) in the app pod and the server in a second pod over a veth, the
// app pod's bypass ratio must match the bytes each hop really moved, with
// no device named. While the server pod is not enabled, the app -> sidecar
// hop is redirected and the sidecar -> server hop crosses the veth's stack:
// about half. Once the server pod is enabled, both hops are redirected.
func TestSidecarBypassRatioMatchesTheHops(t *testing.T) {
	s, dp := newIstioSidecarPods(t)
	// The server pod is a pod of the node (as the daemon's extraNetns
	// would say) but not enabled: the sidecar's connections to it take
	// the stack, and they are local traffic.
	if _, err := dp.RefreshNodeAddrs(s.server.Netns.Path()); err != nil {
		t.Fatal(err)
	}
	body := bytes.Repeat([]byte("ratio hop "), 400<<10)
	size := uint64(len(body))
	send := func() stats.Figures {
		t.Helper()
		before := countersLive(t, dp)
		c := s.app.Dial(t, nil, net.JoinHostPort(s.serverIP, "8080"))
		if err := s.digestRoundTrip(c, body, 30e9); err != nil {
			t.Fatal(err)
		}
		after := countersLive(t, dp)
		return stats.FiguresOf(after[s.app.Cgroup.ID].Sub(before[s.app.Cgroup.ID]))
	}

	f := send()
	t.Logf("server pod not enabled: redirected %d, stack to local peers %d bytes (%d packets), ratio %v", f.RedirectedBytes, f.StackEgressBytes, f.StackEgressPackets, ratioOf(f))
	// app -> sidecar: the body, redirected; sidecar -> server: the body
	// again, through the veth; the 32-byte digest comes back redirected.
	if f.RedirectedBytes != size+32 {
		t.Errorf("redirected %d bytes, want the body and the digest (%d)", f.RedirectedBytes, size+32)
	}
	// The body once; retransmissions (counted: they crossed the stack
	// again) stay within 1%.
	if f.StackEgressBytes < size || f.StackEgressBytes > size+size/100 {
		t.Errorf("stack bytes to local peers %d, want the body once (%d, + at most 1%% of retransmissions): the sidecar -> server hop", f.StackEgressBytes, size)
	}
	if r := ratioOf(f); r < 0.45 || r > 0.55 {
		t.Errorf("bypass ratio %.3f, want about 0.5: one hop of two was bypassed", r)
	}

	if _, err := dp.Enable(s.server.Cgroup, dataplane.EnableOptions{NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := dp.RefreshNodeAddrs(); err != nil {
		t.Fatal(err)
	}
	recordListeners(t, dp, s.server)
	f = send()
	t.Logf("server pod enabled: redirected %d, stack to local peers %d bytes (%d packets), ratio %v", f.RedirectedBytes, f.StackEgressBytes, f.StackEgressPackets, ratioOf(f))
	if f.RedirectedBytes != 2*size+32 || f.StackEgressBytes != 0 || f.StackEgressPackets != 0 {
		t.Errorf("both hops accelerated: redirected %d bytes (want the body twice and the digest once: %d), stack %d bytes in %d packets (want none: handshakes carry no payload)",
			f.RedirectedBytes, 2*size+32, f.StackEgressBytes, f.StackEgressPackets)
	}
	if r := ratioOf(f); r < 0.999 {
		t.Errorf("bypass ratio %.4f, want >= 0.999", r)
	}
}

// countersLive returns dp's counters by cgroup id as stats shows them: the
// stack bytes of accelerated cgroups, counted when their sockets close,
// with those of the live sockets sampled (a keep-alive connection of a
// sidecar has not closed when the test reads).
func countersLive(t testing.TB, dp *dataplane.Dataplane) map[uint64]dataplane.CgroupCounters {
	t.Helper()
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		t.Fatal(err)
	}
	live, closed, err := conns.SampleStack(dp, mounts)
	if err != nil {
		t.Fatalf("sample the live sockets: %v", err)
	}
	for id, l := range live {
		c := closed[id]
		c.StackEgressBytes += l.Bytes
		c.StackEgressPackets += l.Packets
		closed[id] = c
	}
	return closed
}

func ratioOf(f stats.Figures) float64 {
	if f.BypassRatio == nil {
		return -1
	}
	return *f.BypassRatio
}
