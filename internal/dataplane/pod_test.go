package dataplane

import (
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// enablePods enables the pods' cgroups and refreshes the node addresses.
func enablePods(t *testing.T, dp *Dataplane, pods ...*testutil.Pod) NodeAddrs {
	t.Helper()
	for _, p := range pods {
		if _, err := dp.Enable(p.Cgroup, EnableOptions{NoProbation: true}); err != nil {
			t.Fatal(err)
		}
	}
	addrs, err := dp.RefreshNodeAddrs()
	if err != nil {
		t.Fatal(err)
	}
	return addrs
}

func TestPodToPodAcrossNamespaces(t *testing.T) {
	dp := install(t)
	a, b := testutil.NewPod(t), testutil.NewPod(t)
	testutil.Link(t, a, "10.9.1.1/24", b, "10.9.1.2/24", "sbxa", "sbxb")
	addrs := enablePods(t, dp, a, b)
	if addrs.Unique != 2 || len(addrs.Ambiguous) != 0 {
		t.Fatalf("node addresses: %+v, want 2 unique", addrs)
	}

	l := b.Listen(t, "10.9.1.2:8080")
	transfer.ServeEcho(l)
	c := a.Dial(t, nil, "10.9.1.2:8080")
	waitJoined(t, dp, c)
	waitPeerJoined(t, dp, c)

	beforeA, beforeB := counterOf(t, dp, a.Cgroup.ID), counterOf(t, dp, b.Cgroup.ID)
	payload := transfer.Pattern(77, 8<<20)
	if err := transfer.RoundTrip(c, payload, transfer.Options{WriteSize: 16384}); err != nil {
		t.Fatal(err)
	}
	dA := counterOf(t, dp, a.Cgroup.ID).Sub(beforeA)
	dB := counterOf(t, dp, b.Cgroup.ID).Sub(beforeB)
	for name, d := range map[string]CgroupCounters{"client pod": dA, "server pod": dB} {
		if d.RedirectedXnsBytes != 8<<20 || d.RedirectedBytes != 8<<20 {
			t.Errorf("%s: redirected %d bytes, %d across namespaces; want %d both", name, d.RedirectedBytes, d.RedirectedXnsBytes, 8<<20)
		}
	}
}

// TestReusedAddressesNeverCross: two pod pairs on separate veths use the
// same addresses and the same client port. The addresses are ambiguous, so
// nothing pairs across namespaces, and no byte crosses between the pairs.
func TestReusedAddressesNeverCross(t *testing.T) {
	dp := install(t)
	type pair struct {
		client, server *testutil.Pod
		*transfer.LetterStream
	}
	pairs := []*pair{{LetterStream: &transfer.LetterStream{Name: "pair-1", Letter: '1'}}, {LetterStream: &transfer.LetterStream{Name: "pair-2", Letter: '2'}}}
	var pods []*testutil.Pod
	for i, p := range pairs {
		p.client, p.server = testutil.NewPod(t), testutil.NewPod(t)
		testutil.Link(t, p.client, "10.9.2.1/24", p.server, "10.9.2.2/24", fmt.Sprintf("sbx%dc", i), fmt.Sprintf("sbx%ds", i))
		pods = append(pods, p.client, p.server)
	}
	addrs := enablePods(t, dp, pods...)
	if strings.Join(addrs.Ambiguous, ",") != "10.9.2.1,10.9.2.2" {
		t.Fatalf("ambiguous addresses = %v, want 10.9.2.1 and 10.9.2.2", addrs.Ambiguous)
	}
	st, err := dp.Status()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.NodeAddrs.Ambiguous) != 2 {
		t.Errorf("status does not report the ambiguous addresses: %+v", st.NodeAddrs)
	}

	const perConn = 8 << 20
	var streams []*transfer.LetterStream
	for _, p := range pairs {
		p.Listener = p.server.Listen(t, "10.9.2.2:7777")
		streams = append(streams, p.LetterStream)
	}
	send := transfer.ServeLetters(streams)
	for _, p := range pairs {
		p.Client = p.client.Dial(t, &net.TCPAddr{IP: net.IPv4(10, 9, 2, 1), Port: 40123}, "10.9.2.2:7777")
	}
	for _, err := range send(perConn, 16<<10) {
		t.Error(err)
	}
	for _, pod := range pods {
		c := counterOf(t, dp, pod.Cgroup.ID)
		if c.RedirectedXnsBytes != 0 {
			t.Errorf("ambiguous addresses were paired across namespaces: %+v", c)
		}
		if c.SocketsAmbiguous == 0 {
			t.Errorf("sockets on ambiguous addresses not counted: %+v", c)
		}
	}
}

// TestReusedAddressOfDeletedPodGetsNothing: pod A talks to B; A goes away
// and its address is given to a new pod A2 (on a new link to B) while B
// still sends on the old connection. The old socket, still open, keeps
// getting its bytes; A2 gets nothing, neither redirected nor by the stack.
func TestReusedAddressOfDeletedPodGetsNothing(t *testing.T) {
	dp := install(t)
	a, b := testutil.NewPod(t), testutil.NewPod(t)
	testutil.Link(t, a, "10.9.3.1/24", b, "10.9.3.2/24", "sbxa1", "sbxb1")
	enablePods(t, dp, a, b)
	l := b.Listen(t, "10.9.3.2:9000")
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	old := a.Dial(t, nil, "10.9.3.2:9000")
	srv := <-accepted
	defer srv.Close()
	waitJoined(t, dp, old)
	oldPort := old.LocalAddr().(*net.TCPAddr).Port

	// Pod A is deleted: its link (and so B's end) goes; a new pod A2 gets
	// 10.9.3.1 on a new link to B.
	deleteLink(t, a, "sbxa1")
	a2 := testutil.NewPod(t)
	testutil.Link(t, a2, "10.9.3.1/24", b, "10.9.3.2/24", "sbxa2", "sbxb2")
	enablePods(t, dp, a2)
	trap := a2.Listen(t, fmt.Sprintf("10.9.3.1:%d", oldPort))
	got := make(chan string, 1)
	go func() {
		c, err := trap.Accept()
		if err != nil {
			return
		}
		b, _ := io.ReadAll(c)
		got <- string(b)
	}()

	// B sends on the old connection: the old socket, still open, gets it.
	before := counterOf(t, dp, b.Cgroup.ID)
	if _, err := srv.Write([]byte("for the old pod only")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	old.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := old.Read(buf)
	if err != nil || string(buf[:n]) != "for the old pod only" {
		t.Fatalf("old socket read %q, %v", buf[:n], err)
	}
	if d := counterOf(t, dp, b.Cgroup.ID).Sub(before); d.RedirectedBytes == 0 {
		t.Logf("not redirected to the old socket (took the stack): %+v", d)
	}
	// The old pod's socket closes; B keeps sending. Nothing may be
	// redirected any more, B's writes must fail (the new pod's stack
	// answers with a reset), and no socket of the new pod is a member.
	old.Close()
	before = counterOf(t, dp, b.Cgroup.ID)
	var werr error
	for i := 0; i < 50 && werr == nil; i++ {
		_, werr = srv.Write([]byte("still for the old pod"))
		time.Sleep(20 * time.Millisecond)
	}
	if !errors.Is(werr, unix.EPIPE) && !errors.Is(werr, unix.ECONNRESET) {
		t.Errorf("writes to the deleted pod's connection: %v, want EPIPE or ECONNRESET", werr)
	}
	if d := counterOf(t, dp, b.Cgroup.ID).Sub(before); d.RedirectedBytes != 0 {
		t.Errorf("%d bytes were redirected after the old socket closed: %+v", d.RedirectedBytes, d)
	}
	socks, err := dp.Sockets()
	if err != nil {
		t.Fatal(err)
	}
	for k := range socks {
		if k.Local().Addr() == netip.MustParseAddr("10.9.3.1") {
			t.Errorf("a socket on the reused address is in the sockhash: %v -> %v", k.Local(), k.Remote())
		}
	}
	select {
	case s := <-got:
		t.Fatalf("the new pod received the old pod's bytes: %q", s)
	case <-time.After(300 * time.Millisecond):
	}
}

func deleteLink(t *testing.T, p *testutil.Pod, name string) {
	t.Helper()
	testutil.InNetNS(t, p.Netns, func() {
		if err := netlinkDelete(name); err != nil {
			t.Fatal(err)
		}
	})
}
