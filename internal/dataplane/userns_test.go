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

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// The user namespaces of these tests map uids 0..65535 inside to
// 100000..165535 outside, as container runtimes do.
const hostBase = 100000

var nsMap = []syscall.SysProcIDMap{{ContainerID: 0, HostID: hostBase, Size: 65536}}

// sidecarPod is a network namespace with the sidecar's listener on
// 127.0.0.1:15001 and a destination on 10.77.0.1:8080 (on lo), each
// reporting the connections it gets.
type sidecarPod struct {
	sidecar, dest chan struct{}
}

func newSidecarPod(t *testing.T, netns ns.NetNS) *sidecarPod {
	t.Helper()
	p := &sidecarPod{sidecar: make(chan struct{}, 4), dest: make(chan struct{}, 4)}
	testutil.InNetNS(t, netns, func() {
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
		for addr, got := range map[string]chan struct{}{"127.0.0.1:15001": p.sidecar, "10.77.0.1:8080": p.dest} {
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
	return p
}

// connect runs cmd (a connect to 10.77.0.1:8080) in cg and says where the
// connection landed.
func (p *sidecarPod) connect(t *testing.T, cg cgroup.Cgroup, cmd *exec.Cmd) string {
	t.Helper()
	cgDir, err := os.Open(cg.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer cgDir.Close()
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.UseCgroupFD = true
	cmd.SysProcAttr.CgroupFD = int(cgDir.Fd())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", cmd, err, out)
	}
	select {
	case <-p.sidecar:
		return "sidecar"
	case <-p.dest:
		return "destination"
	case <-time.After(5 * time.Second):
		return "nowhere"
	}
}

const connectScript = "exec 3<>/dev/tcp/10.77.0.1/8080"

func enableIntercept(t *testing.T, dp *Dataplane, cg cgroup.Cgroup) MeshOptions {
	t.Helper()
	mesh := MeshPresets["istio"]
	mesh.Intercept = true
	if _, err := dp.Enable(cg, EnableOptions{Mesh: &mesh}); err != nil {
		t.Fatal(err)
	}
	return mesh
}

// TestInterceptSidecarUIDInUserNamespace runs a pod with a user namespace
// of its own (its network namespace owned by it, as a Kubernetes pod with
// hostUsers: false): its sidecar runs as 1337 inside, kernel uid 101337,
// the uid bpf_get_current_uid_gid() reports. Its connects must not be
// intercepted (it would connect to itself), and the app's (1000 inside)
// must be, as iptables' --uid-owner 1337 decides in that network namespace.
func TestInterceptSidecarUIDInUserNamespace(t *testing.T) {
	dp := install(t)
	cg := testutil.NewCgroup(t)
	cgDir, err := os.Open(cg.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer cgDir.Close()

	// The pod: a process in a new user and network namespace, in cg.
	pod := exec.Command("sleep", "600")
	pod.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER | syscall.CLONE_NEWNET,
		UidMappings: nsMap,
		GidMappings: nsMap,
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
	p := newSidecarPod(t, podNS)
	mesh := enableIntercept(t, dp, cg)

	for _, c := range []struct {
		uid  int
		want string
	}{{int(mesh.SidecarUID), "destination"}, {1000, "sidecar"}} {
		cmd := exec.Command("nsenter", "-t", fmt.Sprint(pod.Process.Pid), "-U", "-n",
			"-S", fmt.Sprint(c.uid), "-G", fmt.Sprint(c.uid), "bash", "-c", connectScript)
		if got := p.connect(t, cg, cmd); got != c.want {
			t.Errorf("uid %d (kernel uid %d) in the pod's user namespace: its connect landed on the %s, want the %s",
				c.uid, hostBase+c.uid, got, c.want)
		}
	}
}

// TestInterceptSidecarUIDInHostNamespace: in a pod whose network
// namespace belongs to the host's user namespace (no hostUsers: false),
// the sidecar is kernel uid 1337; a process that made a user namespace of
// its own and is 1337 in it (kernel uid 101337) is not the sidecar, and
// iptables' --uid-owner 1337 would redirect it too.
func TestInterceptSidecarUIDInHostNamespace(t *testing.T) {
	dp := install(t)
	pod := testutil.NewPod(t)
	p := newSidecarPod(t, pod.Netns)
	mesh := enableIntercept(t, dp, pod.Cgroup)
	uid := mesh.SidecarUID

	var sidecar, nested string
	testutil.InNetNS(t, pod.Netns, func() {
		cmd := exec.Command("bash", "-c", connectScript)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		sidecar = p.connect(t, pod.Cgroup, cmd)

		cmd = exec.Command("bash", "-c", connectScript)
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Cloneflags:  syscall.CLONE_NEWUSER,
			UidMappings: nsMap,
			GidMappings: nsMap,
			Credential:  &syscall.Credential{Uid: uid, Gid: uid, NoSetGroups: true},
		}
		nested = p.connect(t, pod.Cgroup, cmd)
	})
	if sidecar != "destination" {
		t.Errorf("kernel uid %d: its connect landed on the %s, want the destination", uid, sidecar)
	}
	if nested != "sidecar" {
		t.Errorf("uid %d in a user namespace of its own (kernel uid %d): its connect landed on the %s, want the sidecar", uid, hostBase+uid, nested)
	}
}
