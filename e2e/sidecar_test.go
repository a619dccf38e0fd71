package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/dptest"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// The sidecar topology: an app pod (app + HAProxy as the sidecar, uid
// 1337, forwarding to the original destination via SO_ORIGINAL_DST) and a
// server pod on the same node, joined by a veth.
const (
	appAddr    = "10.9.8.1"
	serverAddr = "10.9.8.2"
	sidecarUID = 1337
)

type sidecarPods struct {
	app, server *testutil.Pod
	// appIP and serverIP are the pods' addresses; v6 when IPv6.
	appIP, serverIP string
	v6              bool
	accepted        atomic.Int64 // connections the server accepted
	// sidecar is HAProxy over IPv4; over IPv6, where HAProxy cannot read
	// the original destination (it asks SO_ORIGINAL_DST of IPv4 sockets
	// only, and would forward to itself), a small asyncio proxy of ours.
	sidecar *exec.Cmd
	logs    *testutil.SyncBuffer
	dir     string
}

func newSidecarPods(t *testing.T) *sidecarPods { return newSidecarPodsTB(t) }

// newIstioSidecarPods makes sidecar pods with the istio-init redirect on
// and the app pod's cgroup enabled, with the istio preset, in a dataplane
// of the test's own.
func newIstioSidecarPods(t *testing.T) (*sidecarPods, *dataplane.Dataplane) {
	t.Helper()
	s := newSidecarPods(t)
	dp := dptest.Install(t)
	s.redirectOn(t)
	mesh := dataplane.MeshPresets["istio"]
	if _, err := dp.Enable(s.app.Cgroup, dataplane.EnableOptions{Mesh: &mesh, NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	return s, dp
}

func newSidecarPodsTB(t testing.TB) *sidecarPods { return newSidecarPodsFamily(t, false) }

// newSidecarPodsFamily makes the topology over IPv4, or IPv6 (on the veth,
// without duplicate address detection, and ::1) when v6.
func newSidecarPodsFamily(t testing.TB, v6 bool) *sidecarPods {
	t.Helper()
	testutil.RequirePrivileged(t)
	if _, err := exec.LookPath("haproxy"); err != nil {
		if testutil.InCI() {
			t.Fatal("haproxy is not installed (make deps)")
		}
		t.Skip("haproxy is not installed")
	}
	// The sidecar runs as uid 1337: its config must be readable by it
	// (t.TempDir's parent is private to root).
	dir, err := os.MkdirTemp("", "sockbypass-sidecar-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	s := &sidecarPods{app: testutil.NewPod(t), server: testutil.NewPod(t), dir: dir, appIP: appAddr, serverIP: serverAddr, v6: v6}
	prefix := "/24"
	if v6 {
		s.appIP, s.serverIP, prefix = "fd00:9:8::1", "fd00:9:8::2", "/64"
	}
	testutil.Link(t, s.app, s.appIP+prefix, s.server, s.serverIP+prefix, "sbxma", "sbxmb")
	s.serveDigests(t, net.JoinHostPort(s.serverIP, "8080"))
	s.serveEcho(t, net.JoinHostPort(s.serverIP, "8081"))
	s.startSidecar(t)
	return s
}

// boundBody is what boundRoundTrip sends.
var boundBody = bytes.Repeat([]byte("bound app "), 6554)

// boundRoundTrip sends a body through the sidecar from an app socket bound
// to the pod's own address before connecting (curl --interface POD_IP): its
// endpoint is a unique node address, which the intercept state is keyed by.
// With a gate, it sends once every hop has joined.
func (s *sidecarPods) boundRoundTrip(t *testing.T, gate *joinGate) {
	t.Helper()
	before := gate.counters(t)
	c := s.app.Dial(t, &net.TCPAddr{IP: net.ParseIP(s.appIP)}, net.JoinHostPort(s.serverIP, "8080"))
	gate.wait(t, before)
	if err := s.digestRoundTrip(c, boundBody, 10*time.Second); err != nil {
		t.Fatalf("app bound to %s through the sidecar: %v", s.appIP, err)
	}
}

// digestRoundTrip sends body on c to the digest server, half-closes, and
// checks the sha256 it answers; it closes c.
func (s *sidecarPods) digestRoundTrip(c net.Conn, body []byte, timeout time.Duration) error {
	defer c.Close()
	if err := transfer.DigestRoundTrip(c, body, transfer.Options{Timeout: timeout}); err != nil {
		return fmt.Errorf("%w; sidecar log:\n%s", err, s.logs.String())
	}
	return nil
}

// serveDigests answers each connection with the sha256 of what it read.
func (s *sidecarPods) serveDigests(t testing.TB, addr string) {
	s.serve(t, addr, transfer.Digest)
}

// serveEcho echoes with blocking reads and writes on a locked thread.
func (s *sidecarPods) serveEcho(t testing.TB, addr string) {
	s.serve(t, addr, func(c net.Conn) error {
		runtime.LockOSThread()
		return transfer.Echo(c)
	})
}

// serve listens on addr in the server pod and runs handle on each
// connection it accepts, counting them in s.accepted.
func (s *sidecarPods) serve(t testing.TB, addr string, handle func(net.Conn) error) {
	l := s.server.Listen(t, addr)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.accepted.Add(1)
			go handle(c)
		}
	}()
}

func (s *sidecarPods) startSidecar(t testing.TB) {
	t.Helper()
	if s.v6 {
		s.sidecar, s.logs = startPySidecar(t, s.app, s.dir, 15001)
	} else {
		s.sidecar, s.logs = startHAProxy(t, s.app, s.dir, "outbound", 15001)
	}
	t.Cleanup(s.stopSidecar)
}

// startHAProxy runs HAProxy as the sidecar of pod (uid 1337), listening on
// port and forwarding each connection to its original destination
// (SO_ORIGINAL_DST).
func startHAProxy(t testing.TB, pod *testutil.Pod, dir, name string, port int) (*exec.Cmd, *testutil.SyncBuffer) {
	t.Helper()
	cfg := filepath.Join(dir, name+".cfg")
	os.WriteFile(cfg, []byte(`global
    maxconn 512
    nbthread 1
    log stderr local0 info
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen `+name+`
    bind :`+fmt.Sprint(port)+`
    bind :::`+fmt.Sprint(port)+` v6only
    server orig 0.0.0.0:0
`), 0o644)
	// startSidecar waits for the listener. Not by connecting: a
	// connection that was not redirected has no original destination,
	// and HAProxy would forward it to itself.
	return startSidecar(t, pod, "haproxy", port, "haproxy", "-f", cfg, "-db")
}

// startSidecar runs args as the sidecar of pod (uid 1337, in the pod's
// cgroup and network namespace), kills it when t ends, and waits until it
// listens on port (it fails t, naming the sidecar name, when it does not
// within 5 s).
func startSidecar(t testing.TB, pod *testutil.Pod, name string, port int, args ...string) (*exec.Cmd, *testutil.SyncBuffer) {
	t.Helper()
	cg, err := os.Open(pod.Cgroup.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	cmd := exec.Command("nsenter", append([]string{"--net=" + pod.Netns.Path(), "-S", fmt.Sprint(sidecarUID), "-G", fmt.Sprint(sidecarUID)}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	logs := &testutil.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	waitSidecar(t, name, cmd, port, logs)
	return cmd, logs
}

// waitSidecar waits until the sidecar cmd (name) listens on port.
func waitSidecar(t testing.TB, name string, cmd *exec.Cmd, port int, logs *testutil.SyncBuffer) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !listening(cmd.Process.Pid, port) {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not start:\n%s", name, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pySidecar is an IPv6 sidecar: it accepts on [::]:PORT, reads each
// connection's original destination (getsockopt(SOL_IPV6,
// IP6T_SO_ORIGINAL_DST), answered by netfilter under REDIRECT and by
// sockbypass in intercept mode), connects there and copies both ways,
// passing half-closes on. Its sockets are non-blocking (asyncio), as an
// event-loop sidecar's are.
const pySidecar = `import asyncio, socket, struct, sys

IP6T_SO_ORIGINAL_DST = 80

async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except OSError:
        writer.close()

async def handle(reader, writer):
    raw = writer.get_extra_info("socket").getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    port = struct.unpack_from("!H", raw, 2)[0]
    addr = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    try:
        up_reader, up_writer = await asyncio.open_connection(addr, port)
    except OSError as e:
        print("connect [%s]:%d: %s" % (addr, port, e), flush=True)
        writer.close()
        return
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    up_writer.close()
    writer.close()

async def main():
    lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.setblocking(False)
    lsock.bind(("::", int(sys.argv[1])))
    lsock.listen(128)
    server = await asyncio.start_server(handle, sock=lsock)
    async with server:
        await server.serve_forever()

asyncio.run(main())
`

// startPySidecar runs pySidecar as the sidecar of pod (uid 1337, in its
// cgroup and network namespace) on port.
func startPySidecar(t testing.TB, pod *testutil.Pod, dir string, port int) (*exec.Cmd, *testutil.SyncBuffer) {
	t.Helper()
	script := filepath.Join(dir, "sidecar.py")
	if err := os.WriteFile(script, []byte(pySidecar), 0o644); err != nil {
		t.Fatal(err)
	}
	return startSidecar(t, pod, "the IPv6 sidecar", port, pythonBin, script, fmt.Sprint(port))
}

// listening reports whether pid itself has a TCP socket listening on port
// (in its network namespace).
func listening(pid, port int) bool {
	// /proc/PID/net lists every socket of the process's network
	// namespace: the listener must also be one of the process's own
	// descriptors, or another process on the port (one that took the
	// port first) would pass for it.
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return false
	}
	own := map[string]bool{}
	for _, fd := range fds {
		if target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err == nil {
			own[target] = true
		}
	}
	for _, f := range []string{"tcp", "tcp6"} {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, f))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			fields := strings.Fields(line)
			if len(fields) > 9 && strings.HasSuffix(fields[1], fmt.Sprintf(":%04X", port)) && fields[3] == "0A" &&
				own["socket:["+fields[9]+"]"] {
				return true
			}
		}
	}
	return false
}

func (s *sidecarPods) stopSidecar() {
	if s.sidecar != nil && s.sidecar.ProcessState == nil {
		s.sidecar.Process.Kill()
		s.sidecar.Wait()
	}
}

// iptables runs iptables in the app pod's network namespace.
func (s *sidecarPods) iptables(t testing.TB, args ...string) { iptablesIn(t, s.app, args...) }

// iptablesIn runs iptables in pod's network namespace.
func iptablesIn(t testing.TB, pod *testutil.Pod, args ...string) {
	t.Helper()
	bin := "iptables"
	if len(args) > 0 && args[0] == "-6" {
		bin, args = "ip6tables", args[1:]
	}
	out, err := exec.Command("nsenter", append([]string{"--net=" + pod.Netns.Path(), bin}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("iptables %v: %v\n%s", args, err, out)
	}
}

// istioOutboundRule is istio-init's outbound capture, reduced to its core.
var istioOutboundRule = []string{"-t", "nat", "OUTPUT", "-p", "tcp", "!", "-d", "127.0.0.0/8",
	"-m", "owner", "!", "--uid-owner", fmt.Sprint(sidecarUID), "-j", "REDIRECT", "--to-ports", "15001"}

func (s *sidecarPods) redirectOn(t testing.TB)  { s.iptables(t, s.outboundRule("-A")...) }
func (s *sidecarPods) redirectOff(t testing.TB) { s.iptables(t, s.outboundRule("-D")...) }

// outboundRule is istioOutboundRule with action op, for the pods' family.
func (s *sidecarPods) outboundRule(op string) []string {
	rule := append([]string{istioOutboundRule[0], istioOutboundRule[1], op}, istioOutboundRule[2:]...)
	if s.v6 {
		for i, a := range rule {
			if a == "127.0.0.0/8" {
				rule[i] = "::1/128"
			}
		}
		rule = append([]string{"-6"}, rule...)
	}
	return rule
}

// integritySizes are the bodies integrity sends.
var integritySizes = []int{1 << 10, 64 << 10, 1<<20 + 17, 5 << 20}

// integrityBytes is what integrity and boundRoundTrip send in all.
func integrityBytes() uint64 {
	n := uint64(len(boundBody))
	for _, size := range integritySizes {
		n += uint64(size)
	}
	return n
}

// joinGate makes a transfer wait, once its connection is made, until
// every hop of it (app -> sidecar -> ... -> server) has joined the
// sockhash: each cgroup's sockets_inserted grew by its count. A client
// that sends before its server joined gives its pair up, so only then can
// every byte be redirected. A nil gate (plain runs) waits for nothing.
type joinGate struct {
	dp *dataplane.Dataplane
	// inserts is, per cgroup id, how many sockets one connection's hops
	// insert.
	inserts map[uint64]uint64
}

// counters is the state to wait from (nil for a nil gate).
func (g *joinGate) counters(t testing.TB) map[uint64]dataplane.CgroupCounters {
	t.Helper()
	if g == nil {
		return nil
	}
	c, err := g.dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// wait waits, for up to 5 s, until every cgroup of the gate inserted its
// count of sockets since before, and fails the test otherwise.
func (g *joinGate) wait(t testing.TB, before map[uint64]dataplane.CgroupCounters) {
	t.Helper()
	if g == nil {
		return
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		now := g.counters(t)
		joined := true
		for id, n := range g.inserts {
			if now[id].SocketsInserted-before[id].SocketsInserted < n {
				joined = false
			}
		}
		if joined {
			return
		}
		if time.Now().After(deadline) {
			var got []string
			for id, n := range g.inserts {
				got = append(got, fmt.Sprintf("cgroup %d: %d of %d", id, now[id].SocketsInserted-before[id].SocketsInserted, n))
			}
			for id := range g.inserts {
				got = append(got, fmt.Sprintf("cgroup %d: %+v", id, now[id].Sub(before[id])))
			}
			t.Fatalf("the hops of the connection did not all join the sockhash within 5 s (sockets inserted %s)\nsidecar maps: %s", strings.Join(got, ", "), meshMaps(g.dp))
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// meshMaps describes the pinned maps the sidecar pairing reads (node
// addresses, inbound pods, connecting endpoints and their users), for a
// failure message: which record a hop that did not join was missing.
func meshMaps(dp *dataplane.Dataplane) string {
	ip := func(b []byte) string { return netip.AddrFrom16([16]byte(b[:16])).Unmap().String() }
	endpoint := func(k []byte) string { // struct endpoint_key
		return fmt.Sprintf("netns %d %s", binary.LittleEndian.Uint64(k), net.JoinHostPort(ip(k[8:24]), strconv.Itoa(int(binary.LittleEndian.Uint16(k[24:])))))
	}
	describe := map[string]func(k, v []byte) string{
		dataplane.PinNodeAddrs: func(k, v []byte) string {
			return fmt.Sprintf("%s: netns %d flags %d", ip(k), binary.LittleEndian.Uint64(v), binary.LittleEndian.Uint32(v[8:]))
		},
		dataplane.PinInboundPods: func(k, v []byte) string {
			return fmt.Sprintf("%s: port %d", ip(k), binary.LittleEndian.Uint32(v))
		},
		dataplane.PinMeshClients: func(k, v []byte) string { return endpoint(k) },
		dataplane.PinMeshEndpoints: func(k, v []byte) string {
			return fmt.Sprintf("%s: %d users", endpoint(k), binary.LittleEndian.Uint64(v))
		},
	}
	var out []string
	for _, name := range []string{dataplane.PinNodeAddrs, dataplane.PinInboundPods, dataplane.PinMeshClients, dataplane.PinMeshEndpoints} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dp.PinDir(), name), nil)
		if err != nil {
			out = append(out, fmt.Sprintf("%s: %v", name, err))
			continue
		}
		var entries []string
		var k, v []byte
		it := m.Iterate()
		for it.Next(&k, &v) {
			entries = append(entries, describe[name](k, v))
		}
		if err := it.Err(); err != nil {
			entries = append(entries, err.Error())
		}
		m.Close()
		sort.Strings(entries)
		out = append(out, fmt.Sprintf("%s [%s]", name, strings.Join(entries, "; ")))
	}
	return strings.Join(out, "\n  ")
}

// integrity sends bodies from 1 KiB to 5 MiB from the app to the server
// (through the sidecar) and checks the digests the server returns. With a
// gate, each body leaves once every hop of its connection has joined.
func (s *sidecarPods) integrity(t *testing.T, gate *joinGate) {
	t.Helper()
	for _, size := range integritySizes {
		before := gate.counters(t)
		c := s.app.Dial(t, nil, net.JoinHostPort(s.serverIP, "8080"))
		gate.wait(t, before)
		body := make([]byte, size)
		for i := range body {
			body[i] = byte(i*31 + size)
		}
		if err := s.digestRoundTrip(c, body, 30*time.Second); err != nil {
			t.Fatalf("through the sidecar: %v", err)
		}
	}
}

// rr measures request/response round trips of 64 B through the sidecar,
// with blocking calls on a locked thread.
func (s *sidecarPods) rr(t testing.TB, dur time.Duration) (p50, p99 time.Duration) {
	t.Helper()
	c := s.app.Dial(t, nil, net.JoinHostPort(s.serverIP, "8081"))
	defer c.Close()
	raw, err := c.(*net.TCPConn).File() // a duplicate, for plain syscalls
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	fd := int(raw.Fd())
	// Non-blocking, as event loops use sockets (a member made blocking
	// leaves the sockhash: see "Leaving" in bpf/sockbypass.h); a read
	// that finds nothing waits in poll.
	unix.SetNonblock(fd, true)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	msg := bytes.Repeat([]byte("x"), 64)
	reply := make([]byte, 64)
	var lat []time.Duration
	deadline := time.Now().Add(dur)
	for time.Now().Before(deadline) {
		t0 := time.Now()
		if _, err := unix.Write(fd, msg); err != nil {
			t.Fatal(err)
		}
		for got := 0; got < len(reply); {
			n, err := unix.Read(fd, reply[got:])
			if err == unix.EAGAIN {
				unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 1000)
				continue
			}
			if err == unix.EINTR {
				continue
			}
			if err != nil || n == 0 {
				t.Fatalf("rr read: %v", err)
			}
			got += n
		}
		lat = append(lat, time.Since(t0))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return lat[len(lat)/2], lat[len(lat)*99/100]
}

// sidecarStoppedRefuses checks that without the sidecar the app cannot
// reach the server: its connect is refused, the server sees nothing (no
// connection opened in its namespace: the kernel's count, which a
// wrongly routed connect moves before it returns).
func (s *sidecarPods) sidecarStoppedRefuses(t *testing.T) {
	t.Helper()
	s.stopSidecar()
	before := s.accepted.Load()
	opens := passiveOpens(t, s.server)
	var err error
	s.app.In(t, func() {
		var c net.Conn
		c, err = net.DialTimeout("tcp", net.JoinHostPort(s.serverIP, "8080"), 3*time.Second)
		if err == nil {
			c.Close()
		}
	})
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("with the sidecar stopped, connect = %v, want connection refused", err)
	}
	if after := passiveOpens(t, s.server); after != opens || s.accepted.Load() != before {
		t.Errorf("the app reached the server without the sidecar (%d connections opened in its namespace)", after-opens)
	}
}

// passiveOpens is the TCP PassiveOpens count of pod's network namespace
// (/proc/net/snmp): connections its listeners completed.
func passiveOpens(t testing.TB, pod *testutil.Pod) uint64 {
	t.Helper()
	var data []byte
	var err error
	testutil.InNetNS(t, pod.Netns, func() { data, err = os.ReadFile("/proc/thread-self/net/snmp") })
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 || fields[0] != "Tcp:" {
			continue
		}
		if names == nil {
			names = fields
			continue
		}
		for i, name := range names {
			if name == "PassiveOpens" && i < len(fields) {
				n, err := strconv.ParseUint(fields[i], 10, 64)
				if err != nil {
					t.Fatal(err)
				}
				return n
			}
		}
	}
	t.Fatalf("no Tcp PassiveOpens in /proc/net/snmp of %s", pod.Netns.Path())
	return 0
}

// TestSidecarModes runs bodies and round trips app -> HAProxy sidecar ->
// server pod, plain (iptables REDIRECT) and accelerated in both sidecar
// modes. Accelerated, every byte of both hops is redirected: every hop
// joins the sockhash before the first byte, app <-> sidecar is paired
// (mesh_paired, or intercepted with SO_ORIGINAL_DST answered), the bodies
// cross sidecar -> server redirected to the other namespace, and TC sees
// no payload leave either pod through the stack. Over IPv4 with HAProxy,
// over IPv6 with a sidecar of ours (see sidecarPods.sidecar).
func TestSidecarModes(t *testing.T) {
	for _, c := range []struct{ intercept, v6 bool }{{false, false}, {true, false}, {false, true}, {true, true}} {
		intercept := c.intercept
		name := map[bool]string{false: "redirect (iptables)", true: "intercept (no iptables)"}[intercept]
		if c.v6 {
			name += " IPv6"
		}
		t.Run(name, func(t *testing.T) {
			s := newSidecarPodsFamily(t, c.v6)
			dp := dptest.Install(t)

			// Plain: iptables REDIRECT and the sidecar, no sockbypass.
			s.redirectOn(t)
			s.integrity(t, nil)
			plain50, plain99 := s.rr(t, 300*time.Millisecond)

			mesh := dataplane.MeshPresets["istio"]
			mesh.Intercept = intercept
			if intercept {
				s.redirectOff(t) // the istio-init OUTPUT rule is what interception replaces
			}
			appDevs := []dataplane.TCDevice{{NetnsPath: s.app.Netns.Path(), Name: "lo"}, {NetnsPath: s.app.Netns.Path(), Name: "sbxma"}}
			srvDevs := []dataplane.TCDevice{{NetnsPath: s.server.Netns.Path(), Name: "lo"}, {NetnsPath: s.server.Netns.Path(), Name: "sbxmb"}}
			if _, err := dp.Enable(s.app.Cgroup, dataplane.EnableOptions{Mesh: &mesh, TCDevices: appDevs, NoProbation: true}); err != nil {
				t.Fatal(err)
			}
			if _, err := dp.Enable(s.server.Cgroup, dataplane.EnableOptions{TCDevices: srvDevs, NoProbation: true}); err != nil {
				t.Fatal(err)
			}
			if _, err := dp.RefreshNodeAddrs(); err != nil {
				t.Fatal(err)
			}
			recordListeners(t, dp, s.server)
			// Per connection: the app's socket, the sidecar's accepted
			// one and its socket to the server; the server's accepted one.
			gate := &joinGate{dp: dp, inserts: map[uint64]uint64{s.app.Cgroup.ID: 3, s.server.Cgroup.ID: 1}}
			// An app bound to its pod address: in intercept mode its
			// connect to 127.0.0.1:15001 stays plain TCP (the sidecar's
			// accepted socket sees a pod address, not loopback, as its
			// peer: remote scope), so only the sidecar -> server hop
			// joins, and that body and its digest take the stack.
			boundGate, boundStack := gate, uint64(0)
			if intercept {
				boundGate = &joinGate{dp: dp, inserts: map[uint64]uint64{s.app.Cgroup.ID: 1, s.server.Cgroup.ID: 1}}
				boundStack = uint64(len(boundBody) + sha256.Size)
			}
			before := countersLive(t, dp)
			s.integrity(t, gate)
			s.boundRoundTrip(t, boundGate)
			accel50, accel99 := s.rr(t, 300*time.Millisecond)
			after := countersLive(t, dp)
			app := after[s.app.Cgroup.ID].Sub(before[s.app.Cgroup.ID])
			srv := after[s.server.Cgroup.ID].Sub(before[s.server.Cgroup.ID])
			t.Logf("RR 64B app -> sidecar -> server p50: plain %v, accelerated %v (%.2fx faster); p99 %v vs %v",
				plain50, accel50, float64(plain50)/float64(accel50), plain99, accel99)
			t.Logf("app pod: %+v", app)
			t.Logf("server pod: %+v", srv)
			if intercept {
				if app.MeshIntercepted == 0 || app.MeshOrigDstAnswers == 0 {
					t.Errorf("intercept mode: %d connects intercepted, %d SO_ORIGINAL_DST answers", app.MeshIntercepted, app.MeshOrigDstAnswers)
				}
			} else if app.MeshPaired == 0 {
				t.Errorf("redirect mode: no app <-> sidecar connection was paired")
			}
			// The app pod sends each body twice (app -> sidecar, sidecar
			// -> server), the second time to the server's namespace.
			bodies := integrityBytes()
			if app.RedirectedBytes < 2*bodies-boundStack || app.RedirectedXnsBytes < bodies {
				t.Errorf("app pod: redirected %d bytes, %d of them to the server pod; want at least %d and %d (every body on both hops)",
					app.RedirectedBytes, app.RedirectedXnsBytes, 2*bodies, bodies)
			}
			if srv.RedirectedXnsBytes == 0 {
				t.Errorf("server -> sidecar hop was not accelerated: %+v", srv)
			}
			if app.StackEgressBytes != boundStack || srv.StackEgressBytes != 0 || app.PassedBytes != 0 || srv.PassedBytes != 0 {
				t.Errorf("payload through the stack: app pod %d bytes (want %d; %d passed by sk_msg), server pod %d bytes (%d passed)",
					app.StackEgressBytes, boundStack, app.PassedBytes, srv.StackEgressBytes, srv.PassedBytes)
			}
			s.sidecarStoppedRefuses(t)
		})
	}
}

// TestSidecarSharedAppPortIsLeftUnpaired: two app sockets with the same
// local address and port (to two destinations) are not unique: neither is
// redirected to the sidecar while they share it (the first stops when the
// second appears), and both still work through the sidecar.
func TestSidecarSharedAppPortIsLeftUnpaired(t *testing.T) {
	s, dp := newIstioSidecarPods(t)
	var conns []net.Conn
	for _, port := range []int{8080, 8081} {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(appAddr), Port: 41234},
			Control: func(_, _ string, c syscall.RawConn) error {
				return c.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
			}}
		var c net.Conn
		var err error
		s.app.In(t, func() { c, err = d.Dial("tcp4", net.JoinHostPort(serverAddr, fmt.Sprint(port))) })
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	before := countersLive(t, dp)
	// Both work: the echo port echoes, the digest port digests.
	for i := 0; i < 20; i++ {
		conns[1].Write([]byte("ping"))
		buf := make([]byte, 4)
		conns[1].SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(conns[1], buf); err != nil || string(buf) != "ping" {
			t.Fatalf("second app socket: %q %v", buf, err)
		}
	}
	conns[0].Write(bytes.Repeat([]byte("d"), 100000))
	conns[0].(*net.TCPConn).CloseWrite()
	conns[0].SetReadDeadline(time.Now().Add(5 * time.Second))
	digest, err := io.ReadAll(conns[0])
	want := sha256.Sum256(bytes.Repeat([]byte("d"), 100000))
	if err != nil || !bytes.Equal(digest, want[:]) {
		t.Fatalf("first app socket: digest %x, %v", digest, err)
	}
	after := countersLive(t, dp)
	d := after[s.app.Cgroup.ID].Sub(before[s.app.Cgroup.ID])
	t.Logf("shared app endpoint: %+v", d)
	if d.MeshAmbiguous == 0 {
		t.Errorf("the shared app endpoint was not counted as ambiguous")
	}
	if d.RedirectedBytes != 0 {
		t.Errorf("%d bytes were redirected between the sidecar and an app socket whose endpoint is shared", d.RedirectedBytes)
	}
}

// compareSidecar measures RR 64 B app -> sidecar -> server, plain
// (iptables REDIRECT, no sockbypass) and accelerated in the given mode,
// alternating, runs times each; it returns p50 and p99 medians.
func compareSidecar(t testing.TB, intercept bool, runs int, dur time.Duration) (plain, accel [2]time.Duration) {
	s := newSidecarPodsTB(t)
	dp := dptest.Install(t)
	mesh := dataplane.MeshPresets["istio"]
	mesh.Intercept = intercept
	redirecting := false
	setMode := func(accelerated bool) {
		wantRedirect := !accelerated || !intercept
		if wantRedirect && !redirecting {
			s.redirectOn(t)
		} else if !wantRedirect && redirecting {
			s.redirectOff(t)
		}
		redirecting = wantRedirect
		if accelerated {
			if _, err := dp.Enable(s.app.Cgroup, dataplane.EnableOptions{Mesh: &mesh, NoProbation: true}); err != nil {
				t.Fatal(err)
			}
			if _, err := dp.Enable(s.server.Cgroup, dataplane.EnableOptions{NoProbation: true}); err != nil {
				t.Fatal(err)
			}
			dp.RefreshNodeAddrs()
			recordListeners(t, dp, s.server)
		} else {
			dp.Disable(s.app.Cgroup.ID)
			dp.Disable(s.server.Cgroup.ID)
		}
	}
	var p50s, p99s [2][]time.Duration
	for r := 0; r < runs; r++ {
		for _, accelerated := range []bool{r%2 == 1, r%2 == 0} {
			setMode(accelerated)
			p50, p99 := s.rr(t, dur)
			i := 0
			if accelerated {
				i = 1
			}
			p50s[i] = append(p50s[i], p50)
			p99s[i] = append(p99s[i], p99)
		}
	}
	med := func(d []time.Duration) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[len(d)/2]
	}
	return [2]time.Duration{med(p50s[0]), med(p99s[0])}, [2]time.Duration{med(p50s[1]), med(p99s[1])}
}

// BenchmarkSidecar prints RR 64 B through app -> HAProxy sidecar ->
// server pod, plain (iptables REDIRECT only) vs accelerated, in both
// sidecar modes. Goal: p50 at least 1.2x faster in both.
func BenchmarkSidecar(b *testing.B) {
	for i := 0; i < b.N; i++ {
		var table strings.Builder
		fmt.Fprintf(&table, "| sidecar mode | metric | plain (iptables only) | accelerated | accelerated/plain | runs |\n|---|---|---:|---:|---:|---:|\n")
		for _, intercept := range []bool{false, true} {
			plain, accel := compareSidecar(b, intercept, *benchRuns, *benchDuration)
			mode := map[bool]string{false: "redirect (iptables)", true: "intercept (no iptables)"}[intercept]
			for j, metric := range []string{"p50 RTT", "p99 RTT"} {
				fmt.Fprintf(&table, "| %s | %s | %v | %v | %.2fx | %d |\n", mode, metric, plain[j].Round(time.Microsecond), accel[j].Round(time.Microsecond),
					float64(accel[j])/float64(plain[j]), *benchRuns)
			}
		}
		fmt.Print(table.String())
		writeResults(b, "sidecar", table.String(), func(w io.Writer) {
			fmt.Fprintf(w, "# RR 64 B app -> HAProxy sidecar -> server pod (medians of %d alternating runs of %v)\n\n%s", *benchRuns, *benchDuration, table.String())
		})
	}
}

// TestSidecarToSidecarAcrossPods: both pods have sidecars; the server pod's
// inbound traffic is captured by iptables PREROUTING REDIRECT to its
// sidecar's inbound port (15006). The client sidecar's connection and the
// server sidecar's accepted socket do not mirror; they are paired through
// the client's endpoint, so every hop app -> sidecar -> sidecar -> server
// is accelerated: each joins before the first byte, every body crosses
// each hop redirected, and TC sees no payload leave either pod through
// the stack.
func TestSidecarToSidecarAcrossPods(t *testing.T) {
	s := newSidecarPods(t)
	dp := dptest.Install(t)
	startHAProxy(t, s.server, s.dir, "inbound", 15006)
	iptablesIn(t, s.server, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-i", "sbxmb", "-j", "REDIRECT", "--to-ports", "15006")
	s.redirectOn(t)

	s.integrity(t, nil)
	plain50, _ := s.rr(t, 300*time.Millisecond)

	mesh := dataplane.MeshPresets["istio"]
	for p, veth := range map[*testutil.Pod]string{s.app: "sbxma", s.server: "sbxmb"} {
		devs := []dataplane.TCDevice{{NetnsPath: p.Netns.Path(), Name: "lo"}, {NetnsPath: p.Netns.Path(), Name: veth}}
		if _, err := dp.Enable(p.Cgroup, dataplane.EnableOptions{Mesh: &mesh, TCDevices: devs, NoProbation: true}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := dp.RefreshNodeAddrs(); err != nil {
		t.Fatal(err)
	}
	recordListeners(t, dp, s.server)
	// Per connection: the app's socket, its sidecar's accepted one and
	// that sidecar's socket to the server pod; the server sidecar's
	// accepted one, its socket to the server and the server's accepted
	// one.
	gate := &joinGate{dp: dp, inserts: map[uint64]uint64{s.app.Cgroup.ID: 3, s.server.Cgroup.ID: 3}}
	before := countersLive(t, dp)
	s.integrity(t, gate)
	accel50, _ := s.rr(t, 300*time.Millisecond)
	after := countersLive(t, dp)
	app := after[s.app.Cgroup.ID].Sub(before[s.app.Cgroup.ID])
	srv := after[s.server.Cgroup.ID].Sub(before[s.server.Cgroup.ID])
	t.Logf("RR 64B app -> sidecar -> sidecar -> server p50: plain %v, accelerated %v (%.2fx faster)", plain50, accel50, float64(plain50)/float64(accel50))
	t.Logf("client pod: paired %d, cross-netns redirected %d bytes; server pod: paired %d, unpaired %d, redirected %d bytes",
		app.MeshPaired, app.RedirectedXnsBytes, srv.MeshPaired, srv.MeshUnpaired, srv.RedirectedBytes)
	if app.MeshPaired == 0 {
		t.Errorf("app <-> client sidecar not paired: %+v", app)
	}
	if srv.MeshPaired == 0 || app.RedirectedXnsBytes == 0 {
		t.Errorf("client sidecar <-> server sidecar not paired: client %+v, server %+v", app, srv)
	}
	// The client pod sends each body twice (app -> sidecar, sidecar ->
	// server sidecar, to the other namespace), the server pod once (its
	// sidecar -> server).
	bodies := integrityBytes() - uint64(len(boundBody))
	if app.RedirectedBytes < 2*bodies || app.RedirectedXnsBytes < bodies || srv.RedirectedBytes < bodies {
		t.Errorf("redirected: client pod %d bytes, %d of them to the server pod, server pod %d; want at least %d, %d and %d (every body on every hop)",
			app.RedirectedBytes, app.RedirectedXnsBytes, srv.RedirectedBytes, 2*bodies, bodies, bodies)
	}
	if app.StackEgressBytes != 0 || srv.StackEgressBytes != 0 || app.PassedBytes != 0 || srv.PassedBytes != 0 {
		t.Errorf("payload through the stack: client pod %d bytes (%d passed by sk_msg), server pod %d bytes (%d passed)",
			app.StackEgressBytes, app.PassedBytes, srv.StackEgressBytes, srv.PassedBytes)
	}
}

// TestInterceptIPv6AnswersOriginalDestination checks connect6 and the
// IPv6 SO_ORIGINAL_DST answer with a minimal sidecar of our own (uid 1337
// is not needed: the app runs as root and the sidecar only accepts): the
// app's connect to [fd00:9:8::2]:8080 lands on [::1]:15001, and
// getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) there names [fd00:9:8::2]:8080.
func TestInterceptIPv6AnswersOriginalDestination(t *testing.T) {
	testutil.RequirePrivileged(t)
	app, server := testutil.NewPod(t), testutil.NewPod(t)
	testutil.Link(t, app, "fd00:9:8::1/64", server, "fd00:9:8::2/64", "sbxva", "sbxvb")
	dp := dptest.Install(t)
	mesh := dataplane.MeshPresets["istio"]
	mesh.Intercept = true
	if _, err := dp.Enable(app.Cgroup, dataplane.EnableOptions{Mesh: &mesh, NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	// The sidecar lives in the pod's cgroup, as a real one does.
	l := app.Listen(t, "[::1]:15001")
	got := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- err.Error()
			return
		}
		defer c.Close()
		raw, _ := c.(*net.TCPConn).SyscallConn()
		raw.Control(func(fd uintptr) {
			buf := make([]byte, 28)
			n := uint32(len(buf))
			_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IPV6, 80,
				uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
			if errno != 0 {
				got <- "getsockopt: " + errno.Error()
				return
			}
			port := int(buf[2])<<8 | int(buf[3])
			ip, _ := netip.AddrFromSlice(buf[8:24])
			got <- fmt.Sprintf("family %d [%s]:%d len %d", int(buf[0])|int(buf[1])<<8, ip, port, n)
		})
	}()
	c := app.Dial(t, nil, "[fd00:9:8::2]:8080")
	defer c.Close()
	if want := "[::1]:15001"; c.RemoteAddr().String() != want {
		t.Errorf("the app's connection went to %s, want the sidecar at %s", c.RemoteAddr(), want)
	}
	select {
	case s := <-got:
		if want := "family 10 [fd00:9:8::2]:8080 len 28"; s != want {
			t.Errorf("SO_ORIGINAL_DST = %q, want %q", s, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the sidecar got no connection")
	}
}

// recordListeners records, as enable does for the processes of a cgroup,
// the listeners this test process opened in the pods (their servers run
// in the test process, which lives in no pod's cgroup): accepted sockets
// pair only when their listener is known to be non-blocking.
func recordListeners(t testing.TB, dp *dataplane.Dataplane, pods ...*testutil.Pod) {
	t.Helper()
	for _, p := range pods {
		var err error
		p.In(t, func() { _, err = dp.RefreshListeners() })
		if err != nil {
			t.Fatalf("record the listeners of %s: %v", p.Cgroup.Path, err)
		}
	}
}
