package dataplane

import (
	"net"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

func TestIPv6Loopback(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	l := testutil.ListenIn(t, cg, "tcp6", "[::1]:0")
	transfer.ServeEcho(l)
	before := counterOf(t, dp, cg.ID)
	payload := transfer.Pattern(6, 2<<20+1)
	if err := transfer.RoundTrip(testutil.DialIn(t, cg, "tcp6", l.Addr().String()), payload, transfer.Options{WriteSize: 16384}); err != nil {
		t.Fatal(err)
	}
	checkAccounted(t, counterOf(t, dp, cg.ID).Sub(before), 2*uint64(len(payload)), uint64(len(payload)))
}

// TestIPv4MappedPairsWithIPv4 pairs a dual-stack IPv6 server socket (which
// sees ::ffff:127.0.0.1) with an IPv4 client, and an IPv6 client socket
// connecting to ::ffff:127.0.0.1 with an IPv4 server.
func TestIPv4MappedPairsWithIPv4(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	payload := transfer.Pattern(4, 1<<20+5)

	t.Run("dual-stack server, IPv4 client", func(t *testing.T) {
		l := testutil.ListenIn(t, cg, "tcp", "[::]:0") // dual stack: accepts IPv4 as ::ffff:x
		transfer.ServeEcho(l)
		port := l.Addr().(*net.TCPAddr).Port
		before := counterOf(t, dp, cg.ID)
		if err := transfer.RoundTrip(testutil.DialIn(t, cg, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(port))), payload, transfer.Options{WriteSize: 16384}); err != nil {
			t.Fatal(err)
		}
		checkAccounted(t, counterOf(t, dp, cg.ID).Sub(before), 2*uint64(len(payload)), uint64(len(payload)))
	})

	t.Run("IPv6 client to ::ffff:127.0.0.1, IPv4 server", func(t *testing.T) {
		l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
		transfer.ServeEcho(l)
		port := l.Addr().(*net.TCPAddr).Port
		before := counterOf(t, dp, cg.ID)
		var c net.Conn
		testutil.InCgroup(t, cg, func() { c = dialMapped(t, port) })
		defer c.Close()
		if err := transfer.RoundTrip(c, payload, transfer.Options{WriteSize: 16384}); err != nil {
			t.Fatal(err)
		}
		checkAccounted(t, counterOf(t, dp, cg.ID).Sub(before), 2*uint64(len(payload)), uint64(len(payload)))
	})
}

// dialMapped connects an AF_INET6 socket to ::ffff:127.0.0.1:port.
func dialMapped(t *testing.T, port int) net.Conn {
	t.Helper()
	// Non-blocking, as Go's own sockets: blocking sockets are never
	// accelerated (a blocking recv on a sockhash member may return EAGAIN).
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
		t.Fatal(err)
	}
	sa := &unix.SockaddrInet6{Port: port, Addr: [16]byte{10: 0xff, 11: 0xff, 12: 127, 15: 1}}
	if err := unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		t.Fatalf("connect to [::ffff:127.0.0.1]:%d: %v", port, err)
	}
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	if n, err := unix.Poll(pfd, 5000); n != 1 || err != nil {
		unix.Close(fd)
		t.Fatalf("connect to [::ffff:127.0.0.1]:%d: poll %d %v", port, n, err)
	}
	if soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || soerr != 0 {
		unix.Close(fd)
		t.Fatalf("connect to [::ffff:127.0.0.1]:%d: %v %v", port, err, unix.Errno(soerr))
	}
	f := os.NewFile(uintptr(fd), "mapped")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
