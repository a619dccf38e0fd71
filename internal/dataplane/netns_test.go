package dataplane

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
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
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			buf := make([]byte, 64<<10)
			n := 0
			for {
				m, err := c.Read(buf)
				if i := bytes.IndexFunc(buf[:m], func(r rune) bool { return byte(r) != p.letter }); i >= 0 {
					errs <- fmt.Errorf("%s received %q at offset %d: bytes crossed namespaces", p.name, buf[i], n+i)
					return
				}
				n += m
				if err == io.EOF {
					break
				}
				if err != nil {
					errs <- fmt.Errorf("%s server: %w", p.name, err)
					return
				}
			}
			fmt.Fprintf(c, "%s:%d", p.name, n)
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
			chunk := bytes.Repeat([]byte{p.letter}, 32<<10)
			p.c.SetDeadline(time.Now().Add(60 * time.Second))
			for sent := 0; sent < perConn; sent += len(chunk) {
				if _, err := p.c.Write(chunk); err != nil {
					errs <- fmt.Errorf("%s client: %w", p.name, err)
					return
				}
			}
			p.c.(*net.TCPConn).CloseWrite()
			reply, err := io.ReadAll(p.c)
			if err != nil {
				errs <- fmt.Errorf("%s client: %w", p.name, err)
				return
			}
			if want := fmt.Sprintf("%s:%d", p.name, perConn); string(reply) != want {
				errs <- fmt.Errorf("client of %s got reply %q, want %q", p.name, reply, want)
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
