package dataplane

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestAccountingMatchesTheSockets: every byte an enabled cgroup's sockets
// send to a local peer is counted once, as redirected or as stack, and the
// split is what the sockets themselves did. A mix of connections, each end
// writing a known number of bytes: pairs of non-blocking sockets
// (redirected), blocking ones (left plain: the stack), a non-blocking
// client of a listener in a cgroup that is not enabled (unpaired: the
// stack), and a pair whose client turns blocking half-way (redirected,
// then the stack); over loopback in one cgroup, and between two enabled
// pods joined by a veth. After they close, each enabled cgroup's counters
// must hold: RedirectedBytes + StackEgressBytes = what its applications
// wrote, each byte once; StackEgressBytes = what the kernel sent through
// the stack for its sockets, each byte once (TCP_INFO tcpi_bytes_sent
// minus tcpi_bytes_retrans, summed: a retransmission under load is not
// a second byte the application sent); RedirectedBytes = written minus
// what took the stack; and so the bypass ratio is the sockets' own.
func TestAccountingMatchesTheSockets(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Run("loopback", func(t *testing.T) {
		dp := install(t)
		cg := enabledCgroup(t, dp)     // no probation: the first connection may pair
		other := testutil.NewCgroup(t) // not enabled
		in := func(cg cgroup.Cgroup) func(func()) {
			return func(fn func()) { testutil.InCgroup(t, cg, fn) }
		}
		checkAccounting(t, dp, acctTopology{
			addr:   [4]byte{127, 0, 0, 1},
			client: cg, server: cg, other: other,
			dialIn: in(cg), serverIn: in(cg), otherIn: in(other),
		})
	})
	t.Run("veth", func(t *testing.T) {
		dp := install(t)
		a, b := testutil.NewPod(t), testutil.NewPod(t)
		testutil.Link(t, a, "10.9.28.11/24", b, "10.9.28.12/24", "sbx28acca", "sbx28accb")
		for _, p := range []*testutil.Pod{a, b} {
			if _, err := dp.Enable(p.Cgroup, EnableOptions{NoProbation: true}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := dp.RefreshNodeAddrs(); err != nil {
			t.Fatal(err)
		}
		other := testutil.NewCgroup(t) // a cgroup of b's namespace, not enabled
		checkAccounting(t, dp, acctTopology{
			addr:   [4]byte{10, 9, 28, 12},
			client: a.Cgroup, server: b.Cgroup, other: other,
			dialIn:   func(fn func()) { a.In(t, fn) },
			serverIn: func(fn func()) { b.In(t, fn) },
			otherIn:  func(fn func()) { testutil.InCgroup(t, other, func() { testutil.InNetNS(t, b.Netns, fn) }) },
		})
	})
}

// acctTopology is where checkAccounting makes its connections: clients in
// the enabled cgroup client (created by dialIn), servers in the enabled
// cgroup server (listeners created by serverIn) on addr, and one server in
// other, a cgroup that is not enabled (otherIn).
type acctTopology struct {
	addr                      [4]byte
	client, server, other     cgroup.Cgroup
	dialIn, serverIn, otherIn func(func())
}

// checkAccounting makes the mix of connections of
// TestAccountingMatchesTheSockets in topo and checks the counters of its
// enabled cgroups against what their sockets did.
func checkAccounting(t *testing.T, dp *Dataplane, topo acctTopology) {
	t.Helper()
	enabled := []cgroup.Cgroup{topo.client}
	if topo.server.ID != topo.client.ID {
		enabled = append(enabled, topo.server)
	}
	before, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}

	// ends are the sockets of the enabled cgroups, with what their
	// application wrote.
	type end struct {
		name    string
		cgroup  uint64
		fd      int
		written uint64
	}
	var ends []*end
	var fds []int
	t.Cleanup(func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	})
	// connect makes a connection whose client is created by topo.dialIn
	// and whose listener (so the accepted socket) by listenIn, in lcg.
	connect := func(name string, blocking bool, lcg cgroup.Cgroup, listenIn func(func())) (c, s *end) {
		t.Helper()
		lfd := -1
		var err error
		listenIn(func() { lfd, err = acctListen(topo.addr, blocking) })
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(lfd)
		var cfd int
		topo.dialIn(func() { cfd, err = acctDial(lfd, topo.addr, blocking) })
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, cfd)
		sfd, err := acctAccept(lfd, blocking)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, sfd)
		c, s = &end{name: name + " client", cgroup: topo.client.ID, fd: cfd}, &end{name: name + " server", cgroup: lcg.ID, fd: sfd}
		ends = append(ends, c)
		if lcg.ID != topo.other.ID {
			ends = append(ends, s)
		}
		return c, s
	}
	// send writes n bytes from one end and reads them at the other,
	// checking them.
	seed := byte(1)
	send := func(from, to *end, n int) {
		t.Helper()
		seed++
		if err := acctTransfer(from.fd, to.fd, n, seed); err != nil {
			t.Fatalf("%s -> %s, %d bytes: %v", from.name, to.name, n, err)
		}
		from.written += uint64(n)
	}

	for i := range 3 {
		c, s := connect(fmt.Sprintf("paired %d", i), false, topo.server, topo.serverIn)
		send(c, s, 1<<20+7*i)
		send(s, c, 300<<10+3)
		send(c, s, 1)
	}
	for i := range 2 {
		c, s := connect(fmt.Sprintf("blocking %d", i), true, topo.server, topo.serverIn)
		send(c, s, 700<<10+i)
		send(s, c, 64)
	}
	{
		c, s := connect("unpaired", false, topo.other, topo.otherIn)
		send(c, s, 512<<10)
		send(s, c, 200<<10) // the server's bytes are other's, not counted
	}
	{
		c, s := connect("late blocking", false, topo.server, topo.serverIn)
		send(c, s, 256<<10)
		send(s, c, 1000)
		if err := unix.SetNonblock(c.fd, false); err != nil {
			t.Fatal(err)
		}
		// A member found blocking within the accept grace (10 ms) is
		// not taken for blocking yet (bpf/sockbypass.h).
		time.Sleep(30 * time.Millisecond)
		send(c, s, 384<<10)
		send(s, c, 2000)
	}

	// What each socket says it sent through the stack, once everything
	// arrived, per cgroup.
	type sum struct{ written, stack, retrans uint64 }
	want := map[uint64]*sum{}
	for _, cg := range enabled {
		want[cg.ID] = &sum{}
	}
	for _, e := range ends {
		info, err := unix.GetsockoptTCPInfo(e.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			t.Fatal(err)
		}
		if info.Bytes_sent-info.Bytes_retrans > e.written {
			t.Fatalf("%s: TCP_INFO says %d bytes sent (%d retransmitted), more than the %d written", e.name, info.Bytes_sent, info.Bytes_retrans, e.written)
		}
		t.Logf("%-20s wrote %8d bytes: %8d through the stack (%d retransmitted), %8d redirected", e.name, e.written,
			info.Bytes_sent-info.Bytes_retrans, info.Bytes_retrans, e.written-(info.Bytes_sent-info.Bytes_retrans))
		w := want[e.cgroup]
		w.written += e.written
		w.stack += info.Bytes_sent - info.Bytes_retrans
		w.retrans += info.Bytes_retrans
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
	fds = nil

	var allRedirected, allStack uint64
	for _, cg := range enabled {
		w := want[cg.ID]
		wantRedirected := w.written - w.stack
		allRedirected += wantRedirected
		allStack += w.stack
		// The counters may move after the sockets close (an accounting
		// that reads a socket's own counters when it closes): wait for
		// them to settle, up to 5 s.
		var d CgroupCounters
		deadline := time.Now().Add(5 * time.Second)
		for {
			d = counterOf(t, dp, cg.ID).Sub(before[cg.ID])
			if d.RedirectedBytes+d.StackEgressBytes >= w.written || time.Now().After(deadline) {
				time.Sleep(50 * time.Millisecond) // and nothing more comes
				d = counterOf(t, dp, cg.ID).Sub(before[cg.ID])
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Logf("cgroup %d: counters: redirected %d, stack to local peers %d (%d packets), passed %d; sockets: written %d, stack %d (and %d retransmitted)",
			cg.ID, d.RedirectedBytes, d.StackEgressBytes, d.StackEgressPackets, d.PassedBytes, w.written, w.stack, w.retrans)
		if got := d.RedirectedBytes + d.StackEgressBytes; got != w.written {
			t.Errorf("cgroup %d: redirected + stack = %d bytes, want every byte its applications wrote counted once: %d; off by %d",
				cg.ID, got, w.written, int64(got)-int64(w.written))
		}
		if d.StackEgressBytes != w.stack {
			t.Errorf("cgroup %d: stack bytes to local peers %d, want what its sockets sent through the stack, once (TCP_INFO bytes_sent - bytes_retrans): %d", cg.ID, d.StackEgressBytes, w.stack)
		}
		if d.RedirectedBytes != wantRedirected {
			t.Errorf("cgroup %d: redirected %d bytes, want what its applications wrote minus what took the stack: %d", cg.ID, d.RedirectedBytes, wantRedirected)
		}
		if total := d.RedirectedBytes + d.StackEgressBytes; total > 0 && wantRedirected+w.stack > 0 {
			got := float64(d.RedirectedBytes) / float64(total)
			want := float64(wantRedirected) / float64(wantRedirected+w.stack)
			if diff := got - want; diff > 0.001 || diff < -0.001 {
				t.Errorf("cgroup %d: bypass ratio %.4f, want the sockets' own %.4f", cg.ID, got, want)
			}
			t.Logf("cgroup %d: bypass ratio %.4f, the sockets' own %.4f", cg.ID, got, want)
		}
	}
	// The mix is what it says: something redirected, something not.
	if allRedirected == 0 || allStack == 0 {
		t.Errorf("the sockets redirected %d bytes and sent %d through the stack: want both (the mix did not pair, or nothing stayed plain)", allRedirected, allStack)
	}
}

// acctListen makes a listening socket on addr (any port).
func acctListen(addr [4]byte, blocking bool) (int, error) {
	flags := unix.SOCK_STREAM | unix.SOCK_CLOEXEC
	if !blocking {
		flags |= unix.SOCK_NONBLOCK
	}
	fd, err := unix.Socket(unix.AF_INET, flags, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: addr}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if err := unix.Listen(fd, 8); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// acctDial connects a socket to the listener lfd, which listens on addr.
func acctDial(lfd int, addr [4]byte, blocking bool) (int, error) {
	lsa, err := unix.Getsockname(lfd)
	if err != nil {
		return -1, err
	}
	sa := &unix.SockaddrInet4{Addr: addr, Port: lsa.(*unix.SockaddrInet4).Port}
	flags := unix.SOCK_STREAM | unix.SOCK_CLOEXEC
	if !blocking {
		flags |= unix.SOCK_NONBLOCK
	}
	fd, err := unix.Socket(unix.AF_INET, flags, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		return -1, err
	}
	if err := acctWait(fd, unix.POLLOUT); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// acctAccept accepts a connection of lfd.
func acctAccept(lfd int, blocking bool) (int, error) {
	flags := unix.SOCK_CLOEXEC
	if !blocking {
		flags |= unix.SOCK_NONBLOCK
	}
	if err := acctWait(lfd, unix.POLLIN); err != nil {
		return -1, err
	}
	fd, _, err := unix.Accept4(lfd, flags)
	return fd, err
}

// acctWait polls fd for events, up to 10 s.
func acctWait(fd int, events int16) error {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: events}}
	for {
		n, err := unix.Poll(pfd, 10000)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("fd %d not ready for %#x within 10 s", fd, events)
		}
		return nil
	}
}

// acctTransfer writes n bytes (a pattern of seed, in writes of up to
// 64 KiB) to from while reading them from to, and checks them. Both
// sockets may be blocking or not: a reader that would block polls first
// and the writer runs in its own goroutine.
func acctTransfer(from, to, n int, seed byte) error {
	data := make([]byte, n)
	x := uint32(seed) | 1
	for i := range data {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		data[i] = byte(x)
	}
	werr := make(chan error, 1)
	go func() {
		for off := 0; off < n; {
			m, err := unix.Write(from, data[off:min(n, off+64<<10)])
			if err == unix.EAGAIN || err == unix.EINTR {
				if err := acctWait(from, unix.POLLOUT); err != nil {
					werr <- err
					return
				}
				continue
			}
			if err != nil {
				werr <- fmt.Errorf("write: %w", err)
				return
			}
			off += m
		}
		werr <- nil
	}()
	got := make([]byte, 0, n)
	buf := make([]byte, 64<<10)
	for len(got) < n {
		if err := acctWait(to, unix.POLLIN); err != nil {
			return fmt.Errorf("read after %d bytes: %w", len(got), err)
		}
		m, err := unix.Read(to, buf[:min(len(buf), n-len(got))])
		if err == unix.EAGAIN || err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read after %d bytes: %w", len(got), err)
		}
		if m == 0 {
			return fmt.Errorf("EOF after %d bytes", len(got))
		}
		got = append(got, buf[:m]...)
	}
	if err := <-werr; err != nil {
		return err
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("the bytes read differ from the bytes written")
	}
	return nil
}
