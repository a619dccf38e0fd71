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
