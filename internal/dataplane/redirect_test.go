package dataplane

import (
	"bytes"
	"crypto/sha256"
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
