package testutil

import (
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
)

// ListenIn listens on addr (network "tcp4", "tcp6" or "tcp") with a socket
// created in cg, so that the sockets it accepts belong to cg too. It fails tb
// on error and closes the listener when tb ends.
func ListenIn(tb testing.TB, cg cgroup.Cgroup, network, addr string) net.Listener {
	tb.Helper()
	var l net.Listener
	var err error
	InCgroup(tb, cg, func() { l, err = net.Listen(network, addr) })
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { l.Close() })
	return l
}

// DialIn connects to addr with a socket created in cg, within 5 s. It fails
// tb on error and closes the connection when tb ends.
func DialIn(tb testing.TB, cg cgroup.Cgroup, network, addr string) net.Conn {
	tb.Helper()
	var c net.Conn
	var err error
	InCgroup(tb, cg, func() { c, err = net.DialTimeout(network, addr, 5*time.Second) })
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// FreePort returns a TCP port that is free on 127.0.0.1 now (the kernel
// picked it for a listener that is closed again). It fails tb on error.
func FreePort(tb testing.TB) int {
	tb.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// FreePorts returns n distinct TCP ports that are free on 127.0.0.1 now:
// all n listeners are open at once, so the kernel cannot hand out one port
// twice (FreePort called n times can). It fails tb on error.
func FreePorts(tb testing.TB, n int) []int {
	tb.Helper()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

// FreeAddr returns "127.0.0.1:PORT" with a port that is free now (see
// FreePort).
func FreeAddr(tb testing.TB) string {
	tb.Helper()
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(FreePort(tb)))
}

// BlockingDialIn connects to addr ("127.0.0.1:PORT") with a blocking IPv4
// socket created in cg (as a C client that never sets O_NONBLOCK does),
// and returns it as a file. It fails tb on error and closes the socket
// when tb ends.
func BlockingDialIn(tb testing.TB, cg cgroup.Cgroup, addr string) *os.File {
	tb.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		tb.Fatalf("BlockingDialIn %q: want an IPv4 address and port (%v)", addr, err)
	}
	fd := -1
	InCgroup(tb, cg, func() {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return
		}
		if err = unix.Connect(fd, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}); err != nil {
			unix.Close(fd)
		}
	})
	if err != nil {
		tb.Fatalf("blocking connect to %s: %v", addr, err)
	}
	f := os.NewFile(uintptr(fd), "blocking client")
	tb.Cleanup(func() { f.Close() })
	return f
}
