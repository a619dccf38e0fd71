package dataplane

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/lock"
)

// endpointSlotShift is ENDPOINT_SLOT_SHIFT: bits 32-47 of a mesh_endpoints
// value hold the slot (plus one) of the cgroup that counted it.
const endpointSlotShift = 32

// ForgetRemovedCgroups removes what the datapath keeps for sockets and
// cgroups that no program sees close: the socket_cgroups entries of
// sockets no longer in the sockhash (members that closed after their
// cgroup was disabled), and, for cgroups that were disabled and no longer
// exist, their listeners entries and their sidecar-mode endpoint counts
// (mesh_endpoints; a count left behind would make a reused pod address
// look shared for good). It returns how many entries it removed. The
// daemon runs it at every rescan; enable and disable run it too.
func (d *Dataplane) ForgetRemovedCgroups() (int, error) {
	l, err := lock.Exclusive(d.pinDir)
	if err != nil {
		return 0, err
	}
	defer l.Unlock()
	n, err := d.sweepSocketCgroups()
	if err != nil {
		return n, err
	}
	k, err := d.forgetRemovedCgroups()
	return n + k, err
}

// sweepSocketCgroups deletes the socket_cgroups entries whose socket is no
// longer in the sockhash. socket_cgroups is read first: sock_ops inserts a
// member into the sockhash before it records its cookie there, so a
// member read there is in the sockhash read after, unless it has left.
func (d *Dataplane) sweepSocketCgroups() (int, error) {
	recorded, err := readMap[uint64, uint64](d.maps[PinSocketCgs], PinSocketCgs)
	if err != nil || len(recorded) == 0 {
		return 0, err
	}
	members, err := d.Sockets()
	if err != nil {
		return 0, err
	}
	live := make(map[uint64]bool, len(members))
	for _, cookie := range members {
		live[cookie] = true
	}
	n := 0
	for cookie := range recorded {
		if live[cookie] {
			continue
		}
		if err := d.maps[PinSocketCgs].Delete(cookie); err == nil {
			n++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, fmt.Errorf("delete from %s: %w", PinSocketCgs, err)
		}
	}
	return n, nil
}

// forgetRemovedCgroups removes the listeners and mesh_endpoints entries of
// the cgroups that were disabled and no longer exist.
func (d *Dataplane) forgetRemovedCgroups() (int, error) {
	slots, err := d.slots()
	if err != nil {
		return 0, err
	}
	isEnabled, err := d.enabledSet()
	if err != nil {
		return 0, err
	}
	var disabled []uint64
	for id := range slots {
		if !isEnabled[id] {
			disabled = append(disabled, id)
		}
	}
	if len(disabled) == 0 {
		return 0, nil
	}
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return 0, err
	}
	exist, err := mounts.PathsByID(disabled)
	if err != nil {
		return 0, err
	}
	removed := map[uint64]bool{} // slot+1 of each removed cgroup
	for _, id := range disabled {
		if _, ok := exist[id]; !ok {
			removed[uint64(slots[id])+1] = true
		}
	}
	if len(removed) == 0 {
		return 0, nil
	}
	n := 0
	for name, shift := range map[string]uint{PinMeshEndpoints: endpointSlotShift, PinListeners: listenerSlotShift} {
		k, err := d.deleteTagged(name, shift, removed)
		n += k
		if err != nil {
			return n, err
		}
	}
	if n > 0 {
		d.log.Info("forgot the entries of removed cgroups", zap.Int("entries", n), zap.Int("cgroups", len(removed)))
	}
	return n, nil
}

// deleteTagged deletes the entries of the map name (endpoint_key -> u64)
// whose value holds, in its 16 bits from shift, one of tags.
func (d *Dataplane) deleteTagged(name string, shift uint, tags map[uint64]bool) (int, error) {
	m := d.maps[name]
	var (
		key  endpointKey
		v    uint64
		gone []endpointKey
	)
	it := m.Iterate()
	for it.Next(&key, &v) {
		if tags[(v>>shift)&0xffff] {
			gone = append(gone, key)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("read %s: %w", name, err)
	}
	n := 0
	for _, k := range gone {
		if err := m.Delete(k); err == nil {
			n++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, fmt.Errorf("delete from %s: %w", name, err)
		}
	}
	return n, nil
}

// forgetIntercepts removes the orig_dsts entries of the cgroup in slot
// (handshakes it intercepted that no program of it will now see end) and
// zeroes its count in intercepts, for a cgroup whose programs are
// detached.
func (d *Dataplane) forgetIntercepts(slot uint32) error {
	m := d.maps[PinOrigDsts]
	var (
		key  endpointKey
		val  = make([]byte, m.ValueSize())
		gone []endpointKey
	)
	it := m.Iterate()
	for it.Next(&key, &val) {
		if origDstSlot(val) == slot+1 {
			gone = append(gone, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read %s: %w", PinOrigDsts, err)
	}
	for _, k := range gone {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete from %s: %w", PinOrigDsts, err)
		}
	}
	if err := d.maps[PinIntercepts].Put(slot, uint64(0)); err != nil {
		return fmt.Errorf("reset the intercepts of slot %d: %w", slot, err)
	}
	return nil
}

// origDstSlot reads the slot tag (the slot plus one) of a struct orig_dst
// value: ip[16], port, family, then the tag.
func origDstSlot(val []byte) uint32 { return binary.LittleEndian.Uint32(val[20:24]) }
