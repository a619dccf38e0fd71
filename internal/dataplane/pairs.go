package dataplane

import (
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/sockops"
)

// PairReapAge is how old a pair handshake must be before ReapPairs may
// remove it: longer than any TCP handshake lasts (a SYN-ACK is retried for
// about 63 s with the default net.ipv4.tcp_synack_retries of 5, a SYN for
// about 127 s, and a retried SYN offers again with a fresh time).
const PairReapAge = 3 * time.Minute

// ReapPairs removes the pair handshakes (the pairs map, see "Pairs" in
// bpf/sockbypass.h) older than maxAge that no socket will remove:
//   - offers whose handshake never completed (a SYN whose SYN-ACK was
//     reset, a port scan, a SYN flood), and declined or abandoned
//     handshakes whose server never reached ESTABLISHED;
//   - a joined client's handshake whose client is no longer in the
//     sockhash (it closed after its cgroup was disabled, so its close
//     callback did not run), and account-only (dry) handshakes.
//
// It returns how many it removed. The daemon runs it at every rescan;
// enable and disable run it too.
func (d *Dataplane) ReapPairs(maxAge time.Duration) (int, error) {
	l, err := lock.Exclusive(d.pinDir)
	if err != nil {
		return 0, err
	}
	defer l.Unlock()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("reap pairs: read the monotonic clock: %w", err)
	}
	now := uint64(ts.Nano())
	m := d.maps[PinPairs]
	var (
		key   SockKey
		p     sockops.Pair
		stale []SockKey
	)
	it := m.Iterate()
	for it.Next(&key, &p) {
		if p.OfferedNs == 0 || now < p.OfferedNs || time.Duration(now-p.OfferedNs) < maxAge {
			continue
		}
		switch p.State {
		case PairClientJoined, PairJoined:
			// The client's close removes it, unless it closed unseen.
			if _, member, err := d.MemberCookie(key); err != nil || member {
				continue
			}
		}
		stale = append(stale, key)
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("reap pairs: %w", err)
	}
	if err := d.rotateOfferEpoch(now, maxAge); err != nil {
		return 0, err
	}
	n := 0
	for _, k := range stale {
		err := m.Delete(k)
		if err == nil {
			n++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, fmt.Errorf("reap pairs: delete %v: %w", k, err)
		}
	}
	return n, nil
}

// offerEpoch mirrors struct offer_epoch: the epoch of offer_hints that
// offers count in, and since when (monotonic seconds).
type offerEpoch struct {
	Current uint32
	Since   uint32
}

// rotateOfferEpoch bounds how long an offer hint count that nobody takes
// back (see "Offer hints" in bpf/sockbypass.h) makes connections look
// their offer up: once the current epoch is maxAge old, it zeroes the
// other epoch (no offer has counted there for at least maxAge, longer
// than any handshake lasts) and makes it current. now is CLOCK_MONOTONIC
// in nanoseconds; the caller holds the pin directory's lock.
func (d *Dataplane) rotateOfferEpoch(now uint64, maxAge time.Duration) error {
	m := d.maps[PinOfferEpoch]
	var e offerEpoch
	if err := m.Lookup(uint32(0), &e); err != nil {
		return fmt.Errorf("read %s: %w", PinOfferEpoch, err)
	}
	secs := uint32(now / uint64(time.Second))
	if e.Since == 0 {
		// A new install: start the clock.
		e.Since = max(secs, 1)
		return m.Put(uint32(0), e)
	}
	if secs < e.Since || time.Duration(secs-e.Since)*time.Second < maxAge {
		return nil
	}
	next := 1 - e.Current&1
	hints := d.maps[PinOfferHints]
	slots := offerHintSlots(hints) // per epoch
	keys := make([]uint32, slots)
	zeros := make([]uint64, slots)
	for i := range keys {
		keys[i] = offerHintIndex(uint32(i), next)
	}
	if _, err := hints.BatchUpdate(keys, zeros, nil); err != nil {
		// Kernels without batch operations on arrays: one by one.
		for _, k := range keys {
			if err := hints.Put(k, uint64(0)); err != nil {
				return fmt.Errorf("zero %s[%d]: %w", PinOfferHints, k, err)
			}
		}
	}
	return m.Put(uint32(0), offerEpoch{Current: next, Since: max(secs, 1)})
}

// offerHintSlots is the number of offer hint counts per epoch
// (OFFER_HINT_SLOTS in bpf/sockbypass.h): the map holds two epochs.
func offerHintSlots(hints *ebpf.Map) uint32 { return hints.MaxEntries() / 2 }

// offerHintIndex is the index of a slot's count in an epoch
// (offer_hint_index in bpf/sockbypass.h): a slot's two epochs are
// neighbours, so a client's look costs one cache line.
func offerHintIndex(slot, epoch uint32) uint32 { return 2*slot + epoch&1 }
