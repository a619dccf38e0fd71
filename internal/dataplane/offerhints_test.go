package dataplane

import (
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// offerHints returns the sum of each epoch's offer hint counts.
func offerHints(t *testing.T, dp *Dataplane) [2]uint64 {
	t.Helper()
	var sums [2]uint64
	var v uint64
	slots := offerHintSlots(dp.maps[PinOfferHints])
	for slot := uint32(0); slot < slots; slot++ {
		for epoch := uint32(0); epoch < 2; epoch++ {
			i := offerHintIndex(slot, epoch)
			if err := dp.maps[PinOfferHints].Lookup(i, &v); err != nil {
				t.Fatalf("read %s[%d]: %v", PinOfferHints, i, err)
			}
			sums[epoch] += v
		}
	}
	return sums
}

// ageOfferEpoch makes the current offer epoch look age old.
func ageOfferEpoch(t *testing.T, dp *Dataplane, age time.Duration) offerEpoch {
	t.Helper()
	var e offerEpoch
	if err := dp.maps[PinOfferEpoch].Lookup(uint32(0), &e); err != nil {
		t.Fatal(err)
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	e.Since = uint32(ts.Sec) - uint32(age/time.Second)
	if err := dp.maps[PinOfferEpoch].Put(uint32(0), e); err != nil {
		t.Fatal(err)
	}
	return e
}

// TestOfferHintsFollowTheOffers: every offer a server finds gives its
// offer hint count back, whether the pair forms or not, so connections
// that were offered nothing skip the pairs lookup; an offer no server
// finds (an aborted handshake) stays counted until ReapPairs has zeroed
// its epoch, one epoch length after it ended; connections pair in either
// epoch.
func TestOfferHintsFollowTheOffers(t *testing.T) {
	dp := install(t)
	accel := enabledCgroup(t, dp)
	plain := testutil.NewCgroup(t)
	l := testutil.ListenIn(t, accel, "tcp4", "127.0.0.1:0")
	acceptAndClose(l)
	addr := l.Addr().String()
	if got := offerHints(t, dp); got != [2]uint64{} {
		t.Fatalf("a new install's offer hints: %v, want none", got)
	}

	// Paired, declined (blocking), and never taken (not enabled): each
	// offer is found by its server.
	before := counterOf(t, dp, accel.ID)
	churn(t, &accel, addr, 100, false)
	churn(t, &accel, addr, 50, true)
	churn(t, &plain, addr, 50, false)
	if d := counterOf(t, dp, accel.ID).Sub(before); d.SocketsInserted == 0 {
		t.Fatalf("no connection joined the sockhash: %+v", d)
	}
	waitFor(t, 5*time.Second, func() bool { return offerHints(t, dp) == [2]uint64{} })

	// Aborted handshakes: counted, never given back. (Fresh listeners
	// from here: the first one learnt that its connections are
	// short-lived, and offers few.)
	fresh := func() string {
		l := testutil.ListenIn(t, accel, "tcp4", "127.0.0.1:0")
		acceptAndClose(l)
		return l.Addr().String()
	}
	syns := testutil.ListenIn(t, accel, "tcp4", "127.0.0.1:0")
	sendSYNs(t, syns.Addr().(*net.TCPAddr), 41000, 30)
	waitFor(t, 5*time.Second, func() bool { return offerHints(t, dp)[0] == 30 })

	// Not old enough: nothing changes.
	if _, err := dp.ReapPairs(PairReapAge); err != nil {
		t.Fatal(err)
	}
	if got := offerHints(t, dp); got != [2]uint64{30, 0} {
		t.Fatalf("offer hints after a reap within the epoch: %v, want [30 0]", got)
	}
	// The epoch ends: offers count in epoch 1, epoch 0 keeps its counts
	// (handshakes of its last moments may still complete).
	ageOfferEpoch(t, dp, PairReapAge+time.Second)
	if _, err := dp.ReapPairs(PairReapAge); err != nil {
		t.Fatal(err)
	}
	var e offerEpoch
	if err := dp.maps[PinOfferEpoch].Lookup(uint32(0), &e); err != nil || e.Current != 1 {
		t.Fatalf("offer epoch after it ended: %+v, %v; want current 1", e, err)
	}
	if got := offerHints(t, dp); got != [2]uint64{30, 0} {
		t.Fatalf("offer hints after the epoch ended: %v, want [30 0]", got)
	}
	// Connections pair in the new epoch, and give their counts back.
	before = counterOf(t, dp, accel.ID)
	churn(t, &accel, fresh(), 20, false)
	if d := counterOf(t, dp, accel.ID).Sub(before); d.SocketsInserted == 0 {
		t.Fatalf("epoch 1: no connection joined the sockhash: %+v", d)
	}
	waitFor(t, 5*time.Second, func() bool { return offerHints(t, dp) == [2]uint64{30, 0} })
	// One more epoch later, epoch 0 (no offer since) is zeroed and
	// current again.
	ageOfferEpoch(t, dp, PairReapAge+time.Second)
	if _, err := dp.ReapPairs(PairReapAge); err != nil {
		t.Fatal(err)
	}
	if got := offerHints(t, dp); got != [2]uint64{} {
		t.Fatalf("offer hints one epoch after the aborted handshakes: %v, want none", got)
	}
	before = counterOf(t, dp, accel.ID)
	churn(t, &accel, fresh(), 20, false)
	if d := counterOf(t, dp, accel.ID).Sub(before); d.SocketsInserted == 0 {
		t.Fatalf("epoch 0 again: no connection joined the sockhash: %+v", d)
	}
	waitFor(t, 5*time.Second, func() bool { return offerHints(t, dp) == [2]uint64{} })
}
