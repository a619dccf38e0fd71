package dataplane

import (
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

// ForgetRemovedCgroups removes what the datapath keeps for cgroups that
// were disabled and no longer exist, whose sockets' close no program sees:
// their listeners entries and their sidecar-mode endpoint counts
// (mesh_endpoints; a count left behind would make a reused pod address
// look shared for good). It returns how many entries it removed. The
// daemon runs it at every rescan; enable and disable run it too.
func (d *Dataplane) ForgetRemovedCgroups() (int, error) {
	l, err := lock.Exclusive(d.pinDir)
	if err != nil {
		return 0, err
	}
	defer l.Unlock()
	slots, err := d.slots()
	if err != nil {
		return 0, err
	}
	enabled, err := d.EnabledCgroupIDs()
	if err != nil {
		return 0, err
	}
	isEnabled := map[uint64]bool{}
	for _, id := range enabled {
		isEnabled[id] = true
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
