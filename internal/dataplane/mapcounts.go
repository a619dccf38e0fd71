package dataplane

import (
	"bytes"
	"fmt"

	"github.com/cilium/ebpf"
)

// MapEntryCounts returns how many entries each shared map holds now, by its
// pin name, for the churn soak (e2e/soak) and whoever watches the maps
// grow. It only reads:
//
//   - hash, LRU hash and sockhash maps: their keys, walked with
//     get_next_key. Entries come and go during the walk; a key seen twice
//     (the walk restarts when the key it stands on is deleted) counts once,
//     and the walk stops after twice the map's capacity of steps;
//   - array maps (cgroup_config, cgroup_counters, per CPU): the slots whose
//     value is not all zeros, since an array always holds every key.
//
// sock_state (socket storage: no keys to walk from user space) and events
// (a ring buffer) are left out of the result.
func (d *Dataplane) MapEntryCounts() (map[string]int, error) {
	out := map[string]int{}
	for name, m := range d.maps {
		switch m.Type() {
		case ebpf.SkStorage, ebpf.RingBuf:
			continue
		case ebpf.Array, ebpf.PerCPUArray:
			n, err := nonZeroSlots(m)
			if err != nil {
				return nil, fmt.Errorf("count %s: %w", name, err)
			}
			out[name] = n
		default:
			n, err := countKeys(m)
			if err != nil {
				return nil, fmt.Errorf("count %s: %w", name, err)
			}
			out[name] = n
		}
	}
	return out, nil
}

// countKeys walks m's keys; see MapEntryCounts.
func countKeys(m *ebpf.Map) (int, error) {
	seen := map[string]struct{}{}
	var key []byte
	for steps := 0; steps < 2*int(m.MaxEntries())+2; steps++ {
		var next []byte
		var err error
		if key == nil {
			next, err = m.NextKeyBytes(nil)
		} else {
			next, err = m.NextKeyBytes(key)
		}
		if err != nil {
			return 0, err
		}
		if next == nil {
			break
		}
		seen[string(next)] = struct{}{}
		key = next
	}
	return len(seen), nil
}

// nonZeroSlots counts the slots of an array map whose value (on any CPU,
// for a per-CPU array) is not all zeros.
func nonZeroSlots(m *ebpf.Map) (int, error) {
	n := 0
	for i := uint32(0); i < m.MaxEntries(); i++ {
		v, err := m.LookupBytes(i)
		if err != nil {
			return 0, err
		}
		if len(bytes.Trim(v, "\x00")) > 0 {
			n++
		}
	}
	return n, nil
}
