package dataplane

import (
	"bytes"
	"io"
	"net"
	"strings"
	"testing"
	"time"

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

// TestStackPortsKeepSpliceProxiesWorking: a Go io.Copy TCP proxy reads with
// splice(2), which sees nothing of what was redirected to its sockets. With
// its ports listed in StackPorts its connections stay plain TCP and the
// bytes arrive; without, they are redirected and the proxy forwards
// nothing (the known limitation the setting exists for).
func TestStackPortsKeepSpliceProxiesWorking(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	upstream := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(upstream)
	proxy := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	// The proxy dials upstream from the enabled cgroup too: both hops
	// are between members.
	spliceProxy(t, proxy, func() (c net.Conn, err error) {
		testutil.InCgroup(t, cg, func() { c, err = net.DialTimeout("tcp4", upstream.Addr().String(), 5*time.Second) })
		return c, err
	})
	payload := transfer.Pattern(21, 1<<20)

	// With the proxy's and upstream's ports listed, everything is plain.
	ports := []uint16{uint16(proxy.Addr().(*net.TCPAddr).Port), uint16(upstream.Addr().(*net.TCPAddr).Port)}
	if _, err := dp.Enable(cg, EnableOptions{StackPorts: ports}); err != nil {
		t.Fatal(err)
	}
	before := counterOf(t, dp, cg.ID)
	got, err := roundTripWithin(testutil.DialIn(t, cg, "tcp4", proxy.Addr().String()), payload, 10*time.Second)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("through the splice proxy with stack ports: got %d of %d bytes, %v", len(got), len(payload), err)
	}
	d := counterOf(t, dp, cg.ID).Sub(before)
	if d.RedirectedBytes != 0 || d.SocketsStackPort != 4 {
		t.Fatalf("stack ports: redirected %d, stack-port sockets %d; want 0 and 4 (both ends of both hops)", d.RedirectedBytes, d.SocketsStackPort)
	}

	// Without them, the client's bytes are redirected into the proxy's
	// accepted socket, where splice cannot see them.
	if _, err := dp.Enable(cg, EnableOptions{}); err != nil {
		t.Fatal(err)
	}
	before = counterOf(t, dp, cg.ID)
	got, _ = roundTripWithin(testutil.DialIn(t, cg, "tcp4", proxy.Addr().String()), payload, 2*time.Second)
	if bytes.Equal(got, payload) {
		t.Fatalf("the splice proxy forwarded everything without stack ports: the limitation this setting exists for is gone; update README and doctor (counters %+v)", counterOf(t, dp, cg.ID).Sub(before))
	}
	if d := counterOf(t, dp, cg.ID).Sub(before); d.RedirectedBytes == 0 {
		t.Fatalf("without stack ports nothing was redirected: %+v", d)
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
