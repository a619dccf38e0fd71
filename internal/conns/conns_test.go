package conns

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/dptest"
)

func TestPodUIDFromKubeletCgroups(t *testing.T) {
	for rel, want := range map[string]string{
		"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_0f1a_4b2c_9d3e_4f5a6b7c8d9e.slice/cri-containerd-abc.scope": "1b2c3d4e-0f1a-4b2c-9d3e-4f5a6b7c8d9e",
		"kubepods/besteffort/pod1b2c3d4e-0f1a-4b2c-9d3e-4f5a6b7c8d9e/0123abcd":                                                              "1b2c3d4e-0f1a-4b2c-9d3e-4f5a6b7c8d9e",
		"system.slice/redis.service": "",
	} {
		if got := podUID(rel); got != want {
			t.Errorf("podUID(%q) = %q, want %q", rel, got, want)
		}
	}
}

func TestFilterSelects(t *testing.T) {
	a := Conn{Local: netip.MustParseAddrPort("127.0.0.1:8080"), Remote: netip.MustParseAddrPort("127.0.0.1:40000"), Cgroup: "/app.slice/web", State: StatePaired}
	b := Conn{Local: netip.MustParseAddrPort("127.0.0.1:40001"), Remote: netip.MustParseAddrPort("127.0.0.1:6379"), Cgroup: "/app.slice/webcache", State: StatePlain, Reason: "blocking"}
	all := []Conn{a, b}
	for _, tc := range []struct {
		f    Filter
		want []Conn
	}{
		{Filter{}, all},
		{Filter{Cgroup: "app.slice"}, all},
		{Filter{Cgroup: "app.slice/web"}, []Conn{a}},
		{Filter{Cgroup: "/app.slice/webcache/"}, []Conn{b}},
		{Filter{Cgroup: "/"}, all}, // not app.slice/webcache
		{Filter{Port: 8080}, []Conn{a}},
		{Filter{Port: 6379}, []Conn{b}},
		{Filter{Port: 1}, nil},
		{Filter{State: StatePlain}, []Conn{b}},
		{Filter{State: "blocking"}, []Conn{b}},
		{Filter{State: StatePaired, Port: 6379}, nil},
	} {
		got := tc.f.Select(all)
		if fmt.Sprint(got) != fmt.Sprint(tc.want) && !(len(got) == 0 && len(tc.want) == 0) {
			t.Errorf("%+v selects %v, want %v", tc.f, got, tc.want)
		}
	}
}

func TestCheckStateNamesTheInputAndTheValues(t *testing.T) {
	for _, ok := range []string{StatePaired, StatePlain, "blocking", "peer-not-enabled"} {
		if err := CheckState(ok); err != nil {
			t.Errorf("CheckState(%q): %v", ok, err)
		}
	}
	err := CheckState("pared")
	if err == nil || !strings.Contains(err.Error(), `"pared"`) || !strings.Contains(err.Error(), "paired, pairing, leaving, plain") || !strings.Contains(err.Error(), "blocking") {
		t.Errorf("CheckState(\"pared\"): %v, want the input and the states and reasons to use", err)
	}
}

// setup installs a dataplane of the test's own and enables a fresh cgroup.
func setup(tb testing.TB) (*dataplane.Dataplane, cgroup.Cgroup, cgroup.Mounts) {
	tb.Helper()
	dp := dptest.Install(tb)
	cg := testutil.NewCgroup(tb)
	if _, err := dp.Enable(cg, dataplane.EnableOptions{NoProbation: true}); err != nil {
		tb.Fatal(err)
	}
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		tb.Fatal(err)
	}
	return dp, cg, mounts
}

// collect runs Collect and returns its connections by local address.
func collect(tb testing.TB, dp *dataplane.Dataplane, mounts cgroup.Mounts) map[netip.AddrPort]Conn {
	tb.Helper()
	list, err := Collect(dp, Options{Mounts: mounts})
	if err != nil {
		tb.Fatal(err)
	}
	out := map[netip.AddrPort]Conn{}
	for _, c := range list {
		out[c.Local] = c
	}
	return out
}

func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// ownComm is this process's command name, as /proc shows it.
func ownComm(tb testing.TB) string {
	b, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		tb.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// pairedConn makes a connection between two sockets of cg, sends n bytes
// from the client and reads them at the server, and waits (at most 5 s)
// until Collect shows both ends paired.
func pairedConn(t *testing.T, dp *dataplane.Dataplane, mounts cgroup.Mounts, cg cgroup.Cgroup, l net.Listener, n int) (client, server net.Conn) {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	client = testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { server.Close() })
	// The client sends once its server joined (else the pair is given
	// up): wait for the server end to be a member.
	deadline := time.Now().Add(5 * time.Second)
	for collect(t, dp, mounts)[addrPort(server.LocalAddr())].State == StatePlain {
		if time.Now().After(deadline) {
			t.Fatal("the server end did not join the sockhash")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := client.Write(make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, n)
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	for got := 0; got < n; {
		k, err := server.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got += k
	}
	return client, server
}

func TestCollectShowsPairedConnectionWithItsProcessAndBytes(t *testing.T) {
	dp, cg, mounts := setup(t)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	client, server := pairedConn(t, dp, mounts, cg, l, 100000)
	var self unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &self); err != nil {
		t.Fatal(err)
	}
	got := collect(t, dp, mounts)
	c, s := got[addrPort(client.LocalAddr())], got[addrPort(server.LocalAddr())]
	for name, conn := range map[string]Conn{"client": c, "server": s} {
		if conn.State != StatePaired || conn.Reason != "" || conn.PID != os.Getpid() || conn.Comm != ownComm(t) ||
			conn.Cgroup != cg.Rel || conn.CgroupID != cg.ID || conn.Netns != self.Ino || conn.Cookie == 0 || conn.Inode == 0 {
			t.Errorf("%s end: %+v, want paired, pid %d (%s), cgroup %s (%d), netns %d", name, conn, os.Getpid(), ownComm(t), cg.Rel, cg.ID, self.Ino)
		}
	}
	if c.RedirectedBytes != 100000 || s.RedirectedBytes != 0 {
		t.Errorf("redirected: client %d, server %d; want 100000 and 0 (the client sent, the server did not)", c.RedirectedBytes, s.RedirectedBytes)
	}
	if c.Remote != s.Local || s.Remote != c.Local {
		t.Errorf("addresses do not mirror: client %s -> %s, server %s -> %s", c.Local, c.Remote, s.Local, s.Remote)
	}
}

func TestCollectShowsBlockingConnectionAsPlain(t *testing.T) {
	dp, cg, mounts := setup(t)
	f, server := blockingConn(t, cg)
	sa, err := unix.Getsockname(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	clientAddr := netip.AddrPortFrom(netip.AddrFrom4(sa.(*unix.SockaddrInet4).Addr), uint16(sa.(*unix.SockaddrInet4).Port))
	got := collect(t, dp, mounts)
	c, s := got[clientAddr], got[addrPort(server.LocalAddr())]
	if c.State != StatePlain || c.Reason != "blocking" || c.PID != os.Getpid() || c.Comm != ownComm(t) || c.Cgroup != cg.Rel {
		t.Errorf("blocking client: %+v, want plain, reason blocking, pid %d", c, os.Getpid())
	}
	if s.State != StatePlain || s.Reason != "peer-blocking" || !strings.Contains(s.Detail, fmt.Sprint(os.Getpid())) {
		t.Errorf("its server end: %+v, want plain, reason peer-blocking naming the peer's pid", s)
	}
}

func TestCollectShowsPeerOutsideEnabledCgroups(t *testing.T) {
	dp, cg, mounts := setup(t)
	other := testutil.NewCgroup(t) // not enabled
	l := testutil.ListenIn(t, other, "tcp4", "127.0.0.1:0")
	go func() {
		if c, err := l.Accept(); err == nil {
			t.Cleanup(func() { c.Close() })
		}
	}()
	client := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	var c Conn
	deadline := time.Now().Add(5 * time.Second)
	for c.Reason != "peer-not-enabled" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // until the server end is accepted
		c = collect(t, dp, mounts)[addrPort(client.LocalAddr())]
	}
	if c.State != StatePlain || c.Reason != "peer-not-enabled" {
		t.Errorf("client of a server in a cgroup that is not enabled: %+v, want plain, peer-not-enabled", c)
	}
	if s, ok := collect(t, dp, mounts)[netip.MustParseAddrPort(l.Addr().String())]; ok {
		t.Errorf("the server end, in a cgroup that is not enabled, is listed: %+v", s)
	}
}

// TestCollectWalksTheNamespacesOfTheCgroupsProcesses: a connection in a
// network namespace that only a process of the enabled cgroup uses is
// listed, with that namespace.
func TestCollectWalksTheNamespacesOfTheCgroupsProcesses(t *testing.T) {
	dp, cg, mounts := setup(t)
	netns := testutil.NewNetNS(t)
	// A process of the cgroup in the namespace (a pod's pause process).
	cgfd, err := unix.Open(cg.Path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(cgfd)
	sleep := exec.Command("sleep", "60")
	sleep.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgfd}
	testutil.InNetNS(t, netns, func() { err = sleep.Start() }) // forked from the thread in netns
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sleep.Process.Kill(); sleep.Wait() })

	var l net.Listener
	var client net.Conn
	testutil.InNetNS(t, netns, func() {
		testutil.InCgroup(t, cg, func() {
			if l, err = net.Listen("tcp4", "127.0.0.1:0"); err == nil {
				client, err = net.Dial("tcp4", l.Addr().String())
			}
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	defer client.Close()
	server, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	var st unix.Stat_t
	if err := unix.Stat(netns.Path(), &st); err != nil {
		t.Fatal(err)
	}
	c, ok := collect(t, dp, mounts)[addrPort(client.LocalAddr())]
	if !ok || c.Netns != st.Ino || c.Cgroup != cg.Rel || c.PID != os.Getpid() {
		t.Errorf("connection in %s (inode %d): listed %v, %+v", netns.Path(), st.Ino, ok, c)
	}
}

// TestMain lets the benchmark run this binary as the server process that
// holds the accepted ends (CONNS_BENCH_SERVER=N): one process may not hold
// 20,000 descriptors here.
func TestMain(m *testing.M) {
	if n, err := strconv.Atoi(os.Getenv("CONNS_BENCH_SERVER")); err == nil {
		benchServer(n)
		return
	}
	os.Exit(m.Run())
}

// benchServer listens on 127.0.0.1, prints its port, accepts n connections
// and holds them, says "accepted" and exits when its stdin closes.
func benchServer(n int) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	fmt.Println(l.Addr().(*net.TCPAddr).Port)
	held := make([]net.Conn, 0, n)
	for range n {
		c, err := l.Accept()
		if err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		held = append(held, c)
	}
	fmt.Println("accepted")
	io.Copy(io.Discard, os.Stdin)
	for _, c := range held {
		c.Close()
	}
}

// BenchmarkCollect10000Connections times a full collection with 10,000
// accelerated loopback connections (20,000 sockets) of an enabled cgroup,
// their server ends held by a child process in the cgroup, their clients
// by this one:
//
//	go test -run '^$' -bench Collect10000 ./internal/conns
func BenchmarkCollect10000Connections(b *testing.B) {
	const n = 10000
	dp, cg, mounts := setup(b)
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < n+1000 {
		b.Fatalf("descriptor limit %d (%v): the benchmark needs %d", lim.Cur, err, n+1000)
	}
	cgfd, err := unix.Open(cg.Path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(cgfd)
	server := exec.Command(os.Args[0])
	server.Env = append(os.Environ(), "CONNS_BENCH_SERVER="+strconv.Itoa(n))
	server.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgfd}
	server.Stderr = os.Stderr
	stdin, err := server.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := server.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := server.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close()
		done := make(chan error, 1)
		go func() { done <- server.Wait() }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			server.Process.Kill()
			<-done
		}
	})
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() {
		b.Fatal("the server process said nothing")
	}
	port, err := strconv.Atoi(lines.Text())
	if err != nil {
		b.Fatalf("server process: %s", lines.Text())
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	clients := make([]net.Conn, 0, n)
	b.Cleanup(func() {
		for _, c := range clients {
			c.Close()
		}
	})
	testutil.InCgroup(b, cg, func() {
		for range n {
			var c net.Conn
			if c, err = net.DialTimeout("tcp4", addr, 5*time.Second); err != nil {
				return
			}
			clients = append(clients, c)
		}
	})
	if err != nil {
		b.Fatalf("connection %d: %v", len(clients), err)
	}
	if !lines.Scan() || lines.Text() != "accepted" {
		b.Fatalf("server process: %q", lines.Text())
	}
	list, err := Collect(dp, Options{Mounts: mounts})
	if err != nil {
		b.Fatal(err)
	}
	paired := 0
	for _, c := range list {
		if c.State == StatePaired {
			paired++
		}
	}
	if paired < 2*n*99/100 {
		b.Fatalf("%d connection ends listed, %d paired: want (nearly) all %d paired", len(list), paired, 2*n)
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := Collect(dp, Options{Mounts: mounts}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(list)), "sockets")
}

// TestCollectShowsAListenersFirstConnectionOnProbation: with the default
// settings a new listener's first connection stays plain (probation),
// both ends show why, and once the server has read it the next pairs.
func TestCollectShowsAListenersFirstConnectionOnProbation(t *testing.T) {
	dp := dptest.Install(t)
	cg := testutil.NewCgroup(t)
	if _, err := dp.Enable(cg, dataplane.EnableOptions{}); err != nil {
		t.Fatal(err)
	}
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		t.Fatal(err)
	}
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	client := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	server := <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	defer server.Close()
	if _, err := client.Write([]byte("first")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(server, buf); err != nil {
		t.Fatal(err)
	}
	got := collect(t, dp, mounts)
	for name, c := range map[string]Conn{"client": got[addrPort(client.LocalAddr())], "server": got[addrPort(server.LocalAddr())]} {
		if c.State != StatePlain || c.Reason != "probation" {
			t.Errorf("%s end of a listener's first connection: %+v, want plain, reason probation", name, c)
		}
	}
	client2, _ := pairedConn(t, dp, mounts, cg, l, 10)
	if c := collect(t, dp, mounts)[addrPort(client2.LocalAddr())]; c.State != StatePaired {
		t.Errorf("the listener's next connection: %+v, want paired", c)
	}
}

// blockingConn connects a blocking client socket made in cg to a listener
// of cg on 127.0.0.1, and returns it with its accepted end (closed at the
// end of the test).
func blockingConn(t *testing.T, cg cgroup.Cgroup) (*os.File, net.Conn) {
	t.Helper()
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	client := testutil.BlockingDialIn(t, cg, l.Addr().String())
	server := <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { server.Close() })
	return client, server
}
