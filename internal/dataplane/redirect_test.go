package dataplane

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

func TestRedirectCountsExactlyTheBytesSent(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	c, srv := joinedPair(t, dp, cg)

	before := counterOf(t, dp, cg.ID)
	payload := transfer.Pattern(1, 1<<20+7)
	go transfer.Digest(srv)
	if err := transfer.DigestRoundTrip(c, payload, transfer.Options{Timeout: 30 * time.Second}); err != nil {
		t.Fatalf("digest mismatch: %v", err)
	}
	delta := counterOf(t, dp, cg.ID).Sub(before)
	if want := uint64(len(payload) + sha256.Size); delta.RedirectedBytes != want {
		t.Errorf("redirected bytes = %d, want exactly %d (payload + digest); counters %+v", delta.RedirectedBytes, want, delta)
	}
	if delta.PassedBytes != 0 || delta.RedirectFailures != 0 {
		t.Errorf("bytes took the stack: %+v", delta)
	}
}

// TestFirstBytesAreRedirected: both ends of a pair join at ESTABLISHED and
// redirect from the first byte, before the reader has read anything, so a
// member never holds bytes that came through the stack.
func TestFirstBytesAreRedirected(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	c, srv := acceptedPair(t, cg, "tcp4", "127.0.0.1:0")
	before := counterOf(t, dp, cg.ID)
	first := transfer.Pattern(10, 1000)
	if _, err := c.Write(first); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(first))
	if _, err := io.ReadFull(srv, buf); err != nil || !bytes.Equal(buf, first) {
		t.Fatalf("first request: %v", err)
	}
	if d := counterOf(t, dp, cg.ID).Sub(before); d.RedirectedBytes != uint64(len(first)) || d.PassedBytes != 0 {
		t.Fatalf("first request before any read: redirected %d, passed %d; want %d and 0", d.RedirectedBytes, d.PassedBytes, len(first))
	}
}

// TestLegacySkMsgAttach covers kernels without sockmap links: the sk_msg
// program attached with BPF_PROG_ATTACH redirects, and uninstall detaches
// it.
func TestLegacySkMsgAttach(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	dp, err := OpenOrCreate(Options{PinDir: pinDir, LegacySkMsgAttach: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	cg := enabledCgroup(t, dp)
	st, err := dp.Status()
	if err != nil {
		t.Fatal(err)
	}
	if st.SkMsgAttach != "legacy" {
		t.Fatalf("sk_msg attach = %q, want legacy", st.SkMsgAttach)
	}
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(l)
	payload := transfer.Pattern(3, 1<<20)
	if err := transfer.RoundTrip(testutil.DialIn(t, cg, "tcp4", l.Addr().String()), payload, transfer.Options{WriteSize: 16384}); err != nil {
		t.Fatal(err)
	}
	checkAccounted(t, counterOf(t, dp, cg.ID), 2*uint64(len(payload)), uint64(len(payload)))
	sockhash := dp.maps[PinSockhash]
	res, err := link.QueryPrograms(link.QueryOptions{Target: sockhash.FD(), Attach: ebpf.AttachSkMsgVerdict})
	if err != nil || len(res.Programs) != 1 {
		t.Fatalf("query sk_msg on sockhash: %v, %v", res, err)
	}
	sockhash, err = sockhash.Clone()
	if err != nil {
		t.Fatal(err)
	}
	defer sockhash.Close()
	d2, err := Open(Options{PinDir: pinDir})
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Uninstall(); err != nil {
		t.Fatal(err)
	}
	res, err = link.QueryPrograms(link.QueryOptions{Target: sockhash.FD(), Attach: ebpf.AttachSkMsgVerdict})
	if err != nil || len(res.Programs) != 0 {
		t.Errorf("sk_msg still attached after uninstall: %v, %v", res, err)
	}
}

// TestBackPressureThenRedirectAgain: a sender whose reader stalls stops
// redirecting once 64 MiB are unread (the peer's redirected queue, read
// from the peer socket) and its next bytes take the stack, where TCP flow
// control blocks it. Once the reader has read everything, in order, the
// sender redirects again (the peer's copied_seq has reached its
// write_seq).
func TestBackPressureThenRedirectAgain(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	c, srv := joinedPair(t, dp, cg)
	before := counterOf(t, dp, cg.ID)

	// The stream: byte i is byte(i % 251), so a reordering shows.
	var sent int
	chunk := make([]byte, 64<<10)
	fill := func() {
		for i := range chunk {
			chunk[i] = byte((sent + i) % 251)
		}
	}
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	blocked := false
	for sent < 256<<20 && time.Now().Before(deadline) && !blocked {
		fill()
		var n int
		var werr error
		raw.Control(func(fd uintptr) { n, werr = unix.SendmsgN(int(fd), chunk, nil, nil, unix.MSG_DONTWAIT) })
		switch {
		case werr == unix.EAGAIN:
			blocked = true
		case werr == unix.EINTR:
		case werr != nil:
			t.Fatal(werr)
		default:
			sent += n
		}
	}
	d := counterOf(t, dp, cg.ID).Sub(before)
	t.Logf("stalled reader: %d MiB sent before the writer would block; redirected %d MiB, passed %d KiB in %d back-pressure messages",
		sent>>20, d.RedirectedBytes>>20, d.PassedBytes>>10, d.PassedBackpressure)
	if !blocked || d.RedirectedBytes < 64<<20-64<<10 || d.RedirectedBytes > 64<<20 || d.PassedBytes == 0 || d.PassedBackpressure == 0 {
		t.Fatalf("stalled reader: blocked %v after %d bytes; redirected %d, passed %d (%d back-pressure messages); want about 64 MiB redirected, then the stack until the writer blocks",
			blocked, sent, d.RedirectedBytes, d.PassedBytes, d.PassedBackpressure)
	}

	// The reader drains everything, in order, and the writer sends 4 MiB
	// more, redirected again once the reader has caught up.
	const more = 4 << 20
	total := sent + more
	readErr := make(chan error, 1)
	var read atomic.Int64
	go func() {
		buf := make([]byte, 256<<10)
		got := 0
		srv.SetReadDeadline(time.Now().Add(60 * time.Second))
		for got < total {
			n, err := srv.Read(buf)
			for i := 0; i < n; i++ {
				if buf[i] != byte((got+i)%251) {
					readErr <- fmt.Errorf("byte %d is %d, want %d: the stream was reordered", got+i, buf[i], byte((got+i)%251))
					return
				}
			}
			got += n
			read.Store(int64(got))
			if err != nil {
				readErr <- fmt.Errorf("read after %d of %d bytes: %w", got, total, err)
				return
			}
		}
		readErr <- nil
	}()
	write := func() {
		t.Helper()
		fill()
		n, err := c.Write(chunk)
		if err != nil {
			t.Fatalf("write after the stall: %v", err)
		}
		sent += n
	}
	// The reader catches up first (while a writer keeps passing bytes
	// through the stack, its reader is always behind). The first write
	// after the stall takes the stack without running sk_msg: the kernel
	// keeps the pass verdict of the send that failed with EAGAIN.
	c.SetWriteDeadline(time.Now().Add(60 * time.Second))
	waitFor(t, 20*time.Second, func() bool { return read.Load() == int64(sent) })
	write()
	waitFor(t, 20*time.Second, func() bool { return read.Load() == int64(sent) })
	afterStall := counterOf(t, dp, cg.ID)
	rest := total - sent
	for sent < total {
		write()
	}
	if err := <-readErr; err != nil {
		t.Fatal(err)
	}
	d = counterOf(t, dp, cg.ID).Sub(afterStall)
	if d.RedirectedBytes != uint64(rest) || d.PassedBytes != 0 {
		t.Errorf("after the reader caught up: redirected %d of %d bytes, passed %d (%d messages while the peer had stack bytes unread, %d under back-pressure); want every byte redirected again",
			d.RedirectedBytes, rest, d.PassedBytes, d.PassedUnreadMsgs, d.PassedBackpressure)
	}
}
