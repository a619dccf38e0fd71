package dataplane

import (
	"context"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// listenReusePort listens on addr in cg with SO_REUSEPORT.
func listenReusePort(t *testing.T, cg cgroup.Cgroup, addr string) net.Listener {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) }); err != nil {
			return err
		}
		return serr
	}}
	var l net.Listener
	var err error
	testutil.InCgroup(t, cg, func() { l, err = lc.Listen(context.Background(), "tcp4", addr) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// listenerRecorded reports whether listeners has an entry for l.
func listenerRecorded(t *testing.T, dp *Dataplane, l net.Listener) bool {
	t.Helper()
	ap := l.Addr().(*net.TCPAddr).AddrPort()
	_, ok, err := dp.ListenerFlags(netnsCookieOf(t), netip.AddrFrom4(ap.Addr().As4()), ap.Port())
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// netnsCookieOf returns the cookie of this test's network namespace.
func netnsCookieOf(t *testing.T) uint64 {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// pairedEcho round-trips payload over a new connection from cg to addr
// and reports whether bytes were redirected.
func pairedEcho(t *testing.T, dp *Dataplane, cg cgroup.Cgroup, addr string) bool {
	t.Helper()
	payload := transfer.Pattern(41, 32<<10)
	before := counterOf(t, dp, cg.ID)
	got, err := roundTripWithin(testutil.DialIn(t, cg, "tcp4", addr), payload, 10*time.Second)
	if err != nil || string(got) != string(payload) {
		t.Fatalf("echo through %s: %d of %d bytes, %v", addr, len(got), len(payload), err)
	}
	return counterOf(t, dp, cg.ID).Sub(before).RedirectedBytes > 0
}

// TestReusePortSiblingsShareTheirListenerEntry: SO_REUSEPORT listeners
// share one listeners entry; the first to close must not remove it while
// a sibling still listens (its connections would stay plain, counted as
// blocking), and the last removes it.
func TestReusePortSiblingsShareTheirListenerEntry(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	first := listenReusePort(t, cg, "127.0.0.1:0")
	second := listenReusePort(t, cg, first.Addr().String())
	transfer.ServeEcho(second)
	first.Close()
	if !listenerRecorded(t, dp, second) {
		t.Fatal("the first SO_REUSEPORT sibling closed and took the group's listeners entry with it")
	}
	if !pairedEcho(t, dp, cg, second.Addr().String()) {
		t.Fatalf("a connection to the surviving sibling was not paired (%+v)", counterOf(t, dp, cg.ID))
	}
	second.Close()
	waitFor(t, 5*time.Second, func() bool { return !listenerRecorded(t, dp, second) })
}

// TestDisableForgetsItsListeners: once a cgroup is disabled no program
// sees its listeners close, so disable removes the entries its sock_ops
// recorded.
func TestDisableForgetsItsListeners(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	other := enabledCgroup(t, dp)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	kept := testutil.ListenIn(t, other, "tcp4", "127.0.0.1:0")
	if !listenerRecorded(t, dp, l) || !listenerRecorded(t, dp, kept) {
		t.Fatal("listen() was not recorded")
	}
	if _, err := dp.Disable(cg.ID); err != nil {
		t.Fatal(err)
	}
	if listenerRecorded(t, dp, l) {
		t.Error("disable left its cgroup's listener in the listeners table")
	}
	if !listenerRecorded(t, dp, kept) {
		t.Error("disable removed another cgroup's listener")
	}
}

// TestRescanRemovesListenersThatAreGone: a listener that predates enable
// is recorded by the rescan, and nothing runs when it closes: the rescan
// marks it unseen, then removes it.
func TestRescanRemovesListenersThatAreGone(t *testing.T) {
	dp := install(t)
	cg := testutil.NewCgroup(t)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	var err error
	testutil.InCgroup(t, cg, func() { _, err = dp.Enable(cg, EnableOptions{NoProbation: true}) })
	if err != nil {
		t.Fatal(err)
	}
	refreshListenersIn(t, dp, cg)
	if !listenerRecorded(t, dp, l) {
		t.Fatal("the rescan did not record a listener that predates enable")
	}
	l.Close()
	for i := 0; i < 2; i++ {
		var err error
		testutil.InCgroup(t, cg, func() { _, err = dp.RefreshListeners() })
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 && !listenerRecorded(t, dp, l) {
			t.Fatal("one rescan without the listener removed it: a listener that starts between the /proc scan and the sweep would be lost")
		}
	}
	if listenerRecorded(t, dp, l) {
		t.Error("two rescans without the listener left its entry")
	}
}

// TestRemovedCgroupsAreForgotten: a sidecar-mode pod's app endpoint is
// counted in mesh_endpoints until its socket closes; a socket that closes
// after its cgroup was disabled is seen by no program, so the count would
// stay and make the address look shared for good. Once the cgroup is
// removed, ForgetRemovedCgroups removes it; a live cgroup's entries stay.
func TestRemovedCgroupsAreForgotten(t *testing.T) {
	dp := install(t)
	// A pod without its sleeping process, so that its cgroup can be
	// removed while the test runs.
	pod := &testutil.Pod{Netns: testutil.NewNetNS(t), Cgroup: testutil.NewCgroup(t)}
	mesh := MeshPresets["istio"]
	mesh.Intercept = true
	if _, err := dp.Enable(pod.Cgroup, EnableOptions{Mesh: &mesh, NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	sidecars := pod.Listen(t, "127.0.0.1:15001")
	other, otherSidecars := interceptPod(t, dp)
	app, sidecar := intercepted(t, pod, sidecars, "10.78.0.1:8080")
	otherApp, otherSidecar := intercepted(t, other, otherSidecars, "10.78.0.2:8080")
	defer otherApp.Close()
	defer otherSidecar.Close()
	base := entries(t, dp, PinMeshEndpoints)
	if base < 2 {
		t.Fatalf("mesh_endpoints holds %d entries, want both apps' endpoints", base)
	}
	if _, err := dp.Disable(pod.Cgroup.ID); err != nil {
		t.Fatal(err)
	}
	app.Close()
	sidecar.Close()
	sidecars.Close()
	if n, err := dp.ForgetRemovedCgroups(); err != nil || n != 0 {
		t.Fatalf("with the disabled cgroup still there: %d entries forgotten, %v; want none", n, err)
	}
	if err := os.Remove(pod.Cgroup.Path); err != nil {
		t.Fatalf("remove the pod's cgroup: %v", err)
	}
	n, err := dp.ForgetRemovedCgroups()
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 || entries(t, dp, PinMeshEndpoints) != base-1 {
		t.Errorf("after the cgroup was removed: %d forgotten, mesh_endpoints %d entries (%d before); want its one endpoint gone", n, entries(t, dp, PinMeshEndpoints), base)
	}
}
