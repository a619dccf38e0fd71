package sockdiag

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// loopbackPair returns both ends of a fresh TCP connection on addr
// ("127.0.0.1:0", "[::1]:0"), closed when t ends.
func loopbackPair(t *testing.T, network, addr string) (client, server *net.TCPConn) {
	t.Helper()
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial(network, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.Accept()
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// identity returns the socket cookie and inode of c, as the kernel gives
// them to the socket's owner.
func identity(t *testing.T, c *net.TCPConn) (cookie, inode uint64) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	raw.Control(func(fd uintptr) {
		cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
		var st unix.Stat_t
		if serr == nil {
			serr = unix.Fstat(int(fd), &st)
			inode = st.Ino
		}
	})
	if serr != nil {
		t.Fatal(serr)
	}
	return cookie, inode
}

// find returns the socket of socks whose local address is local.
func find(socks []Socket, local net.Addr) (Socket, bool) {
	want := local.(*net.TCPAddr).AddrPort()
	want = netip.AddrPortFrom(want.Addr().Unmap(), want.Port())
	for _, s := range socks {
		if s.Local == want {
			return s, true
		}
	}
	return Socket{}, false
}

// ownCgroupID is the cgroup v2 id of this process, 0 without cgroup v2.
func ownCgroupID(t *testing.T) uint64 {
	t.Helper()
	mounts, err := cgroup.ReadMounts()
	if err != nil || mounts.V2 == "" {
		return 0
	}
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rel, ok := strings.CutPrefix(line, "0::"); ok {
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(mounts.V2, rel), &st); err != nil {
				t.Fatal(err)
			}
			return st.Ino
		}
	}
	return 0
}

func TestDumpReportsEachEndOfALoopbackConnection(t *testing.T) {
	for _, tc := range []struct{ network, addr string }{{"tcp4", "127.0.0.1:0"}, {"tcp6", "[::1]:0"}} {
		t.Run(tc.network, func(t *testing.T) {
			client, server := loopbackPair(t, tc.network, tc.addr)
			socks, err := Dump(Request{States: ConnectedStates})
			if err != nil {
				t.Fatal(err)
			}
			cg := ownCgroupID(t)
			for name, c := range map[string]*net.TCPConn{"client": client, "server": server} {
				s, ok := find(socks, c.LocalAddr())
				if !ok {
					t.Fatalf("%s %s not in the dump of %d sockets", name, c.LocalAddr(), len(socks))
				}
				cookie, inode := identity(t, c)
				if s.Cookie != cookie || s.Inode != inode || s.State != StateEstablished || StateName(s.State) != "ESTABLISHED" {
					t.Errorf("%s: dump says cookie %d inode %d state %s, the socket has cookie %d inode %d", name, s.Cookie, s.Inode, StateName(s.State), cookie, inode)
				}
				remote := c.RemoteAddr().(*net.TCPAddr).AddrPort()
				if s.Remote.Port() != remote.Port() || s.Remote.Addr() != remote.Addr().Unmap() {
					t.Errorf("%s: remote %s, want %s", name, s.Remote, remote)
				}
				if s.UID != uint32(os.Getuid()) {
					t.Errorf("%s: uid %d, want %d", name, s.UID, os.Getuid())
				}
				if cg != 0 && s.CgroupID != cg {
					t.Errorf("%s: cgroup id %d, this process is in cgroup %d", name, s.CgroupID, cg)
				}
			}
		})
	}
}

func TestDumpListsOnlyTheStatesAsked(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	connected, err := Dump(Request{States: ConnectedStates})
	if err != nil {
		t.Fatal(err)
	}
	if s, ok := find(connected, l.Addr()); ok {
		t.Errorf("a listener is listed among connected sockets: %+v", s)
	}
	listening, err := Dump(Request{States: 1 << StateListen})
	if err != nil {
		t.Fatal(err)
	}
	if s, ok := find(listening, l.Addr()); !ok || s.State != StateListen {
		t.Errorf("listener %s: found %v, %+v", l.Addr(), ok, s)
	}
	for _, s := range listening {
		if s.State != StateListen {
			t.Errorf("asked for listeners only, got %s %s", StateName(s.State), s.Local)
		}
	}
}

func TestDumpReturnsSocketStorage(t *testing.T) {
	testutil.RequirePrivileged(t)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SkStorage, KeySize: 4, ValueSize: 8, Flags: unix.BPF_F_NO_PREALLOC,
		// Socket storage needs BTF for its key and value.
		Key: &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed}, Value: &btf.Int{Name: "u64", Size: 8}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	mapID, _ := info.ID()
	client, server := loopbackPair(t, "tcp4", "127.0.0.1:0")
	// User space writes a socket's storage with the socket's fd as key.
	raw, _ := client.SyscallConn()
	var perr error
	raw.Control(func(fd uintptr) { perr = m.Put(uint32(fd), uint64(0xc0ffee)) })
	if perr != nil {
		t.Fatal(perr)
	}
	socks, err := Dump(Request{States: ConnectedStates, StorageMapFDs: []int{m.FD()}})
	if err != nil {
		t.Fatal(err)
	}
	c, ok := find(socks, client.LocalAddr())
	if !ok {
		t.Fatal("client not in the dump")
	}
	if len(c.Storages) != 1 || c.Storages[0].MapID != uint32(mapID) || len(c.Storages[0].Value) != 8 ||
		binary.NativeEndian.Uint64(c.Storages[0].Value) != 0xc0ffee {
		t.Errorf("client storages %+v, want map %d value 0xc0ffee", c.Storages, mapID)
	}
	if s, ok := find(socks, server.LocalAddr()); !ok || len(s.Storages) != 0 {
		t.Errorf("server (no storage): found %v, storages %+v", ok, s.Storages)
	}
}

func TestDumpNetnsListsThatNamespaceOnly(t *testing.T) {
	netns := testutil.NewNetNS(t)
	var l net.Listener
	var c net.Conn
	var err error
	testutil.InNetNS(t, netns, func() {
		if l, err = net.Listen("tcp4", "127.0.0.1:0"); err != nil {
			return
		}
		c, err = net.Dial("tcp4", l.Addr().String())
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	defer c.Close()
	inside, err := DumpNetns(netns.Path(), Request{States: ConnectedStates})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := find(inside, c.LocalAddr()); !ok || len(inside) != 2 {
		t.Errorf("in %s: found the client %v among %d sockets %+v, want it and its server end only", netns.Path(), ok, len(inside), inside)
	}
	here, err := Dump(Request{States: ConnectedStates})
	if err != nil {
		t.Fatal(err)
	}
	if s, ok := find(here, c.LocalAddr()); ok && s.Remote == netip.MustParseAddrPort(c.RemoteAddr().String()) {
		t.Errorf("a socket of %s is listed in this process's namespace: %+v", netns.Path(), s)
	}
	if _, err := DumpNetns("/proc/no-such-pid/ns/net", Request{}); !os.IsNotExist(err) {
		t.Errorf("a namespace that does not exist: %v, want a not-exist error", err)
	}
}

// TestDumpReportsTCPInfo: with Request.TCPInfo each socket comes with its
// struct tcp_info, whose byte counters are what the socket sent (and
// getsockopt(TCP_INFO) says); without it, none.
func TestDumpReportsTCPInfo(t *testing.T) {
	client, server := loopbackPair(t, "tcp4", "127.0.0.1:0")
	const n = 100003
	go func() {
		buf := make([]byte, n)
		for got := 0; got < n; {
			r, err := server.Read(buf)
			if err != nil {
				return
			}
			got += r
		}
		server.Write([]byte("ok"))
	}()
	if _, err := client.Write(make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 2)
	if _, err := client.Read(ack); err != nil {
		t.Fatal(err)
	}
	socks, err := Dump(Request{States: ConnectedStates, TCPInfo: true})
	if err != nil {
		t.Fatal(err)
	}
	s, ok := find(socks, client.LocalAddr())
	if !ok || s.TCPInfo == nil {
		t.Fatalf("client %s: in the dump %v, tcp_info %v; want both", client.LocalAddr(), ok, s.TCPInfo)
	}
	raw, err := client.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var own *unix.TCPInfo
	raw.Control(func(fd uintptr) { own, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if err != nil {
		t.Fatal(err)
	}
	if s.TCPInfo.Bytes_sent-s.TCPInfo.Bytes_retrans != n || s.TCPInfo.Bytes_sent != own.Bytes_sent ||
		s.TCPInfo.Data_segs_out != own.Data_segs_out || s.TCPInfo.Notsent_bytes != 0 {
		t.Errorf("dumped tcp_info: bytes_sent %d, bytes_retrans %d, data_segs_out %d, notsent %d; want %d sent, as TCP_INFO says (%d bytes in %d segments), none queued",
			s.TCPInfo.Bytes_sent, s.TCPInfo.Bytes_retrans, s.TCPInfo.Data_segs_out, s.TCPInfo.Notsent_bytes, n, own.Bytes_sent, own.Data_segs_out)
	}
	socks, err = Dump(Request{States: ConnectedStates})
	if err != nil {
		t.Fatal(err)
	}
	if s, _ := find(socks, client.LocalAddr()); s.TCPInfo != nil {
		t.Errorf("tcp_info without asking for it: %+v", s.TCPInfo)
	}
}
