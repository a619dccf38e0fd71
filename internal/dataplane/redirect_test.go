package dataplane

import (
	"bytes"
	"crypto/sha256"
	"io"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
	"github.com/sockbypass/sockbypass/sockops"
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

// TestReadProgressIsPublishedOnlyWhenNeeded: a pair that only redirects
// writes nothing to `receivers' (its senders never look), until a reader
// has read READ_PUBLISH_STEP (1 MiB) of redirected bytes: then its
// progress is there for the sender's back-pressure check.
func TestReadProgressIsPublishedOnlyWhenNeeded(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	c, srv := joinedPair(t, dp, cg)
	go transfer.Echo(srv)
	progress := func() (found bool, read uint64) {
		k := keyOf(c)
		k.LocalIp, k.RemoteIp = k.RemoteIp, k.LocalIp
		k.LocalPort, k.RemotePort = k.RemotePort, k.LocalPort
		var r sockops.Receiver
		if dp.maps[PinReceivers].Lookup(k, &r) != nil {
			return false, 0
		}
		return true, r.RedirectedRead
	}
	exchange := func(size int) {
		t.Helper()
		msg, got := transfer.Pattern(3, size), make([]byte, size)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		go c.Write(msg)
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("echo of %d bytes: %v", size, err)
		}
	}

	for i := 0; i < 100; i++ {
		exchange(1000)
	}
	if found, _ := progress(); found {
		t.Errorf("the server wrote its read progress after 100 kB of redirected reads; want no entry before 1 MiB")
	}
	exchange(2 << 20)
	if found, read := progress(); !found || read < 1<<20 {
		t.Errorf("after 2 MiB more: the server's read progress found %v, %d bytes read; want an entry with at least 1 MiB", found, read)
	}
	if d := counterOf(t, dp, cg.ID); d.PassedBytes != 0 || d.RedirectedBytes == 0 {
		t.Errorf("counters %+v: want everything redirected", d)
	}
}
