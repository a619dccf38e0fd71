package testutil

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
)

// Pod is a network namespace with a cgroup and a process living in both,
// the way a Kubernetes pod looks to sockbypass.
type Pod struct {
	Netns  ns.NetNS
	Cgroup cgroup.Cgroup
}

// NewPod makes a pod: a network namespace (lo up), a cgroup, and a sleeping
// process in both, all removed when tb ends.
func NewPod(tb testing.TB) *Pod {
	tb.Helper()
	p := &Pod{Netns: NewNetNS(tb), Cgroup: NewCgroup(tb)}
	cgDir, err := os.Open(p.Cgroup.Path)
	if err != nil {
		tb.Fatal(err)
	}
	defer cgDir.Close()
	cmd := exec.Command("nsenter", "--net="+p.Netns.Path(), "sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgDir.Fd())}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start the pod's process: %v", err)
	}
	// Registered after the cgroup's cleanup, so it runs before it.
	tb.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	// nsenter starts in the cgroup but in this namespace: until it has
	// entered the pod's, a scan of the cgroup's processes would find the
	// host's addresses.
	want, err := os.Stat(p.Netns.Path())
	if err != nil {
		tb.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := os.Stat(fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid))
		if err == nil && os.SameFile(got, want) {
			break
		}
		if time.Now().After(deadline) {
			tb.Fatalf("the pod's process did not enter its network namespace within 5 s")
		}
		time.Sleep(2 * time.Millisecond)
	}
	return p
}

// In runs fn with sockets created in the pod's cgroup and namespace.
func (p *Pod) In(tb testing.TB, fn func()) {
	tb.Helper()
	InCgroup(tb, p.Cgroup, func() { InNetNS(tb, p.Netns, fn) })
}

// Link joins two pods with a veth pair, giving a the address addrA and b
// the address addrB (CIDR notation, e.g. 10.9.1.1/24).
func Link(tb testing.TB, a *Pod, addrA string, b *Pod, addrB string, nameA, nameB string) {
	tb.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: nameA}, PeerName: nameB}
	err := a.Netns.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		peer, err := netlink.LinkByName(nameB)
		if err != nil {
			return err
		}
		return netlink.LinkSetNsFd(peer, int(b.Netns.Fd()))
	})
	if err != nil {
		tb.Fatalf("create veth %s/%s: %v", nameA, nameB, err)
	}
	for _, side := range []struct {
		pod        *Pod
		name, addr string
	}{{a, nameA, addrA}, {b, nameB, addrB}} {
		err := side.pod.Netns.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName(side.name)
			if err != nil {
				return err
			}
			addr, err := netlink.ParseAddr(side.addr)
			if err != nil {
				return err
			}
			if addr.IP.To4() == nil {
				addr.Flags |= unix.IFA_F_NODAD // usable at once
			}
			if err := netlink.AddrAdd(l, addr); err != nil {
				return err
			}
			return netlink.LinkSetUp(l)
		})
		if err != nil {
			tb.Fatalf("configure %s: %v", side.name, err)
		}
	}
}

// Listen listens on addr in the pod.
func (p *Pod) Listen(tb testing.TB, addr string) net.Listener {
	tb.Helper()
	var l net.Listener
	var err error
	p.In(tb, func() { l, err = net.Listen("tcp", addr) })
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { l.Close() })
	return l
}

// Dial connects from the pod, from local (may be nil) to addr.
func (p *Pod) Dial(tb testing.TB, local *net.TCPAddr, addr string) net.Conn {
	tb.Helper()
	var c net.Conn
	var err error
	d := net.Dialer{LocalAddr: local}
	p.In(tb, func() { c, err = d.Dial("tcp", addr) })
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}
