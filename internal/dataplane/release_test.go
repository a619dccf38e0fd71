package dataplane

import (
	"bytes"
	"net"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// dialBlocking connects a blocking socket created in cg to 127.0.0.1:port
// and returns its fd (closed at the end of the test unless the test
// closed it first).
func dialBlocking(t *testing.T, cg cgroup.Cgroup, port int) int {
	t.Helper()
	fd := -1
	var err error
	if e := cg.RunIn(func() {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return
		}
		err = unix.Connect(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: port})
	}); e != nil {
		t.Fatal(e)
	}
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

// writeAll writes n bytes to the blocking fd.
func writeAll(fd, n int) error {
	buf := bytes.Repeat([]byte("s"), 64<<10)
	for n > 0 {
		w, err := unix.Write(fd, buf[:min(n, len(buf))])
		if err != nil {
			return err
		}
		n -= w
	}
	return nil
}

// readN reads n bytes from the blocking fd, or until EOF when n < 0, and
// returns how many it read.
func readN(fd, n int) (int, error) {
	buf := make([]byte, 64<<10)
	got := 0
	for n < 0 || got < n {
		want := len(buf)
		if n >= 0 {
			want = min(want, n-got)
		}
		r, err := unix.Read(fd, buf[:want])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return got, err
		}
		if r == 0 {
			return got, nil
		}
		got += r
	}
	return got, nil
}

// TestStackBytesCountedAtClose: what an accelerated cgroup's sockets send
// through the stack to a local peer is counted when they close, and it is
// exactly what the applications wrote: over blocking connections (which
// never pair), both ways; and with a sender that closes while its bytes
// and its FIN (shutdown) are still queued, which the kernel delivers after
// close (the count is what the reader read).
func TestStackBytesCountedAtClose(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	lfd, port := blockingListener(t, cg)

	// Blocking exchange: the client writes up, the server writes back,
	// then both close.
	const up, down = 1<<20 + 7, 300001
	before := counterOf(t, dp, cg.ID)
	cfd := dialBlocking(t, cg, port)
	sfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		if _, err := readN(sfd, up); err != nil {
			errc <- err
			return
		}
		errc <- writeAll(sfd, down)
	}()
	if err := writeAll(cfd, up); err != nil {
		t.Fatal(err)
	}
	if n, err := readN(cfd, down); n != down || err != nil {
		t.Fatalf("client read %d, %v; want %d", n, err, down)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	open := counterOf(t, dp, cg.ID).Sub(before)
	unix.Close(cfd)
	unix.Close(sfd)
	d := counterOf(t, dp, cg.ID).Sub(before)
	if d.StackEgressBytes != up+down || d.StackEgressPackets == 0 || d.StackEgressPackets > d.StackEgressBytes || d.RedirectedBytes != 0 {
		t.Errorf("blocking exchange of %d + %d bytes: stack egress %d bytes in %d packets, redirected %d; want %d, at least one packet, none redirected",
			up, down, d.StackEgressBytes, d.StackEgressPackets, d.RedirectedBytes, up+down)
	}
	if d.SocketsBlocking == 0 {
		t.Errorf("sockets_blocking did not move: the connection was not the plain one this test needs")
	}
	t.Logf("blocking exchange: %d bytes in %d packets counted at close (%d before it)", d.StackEgressBytes, d.StackEgressPackets, open.StackEgressBytes)

	// Closed with bytes and a FIN still queued: the client fills its
	// send buffer while the server reads nothing, shuts its side down,
	// and closes; the kernel sends the rest after close.
	before = counterOf(t, dp, cg.ID)
	cfd = dialBlocking(t, cg, port)
	sfd, _, err = unix.Accept4(lfd, unix.SOCK_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sfd)
	if err := unix.SetNonblock(cfd, true); err != nil {
		t.Fatal(err)
	}
	buf := bytes.Repeat([]byte("q"), 64<<10)
	written := 0
	for {
		w, err := unix.Write(cfd, buf)
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		written += w
	}
	if err := unix.Shutdown(cfd, unix.SHUT_WR); err != nil {
		t.Fatal(err)
	}
	unix.Close(cfd)
	read, err := readN(sfd, -1)
	if err != nil || read != written {
		t.Fatalf("server read %d bytes, %v; want the %d written", read, err, written)
	}
	d = counterOf(t, dp, cg.ID).Sub(before)
	if d.StackEgressBytes != uint64(written) {
		t.Errorf("closed with bytes and a FIN queued: stack egress %d bytes, want the %d written (and read)", d.StackEgressBytes, written)
	}
	t.Logf("closed with bytes queued: %d bytes counted, %d written", d.StackEgressBytes, written)
}

// TestStackBytesOfSocketsThatPredateEnable: sockets established before
// their cgroup was enabled (sock_ops never classified them) are counted
// when they close if their peer is local by the rule sock_ops classifies
// with (loopback; a node address, here over a veth), and not when it
// cannot be local. A socket's whole history counts, bytes sent before the
// enable too.
func TestStackBytesOfSocketsThatPredateEnable(t *testing.T) {
	dp := install(t)
	a, b := testutil.NewPod(t), testutil.NewPod(t)
	testutil.Link(t, a, "10.9.8.1/24", b, "10.9.8.2/24", "sbxpa", "sbxpb")
	lb := b.Listen(t, "10.9.8.2:0")
	transfer.ServeDiscard(lb)
	lo := a.Listen(t, "127.0.0.1:0")
	transfer.ServeDiscard(lo)
	loop := a.Dial(t, nil, lo.Addr().String())
	remote := a.Dial(t, nil, lb.Addr().String())
	node := a.Dial(t, nil, lb.Addr().String())
	const first, then = 1000, 2345
	write := func(n int) {
		t.Helper()
		for _, c := range []net.Conn{loop, remote, node} {
			if _, err := c.Write(bytes.Repeat([]byte("p"), n)); err != nil {
				t.Fatal(err)
			}
		}
	}
	write(first)
	if _, err := dp.Enable(a.Cgroup, EnableOptions{}); err != nil {
		t.Fatal(err)
	}
	before := counterOf(t, dp, a.Cgroup.ID)
	write(then)
	closed := func(c net.Conn, what string, want uint64) {
		t.Helper()
		c.Close()
		if d := counterOf(t, dp, a.Cgroup.ID).Sub(before); d.StackEgressBytes != want {
			t.Errorf("%s closed: stack egress %d bytes, want %d", what, d.StackEgressBytes, want)
		}
	}
	closed(remote, "to a peer that cannot be local", 0)
	closed(loop, "on loopback", first+then)
	// b's namespace is a pod of the node: its address is local now.
	if _, err := dp.RefreshNodeAddrs(b.Netns.Path()); err != nil {
		t.Fatal(err)
	}
	closed(node, "to a node address over a veth", 2*(first+then))
}
