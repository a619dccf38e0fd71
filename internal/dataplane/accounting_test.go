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
// split is what the sockets themselves did. A mix of connections over
// loopback, each end writing a known number of bytes: pairs of
// non-blocking sockets (redirected), blocking ones (left plain: the
// stack), a non-blocking client of a listener in a cgroup that is not
// enabled (unpaired: the stack), and a pair whose client turns blocking
// half-way (redirected, then the stack). After they close, the cgroup's
// counters must hold: RedirectedBytes + StackEgressBytes = what the apps
// wrote (+ retransmissions, which cross the stack again); StackEgressBytes
// = what the kernel sent through the stack for those sockets (TCP_INFO
// tcpi_bytes_sent, summed); RedirectedBytes = written minus what took the
// stack; and so the bypass ratio is the sockets' own.
func TestAccountingMatchesTheSockets(t *testing.T) {
	testutil.RequirePrivileged(t)
	dp := install(t)
	cg := enabledCgroup(t, dp) // no probation: the first connection may pair
	other := testutil.NewCgroup(t)
	before := counterOf(t, dp, cg.ID)

	// conns are the connections; ends are the sockets of cg with what
	// their application wrote.
	type end struct {
		name    string
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
	// connect makes a connection whose client is created in cg and whose
	// listener (so the accepted socket) in lcg.
	connect := func(name string, blocking bool, lcg cgroup.Cgroup) (c, s *end) {
		t.Helper()
		lfd := -1
		var err error
		testutil.InCgroup(t, lcg, func() { lfd, err = acctListen(blocking) })
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(lfd)
		var cfd int
		testutil.InCgroup(t, cg, func() { cfd, err = acctDial(lfd, blocking) })
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, cfd)
		sfd, err := acctAccept(lfd, blocking)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, sfd)
		c, s = &end{name: name + " client", fd: cfd}, &end{name: name + " server", fd: sfd}
		ends = append(ends, c)
		if lcg.ID == cg.ID {
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
		c, s := connect(fmt.Sprintf("paired %d", i), false, cg)
		send(c, s, 1<<20+7*i)
		send(s, c, 300<<10+3)
		send(c, s, 1)
	}
	for i := range 2 {
		c, s := connect(fmt.Sprintf("blocking %d", i), true, cg)
		send(c, s, 700<<10+i)
		send(s, c, 64)
	}
	{
		c, s := connect("unpaired", false, other)
		send(c, s, 512<<10)
		send(s, c, 200<<10) // the server's bytes are other's, not cg's
	}
	{
		c, s := connect("late blocking", false, cg)
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
	// arrived.
	var written, stack, retrans uint64
	for _, e := range ends {
		info, err := unix.GetsockoptTCPInfo(e.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			t.Fatal(err)
		}
		if info.Bytes_sent-info.Bytes_retrans > e.written {
			t.Fatalf("%s: TCP_INFO says %d bytes sent (%d retransmitted), more than the %d written", e.name, info.Bytes_sent, info.Bytes_retrans, e.written)
		}
		t.Logf("%-18s wrote %8d bytes: %8d through the stack (%d retransmitted), %8d redirected", e.name, e.written,
			info.Bytes_sent-info.Bytes_retrans, info.Bytes_retrans, e.written-(info.Bytes_sent-info.Bytes_retrans))
		written += e.written
		stack += info.Bytes_sent
		retrans += info.Bytes_retrans
	}
	wantRedirected := written - (stack - retrans)
	for _, fd := range fds {
		unix.Close(fd)
	}
	fds = nil

	// The counters may move after the sockets close (an accounting that
	// reads a socket's own counters when it closes): wait for them to
	// settle, up to 5 s.
	var d CgroupCounters
	deadline := time.Now().Add(5 * time.Second)
	for {
		d = counterOf(t, dp, cg.ID).Sub(before)
		if d.RedirectedBytes+d.StackEgressBytes >= written+retrans || time.Now().After(deadline) {
			time.Sleep(50 * time.Millisecond) // and nothing more comes
			d = counterOf(t, dp, cg.ID).Sub(before)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("counters: redirected %d, stack to local peers %d (%d packets), passed %d; sockets: written %d, stack %d (%d retransmitted)",
		d.RedirectedBytes, d.StackEgressBytes, d.StackEgressPackets, d.PassedBytes, written, stack, retrans)
	if got := d.RedirectedBytes + d.StackEgressBytes; got != written+retrans {
		t.Errorf("redirected + stack = %d bytes, want every byte the applications wrote counted once: %d (+ %d retransmitted); off by %d",
			got, written, retrans, int64(got)-int64(written+retrans))
	}
	if d.StackEgressBytes != stack {
		t.Errorf("stack bytes to local peers %d, want what the sockets sent through the stack (TCP_INFO bytes_sent): %d", d.StackEgressBytes, stack)
	}
	if d.RedirectedBytes != wantRedirected {
		t.Errorf("redirected %d bytes, want what the applications wrote minus what took the stack: %d", d.RedirectedBytes, wantRedirected)
	}
	if total := d.RedirectedBytes + d.StackEgressBytes; total > 0 {
		got := float64(d.RedirectedBytes) / float64(total)
		want := float64(wantRedirected) / float64(wantRedirected+stack)
		if diff := got - want; diff > 0.001 || diff < -0.001 {
			t.Errorf("bypass ratio %.4f, want the sockets' own %.4f", got, want)
		}
		t.Logf("bypass ratio %.4f, the sockets' own %.4f", got, want)
	}
	// The mix is what it says: something redirected, something not.
	if wantRedirected == 0 || stack == 0 {
		t.Errorf("the sockets redirected %d bytes and sent %d through the stack: want both (the mix did not pair, or nothing stayed plain)", wantRedirected, stack)
	}
}

// acctListen makes a listening socket on 127.0.0.1 (any port).
func acctListen(blocking bool) (int, error) {
	flags := unix.SOCK_STREAM | unix.SOCK_CLOEXEC
	if !blocking {
		flags |= unix.SOCK_NONBLOCK
	}
	fd, err := unix.Socket(unix.AF_INET, flags, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if err := unix.Listen(fd, 8); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// acctDial connects a socket to the listener lfd.
func acctDial(lfd int, blocking bool) (int, error) {
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		return -1, err
	}
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
