package dataplane

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// control runs fn on c's socket.
func control(t *testing.T, c net.Conn, fn func(fd int) error) {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil || ferr != nil {
		t.Fatalf("control: %v %v", err, ferr)
	}
}

// eventStream reads r until it is closed, into the returned channel.
func eventStream(r *EventReader) <-chan FallbackEvent {
	got := make(chan FallbackEvent, 16)
	go func() {
		for {
			e, err := r.Read()
			if err != nil {
				close(got)
				return
			}
			got <- e
		}
	}()
	return got
}

// nextEvents takes n events from events within timeout.
func nextEvents(t *testing.T, events <-chan FallbackEvent, n int, timeout time.Duration) []FallbackEvent {
	t.Helper()
	var out []FallbackEvent
	deadline := time.After(timeout)
	for len(out) < n {
		select {
		case e := <-events:
			out = append(out, e)
		case <-deadline:
			t.Fatalf("%d of %d events within %v: %v", len(out), n, timeout, out)
		}
	}
	return out
}

// TestFallbackEventsNameTheSocket: an accepted member made blocking, and a
// client member that sets SO_RCVLOWAT, each produce an event with the
// socket's addresses and the reason, and the listener whose accepted
// socket turned blocking produces one too; its next connection stays plain.
func TestFallbackEventsNameTheSocket(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	r, err := dp.ReadEvents()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	events := eventStream(r)

	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	dial := func() net.Conn { return testutil.DialIn(t, cg, "tcp4", l.Addr().String()) }
	c, srv := acceptDialed(t, l, "the server", dial)
	waitJoined(t, dp, c, srv)
	// A first byte: the client finds its server's file.
	if _, err := c.Write([]byte{0}); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(srv, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	control(t, srv, func(fd int) error { return unix.SetNonblock(fd, false) })
	time.Sleep(20 * time.Millisecond) // past ACCEPT_GRACE_NS (bpf/sockbypass.h)
	msg := transfer.Pattern(3, 100)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(srv, make([]byte, len(msg))); err != nil {
		t.Fatal(err)
	}
	evs := nextEvents(t, events, 2, 5*time.Second)
	want := map[string]FallbackEvent{
		EventLateBlocking:             {CgroupID: cg.ID, Local: addrPort(srv.LocalAddr()), Remote: addrPort(srv.RemoteAddr()), Reason: EventLateBlocking},
		EventListenerBlockingChildren: {CgroupID: cg.ID, Local: addrPort(srv.LocalAddr()), Reason: EventListenerBlockingChildren},
	}
	for _, e := range evs {
		if w, ok := want[e.Reason]; !ok || e != w {
			t.Errorf("event %+v (%s), want one of %+v", e, e, want)
		}
		delete(want, e.Reason)
	}

	// The listener's next connection stays plain.
	before := counterOf(t, dp, cg.ID)
	c2, srv2 := acceptDialed(t, l, "the server", dial)
	if d := counterOf(t, dp, cg.ID).Sub(before); d.SocketsBlocking != 1 || joined(dp, keyOf(srv2)) {
		t.Errorf("next connection of the listener: sockets_blocking moved by %d, server joined %v; want 1 and false", d.SocketsBlocking, joined(dp, keyOf(srv2)))
	}
	c2.Close()

	// A late SO_RCVLOWAT on another listener's member.
	l3 := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	c3, srv3 := acceptDialed(t, l3, "the server", func() net.Conn { return testutil.DialIn(t, cg, "tcp4", l3.Addr().String()) })
	waitJoined(t, dp, c3, srv3)
	control(t, c3, func(fd int) error { return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 10) })
	// Seen on the socket at the next message either end sends (the
	// server's here: it takes the stack, where the option is served).
	if _, err := srv3.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c3, make([]byte, len(msg))); err != nil {
		t.Fatal(err)
	}
	evs = nextEvents(t, events, 1, 5*time.Second)
	w := FallbackEvent{CgroupID: cg.ID, Local: addrPort(c3.LocalAddr()), Remote: addrPort(c3.RemoteAddr()), Reason: EventLateStackOption, Option: "SO_RCVLOWAT"}
	if evs[0] != w {
		t.Errorf("event %+v, want %+v", evs[0], w)
	}
	if s := evs[0].String(); s == "" {
		t.Error("event has no description")
	}

	// A member that attaches kernel TLS's ULP leaves at its next send,
	// never redirecting what kTLS would see. A kernel without the tls
	// module refuses the ULP (ENOENT): nothing attached, the member
	// stays, and there is no event.
	c4, srv4 := acceptDialed(t, l3, "the server", func() net.Conn { return testutil.DialIn(t, cg, "tcp4", l3.Addr().String()) })
	waitJoined(t, dp, c4, srv4)
	var ulpErr error
	control(t, c4, func(fd int) error {
		ulpErr = unix.SetsockoptString(fd, unix.SOL_TCP, unix.TCP_ULP, "tls")
		return nil
	})
	before = counterOf(t, dp, cg.ID)
	if _, err := c4.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(srv4, make([]byte, len(msg))); err != nil {
		t.Fatal(err)
	}
	if ulpRefused(t, ulpErr) {
		if d := counterOf(t, dp, cg.ID).Sub(before); d.RedirectedBytes != uint64(len(msg)) {
			t.Errorf("after a refused TCP_ULP: %d bytes redirected, want all %d", d.RedirectedBytes, len(msg))
		}
		select {
		case e := <-events:
			t.Errorf("event %+v after a refused TCP_ULP", e)
		case <-time.After(200 * time.Millisecond):
		}
		return
	}
	evs = nextEvents(t, events, 1, 5*time.Second)
	if evs[0].Reason != EventLateStackOption || evs[0].Option != "TCP_ULP" || evs[0].Local != addrPort(c4.LocalAddr()) {
		t.Errorf("event %+v, want a late TCP_ULP of %s", evs[0], c4.LocalAddr())
	}
}

func addrPort(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }
