package dataplane

import (
	"bytes"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// askKernelTLS sets TCP_ULP "tls" on c, as OpenSSL does before TLS_TX. The
// result does not matter here: cgroup/setsockopt sees the request before
// the kernel looks for the tls module (this VM has none: ENOENT).
func askKernelTLS(t *testing.T, c net.Conn) {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	raw.Control(func(fd uintptr) { unix.SetsockoptString(int(fd), unix.SOL_TCP, unix.TCP_ULP, "tls") })
}

// echoOnce sends hello and reads it back on conn (asking for kernel TLS
// then, with ktls), round-trips payload, and returns the bytes the cgroup
// redirected meanwhile.
func echoOnce(t *testing.T, dp *Dataplane, id uint64, conn net.Conn, payload []byte, ktls bool) uint64 {
	t.Helper()
	before := counterOf(t, dp, id)
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	hello := make([]byte, 5)
	if _, err := conn.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(conn, hello); err != nil || string(hello) != "hello" {
		t.Fatalf("hello: %q, %v", hello, err)
	}
	if ktls {
		askKernelTLS(t, conn)
	}
	got, err := roundTripWithin(conn, payload, 10*time.Second)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("echo: got %d of %d bytes, %v", len(got), len(payload), err)
	}
	return counterOf(t, dp, id).Sub(before).RedirectedBytes
}

// TestKernelTLSOnAnAcceptedSocketTeachesItsListener: kernel TLS cannot be
// set up on a member (TLS_TX fails with EINVAL), so an accepted socket that
// asks for TCP_ULP keeps its listener's later connections plain TCP, where
// it works. The first connection pairs (NoProbation), and its server asks
// for kernel TLS; the second stays plain; an event names the listener.
func TestKernelTLSOnAnAcceptedSocketTeachesItsListener(t *testing.T) {
	t.Run("no-probation", func(t *testing.T) { kernelTLSTeachesListener(t, true) })
	// By default the first connection is plain (probation), its first
	// read proves the listener, and its TCP_ULP, set after that read,
	// must still teach the listener: without it the second would pair.
	t.Run("probation", func(t *testing.T) { kernelTLSTeachesListener(t, false) })
}

func kernelTLSTeachesListener(t *testing.T, noProbation bool) {
	dp := install(t)
	cg := testutil.NewCgroup(t)
	if _, err := dp.Enable(cg, EnableOptions{NoProbation: noProbation}); err != nil {
		t.Fatal(err)
	}
	events, err := dp.ReadEvents()
	if err != nil {
		t.Fatal(err)
	}
	defer events.Close()
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				// A request and a reply in the clear (a TLS handshake in
				// user space), then kernel TLS, then the echo.
				buf := make([]byte, 64<<10)
				if _, err := io.ReadFull(c, buf[:5]); err != nil {
					return
				}
				c.Write(buf[:5])
				askKernelTLS(t, c)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						c.Write(buf[:n])
					}
					if err != nil {
						c.(*net.TCPConn).CloseWrite()
						return
					}
				}
			}()
		}
	}()
	payload := transfer.Pattern(31, 64<<10)
	if r := echoOnce(t, dp, cg.ID, testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, false); (r == 0) == noProbation {
		t.Fatalf("first connection: %d bytes redirected, want it paired without probation, plain with", r)
	}
	// The server asks for TCP_ULP after its echo: wait for the event.
	got := make(chan FallbackEvent, 1)
	go func() {
		for {
			e, err := events.Read()
			if err != nil {
				return
			}
			if e.Reason == EventListenerKernelTLS {
				got <- e
				return
			}
		}
	}()
	select {
	case e := <-got:
		if e.Local.Port() != uint16(l.Addr().(*net.TCPAddr).Port) {
			t.Errorf("event names %s, want the listener %s", e.Local, l.Addr())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no listener_kernel_tls event after the accepted socket asked for TCP_ULP")
	}
	if r := echoOnce(t, dp, cg.ID, testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, false); r != 0 {
		t.Fatalf("second connection: %d bytes redirected, want plain TCP (its listener uses kernel TLS)", r)
	}
}

// TestKernelTLSOnAClientTeachesItsProcess: the client end of a pair that
// asks for TCP_ULP keeps its process's later connections plain TCP.
func TestKernelTLSOnAClientTeachesItsProcess(t *testing.T) {
	dp := install(t)
	cg := testutil.NewCgroup(t)
	if _, err := dp.Enable(cg, EnableOptions{NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.ForgetSplicer(uint32(os.Getpid())) })
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(l)
	payload := transfer.Pattern(32, 64<<10)
	if r := echoOnce(t, dp, cg.ID, testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, true); r == 0 {
		t.Fatalf("first connection: no byte redirected, want it paired")
	}
	if r := echoOnce(t, dp, cg.ID, testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, false); r != 0 {
		t.Fatalf("second connection: %d bytes redirected, want plain TCP (its process uses kernel TLS)", r)
	}
}
