package dataplane

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// askKernelTLS sets TCP_ULP "tls" on c, as OpenSSL does before TLS_TX, and
// returns what the kernel said. sockbypass sees an attached ULP on the
// socket itself (stack_reader.h); a kernel without the tls module (this
// VM: ENOENT) attaches none, and there is nothing to learn. The kernel
// matrix (make kernels) runs real kernel TLS on Debian's kernels, module
// loaded: probe.ktls_sockbypass and ktls_sockbypass_server.
func askKernelTLS(t *testing.T, c net.Conn) error {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ulpErr error
	if err := raw.Control(func(fd uintptr) { ulpErr = unix.SetsockoptString(int(fd), unix.SOL_TCP, unix.TCP_ULP, "tls") }); err != nil {
		t.Fatal(err)
	}
	return ulpErr
}

// ulpRefused reports whether err is the kernel refusing TCP_ULP "tls" for
// want of the module; any other error fails the test.
func ulpRefused(t *testing.T, err error) bool {
	t.Helper()
	if err != nil && !errors.Is(err, unix.ENOENT) {
		t.Fatalf("TCP_ULP tls: %v, want success or ENOENT (no tls module)", err)
	}
	return err != nil
}

// echoOnce sends hello and reads it back on conn (then asks for kernel
// TLS when ulpErr is set, which gets what the kernel said), round-trips
// payload, and returns the bytes the cgroup redirected meanwhile.
func echoOnce(t *testing.T, dp *Dataplane, id uint64, conn net.Conn, payload []byte, ulpErr *error) uint64 {
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
	if ulpErr != nil {
		*ulpErr = askKernelTLS(t, conn)
	}
	got, err := roundTripWithin(conn, payload, 10*time.Second)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("echo: got %d of %d bytes, %v", len(got), len(payload), err)
	}
	return counterOf(t, dp, id).Sub(before).RedirectedBytes
}

// TestKernelTLSOnAnAcceptedSocketTeachesItsListener: kernel TLS cannot be
// set up on a member (TLS_TX fails with EINVAL), so an accepted socket that
// attaches the tls ULP keeps its listener's later connections plain TCP,
// where it works. The first connection pairs (NoProbation), and its server
// asks for kernel TLS; the second stays plain; an event names the
// listener. Where the kernel refuses the ULP (no tls module), nothing was
// attached: no event, and the second connection is as the first.
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
	ulpErrs := make(chan error, 2)
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
				ulpErrs <- askKernelTLS(t, c)
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
	if r := echoOnce(t, dp, cg.ID, testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, nil); (r == 0) == noProbation {
		t.Fatalf("first connection: %d bytes redirected, want it paired without probation, plain with", r)
	}
	if ulpRefused(t, <-ulpErrs) {
		// Nothing attached: the listener learnt nothing. Its next
		// connection pairs (its first read proved it, with probation).
		if r := echoOnce(t, dp, cg.ID, testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, nil); r == 0 {
			t.Fatalf("second connection after a refused TCP_ULP: no byte redirected, want it paired")
		}
		select {
		case e := <-eventStream(events):
			if e.Reason == EventListenerKernelTLS {
				t.Fatalf("event %+v after a refused TCP_ULP", e)
			}
		case <-time.After(200 * time.Millisecond):
		}
		return
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
	if r := echoOnce(t, dp, cg.ID, testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, nil); r != 0 {
		t.Fatalf("second connection: %d bytes redirected, want plain TCP (its listener uses kernel TLS)", r)
	}
}

// TestKernelTLSOnAClientTeachesItsProcess: the client end of a pair that
// attaches the tls ULP keeps its process's later connections plain TCP.
// Where the kernel refuses the ULP (no tls module), its process learns
// nothing: its next connection pairs.
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
	var ulpErr error
	if r := echoOnce(t, dp, cg.ID, testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, &ulpErr); r == 0 {
		t.Fatalf("first connection: no byte redirected, want it paired")
	}
	if ulpRefused(t, ulpErr) {
		if r := echoOnce(t, dp, cg.ID, testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, nil); r == 0 {
			t.Fatalf("second connection after a refused TCP_ULP: no byte redirected, want it paired")
		}
		return
	}
	if r := echoOnce(t, dp, cg.ID, testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, nil); r != 0 {
		t.Fatalf("second connection: %d bytes redirected, want plain TCP (its process uses kernel TLS)", r)
	}
}
