package dataplane

import (
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// podIptables runs iptables in pod's network namespace.
func podIptables(t *testing.T, pod *testutil.Pod, args ...string) {
	t.Helper()
	out, err := exec.Command("nsenter", append([]string{"--net=" + pod.Netns.Path(), "iptables"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("iptables %v: %v\n%s", args, err, out)
	}
}

// boundDial connects a non-blocking socket bound to local (SO_REUSEADDR,
// so two sockets can share it) to remote, from pod's cgroup and namespace.
func boundDial(t *testing.T, pod *testutil.Pod, local, remote netip4) net.Conn {
	t.Helper()
	var fd int
	var err error
	pod.In(t, func() {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			return
		}
		if err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return
		}
		if err = unix.Bind(fd, &unix.SockaddrInet4{Addr: local.ip, Port: local.port}); err != nil {
			return
		}
		err = unix.Connect(fd, &unix.SockaddrInet4{Addr: remote.ip, Port: remote.port})
	})
	if err != nil && err != unix.EINPROGRESS {
		t.Fatalf("connect %v -> %v: %v", local, remote, err)
	}
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	if n, err := unix.Poll(pfd, 5000); n != 1 || err != nil {
		t.Fatalf("connect %v -> %v: poll %d %v", local, remote, n, err)
	}
	f := os.NewFile(uintptr(fd), "bound")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

type netip4 struct {
	ip   [4]byte
	port int
}

// TestNATImpostorNeverPairs reproduces a mirrored key that is not one
// connection. In pod A, socket C connects A:P -> VIP:80, which DNAT sends
// to B:8080; its final ACK is held back, so B's socket R stays in its
// handshake with the key (B:8080, A:P). Meanwhile socket X connects
// A:P -> B:8080 directly from the same port (Linux allows it: another
// destination); conntrack rewrites X's source port on the wire. X's key
// (A:P, B:8080) mirrors R's, and X joins on R's offer. When C's ACK finally
// arrives, R must refuse the pair (sequence numbers do not cross-match):
// X's bytes must reach X's own server socket, never R.
func TestNATImpostorNeverPairs(t *testing.T) {
	dp := install(t)
	a, b := testutil.NewPod(t), testutil.NewPod(t)
	testutil.Link(t, a, "10.9.7.1/24", b, "10.9.7.2/24", "sbxna", "sbxnb")
	enablePods(t, dp, a, b)
	l := b.Listen(t, "10.9.7.2:8080")
	recordListenerOf(t, dp, b)
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()

	const port = 41234
	podIptables(t, a, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.9.7.100", "--dport", "80", "-j", "DNAT", "--to-destination", "10.9.7.2:8080")
	hold := []string{"INPUT", "-p", "tcp", "-s", "10.9.7.1", "--sport", strconv.Itoa(port), "--dport", "8080", "--tcp-flags", "SYN,ACK,FIN,RST", "ACK", "-j", "DROP"}
	podIptables(t, b, append([]string{"-A"}, hold...)...)

	before := counterOf(t, dp, b.Cgroup.ID)
	local := netip4{[4]byte{10, 9, 7, 1}, port}
	c := boundDial(t, a, local, netip4{[4]byte{10, 9, 7, 100}, 80})
	x := boundDial(t, a, local, netip4{[4]byte{10, 9, 7, 2}, 8080})

	// X's own server socket (its SYN came from a rewritten port).
	var xs net.Conn
	select {
	case xs = <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("X's connection was not accepted")
	}
	if p := xs.RemoteAddr().(*net.TCPAddr).Port; p == port {
		t.Fatalf("X's source port was not rewritten (%d): the clash this test needs did not happen", p)
	}
	// Let C's handshake complete: R's SYN-ACK is retransmitted, C answers.
	podIptables(t, b, append([]string{"-D"}, hold...)...)
	var r net.Conn
	select {
	case r = <-accepted:
	case <-time.After(10 * time.Second):
		t.Fatal("C's connection was not accepted after its ACK was let through")
	}
	if p := r.RemoteAddr().(*net.TCPAddr).Port; p != port {
		t.Fatalf("R's peer port is %d, want %d", p, port)
	}

	// C is no member: what it sends reaches R through the stack, and R
	// must not be a member either, or FIONREAD on R misses it.
	if _, err := c.Write([]byte("from C")); err != nil {
		t.Fatal(err)
	}
	if n := fionreadWhenReadable(t, r, len("from C")); n != len("from C") {
		t.Errorf("FIONREAD on R = %d after C sent %d bytes: R joined a pair with another socket", n, len("from C"))
	}
	for _, w := range []struct {
		conn net.Conn
		msg  string
	}{{x, "from X"}, {c, ""}} {
		if _, err := w.conn.Write([]byte(w.msg)); err != nil {
			t.Fatal(err)
		}
		w.conn.(*net.TCPConn).CloseWrite()
	}
	read := func(conn net.Conn) string {
		conn.SetReadDeadline(time.Now().Add(3 * time.Second))
		b, _ := io.ReadAll(conn)
		return string(b)
	}
	if got := read(r); got != "from C" {
		t.Errorf("R (C's server socket) read %q, want %q", got, "from C")
	}
	if got := read(xs); got != "from X" {
		t.Errorf("X's server socket read %q, want %q", got, "from X")
	}
	if d := counterOf(t, dp, b.Cgroup.ID).Sub(before); d.PairsMismatched != 1 {
		t.Errorf("pairs_mismatched = %d, want 1 (R refused X): %+v", d.PairsMismatched, d)
	}
}

// recordListenerOf records the listeners this test process opened in pod.
func recordListenerOf(t *testing.T, dp *Dataplane, pod *testutil.Pod) {
	t.Helper()
	var err error
	pod.In(t, func() { _, err = dp.RefreshListeners() })
	if err != nil {
		t.Fatal(err)
	}
}

// fionreadWhenReadable waits until c is readable and returns FIONREAD once
// it counts want bytes, or what it counts 2 s later.
func fionreadWhenReadable(t *testing.T, c net.Conn, want int) int {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	n := -1
	raw.Control(func(fd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if k, err := unix.Poll(pfd, 5000); k != 1 || err != nil {
			t.Errorf("not readable: %d %v", k, err)
			return
		}
		deadline := time.Now().Add(2 * time.Second)
		for {
			n, err = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
			if err != nil {
				t.Error(err)
				return
			}
			if n >= want || time.Now().After(deadline) {
				return
			}
			time.Sleep(time.Millisecond)
		}
	})
	return n
}
