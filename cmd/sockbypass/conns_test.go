package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/conns"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// ends names a connection end by its local and remote address (two server
// ends share their local address).
type ends [2]netip.AddrPort

// connsOf runs conns --json with args and returns its connections by local
// and remote address.
func connsOf(t *testing.T, pinDir string, args ...string) map[ends]conns.Conn {
	t.Helper()
	code, out, errOut := sockbypass(t, append([]string{"conns", "--json", "--bpffs-dir", pinDir}, args...)...)
	if code != 0 {
		t.Fatalf("conns --json %v: exit %d: %s", args, code, errOut)
	}
	var doc connsJSON
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("conns --json: %v\n%s", err, out)
	}
	m := map[ends]conns.Conn{}
	for _, c := range doc.Connections {
		m[ends{c.Local, c.Remote}] = c
	}
	return m
}

func addrOf(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// endsOf names the end c.
func endsOf(c net.Conn) ends { return ends{addrOf(c.LocalAddr()), addrOf(c.RemoteAddr())} }

// fdEnds names the end of the IPv4 socket f.
func fdEnds(t *testing.T, f *os.File) ends {
	t.Helper()
	var e ends
	for i, get := range []func(int) (unix.Sockaddr, error){unix.Getsockname, unix.Getpeername} {
		sa, err := get(int(f.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		in := sa.(*unix.SockaddrInet4)
		e[i] = netip.AddrPortFrom(netip.AddrFrom4(in.Addr), uint16(in.Port))
	}
	return e
}

// connsScene is what newConnsScene made: a paired connection and a
// blocking one to a listener of cg, and a paired connection to a second
// listener of cg.
type connsScene struct {
	pinDir                string
	cg                    cgroup.Cgroup
	port, otherPort       uint16
	client, server, other net.Conn // paired (client -> port), other: the client end to otherPort
	blockingClient        *os.File
	blockingServer        net.Conn
}

// acceptOne accepts the next connection of l in the background.
func acceptOne(t *testing.T, l net.Listener) <-chan net.Conn {
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			ch <- nil
			return
		}
		t.Cleanup(func() { c.Close() })
		ch <- c
	}()
	return ch
}

// pairIn connects to l from cg, waits until conns shows the server end
// paired, and sends 64 KiB from the client, read by the server.
func pairIn(t *testing.T, pinDir string, cg cgroup.Cgroup, l net.Listener) (client, server net.Conn) {
	t.Helper()
	accepted := acceptOne(t, l)
	client = testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	if server = <-accepted; server == nil {
		t.Fatal("accept failed")
	}
	deadline := time.Now().Add(5 * time.Second)
	for connsOf(t, pinDir)[endsOf(server)].State != conns.StatePaired {
		if time.Now().After(deadline) {
			t.Fatal("the server end did not pair")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := client.Write(make([]byte, 64<<10)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	for got := 0; got < len(buf); {
		n, err := server.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got += n
	}
	return client, server
}

func newConnsScene(t *testing.T) *connsScene {
	t.Helper()
	s := &connsScene{}
	s.pinDir, s.cg = newInstallDir(t)
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", s.cg.Path, "--bpffs-dir", s.pinDir)
	l := testutil.ListenIn(t, s.cg, "tcp4", "127.0.0.1:0")
	l2 := testutil.ListenIn(t, s.cg, "tcp4", "127.0.0.1:0")
	s.port, s.otherPort = uint16(l.Addr().(*net.TCPAddr).Port), uint16(l2.Addr().(*net.TCPAddr).Port)
	s.client, s.server = pairIn(t, s.pinDir, s.cg, l)
	s.other, _ = pairIn(t, s.pinDir, s.cg, l2)
	accepted := acceptOne(t, l)
	s.blockingClient = testutil.BlockingDialIn(t, s.cg, l.Addr().String())
	if s.blockingServer = <-accepted; s.blockingServer == nil {
		t.Fatal("accept failed")
	}
	return s
}

func TestConnsShowsPairedAndBlockingConnections(t *testing.T) {
	s := newConnsScene(t)
	comm, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	got := connsOf(t, s.pinDir)
	c := got[endsOf(s.client)]
	if c.State != conns.StatePaired || c.PID != os.Getpid() || c.Comm != strings.TrimSpace(string(comm)) || c.RedirectedBytes != 64<<10 ||
		c.Cgroup != s.cg.Rel || c.Remote.Port() != s.port {
		t.Errorf("paired client: %+v, want paired, pid %d (%s), 65536 bytes redirected, cgroup %s", c, os.Getpid(), comm, s.cg.Rel)
	}
	if srv := got[endsOf(s.server)]; srv.State != conns.StatePaired || srv.PID != os.Getpid() {
		t.Errorf("paired server end: %+v", srv)
	}
	b := got[fdEnds(t, s.blockingClient)]
	if b.State != conns.StatePlain || b.Reason != "blocking" || b.PID != os.Getpid() {
		t.Errorf("blocking client: %+v, want plain, reason blocking, pid %d", b, os.Getpid())
	}
	if bs := got[endsOf(s.blockingServer)]; bs.State != conns.StatePlain || bs.Reason != "peer-blocking" {
		t.Errorf("the blocking client's server end: %+v, want plain, reason peer-blocking", bs)
	}

	// For people: an aligned table, one line per end, then the counts.
	code, out, errOut := sockbypass(t, "conns", "--bpffs-dir", s.pinDir)
	if code != 0 {
		t.Fatalf("conns: exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 1+6+1 || !strings.HasPrefix(lines[0], "LOCAL ") || !strings.Contains(lines[0], "STATE") ||
		!strings.Contains(lines[len(lines)-1], "6 connection end(s): 4 paired, 0 pairing, 0 leaving, 2 plain") {
		t.Fatalf("conns table:\n%s", out)
	}
	col := strings.Index(lines[0], "STATE")
	for _, l := range lines[1 : len(lines)-1] {
		if len(l) <= col || l[col-1] != ' ' || l[col] == ' ' {
			t.Errorf("column STATE (at %d) not aligned in %q", col, l)
		}
	}
	wantRow := fmt.Sprintf("%s  %s  paired", addrOf(s.client.LocalAddr()), addrOf(s.client.RemoteAddr()))
	if !strings.Contains(out, wantRow) || !strings.Contains(out, "64.0 KiB") || !strings.Contains(out, fmt.Sprintf("%d/%s", os.Getpid(), strings.TrimSpace(string(comm)))) {
		t.Errorf("conns table lacks the paired client row (%q, 64.0 KiB, its process):\n%s", wantRow, out)
	}
}

func TestConnsFilters(t *testing.T) {
	s := newConnsScene(t)
	keys := func(m map[ends]conns.Conn) string {
		var ks []string
		for k, c := range m {
			ks = append(ks, fmt.Sprintf("%s(%s %s)", k, c.State, c.Reason))
		}
		return strings.Join(ks, " ")
	}
	if got := connsOf(t, s.pinDir, "--state", "paired"); len(got) != 4 {
		t.Errorf("--state paired: %s, want the 4 ends of the 2 paired connections", keys(got))
	} else {
		for _, c := range got {
			if c.State != conns.StatePaired {
				t.Errorf("--state paired lists %+v", c)
			}
		}
	}
	if got := connsOf(t, s.pinDir, "--state", "blocking"); len(got) != 1 || got[fdEnds(t, s.blockingClient)].Reason != "blocking" {
		t.Errorf("--state blocking: %s, want the blocking client only", keys(got))
	}
	if got := connsOf(t, s.pinDir, "--state", "plain"); len(got) != 2 {
		t.Errorf("--state plain: %s, want the blocking connection's 2 ends", keys(got))
	}
	// Both ends of the connection to otherPort, nothing else.
	if got := connsOf(t, s.pinDir, "--port", fmt.Sprint(s.otherPort)); len(got) != 2 || got[endsOf(s.other)].Remote.Port() != s.otherPort {
		t.Errorf("--port %d: %s, want the 2 ends of the connection to it", s.otherPort, keys(got))
	}
	if got := connsOf(t, s.pinDir, "--port", fmt.Sprint(s.port), "--state", "paired"); len(got) != 2 || got[endsOf(s.client)].State != conns.StatePaired {
		t.Errorf("--port %d --state paired: %s, want the paired connection's 2 ends", s.port, keys(got))
	}
	if got := connsOf(t, s.pinDir, "--cgroup", s.cg.Rel); len(got) != 6 {
		t.Errorf("--cgroup %s: %s, want all 6 ends", s.cg.Rel, keys(got))
	}
	// Another enabled cgroup: none of these.
	other := testutil.NewCgroup(t)
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", other.Path, "--bpffs-dir", s.pinDir)
	if got := connsOf(t, s.pinDir, "--cgroup", other.Path); len(got) != 0 {
		t.Errorf("--cgroup %s (no connections): %s", other.Path, keys(got))
	}
}

func TestConnsRejectsUnknownFilterValues(t *testing.T) {
	for _, tc := range []struct {
		args      []string
		wantInErr []string
	}{
		{[]string{"--state", "pared"}, []string{`--state "pared"`, "paired, pairing, leaving, plain", "blocking"}},
		{[]string{"--port", "70000"}, []string{`--port "70000"`, "1 to 65535"}},
		{[]string{"--port", "http"}, []string{`--port "http"`, "1 to 65535"}},
		{[]string{"--cgroup", ""}, []string{`--cgroup ""`, "leave the flag out"}},
	} {
		code, _, errOut := sockbypass(t, append([]string{"conns", "--bpffs-dir", "/sys/fs/bpf/sockbypass-no-such-dir"}, tc.args...)...)
		if code != exitUsage {
			t.Errorf("conns %v: exit %d, want %d", tc.args, code, exitUsage)
		}
		for _, w := range tc.wantInErr {
			if !strings.Contains(errOut, w) {
				t.Errorf("conns %v: %q does not say %q", tc.args, errOut, w)
			}
		}
	}

	// Cgroups are checked against the installed state.
	pinDir, cg := newInstallDir(t)
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	notEnabled := testutil.NewCgroup(t)
	for arg, want := range map[string][]string{
		"no-such-cgroup-for-conns": {`--cgroup "no-such-cgroup-for-conns"`, "no such cgroup", "sockbypass status"},
		notEnabled.Path:            {notEnabled.Rel, "not enabled", "sockbypass enable --cgroup " + notEnabled.Rel},
	} {
		code, _, errOut := sockbypass(t, "conns", "--cgroup", arg, "--bpffs-dir", pinDir)
		if code != exitError {
			t.Errorf("conns --cgroup %s: exit %d, want %d", arg, code, exitError)
		}
		for _, w := range want {
			if !strings.Contains(errOut, w) {
				t.Errorf("conns --cgroup %s: %q does not say %q", arg, errOut, w)
			}
		}
	}
}
