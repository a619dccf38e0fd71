package dataplane

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/sockbypass/sockbypass/sockops"
)

// What the pinned maps record about single sockets, read-only, for
// `sockbypass conns` (internal/conns), which joins it with the kernel's
// socket diagnostics: each socket's storage (sock_state, dumped by
// sock_diag with the map below), sockhash membership, pair handshakes,
// listeners and the cgroups' settings.

// SockState is struct sock_state, a socket's storage in the sock_state map.
type SockState = sockops.SockState

// Flags of SockState.Flags: SOCK_FLAG_* of bpf/sockbypass.h, which
// TestSockFlagsMirrorTheHeader compares with these.
const (
	SockFlagHandled         = 1 << 0
	SockFlagInserted        = 1 << 1
	SockFlagRedirecting     = 1 << 2
	SockFlagStackReader     = 1 << 3
	SockFlagExplicitPeer    = 1 << 5
	SockFlagIntercepted     = 1 << 6
	SockFlagSynRedirected   = 1 << 7
	SockFlagMeshApp         = 1 << 8
	SockFlagAmbiguous       = 1 << 9
	SockFlagPaired          = 1 << 10
	SockFlagPairClient      = 1 << 11
	SockFlagListener        = 1 << 12
	SockFlagLateOption      = 1 << 13
	SockFlagLocalPeer       = 1 << 14
	SockFlagRemotePeer      = 1 << 15
	SockFlagPassed          = 1 << 16
	SockFlagOrigDst         = 1 << 17
	SockFlagEndpointCounted = 1 << 18
	SockFlagWouldPair       = 1 << 19
	SockFlagAccepted        = 1 << 20
	SockFlagLeaving         = 1 << 21
	SockFlagPeerRemoved     = 1 << 22
	SockFlagStackProcess    = 1 << 23
	SockFlagProbation       = 1 << 24
	SockFlagSpliced         = 1 << 25
	// SockFlagProbationChild: accepted while its listener was on
	// probation (it stays plain for its whole life).
	SockFlagProbationChild = 1 << 26
)

// States of a pair handshake (struct pair.state, PAIR_* of
// bpf/sockbypass.h).
const (
	PairOffered      = 1
	PairClientJoined = 2
	PairJoined       = 3
	PairDeclined     = 4
	PairAbandoned    = 5
	PairDryOffered   = 6
	PairDryClient    = 7
	PairDryJoined    = 8
)

// Flags of a listener in the listeners map (LISTENER_* of
// bpf/sockbypass.h): bits 0-7 flags, bits 8-15 the short-lived streak.
const (
	ListenerNonblock         = 1 << 0
	ListenerStackReader      = 1 << 1
	ListenerBlockingChildren = 1 << 2
	ListenerShortOne         = 1 << 8
	ListenerShortMask        = 0xff << 8
	// ShortStreak is SHORT_STREAK: a listener whose last ShortStreak
	// connections were short-lived offers no pair to new ones.
	ShortStreak = 8
)

// SockStateMap returns the sock_state map (BPF socket storage), for
// socket diagnostics requests that dump each socket's storage with it
// (sockdiag.Request.StorageMapFDs). It stays d's: callers must neither
// write nor close it.
func (d *Dataplane) SockStateMap() *ebpf.Map { return d.maps[PinSockState] }

// DecodeSockState decodes a sock_state value as the kernel dumps it (the
// map's value, laid out as struct sock_state).
func DecodeSockState(b []byte) (SockState, error) {
	var st SockState
	if n := binary.Size(st); len(b) != n {
		return st, fmt.Errorf("sock_state value of %d bytes, this binary reads %d: the pinned maps are of another sockbypass version (run sockbypass upgrade)", len(b), n)
	}
	err := binary.Read(bytes.NewReader(b), binary.NativeEndian, &st)
	return st, err
}

// MemberCookie returns the cookie of the socket that is in the sockhash
// under key, and whether there is one.
func (d *Dataplane) MemberCookie(key SockKey) (uint64, bool, error) {
	var cookie uint64
	err := d.maps[PinSockhash].Lookup(key, &cookie)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("look up sockhash: %w", err)
	}
	return cookie, true, nil
}

// PairState returns the state (PairOffered, ...) of the pair handshake of
// the client whose sockhash key is client, and whether one is recorded.
func (d *Dataplane) PairState(client SockKey) (uint64, bool, error) {
	var p sockops.Pair
	err := d.maps[PinPairs].Lookup(client, &p)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("look up pairs: %w", err)
	}
	return p.State, true, nil
}

// ListenerFlags returns the flags (ListenerNonblock, ...) recorded for the
// listener that accepts connections to addr:port in the network namespace
// whose cookie is netns, as sock_ops finds it: the exact address first,
// then the IPv4 and the IPv6 wildcard. ok is false when none is recorded.
func (d *Dataplane) ListenerFlags(netns uint64, addr netip.Addr, port uint16) (flags uint64, ok bool, err error) {
	for _, a := range []netip.Addr{addr, netip.IPv4Unspecified(), netip.IPv6Unspecified()} {
		key := endpointKey{NetnsCookie: netns, Ip: sockops.AddrToC(a), Port: port}
		err := d.maps[PinListeners].Lookup(key, &flags)
		if err == nil {
			return flags, true, nil
		}
		if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return 0, false, fmt.Errorf("look up listeners: %w", err)
		}
	}
	return 0, false, nil
}

// SlotSettings are the settings of a cgroup that has a slot.
type SlotSettings struct {
	// ID is the cgroup id.
	ID uint64
	// Enabled reports whether the cgroup is enabled now (a disabled
	// cgroup keeps its slot while its accelerated sockets live).
	Enabled bool
	// AccountOnly and AllConnections are the modes of enable
	// (--account-only, --all-connections).
	AccountOnly, AllConnections bool
	// Mesh is the sidecar mode: "", "redirect" or "intercept".
	Mesh string
	// StackPorts are its stack ports (--stack-ports).
	StackPorts []uint16
	// NoProbation: its listeners' first connections pair too
	// (--no-probation).
	NoProbation bool
}

// SlotSettings returns the settings of every cgroup that has a slot,
// by cgroup id.
func (d *Dataplane) SlotSettings() (map[uint64]SlotSettings, error) {
	slots, err := d.slots()
	if err != nil {
		return nil, err
	}
	ids, err := d.EnabledCgroupIDs()
	if err != nil {
		return nil, err
	}
	enabled := map[uint64]bool{}
	for _, id := range ids {
		enabled[id] = true
	}
	out := make(map[uint64]SlotSettings, len(slots))
	for id, slot := range slots {
		var cfg cgroupConfig
		if err := d.maps[PinCgroupConfig].Lookup(slot, &cfg); err != nil {
			return nil, fmt.Errorf("read the settings of cgroup id %d (slot %d): %w", id, slot, err)
		}
		s := SlotSettings{ID: id, Enabled: enabled[id], AccountOnly: cfg.Flags&cgroupAccountOnly != 0,
			AllConnections: cfg.Flags&cgroupAllConnections != 0, NoProbation: cfg.Flags&cgroupNoProbation != 0}
		switch cfg.MeshMode {
		case MeshRedirect:
			s.Mesh = "redirect"
		case MeshIntercept:
			s.Mesh = "intercept"
		}
		for _, p := range cfg.StackPorts {
			if p == 0 {
				break
			}
			s.StackPorts = append(s.StackPorts, p)
		}
		out[id] = s
	}
	// An enabled cgroup always has a slot; be lenient with one that has
	// none (enabled by an older binary).
	for _, id := range ids {
		if _, ok := out[id]; !ok {
			out[id] = SlotSettings{ID: id, Enabled: true}
		}
	}
	return out, nil
}
