package dataplane

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// inFlight counts the orig_dsts entries of slot and reads its count in
// intercepts.
func inFlight(t *testing.T, dp *Dataplane, slot uint32) (entries int, count uint64) {
	t.Helper()
	m := dp.maps[PinOrigDsts]
	var key endpointKey
	val := make([]byte, m.ValueSize())
	it := m.Iterate()
	for it.Next(&key, &val) {
		if origDstSlot(val) == slot+1 {
			entries++
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	if err := dp.maps[PinIntercepts].Lookup(slot, &count); err != nil {
		t.Fatal(err)
	}
	return entries, count
}

// TestInterceptQuota: a pod in intercept mode whose sidecar stops
// accepting (its backlog full) holds one orig_dsts entry per connect in
// flight, counted in its slot. Once it holds its quota, its next connects
// go where they asked, unintercepted and counted (fail open), so it
// cannot fill the node's orig_dsts: another pod's intercepted connects
// still get their SO_ORIGINAL_DST. Closing the connects gives the entries
// back; disabling the cgroup removes what is left and zeroes its count.
func TestInterceptQuota(t *testing.T) {
	dp := installSized(t, 64)
	noisy := interceptPodNoSidecar(t, dp)
	victim, victimSidecars := interceptPod(t, dp)
	slot, ok, err := dp.slotOf(noisy.Cgroup.ID)
	if err != nil || !ok {
		t.Fatalf("slot of the noisy pod: %v %v", ok, err)
	}
	quota := InterceptQuota(dp.maps[PinOrigDsts].MaxEntries())

	// The noisy pod's sidecar: listening with a backlog of 0, never
	// accepting; and a server at the address its app connects to,
	// which only an unintercepted connect reaches.
	var sidecarFD int
	noisy.In(t, func() {
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 88, 0, 1), Mask: net.CIDRMask(32, 32)}})
		}
		if err != nil {
			t.Fatalf("address the noisy pod: %v", err)
		}
		sidecarFD, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err == nil {
			err = unix.Bind(sidecarFD, &unix.SockaddrInet4{Port: 15001, Addr: [4]byte{127, 0, 0, 1}})
		}
		if err == nil {
			err = unix.Listen(sidecarFD, 0)
		}
		if err != nil {
			t.Fatalf("the noisy pod's sidecar: %v", err)
		}
	})
	t.Cleanup(func() { unix.Close(sidecarFD) })
	direct := noisy.Listen(t, "10.88.0.1:8080")
	go func() {
		for {
			c, err := direct.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()

	// connect starts a non-blocking connect from the noisy app to the
	// server's address and returns its socket.
	var held []int
	t.Cleanup(func() {
		for _, fd := range held {
			unix.Close(fd)
		}
	})
	connect := func() int {
		var fd int
		noisy.In(t, func() {
			var err error
			fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := unix.Connect(fd, &unix.SockaddrInet4{Port: 8080, Addr: [4]byte{10, 88, 0, 1}}); err != nil && !errors.Is(err, unix.EINPROGRESS) {
				t.Fatalf("connect: %v", err)
			}
		})
		held = append(held, fd)
		return fd
	}
	peerOf := func(fd int) string {
		sa, err := unix.Getpeername(fd)
		if err != nil {
			return "none (" + err.Error() + ")"
		}
		a := sa.(*unix.SockaddrInet4)
		return (&net.TCPAddr{IP: net.IP(a.Addr[:]), Port: a.Port}).String()
	}

	// The first connect fills the sidecar's accept queue (its entry moves
	// to the accepted socket); the next ones stay in flight, each holding
	// an entry.
	first := connect()
	waitFor(t, 5*time.Second, func() bool { return peerOf(first) == "127.0.0.1:15001" })
	const n = 20
	for i := 0; i < n; i++ {
		connect()
	}
	waitFor(t, 5*time.Second, func() bool { e, c := inFlight(t, dp, slot); return e == n && c == n })

	// The pod at its quota (the rest of it mimicked in the count): the
	// next connects go where they asked.
	if err := dp.maps[PinIntercepts].Put(slot, quota-2); err != nil {
		t.Fatal(err)
	}
	before := counterOf(t, dp, noisy.Cgroup.ID)
	for i := 0; i < 4; i++ {
		fd := connect()
		if i < 2 {
			// Intercepted: in flight to the sidecar, one more entry.
			waitFor(t, 5*time.Second, func() bool { e, _ := inFlight(t, dp, slot); return e == n+i+1 })
			continue
		}
		deadline := time.Now().Add(5 * time.Second)
		for peerOf(fd) != "10.88.0.1:8080" && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if got := peerOf(fd); got != "10.88.0.1:8080" {
			t.Errorf("connect %d over the quota went to %s, want where it asked (10.88.0.1:8080)", i, got)
		}
	}
	d := counterOf(t, dp, noisy.Cgroup.ID).Sub(before)
	if d.InterceptsOverQuota != 2 || d.MeshIntercepted != 2 {
		t.Errorf("at its quota: %d connects left alone, %d intercepted; want 2 and 2", d.InterceptsOverQuota, d.MeshIntercepted)
	}
	if _, c := inFlight(t, dp, slot); c != quota {
		t.Errorf("count %d at the quota, want %d", c, quota)
	}

	// Another pod is still intercepted, with its destination.
	app, sidecar := intercepted(t, victim, victimSidecars, "10.77.0.1:8080")
	if dst, err := origDst(sidecar); err != nil || dst.String() != "10.77.0.1:8080" {
		t.Errorf("the other pod's SO_ORIGINAL_DST: %v (%v), want 10.77.0.1:8080", dst, err)
	}
	app.Close()
	sidecar.Close()

	// Closing the connects in flight gives their entries back.
	for _, fd := range held {
		unix.Close(fd)
	}
	held = nil
	waitFor(t, 5*time.Second, func() bool { e, c := inFlight(t, dp, slot); return e == 0 && c == quota-2-n })

	// Disabling the cgroup zeroes its count.
	connect()
	waitFor(t, 5*time.Second, func() bool { e, _ := inFlight(t, dp, slot); return e == 1 })
	if _, err := dp.Disable(noisy.Cgroup.ID); err != nil {
		t.Fatal(err)
	}
	if e, c := inFlight(t, dp, slot); e != 0 || c != 0 {
		t.Errorf("after disable: %d entries, count %d; want none", e, c)
	}
}
