package dataplane

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/sockops"
)

// Slots (see "Slots" in bpf/sockbypass.h): every enabled cgroup has a slot,
// the index of its counters (cgroup_counters) and settings (cgroup_config)
// in two array maps, which its programs get as a constant. cgroup_slots
// records them. Slot 0 holds what cannot be attributed to an enabled cgroup.
// A disabled cgroup keeps its slot, so its live sockets keep counting there
// and enabling it again continues its counters; its slot is taken back only
// when every other slot is in use and it has no live socket left.

// slotOf returns the slot of the cgroup id, and whether it has one.
func (d *Dataplane) slotOf(id uint64) (uint32, bool, error) {
	var slot uint32
	err := d.maps[PinCgroupSlots].Lookup(id, &slot)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("read the slot of cgroup id %d: %w", id, err)
	}
	return slot, true, nil
}

// slots returns every cgroup id that has a slot, with its slot.
func (d *Dataplane) slots() (map[uint64]uint32, error) {
	return readMap[uint64, uint32](d.maps[PinCgroupSlots], PinCgroupSlots)
}

// assignSlot returns the slot of the cgroup id, giving it a free one (with
// zero counters and settings) when it has none; fresh reports that, and
// releaseSlot undoes it. The caller holds the exclusive lock.
func (d *Dataplane) assignSlot(id uint64) (slot uint32, fresh bool, err error) {
	if slot, ok, err := d.slotOf(id); err != nil || ok {
		return slot, false, err
	}
	taken, err := d.slots()
	if err != nil {
		return 0, false, err
	}
	used := make(map[uint32]bool, len(taken))
	for _, s := range taken {
		used[s] = true
	}
	n := d.maps[PinCounters].MaxEntries()
	for s := uint32(1); s < n; s++ {
		if !used[s] {
			slot = s
			break
		}
	}
	if slot == 0 {
		if slot, err = d.reclaimSlot(taken); err != nil {
			return 0, false, err
		}
	}
	if err := d.resetSlot(slot); err != nil {
		return 0, false, err
	}
	if err := d.maps[PinCgroupSlots].Put(id, slot); err != nil {
		return 0, false, fmt.Errorf("record the slot of cgroup id %d: %w", id, err)
	}
	return slot, true, nil
}

// reclaimSlot takes the slot of a disabled cgroup with no live socket left
// (its counters go), when every slot is in use.
func (d *Dataplane) reclaimSlot(taken map[uint64]uint32) (uint32, error) {
	isEnabled, err := d.enabledSet()
	if err != nil {
		return 0, err
	}
	socks, err := d.Sockets()
	if err != nil {
		return 0, err
	}
	live, err := d.liveSocketsByCgroup(socks)
	if err != nil {
		return 0, err
	}
	for id, slot := range taken {
		if isEnabled[id] || live[id] > 0 {
			continue
		}
		if err := d.maps[PinCgroupSlots].Delete(id); err != nil {
			return 0, fmt.Errorf("take back the slot of disabled cgroup id %d: %w", id, err)
		}
		d.log.Debug("took back the slot of a disabled cgroup", zap.Uint64("cgroup_id", id), zap.Uint32("slot", slot))
		return slot, nil
	}
	return 0, fmt.Errorf("all %d slots are in use by enabled cgroups or by disabled ones whose accelerated connections are still open: disable a cgroup, or wait for those connections to close", len(taken))
}

// enabledSet returns the ids of the enabled cgroups as a set.
func (d *Dataplane) enabledSet() (map[uint64]bool, error) {
	ids, err := d.EnabledCgroupIDs()
	if err != nil {
		return nil, err
	}
	set := make(map[uint64]bool, len(ids))
	for _, id := range ids {
		set[id] = true
	}
	return set, nil
}

// resetSlot zeroes the counters and settings of slot.
func (d *Dataplane) resetSlot(slot uint32) error {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("count possible CPUs: %w", err)
	}
	if err := d.maps[PinCounters].Put(slot, make([]sockops.CgroupCounters, cpus)); err != nil {
		return fmt.Errorf("zero the counters of slot %d: %w", slot, err)
	}
	if err := d.maps[PinCgroupConfig].Put(slot, cgroupConfig{}); err != nil {
		return fmt.Errorf("zero the settings of slot %d: %w", slot, err)
	}
	return nil
}

// releaseSlot undoes assignSlot's fresh assignment of the cgroup id.
func (d *Dataplane) releaseSlot(id uint64) {
	d.maps[PinCgroupSlots].Delete(id)
}

// configOf returns the settings of the cgroup id, and whether it has a slot.
func (d *Dataplane) configOf(id uint64) (cgroupConfig, bool) {
	var cfg cgroupConfig
	slot, ok, err := d.slotOf(id)
	if err != nil || !ok || d.maps[PinCgroupConfig].Lookup(slot, &cfg) != nil {
		return cgroupConfig{}, false
	}
	return cfg, true
}
