package dataplane

import (
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
	"github.com/sockbypass/sockbypass/sockops"
)

// TestSockKeyMatchesWhatBPFWrites checks the Go type of struct sock_key
// against the keys the sock_ops program really writes: addresses, ports,
// family and the network namespace cookie of both ends of a connection.
func TestSockKeyMatchesWhatBPFWrites(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	for _, network := range []string{"tcp4", "tcp6"} {
		addr := "127.0.0.1:0"
		if network == "tcp6" {
			addr = "[::1]:0"
		}
		l := testutil.ListenIn(t, cg, network, addr)
		transfer.ServeEcho(l)
		c := testutil.DialIn(t, cg, network, l.Addr().String())
		// One byte there and back, keeping both sockets open.
		buf := []byte("x")
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(buf); err != nil {
			t.Fatal(err)
		}

		local := netip.MustParseAddrPort(c.LocalAddr().String())
		remote := netip.MustParseAddrPort(c.RemoteAddr().String())
		cookie := netnsCookie(t, c)
		family := uint16(unix.AF_INET)
		if network == "tcp6" {
			family = unix.AF_INET6
		}
		want := map[SockKey]bool{}
		for _, k := range []SockKey{
			{NetnsCookie: cookie, LocalIp: sockops.AddrToC(local.Addr()), RemoteIp: sockops.AddrToC(remote.Addr()), LocalPort: local.Port(), RemotePort: remote.Port(), Family: family},
			{NetnsCookie: cookie, LocalIp: sockops.AddrToC(remote.Addr()), RemoteIp: sockops.AddrToC(local.Addr()), LocalPort: remote.Port(), RemotePort: local.Port(), Family: family},
		} {
			want[k] = true
		}
		socks, err := dp.Sockets()
		if err != nil {
			t.Fatal(err)
		}
		for k := range want {
			if _, ok := socks[k]; !ok {
				t.Errorf("%s: key %+v (local %s remote %s) not in sockhash %v", network, k, k.Local(), k.Remote(), socks)
			}
		}
	}
}

func netnsCookie(t *testing.T, c net.Conn) uint64 {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var cookie uint64
	var serr error
	raw.Control(func(fd uintptr) {
		cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	})
	if serr != nil {
		t.Fatalf("SO_NETNS_COOKIE: %v", serr)
	}
	return cookie
}
