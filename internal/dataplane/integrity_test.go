package dataplane

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

var integritySizes = []int{1, 2, 3, 7, 64, 1000, 1023, 1024, 1025, 4095, 4096, 4097, 16383, 16384,
	65535, 65536, 65537, 100_003, 1<<20 - 1, 1 << 20, 1<<20 + 13, 3<<20 + 5, 8<<20 - 3, 8 << 20}

func TestIntegrityBothDirections64Connections(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(l)

	const conns = 64
	var total uint64
	clients := make([]net.Conn, conns)
	payloads := make([][]byte, conns)
	writeSizes := []int{1, 1000, 4096, 16384, 65536, 128 << 10}
	for i := range clients {
		clients[i] = testutil.DialIn(t, cg, "tcp4", l.Addr().String())
		payloads[i] = transfer.Pattern(uint64(i), integritySizes[i%len(integritySizes)])
		total += uint64(len(payloads[i]))
	}
	before := counterOf(t, dp, cg.ID)

	var wg sync.WaitGroup
	errs := make([]error, conns)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ws := writeSizes[i%len(writeSizes)]
			if len(payloads[i]) < 1024 {
				ws = len(payloads[i])
			}
			errs[i] = transfer.RoundTrip(clients[i], payloads[i], transfer.Options{WriteSize: ws})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("connection %d (%d bytes): %v", i, len(payloads[i]), err)
		}
	}
	// Both directions carry the payloads: client -> server and the echo.
	checkAccounted(t, counterOf(t, dp, cg.ID).Sub(before), 2*total, total)
}

func TestHalfCloseReplyArrives(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	c, srv := joinedPair(t, dp, cg)

	payload := transfer.Pattern(42, 3<<20+1)
	serverErr := make(chan error, 1)
	go func() {
		defer srv.Close()
		srv.SetDeadline(time.Now().Add(30 * time.Second))
		got, err := io.ReadAll(srv) // returns at the client's FIN
		if err != nil {
			serverErr <- fmt.Errorf("server read: %w", err)
			return
		}
		if !bytes.Equal(got, payload) {
			serverErr <- fmt.Errorf("server read %d bytes, not the %d sent", len(got), len(payload))
			return
		}
		_, err = srv.Write([]byte("reply after EOF"))
		serverErr <- err
	}()

	before := counterOf(t, dp, cg.ID)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	reply, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-serverErr; err != nil {
		t.Fatal(err)
	}
	if string(reply) != "reply after EOF" {
		t.Fatalf("reply = %q", reply)
	}
	d := counterOf(t, dp, cg.ID).Sub(before)
	if want := uint64(len(payload) + len("reply after EOF")); d.RedirectedBytes != want {
		t.Errorf("redirected %d bytes, want %d: %+v", d.RedirectedBytes, want, d)
	}
}

// TestPeerOutsideEnabledCgroupStaysPlain: a client whose server is in no
// enabled cgroup does not join the sockhash (both or neither): it stays
// plain TCP from its first byte, so its receive path is untouched.
func TestPeerOutsideEnabledCgroupStaysPlain(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	// The server lives in the test's own cgroup, which is not enabled.
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	transfer.ServeEcho(l)

	before := counterOf(t, dp, cg.ID)
	payload := transfer.Pattern(7, 1<<20+3)
	c := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	if err := transfer.RoundTrip(c, payload, transfer.Options{WriteSize: 16384}); err != nil {
		t.Fatal(err)
	}
	delta := counterOf(t, dp, cg.ID).Sub(before)
	if delta.RedirectedBytes != 0 || delta.PassedBytes != 0 {
		t.Errorf("a socket whose peer is in no enabled cgroup went through sk_msg: %+v", delta)
	}
	if delta.SocketsInserted != 0 || delta.SocketsUnpaired != 1 {
		t.Errorf("sockets inserted = %d, unpaired = %d; want 0 and 1 (the client stays out)", delta.SocketsInserted, delta.SocketsUnpaired)
	}
	socks, err := dp.Sockets()
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 0 {
		t.Errorf("sockhash holds %d sockets, want none", len(socks))
	}
}
