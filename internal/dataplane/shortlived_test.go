package dataplane

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/sockdiag"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// exchanges opens a connection to addr from cg, sends n messages of 64 B
// one at a time, checks each echo, and closes.
func exchanges(t *testing.T, cg cgroup.Cgroup, addr string, n int) {
	t.Helper()
	c := testutil.DialIn(t, cg, "tcp4", addr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg, got := bytes.Repeat([]byte{'s'}, 64), make([]byte, 64)
	for i := 0; i < n; i++ {
		msg[0] = byte(i)
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("write message %d: %v", i, err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatalf("read echo %d: %v", i, err)
		}
		if !bytes.Equal(got, msg) {
			t.Fatalf("echo %d differs", i)
		}
	}
}

// waitClosed waits until no connection to the listener on port (either
// end) is open any more: every end of them has reached TCP_CLOSE, whose
// sock_ops state callback (forget_socket) reports the end to its listener
// before the kernel lets the socket go.
func waitClosed(t *testing.T, port uint16) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		socks, err := sockdiag.Dump(sockdiag.Request{States: sockdiag.ConnectedStates})
		if err != nil {
			t.Fatal(err)
		}
		var open []string
		for _, s := range socks {
			if s.Local.Port() == port || s.Remote.Port() == port {
				open = append(open, fmt.Sprintf("%s->%s %s", s.Local, s.Remote, sockdiag.StateName(s.State)))
			}
		}
		if len(open) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("connections to port %d still open after 5 s: %v", port, open)
		}
		time.Sleep(2 * time.Millisecond) // poll interval
	}
}

// TestShortLivedListenerLeftPlain: once a listener's connections prove
// short (one exchange each), its new connections stay plain TCP; a probe
// notices when its connections grow long, and AllConnections pairs them
// all.
func TestShortLivedListenerLeftPlain(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(l)
	addr := l.Addr().String()
	port := uint16(l.Addr().(*net.TCPAddr).Port)

	before := counterOf(t, dp, cg.ID)
	for i := 0; i < 40; i++ {
		exchanges(t, cg, addr, 1)
	}
	// Stack bytes count when their socket closes: the servers' ends too.
	waitClosed(t, port)
	d := counterOf(t, dp, cg.ID).Sub(before)
	t.Logf("40 one-exchange connections: %d sockets inserted, %d connections left plain as short-lived, %d bytes redirected, %d passed",
		d.SocketsInserted, d.ConnectionsShortLived, d.RedirectedBytes, d.PassedBytes)
	// The first SHORT_STREAK (8) connections pair (one more may, while
	// the last close is on its way), then about 63 in 64 stay plain.
	if d.SocketsInserted < 2*8 || d.SocketsInserted > 2*(9+3) || d.ConnectionsShortLived < 25 {
		t.Errorf("40 one-exchange connections: %d sockets inserted, %d left plain as short-lived; want 16 to 24 inserted, at least 25 left plain",
			d.SocketsInserted, d.ConnectionsShortLived)
	}
	// Every byte is accounted once: redirected by the pairs, or
	// counted as stack bytes when its socket closed.
	if d.RedirectedBytes+d.StackEgressBytes != 40*2*64 || d.RedirectedBytes != d.SocketsInserted*64 {
		t.Errorf("redirected %d + stack egress %d bytes, want %d in all, %d of them redirected", d.RedirectedBytes, d.StackEgressBytes, 40*2*64, d.SocketsInserted*64)
	}

	// Long connections: the probe (one in 64) pairs, and its close
	// tells the listener; from then on every connection pairs again.
	before = counterOf(t, dp, cg.ID)
	for i := 0; i < 2*64 && counterOf(t, dp, cg.ID).Sub(before).SocketsInserted == 0; i++ {
		exchanges(t, cg, addr, 20)
	}
	if d := counterOf(t, dp, cg.ID).Sub(before); d.SocketsInserted == 0 {
		t.Fatalf("128 connections of 20 exchanges each, none paired: the probe did not happen (%+v)", d)
	}
	waitClosed(t, port) // the probe's server end closes and reports
	before = counterOf(t, dp, cg.ID)
	exchanges(t, cg, addr, 20)
	if d := counterOf(t, dp, cg.ID).Sub(before); d.SocketsInserted != 2 || d.RedirectedBytes != 2*20*64 {
		t.Errorf("after a long probe: %d sockets inserted, %d bytes redirected; want 2 and %d", d.SocketsInserted, d.RedirectedBytes, 2*20*64)
	}

	// AllConnections pairs short connections too.
	if _, err := dp.Enable(cg, EnableOptions{AllConnections: true, NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	before = counterOf(t, dp, cg.ID)
	for i := 0; i < 20; i++ {
		exchanges(t, cg, addr, 1)
	}
	if d := counterOf(t, dp, cg.ID).Sub(before); d.ConnectionsShortLived != 0 || d.SocketsInserted != 40 {
		t.Errorf("with AllConnections, 20 one-exchange connections: %d inserted, %d left plain as short-lived; want 40 and 0", d.SocketsInserted, d.ConnectionsShortLived)
	}
}

// TestUploadsKeepTheirListenerPaired: a connection that uploads much and
// is answered once is long on its client's side: the client's report at
// close keeps its listener from being taken for short-lived, and every
// upload stays paired.
func TestUploadsKeepTheirListenerPaired(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeDigest(l)
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	before := counterOf(t, dp, cg.ID)
	const uploads = 24
	for i := 0; i < uploads; i++ {
		c := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
		if err := transfer.DigestRoundTrip(c, transfer.Pattern(uint64(i), 256<<10), transfer.Options{Timeout: 10 * time.Second}); err != nil {
			t.Fatalf("upload %d: %v", i, err)
		}
		c.Close()
		waitClosed(t, port) // both ends' close reports land before the next connection
	}
	if d := counterOf(t, dp, cg.ID).Sub(before); d.ConnectionsShortLived != 0 || d.SocketsInserted != 2*uploads {
		t.Errorf("%d uploads of 256 KiB answered by one digest each: %d sockets inserted, %d connections left plain as short-lived; want %d and 0",
			uploads, d.SocketsInserted, d.ConnectionsShortLived, 2*uploads)
	}
}
