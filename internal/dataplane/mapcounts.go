package dataplane

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"

	"github.com/cilium/ebpf"
)

// MapEntryCounts returns how many entries each shared map holds now, by its
// pin name, for the churn soak (e2e/soak) and whoever watches the maps
// grow. It only reads:
//
//   - hash and LRU hash maps: their keys, read in batches (one bucket at
//     a time: entries that come and go meanwhile are counted or not, none
//     twice);
//   - the sockhash (no batch reads): its keys, walked with get_next_key.
//     A key seen twice (the walk restarts when the key it stands on is
//     deleted) counts once, and the walk stops after twice the map's
//     capacity of steps;
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

// countKeys counts m's keys; see MapEntryCounts.
func countKeys(m *ebpf.Map) (int, error) {
	if m.Type() == ebpf.Hash || m.Type() == ebpf.LRUHash {
		return batchCountKeys(m)
	}
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

// batchCountKeys counts the keys of a hash map with BPF_MAP_LOOKUP_BATCH.
func batchCountKeys(m *ebpf.Map) (int, error) {
	const batch = 4096
	byteT := reflect.TypeOf(byte(0))
	keys := reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(int(m.KeySize()), byteT)), batch, batch).Interface()
	values := reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(int(m.ValueSize()), byteT)), batch, batch).Interface()
	var cursor ebpf.MapBatchCursor
	total := 0
	for i := 0; i <= int(m.MaxEntries())/batch+1; i++ {
		n, err := m.BatchLookup(&cursor, keys, values, nil)
		total += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return total, nil
		}
		if err != nil {
			return 0, err
		}
	}
	return total, nil
}
