package dataplane

import (
	"net"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// TestIdenticalTuplesInTwoNamespacesNeverCross runs the same 4-tuple
// (127.0.0.1:40123 -> 127.0.0.1:7777) in two network namespaces at once,
// both in enabled cgroups. Each client streams its own namespace's letter;
// each server checks every byte is its own letter and answers with its
// name. A key without the namespace cookie would mix them.
func TestIdenticalTuplesInTwoNamespacesNeverCross(t *testing.T) {
	dp := install(t)
	type pod struct {
		cg    cgroup.Cgroup
		netns ns.NetNS
		*transfer.LetterStream
	}
	pods := []*pod{{LetterStream: &transfer.LetterStream{Name: "pod-a", Letter: 'A'}}, {LetterStream: &transfer.LetterStream{Name: "pod-b", Letter: 'B'}}}
	var streams []*transfer.LetterStream
	inPod := func(p *pod, fn func()) {
		testutil.InCgroup(t, p.cg, func() { testutil.InNetNS(t, p.netns, fn) })
	}
	for _, p := range pods {
		p.cg = enabledCgroup(t, dp)
		p.netns = testutil.NewNetNS(t)
		var err error
		inPod(p, func() { p.Listener, err = net.Listen("tcp4", "127.0.0.1:7777") })
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Listener.Close() })
		streams = append(streams, p.LetterStream)
	}

	const perConn = 6 << 20 // under the 64 MiB unread limit: all redirected
	send := transfer.ServeLetters(streams)

	// Both clients use the same source port: identical 4-tuples.
	dialer := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40123}, Timeout: 5 * time.Second}
	for _, p := range pods {
		var err error
		inPod(p, func() { p.Client, err = dialer.Dial("tcp4", "127.0.0.1:7777") })
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Client.Close() })
	}
	// The servers join their pairs at PASSIVE_ESTABLISHED, which may come
	// after the client's connect returned: wait until they have, so the
	// whole stream takes the fast path.
	for _, p := range pods {
		waitPeerJoined(t, dp, p.Client)
	}

	for _, err := range send(perConn, 32<<10) {
		t.Error(err)
	}
	for _, p := range pods {
		if got := counterOf(t, dp, p.cg.ID).RedirectedBytes; got < perConn {
			t.Errorf("%s: redirected %d bytes, want at least %d (the test must exercise the fast path)", p.Name, got, perConn)
		}
	}
}
