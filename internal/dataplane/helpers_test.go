package dataplane

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/sockops"
)

// install creates a pinned dataplane of the test's own and uninstalls it at
// the end of the test.
func install(t *testing.T) *Dataplane {
	t.Helper()
	return installSized(t, 0)
}

// enabledCgroup creates a cgroup and enables it in dp.
func enabledCgroup(t *testing.T, dp *Dataplane) cgroup.Cgroup {
	t.Helper()
	cg := testutil.NewCgroup(t)
	if _, err := dp.Enable(cg, EnableOptions{NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	return cg
}

func counterOf(t *testing.T, dp *Dataplane, id uint64) CgroupCounters {
	t.Helper()
	c, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c[id]
}

// waitJoined waits until every conn's socket is in the sockhash: a member
// of a joined pair, a redirect target from then on.
func waitJoined(t *testing.T, dp *Dataplane, conns ...net.Conn) {
	t.Helper()
	waitFor(t, 5*time.Second, func() bool {
		for _, c := range conns {
			if !joined(dp, keyOf(c)) {
				return false
			}
		}
		return true
	})
}

// waitPeerJoined waits until the peer of each conn (the accepted side,
// possibly owned by another goroutine) is in the sockhash.
func waitPeerJoined(t *testing.T, dp *Dataplane, conns ...net.Conn) {
	t.Helper()
	waitFor(t, 5*time.Second, func() bool {
		for _, c := range conns {
			k := keyOf(c)
			k.LocalIp, k.RemoteIp = k.RemoteIp, k.LocalIp
			k.LocalPort, k.RemotePort = k.RemotePort, k.LocalPort
			if !joined(dp, k) {
				return false
			}
		}
		return true
	})
}

// joined reports whether the socket with key k (namespace-scope, or
// node-scope with cookie 0) is in the sockhash.
func joined(dp *Dataplane, k SockKey) bool {
	for _, cookie := range []uint64{k.NetnsCookie, 0} {
		k.NetnsCookie = cookie
		var socketCookie uint64
		if dp.maps[PinSockhash].Lookup(k, &socketCookie) == nil {
			return true
		}
	}
	return false
}

// keyOf returns the namespace-scope sockhash key of c's socket.
func keyOf(c net.Conn) SockKey {
	local := netip.MustParseAddrPort(c.LocalAddr().String())
	remote := netip.MustParseAddrPort(c.RemoteAddr().String())
	family := uint16(unix.AF_INET6)
	if local.Addr().Unmap().Is4() {
		family = unix.AF_INET
	}
	raw, _ := c.(*net.TCPConn).SyscallConn()
	var cookie uint64
	raw.Control(func(fd uintptr) { cookie, _ = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE) })
	return SockKey{NetnsCookie: cookie, LocalIp: sockops.AddrToC(local.Addr()), RemoteIp: sockops.AddrToC(remote.Addr()),
		LocalPort: local.Port(), RemotePort: remote.Port(), Family: family}
}

// acceptedPair returns a connected pair in cg: the client and the
// accepted server side.
func acceptedPair(t *testing.T, cg cgroup.Cgroup, network, addr string) (client, server net.Conn) {
	t.Helper()
	l := testutil.ListenIn(t, cg, network, addr)
	return acceptDialed(t, l, "the server", func() net.Conn { return testutil.DialIn(t, cg, network, l.Addr().String()) })
}

// acceptDialed calls dial, which connects to l, and returns its connection
// and the one l accepted (closed when t ends). It fails t, saying that
// server accepted nothing, when the accept fails.
func acceptDialed(t *testing.T, l net.Listener, server string, dial func() net.Conn) (net.Conn, net.Conn) {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	client := dial()
	s := <-accepted
	if s == nil {
		t.Fatalf("%s accepted nothing", server)
	}
	t.Cleanup(func() { s.Close() })
	return client, s
}

// joinedPair is acceptedPair over 127.0.0.1 whose two ends have joined
// their pair: from the first byte on, everything is redirected.
func joinedPair(t *testing.T, dp *Dataplane, cg cgroup.Cgroup) (client, server net.Conn) {
	t.Helper()
	client, server = acceptedPair(t, cg, "tcp4", "127.0.0.1:0")
	waitJoined(t, dp, client, server)
	return client, server
}

// checkAccounted checks that every byte sent is counted once, as
// redirected or passed, and that at least minRedirected took the fast path.
func checkAccounted(t *testing.T, d CgroupCounters, sent, minRedirected uint64) {
	t.Helper()
	if d.RedirectedBytes+d.PassedBytes != sent {
		t.Errorf("redirected %d + passed %d bytes, want %d in all", d.RedirectedBytes, d.PassedBytes, sent)
	}
	if d.RedirectedBytes < minRedirected {
		t.Errorf("redirected %d bytes, want at least %d", d.RedirectedBytes, minRedirected)
	}
}

func netlinkDelete(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	return netlink.LinkDel(l)
}
