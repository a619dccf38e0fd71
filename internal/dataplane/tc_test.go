package dataplane

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"io"
	"net"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
	"github.com/sockbypass/sockbypass/tc"
)

// transferInPod sends n bytes from a client to a server, both created in
// cg and netns, and checks the digest the server returns.
func transferInPod(t *testing.T, cg cgroup.Cgroup, netns ns.NetNS, n int) {
	t.Helper()
	var l net.Listener
	var err error
	testutil.InCgroup(t, cg, func() {
		testutil.InNetNS(t, netns, func() { l, err = net.Listen("tcp4", "127.0.0.1:0") })
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	// The reader acknowledges every 4 MiB and the writer waits for it: the
	// writer never has 8 MiB unread (past which it would fall back to the
	// stack for flow control), whatever the machine's speed.
	const window = 4 << 20
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 1<<20)
		sum := crc32.New(crc32.MakeTable(crc32.Castagnoli))
		got := 0
		for {
			m, err := c.Read(buf)
			sum.Write(buf[:m])
			if got/window != (got+m)/window {
				c.Write([]byte{'a'})
			}
			got += m
			if err != nil {
				break
			}
		}
		c.Write(sum.Sum(nil))
	}()
	var c net.Conn
	testutil.InCgroup(t, cg, func() {
		testutil.InNetNS(t, netns, func() { c, err = net.Dial("tcp4", l.Addr().String()) })
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	payload := transfer.Pattern(uint64(n), n)
	ack := make([]byte, 1)
	for off := 0; off < n; off += window {
		if _, err := c.Write(payload[off:min(off+window, n)]); err != nil {
			t.Fatal(err)
		}
		if off+window <= n {
			if _, err := io.ReadFull(c, ack); err != nil {
				t.Fatalf("ack after %d bytes: %v", off+window, err)
			}
		}
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	want := crc32.Checksum(payload, crc32.MakeTable(crc32.Castagnoli))
	if err != nil || len(got) != 4 || binary.BigEndian.Uint32(got) != want {
		t.Fatalf("CRC-32C after %d bytes: %x (%v), want %08x", n, got, err, want)
	}
}

// tcOnLo reports what of ours is attached to lo's egress in netns: tcx
// programs, our cls_bpf filter, and whether a clsact qdisc exists.
func tcOnLo(t *testing.T, netns ns.NetNS) (tcxProgs int, filter, clsact bool) {
	t.Helper()
	testutil.InNetNS(t, netns, func() {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: lo.Attrs().Index, Attach: ebpf.AttachTCXEgress})
		if err == nil {
			tcxProgs = len(res.Programs)
		}
		if filter, err = tc.HasFilter(lo.Attrs().Index); err != nil {
			t.Fatal(err)
		}
		qdiscs, err := netlink.QdiscList(lo)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range qdiscs {
			clsact = clsact || q.Type() == "clsact"
		}
	})
	return
}

func TestTCAccountsStackEgressPerCgroup(t *testing.T) {
	for _, legacy := range []bool{false, true} {
		name := map[bool]string{false: "tcx", true: "clsact"}[legacy]
		t.Run(name, func(t *testing.T) {
			pinDir := testutil.NewPinDir(t)
			dp, err := OpenOrCreate(Options{PinDir: pinDir, LegacyTC: legacy})
			if err != nil {
				t.Fatal(err)
			}
			defer dp.Close()
			t.Cleanup(func() {
				if d, err := Open(Options{PinDir: pinDir}); err == nil {
					d.Uninstall()
				}
			})
			netns := testutil.NewNetNS(t)
			cg := testutil.NewCgroup(t)
			other := testutil.NewCgroup(t)
			devs := []TCDevice{{NetnsPath: netns.Path(), Name: "lo"}}
			const size = 64 << 20

			// Account only: everything crosses the stack and is counted.
			if _, err := dp.Enable(cg, EnableOptions{TCDevices: devs, AccountOnly: true}); err != nil {
				t.Fatal(err)
			}
			tcx, filter, _ := tcOnLo(t, netns)
			if (legacy && (!filter || tcx != 0)) || (!legacy && (tcx != 1 || filter)) {
				t.Fatalf("after enable: tcx programs %d, cls_bpf filter %v", tcx, filter)
			}
			st, err := dp.Status()
			if err != nil {
				t.Fatal(err)
			}
			if len(st.TCDevices) != 1 || st.TCDevices[0].Mode != name || st.TCDevices[0].ProgramID == 0 || st.Cgroups[0].Mode != "account-only" {
				t.Fatalf("status: tc devices %+v, cgroups %+v", st.TCDevices, st.Cgroups)
			}
			before := counterOf(t, dp, cg.ID)
			transferInPod(t, cg, netns, size)
			d := counterOf(t, dp, cg.ID).Sub(before)
			if d.TCEgressBytes < size || d.StackEgressBytes < size || d.RedirectedBytes != 0 {
				t.Errorf("account-only: TC egress %d bytes, stack egress at the sockets %d, redirected %d; want >= %d, >= %d and 0",
					d.TCEgressBytes, d.StackEgressBytes, d.RedirectedBytes, size, size)
			}

			// Accelerated: the same transfer leaves the stack nearly idle.
			if _, err := dp.Enable(cg, EnableOptions{TCDevices: devs, NoProbation: true}); err != nil {
				t.Fatal(err)
			}
			before = counterOf(t, dp, cg.ID)
			transferInPod(t, cg, netns, size)
			d = counterOf(t, dp, cg.ID).Sub(before)
			if d.RedirectedBytes < size || d.TCEgressBytes*100 >= size || d.StackEgressBytes*100 >= size {
				t.Errorf("accelerated: redirected %d bytes, TC egress %d bytes (%d packets), stack egress at the sockets %d; want >= %d and < 1%% each",
					d.RedirectedBytes, d.TCEgressBytes, d.TCEgressPackets, d.StackEgressBytes, size)
			}
			// TC sees every packet of the device; the sockets' count
			// holds packets with payload only, and the pair sent none.
			if d.TCEgressPackets == 0 || d.StackEgressPackets != 0 {
				t.Errorf("accelerated: TC counted %d packets (want the handshake and FIN ones), the sockets %d (want none with payload)", d.TCEgressPackets, d.StackEgressPackets)
			}
			t.Logf("accelerated 64 MiB: redirected %d bytes, TC: stack %d bytes in %d packets", d.RedirectedBytes, d.TCEgressBytes, d.TCEgressPackets)

			// A cgroup that is not enabled: counted under no enabled cgroup.
			beforeCg := counterOf(t, dp, cg.ID)
			beforeNone := counterOf(t, dp, 0)
			transferInPod(t, other, netns, 8<<20)
			if d := counterOf(t, dp, cg.ID).Sub(beforeCg); d.TCEgressBytes != 0 || d.StackEgressBytes != 0 {
				t.Errorf("traffic of a cgroup that is not enabled was counted for %s: %+v", cg.Path, d)
			}
			if d := counterOf(t, dp, 0).Sub(beforeNone); d.TCEgressBytes < 8<<20 || d.StackEgressBytes != 0 {
				t.Errorf("unattributed TC egress grew by %d bytes, want >= %d (stack egress at the sockets %d, want 0: only enabled cgroups count there)",
					d.TCEgressBytes, 8<<20, d.StackEgressBytes)
			}
			if c := counterOf(t, dp, other.ID); c != (CgroupCounters{}) {
				t.Errorf("counters exist for a cgroup that is not enabled: %+v", c)
			}

			// Disable removes the attachment: nothing of ours on lo.
			if _, err := dp.Disable(cg.ID); err != nil {
				t.Fatal(err)
			}
			if tcx, filter, clsact := tcOnLo(t, netns); tcx != 0 || filter || clsact {
				t.Errorf("after disable: tcx programs %d, filter %v, clsact qdisc %v", tcx, filter, clsact)
			}
			// Uninstall does too.
			if _, err := dp.Enable(cg, EnableOptions{TCDevices: devs, NoProbation: true}); err != nil {
				t.Fatal(err)
			}
			d2, err := Open(Options{PinDir: pinDir})
			if err != nil {
				t.Fatal(err)
			}
			if err := d2.Uninstall(); err != nil {
				t.Fatal(err)
			}
			if tcx, filter, clsact := tcOnLo(t, netns); tcx != 0 || filter || clsact {
				t.Errorf("after uninstall: tcx programs %d, filter %v, clsact qdisc %v", tcx, filter, clsact)
			}
		})
	}
}

func TestTCDeviceErrorsNameTheInput(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"", "not an interface name"},
		{"relative/ns:lo", "must be an absolute path"},
		{"/run/netns/x:", "not an interface name"},
	} {
		if _, err := ParseTCDevice(c.in); err == nil || !bytes.Contains([]byte(err.Error()), []byte(c.want)) {
			t.Errorf("ParseTCDevice(%q) = %v, want %q", c.in, err, c.want)
		}
	}
	dp := install(t)
	cg := testutil.NewCgroup(t)
	_, err := dp.Enable(cg, EnableOptions{TCDevices: []TCDevice{{Name: "nosuchdev0"}}})
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte(`no interface "nosuchdev0"`)) {
		t.Fatalf("enable with a missing device: %v", err)
	}
	ids, _ := dp.EnabledCgroupIDs()
	if len(ids) != 0 {
		t.Errorf("a failed enable left cgroups enabled: %v", ids)
	}
}
