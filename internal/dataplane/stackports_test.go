package dataplane

import (
	"bytes"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// spliceProxy forwards every connection accepted on l to upstream with
// io.Copy in both directions: between two *net.TCPConn Go uses splice(2),
// which cannot read bytes redirected into a socket's queue.
func spliceProxy(t *testing.T, l net.Listener, dialUpstream func() (net.Conn, error)) {
	t.Helper()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := dialUpstream()
			if err != nil {
				c.Close()
				return
			}
			go func() {
				io.Copy(u, c) // splice from c
				u.(*net.TCPConn).CloseWrite()
			}()
			go func() {
				defer c.Close()
				defer u.Close()
				io.Copy(c, u) // splice from u
			}()
		}
	}()
}

// roundTripWithin sends payload through c, half-closes, and reads the echo
// until EOF or the deadline.
func roundTripWithin(c net.Conn, payload []byte, d time.Duration) ([]byte, error) {
	c.SetDeadline(time.Now().Add(d))
	go func() {
		c.Write(payload)
		c.(*net.TCPConn).CloseWrite()
	}()
	return io.ReadAll(c)
}

// spliceSetup starts an echo upstream and a splice proxy in front of it,
// both in cg, the proxy dialing upstream from cg too (both hops are
// between sockets of enabled cgroups).
func spliceSetup(t *testing.T, cg cgroup.Cgroup) (proxy, upstream net.Listener) {
	t.Helper()
	upstream = testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(upstream)
	proxy = testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	spliceProxy(t, proxy, func() (c net.Conn, err error) {
		testutil.InCgroup(t, cg, func() { c, err = net.DialTimeout("tcp4", upstream.Addr().String(), 5*time.Second) })
		return c, err
	})
	return proxy, upstream
}

// TestSpliceProxyWorksByDefault: a Go io.Copy TCP proxy reads with
// splice(2), which sees nothing of what was redirected to its sockets. By
// default its listener is on probation, so its first connection stays
// plain; the splice of that connection marks the listener (and the
// process) as a splice reader, so every later connection stays plain too.
// Every byte arrives, in three sessions, and nothing ever stalls.
func TestSpliceProxyWorksByDefault(t *testing.T) {
	dp := install(t)
	cg := testutil.NewCgroup(t)
	if _, err := dp.Enable(cg, EnableOptions{}); err != nil {
		t.Fatal(err)
	}
	proxy, _ := spliceSetup(t, cg)
	before := counterOf(t, dp, cg.ID)
	for i := range 3 {
		payload := transfer.Pattern(uint64(21+i), 1<<20)
		got, err := roundTripWithin(testutil.DialIn(t, cg, "tcp4", proxy.Addr().String()), payload, 10*time.Second)
		if err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("session %d through the splice proxy: got %d of %d bytes, %v (counters %+v)", i, len(got), len(payload), err, counterOf(t, dp, cg.ID).Sub(before))
		}
	}
	d := counterOf(t, dp, cg.ID).Sub(before)
	if d.SocketsProbation == 0 || d.SpliceStalled != 0 || d.RedirectedBytes != 0 {
		t.Fatalf("three sessions: %d connections on probation, %d stalled, %d bytes redirected; want some, none and none", d.SocketsProbation, d.SpliceStalled, d.RedirectedBytes)
	}
}

// TestProbationEndsAtTheFirstRecvmsgRead: a new listener's first
// connection stays plain; once the server has read it with recvmsg (Go's
// read on a non-blocking socket), the listener's next connection pairs.
func TestProbationEndsAtTheFirstRecvmsgRead(t *testing.T) {
	dp := install(t)
	cg := testutil.NewCgroup(t)
	if _, err := dp.Enable(cg, EnableOptions{}); err != nil {
		t.Fatal(err)
	}
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(l)
	payload := transfer.Pattern(5, 64<<10)
	for i, want := range []string{"plain", "paired"} {
		before := counterOf(t, dp, cg.ID)
		got, err := roundTripWithin(testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, 10*time.Second)
		if err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("connection %d: got %d of %d bytes, %v", i, len(got), len(payload), err)
		}
		d := counterOf(t, dp, cg.ID).Sub(before)
		if want == "plain" && (d.SocketsProbation != 1 || d.RedirectedBytes != 0) {
			t.Fatalf("first connection: %d on probation, %d bytes redirected; want 1 and 0", d.SocketsProbation, d.RedirectedBytes)
		}
		if want == "paired" && (d.SocketsProbation != 0 || d.RedirectedBytes < 2*uint64(len(payload))) {
			t.Fatalf("second connection: %d on probation, %d bytes redirected; want 0 and %d", d.SocketsProbation, d.RedirectedBytes, 2*len(payload))
		}
	}
}

// TestSpliceProxyWithoutProbation: with NoProbation the proxy's first
// connection pairs, and the client's bytes are redirected into the
// proxy's accepted socket before the proxy splices it: splice cannot read
// them and the session stalls, which is counted (splice_stalled); the
// proxy's upstream socket, spliced before anything reached it, leaves the
// sockhash instead (splice_readers). Listing the ports in StackPorts keeps
// such a proxy plain from the start.
func TestSpliceProxyWithoutProbation(t *testing.T) {
	dp := install(t)
	cg := testutil.NewCgroup(t)
	if _, err := dp.Enable(cg, EnableOptions{NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	proxy, upstream := spliceSetup(t, cg)
	payload := transfer.Pattern(21, 1<<20)
	before := counterOf(t, dp, cg.ID)
	got, _ := roundTripWithin(testutil.DialIn(t, cg, "tcp4", proxy.Addr().String()), payload, 2*time.Second)
	d := counterOf(t, dp, cg.ID).Sub(before)
	if bytes.Equal(got, payload) {
		t.Fatalf("the splice proxy forwarded everything without probation and stack ports: the limitation is gone; update README and doctor (counters %+v)", d)
	}
	if d.RedirectedBytes == 0 || d.SpliceStalled == 0 {
		t.Fatalf("without probation: redirected %d bytes, %d stalled splice readers; want both > 0 (%+v)", d.RedirectedBytes, d.SpliceStalled, d)
	}

	// With the proxy's and upstream's ports listed, everything is plain.
	ports := []uint16{uint16(proxy.Addr().(*net.TCPAddr).Port), uint16(upstream.Addr().(*net.TCPAddr).Port)}
	if _, err := dp.Enable(cg, EnableOptions{StackPorts: ports, NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	before = counterOf(t, dp, cg.ID)
	got, err := roundTripWithin(testutil.DialIn(t, cg, "tcp4", proxy.Addr().String()), payload, 10*time.Second)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("through the splice proxy with stack ports: got %d of %d bytes, %v", len(got), len(payload), err)
	}
	if d := counterOf(t, dp, cg.ID).Sub(before); d.RedirectedBytes != 0 || d.SocketsStackPort != 4 {
		t.Fatalf("stack ports: redirected %d, stack-port sockets %d; want 0 and 4 (both ends of both hops)", d.RedirectedBytes, d.SocketsStackPort)
	}
}

// TestStackPortZeroIsRefused: the datapath reads the stack ports up to the
// first 0, so 0 among them would hide the ports after it: enable refuses
// it, names it, and attaches nothing.
func TestStackPortZeroIsRefused(t *testing.T) {
	dp := install(t)
	cg := testutil.NewCgroup(t)
	_, err := dp.Enable(cg, EnableOptions{StackPorts: []uint16{8080, 0, 9090}})
	if err == nil || !strings.Contains(err.Error(), "stack port 0") || !strings.Contains(err.Error(), cg.Path) {
		t.Fatalf("enable with stack ports 8080,0,9090: %v; want an error naming the cgroup and stack port 0", err)
	}
	if ids, _ := dp.EnabledCgroupIDs(); len(ids) != 0 {
		t.Errorf("after the refused enable, enabled cgroups: %v", ids)
	}
}
