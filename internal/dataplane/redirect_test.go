package dataplane

import (
	"bytes"
	"crypto/sha256"
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"math/rand/v2"
	"testing"
)

func TestRedirectCountsExactlyTheBytesSent(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	l := listenIn(t, cg, "tcp4", "127.0.0.1:0")
	sumServer(t, l)

	before := counterOf(t, dp, cg.ID)
	payload := make([]byte, 1<<20+7)
	for i := range payload {
		payload[i] = byte(rand.Uint32())
	}
	c := dialIn(t, cg, "tcp4", l.Addr().String())
	got := sendAndSum(t, c, payload)
	want := sha256.Sum256(payload)
	if !bytes.Equal(got, want[:]) {
		t.Fatalf("digest mismatch: got %x want %x", got, want)
	}
	c.Close()

	delta := counterOf(t, dp, cg.ID).Sub(before)
	if delta.SocketsInserted != 2 {
		t.Errorf("sockets inserted = %d, want 2", delta.SocketsInserted)
	}
	if want := uint64(len(payload) + sha256.Size); delta.RedirectedBytes != want {
		t.Errorf("redirected bytes = %d, want exactly %d (payload + digest); counters %+v", delta.RedirectedBytes, want, delta)
	}
	if delta.PassedBytes != 0 || delta.RedirectFailures != 0 {
		t.Errorf("bytes took the stack: %+v", delta)
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
	l := listenIn(t, cg, "tcp4", "127.0.0.1:0")
	echoServer(t, l)
	payload := pattern(3, 1<<20)
	if err := echoRoundTrip(dialIn(t, cg, "tcp4", l.Addr().String()), payload, 16384); err != nil {
		t.Fatal(err)
	}
	if got := counterOf(t, dp, cg.ID).RedirectedBytes; got != 2*uint64(len(payload)) {
		t.Errorf("redirected %d bytes with the legacy attach, want %d", got, 2*len(payload))
	}
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
