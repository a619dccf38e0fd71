package dataplane

import (
	"bytes"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// TestStackEgressCountedOnAnyDevice: an enabled cgroup's stack bytes to a
// local peer are counted at its sockets whatever device they leave by (a
// pod's veth here), with no TC device named; bytes to a peer that cannot be
// local are not, since acceleration could not have taken them.
func TestStackEgressCountedOnAnyDevice(t *testing.T) {
	testutil.RequirePrivileged(t)
	dp := install(t)
	a, b := testutil.NewPod(t), testutil.NewPod(t)
	testutil.Link(t, a, "10.9.7.1/24", b, "10.9.7.2/24", "sbxea", "sbxeb")
	// Only a is enabled, with no TC device: its connections to b never
	// pair (b's sockets are in no enabled cgroup) and take the veth.
	if _, err := dp.Enable(a.Cgroup, EnableOptions{}); err != nil {
		t.Fatal(err)
	}
	if st, err := dp.Status(); err != nil || len(st.TCDevices) != 0 {
		t.Fatalf("TC devices %+v, %v: want none by default", st, err)
	}
	l := b.Listen(t, "10.9.7.2:0")
	transfer.ServeDiscard(l)
	const size = 4 << 20
	send := func() CgroupCounters {
		t.Helper()
		before := counterOf(t, dp, a.Cgroup.ID)
		c := a.Dial(t, nil, l.Addr().String())
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Write(bytes.Repeat([]byte("x"), size)); err != nil {
			t.Fatal(err)
		}
		c.Close()
		// The last segments leave after Write returns: wait for them.
		deadline := time.Now().Add(5 * time.Second)
		for {
			d := counterOf(t, dp, a.Cgroup.ID).Sub(before)
			if d.StackEgressBytes >= size || time.Now().After(deadline) {
				return d
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	// b's address is no node address yet: its peer cannot be local.
	if d := send(); d.StackEgressBytes != 0 || d.SocketsRemote == 0 {
		t.Errorf("to a peer that cannot be local: stack egress %d bytes, sockets_remote %d; want 0 and > 0", d.StackEgressBytes, d.SocketsRemote)
	}

	// b's namespace is a pod of the node: the same bytes now count.
	if _, err := dp.RefreshNodeAddrs(b.Netns.Path()); err != nil {
		t.Fatal(err)
	}
	d := send()
	if d.StackEgressBytes < size || d.StackEgressBytes > size+size/10 || d.StackEgressPackets == 0 {
		t.Errorf("to a local peer over a veth: stack egress %d bytes in %d packets, want %d (+ at most 10%%)", d.StackEgressBytes, d.StackEgressPackets, size)
	}
	if d.TCEgressBytes != 0 || d.RedirectedBytes != 0 {
		t.Errorf("TC egress %d, redirected %d: want 0 (no TC device, no pair)", d.TCEgressBytes, d.RedirectedBytes)
	}
	t.Logf("over the veth: %d bytes in %d packets counted at the sockets", d.StackEgressBytes, d.StackEgressPackets)
}
