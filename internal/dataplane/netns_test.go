package dataplane

import (
	"net"
	"sync"
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
		name   string
		letter byte
		cg     cgroup.Cgroup
		netns  ns.NetNS
		l      net.Listener
		c      net.Conn
	}
	pods := []*pod{{name: "pod-a", letter: 'A'}, {name: "pod-b", letter: 'B'}}
	inPod := func(p *pod, fn func()) {
		testutil.InCgroup(t, p.cg, func() { testutil.InNetNS(t, p.netns, fn) })
	}
	for _, p := range pods {
		p.cg = enabledCgroup(t, dp)
		p.netns = testutil.NewNetNS(t)
		var err error
		inPod(p, func() { p.l, err = net.Listen("tcp4", "127.0.0.1:7777") })
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.l.Close() })
	}

	const perConn = 6 << 20 // under the 64 MiB unread limit: all redirected
	errs := make(chan error, 2*len(pods))
	var wg sync.WaitGroup
	for _, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := p.l.Accept()
			if err == nil {
				err = transfer.LetterSink(c, p.name, p.letter)
			}
			if err != nil {
				errs <- err
			}
		}()
	}

	// Both clients use the same source port: identical 4-tuples.
	dialer := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40123}, Timeout: 5 * time.Second}
	for _, p := range pods {
		var err error
		inPod(p, func() { p.c, err = dialer.Dial("tcp4", "127.0.0.1:7777") })
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.c.Close() })
	}
	// The servers read at once (Go's reader tries a read right after
	// accept): wait until they are redirect targets, so the whole stream
	// takes the fast path.
	for _, p := range pods {
		waitPeerPublished(t, dp, p.c)
	}

	for _, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := transfer.SendLetters(p.c, p.name, p.letter, perConn, 32<<10); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, p := range pods {
		if got := counterOf(t, dp, p.cg.ID).RedirectedBytes; got < perConn {
			t.Errorf("%s: redirected %d bytes, want at least %d (the test must exercise the fast path)", p.name, got, perConn)
		}
	}
}
