package dataplane

import (
	"bytes"
	"io"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// blockingListener listens on 127.0.0.1:0 with a blocking socket created in
// the cgroup (as redis does before it makes its listener non-blocking), and
// returns its fd and port.
func blockingListener(t *testing.T, cg interface{ RunIn(func()) error }) (int, int) {
	t.Helper()
	fd := -1
	var err error
	if e := cg.RunIn(func() {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return
		}
		if err = unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			return
		}
		err = unix.Listen(fd, 16)
	}); e != nil {
		t.Fatal(e)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return fd, sa.(*unix.SockaddrInet4).Port
}

// exchange connects a (non-blocking, Go) client with dial, accepts it on
// lfd (polling first and accepting with SOCK_NONBLOCK when the listener is
// non-blocking, as redis does), sends 4 KiB each way and checks them.
func exchange(t *testing.T, dial func() net.Conn, lfd int, nonblocking bool) {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	go func() {
		flags := unix.SOCK_CLOEXEC
		if nonblocking {
			pfd := []unix.PollFd{{Fd: int32(lfd), Events: unix.POLLIN}}
			if n, err := unix.Poll(pfd, 5000); n != 1 || err != nil {
				accepted <- nil
				return
			}
			flags |= unix.SOCK_NONBLOCK
		}
		nfd, _, err := unix.Accept4(lfd, flags)
		if err != nil {
			accepted <- nil
			return
		}
		f := os.NewFile(uintptr(nfd), "accepted")
		c, err := net.FileConn(f) // dups the fd; the file keeps its flags
		f.Close()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	c := dial()
	defer c.Close()
	var s net.Conn
	select {
	case s = <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("accept timed out")
	}
	if s == nil {
		t.Fatal("accept failed")
	}
	defer s.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	s.SetDeadline(time.Now().Add(5 * time.Second))
	msg := transfer.Pattern(3, 4096)
	buf := make([]byte, len(msg))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(s, buf); err != nil || !bytes.Equal(buf, msg) {
		t.Fatalf("server read: %v", err)
	}
	if _, err := s.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || !bytes.Equal(buf, msg) {
		t.Fatalf("client read: %v", err)
	}
}

// TestBlockingListenerStaysPlainUntilNonBlocking: the accepted sockets of a
// listener that blocks at listen() never join (a blocking recv on a
// sockhash member may return EAGAIN); once the server makes the listener
// non-blocking (as redis does after listen()) and the listeners are
// refreshed, new connections join and are redirected.
func TestBlockingListenerStaysPlainUntilNonBlocking(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	lfd, port := blockingListener(t, cg)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	dial := func() net.Conn { return testutil.DialIn(t, cg, "tcp4", addr) }

	before := counterOf(t, dp, cg.ID)
	exchange(t, dial, lfd, false)
	d := counterOf(t, dp, cg.ID).Sub(before)
	// The client joined at ACTIVE_ESTABLISHED (its listener was offered
	// the SYN) and the server's refusal took it out again.
	if d.RedirectedBytes != 0 || d.PassedBytes != 0 || d.SocketsBlocking != 1 {
		t.Fatalf("blocking listener: redirected %d, passed %d, blocking %d; want 0, 0, 1", d.RedirectedBytes, d.PassedBytes, d.SocketsBlocking)
	}
	if socks, _ := dp.Sockets(); len(socks) != 0 {
		t.Fatalf("sockhash holds %d sockets after a declined pair, want 0 (the client must leave again)", len(socks))
	}

	// The server makes its listener non-blocking; the next refresh (the
	// daemon's rescan, or enable) records it, and new connections join.
	if err := unix.SetNonblock(lfd, true); err != nil {
		t.Fatal(err)
	}
	refreshListenersIn(t, dp, cg)
	before = counterOf(t, dp, cg.ID)
	exchange(t, dial, lfd, true)
	if d := counterOf(t, dp, cg.ID).Sub(before); d.SocketsInserted != 2 || d.RedirectedBytes != 2*4096 {
		t.Fatalf("non-blocking listener: inserted %d, redirected %d; want 2 and %d", d.SocketsInserted, d.RedirectedBytes, 2*4096)
	}

	// And back: the table follows the file flags both ways.
	if err := unix.SetNonblock(lfd, false); err != nil {
		t.Fatal(err)
	}
	refreshListenersIn(t, dp, cg)
	before = counterOf(t, dp, cg.ID)
	exchange(t, dial, lfd, false)
	if d := counterOf(t, dp, cg.ID).Sub(before); d.RedirectedBytes != 0 || d.PassedBytes != 0 || d.SocketsBlocking != 1 {
		t.Fatalf("listener blocking again: redirected %d, passed %d, blocking %d; want 0, 0, 1", d.RedirectedBytes, d.PassedBytes, d.SocketsBlocking)
	}
	if socks, _ := dp.Sockets(); len(socks) != 0 {
		t.Fatalf("sockhash holds %d sockets after a declined pair, want 0", len(socks))
	}
}

// TestBlockingClientStaysPlain: a client whose socket blocks at connect()
// never joins, so neither end of its connection is in the sockhash.
func TestBlockingClientStaysPlain(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(l)
	port := l.Addr().(*net.TCPAddr).Port
	before := counterOf(t, dp, cg.ID)
	var fd int
	var err error
	testutil.InCgroup(t, cg, func() {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err == nil {
			err = unix.Connect(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}})
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "blocking client")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := transfer.RoundTrip(c, transfer.Pattern(5, 100000), transfer.Options{WriteSize: 16384}); err != nil {
		t.Fatal(err)
	}
	d := counterOf(t, dp, cg.ID).Sub(before)
	if d.SocketsInserted != 0 || d.RedirectedBytes != 0 || d.SocketsBlocking != 1 {
		t.Fatalf("blocking client: inserted %d, redirected %d, blocking %d; want 0, 0, 1", d.SocketsInserted, d.RedirectedBytes, d.SocketsBlocking)
	}
}

// refreshListenersIn refreshes the listeners with this process (which
// holds the listener) moved into cg, as a server process in it would be.
func refreshListenersIn(t *testing.T, dp *Dataplane, cg cgroup.Cgroup) {
	t.Helper()
	var n int
	var err error
	testutil.InCgroup(t, cg, func() { n, err = dp.RefreshListeners() })
	if err != nil || n == 0 {
		t.Fatalf("refresh listeners: %d found, %v", n, err)
	}
}
