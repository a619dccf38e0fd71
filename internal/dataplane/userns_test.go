package dataplane

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

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestInterceptSidecarUIDInUserNamespace runs a pod with a user namespace
// of its own (uid_map "0 100000 65536", its network namespace owned by it,
// as a Kubernetes pod with hostUsers: false): its sidecar runs as 1337
// inside, kernel uid 101337, the uid bpf_get_current_uid_gid() reports.
// Its connects must not be intercepted (it would connect to itself), and
// the app's (1000 inside) must be, as iptables' --uid-owner 1337 decides in
// that network namespace.
func TestInterceptSidecarUIDInUserNamespace(t *testing.T) {
	dp := install(t)
	cg := testutil.NewCgroup(t)
	cgDir, err := os.Open(cg.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer cgDir.Close()

	// The pod: a process in a new user and network namespace, in cg.
	const hostBase = 100000
	pod := exec.Command("sleep", "600")
	pod.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER | syscall.CLONE_NEWNET,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: hostBase, Size: 65536}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: hostBase, Size: 65536}},
		UseCgroupFD: true,
		CgroupFD:    int(cgDir.Fd()),
	}
	if err := pod.Start(); err != nil {
		t.Fatalf("start a process in a new user namespace: %v", err)
	}
	t.Cleanup(func() {
		pod.Process.Kill()
		pod.Wait()
	})
	podNS, err := ns.GetNS(fmt.Sprintf("/proc/%d/ns/net", pod.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer podNS.Close()

	// In its network namespace: the sidecar on 127.0.0.1:15001 and the
	// destination on 10.77.0.1:8080; each reports the connections it gets.
	sidecar, dest := make(chan struct{}, 4), make(chan struct{}, 4)
	testutil.InNetNS(t, podNS, func() {
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err == nil {
			err = netlink.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 77, 0, 1), Mask: net.CIDRMask(32, 32)}})
		}
		if err != nil {
			t.Fatalf("set up lo: %v", err)
		}
		for addr, got := range map[string]chan struct{}{"127.0.0.1:15001": sidecar, "10.77.0.1:8080": dest} {
			l, err := net.Listen("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					c.Close()
					got <- struct{}{}
				}
			}()
		}
	})

	mesh := MeshPresets["istio"]
	mesh.Intercept = true
	if _, err := dp.Enable(cg, EnableOptions{Mesh: &mesh}); err != nil {
		t.Fatal(err)
	}

	// connectAs connects to 10.77.0.1:8080 from the pod as uid (inside)
	// and says where the connection landed.
	connectAs := func(uid int) string {
		cmd := exec.Command("nsenter", "-t", fmt.Sprint(pod.Process.Pid), "-U", "-n",
			"-S", fmt.Sprint(uid), "-G", fmt.Sprint(uid),
			"bash", "-c", "exec 3<>/dev/tcp/10.77.0.1/8080")
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgDir.Fd())}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("connect as uid %d in the pod: %v: %s", uid, err, out)
		}
		select {
		case <-sidecar:
			return "sidecar"
		case <-dest:
			return "destination"
		case <-time.After(5 * time.Second):
			return "nowhere"
		}
	}
	for _, c := range []struct {
		uid  int
		want string
	}{{int(mesh.SidecarUID), "destination"}, {1000, "sidecar"}} {
		if got := connectAs(c.uid); got != c.want {
			t.Errorf("uid %d (kernel uid %d) in the pod's user namespace: its connect landed on the %s, want the %s",
				c.uid, hostBase+c.uid, got, c.want)
		}
	}
}
