package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"

	"github.com/cilium/ebpf"
	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/listeners"
	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/internal/nodeaddrs"
)

// nodeAddrKey and nodeAddrValue mirror struct node_addr_key and node_addr.
type nodeAddrKey struct{ IP [16]byte }

type nodeAddrValue struct {
	NetnsCookie uint64
	Flags       uint32
	Pad         uint32
}

const nodeAddrAmbiguous = 1 << 0

// NodeAddrs says which node addresses may be paired across namespaces.
type NodeAddrs struct {
	// Unique is the number of addresses owned by one namespace each.
	Unique int `json:"unique"`
	// Ambiguous lists the addresses seen in several namespaces: they are
	// never paired across namespaces.
	Ambiguous []string `json:"ambiguous"`
}

// syncNodeAddrs makes the node address table hold exactly owners: address
// -> the cookies of the namespaces that have it, and the inbound-pod table
// exactly inbound: address -> inbound port of its redirect-mode sidecar.
// Connections between two addresses that each have one owner pair across
// namespaces; an address with several owners is marked ambiguous.
func (d *Dataplane) syncNodeAddrs(owners nodeaddrs.Owners, inbound map[netip.Addr]uint16) (NodeAddrs, error) {
	l, err := lock.Exclusive(d.pinDir)
	if err != nil {
		return NodeAddrs{}, err
	}
	defer l.Unlock()
	wantAddrs := map[nodeAddrKey]nodeAddrValue{}
	for addr, cookies := range owners {
		k := nodeAddrKey{IP: addr.As16()}
		if len(cookies) == 1 {
			for c := range cookies {
				wantAddrs[k] = nodeAddrValue{NetnsCookie: c}
			}
		} else {
			wantAddrs[k] = nodeAddrValue{Flags: nodeAddrAmbiguous}
		}
	}
	changed, removed, err := syncMap(d.maps[PinNodeAddrs], wantAddrs)
	if err != nil {
		return NodeAddrs{}, fmt.Errorf("node addresses: %w", err)
	}
	if changed > 0 || removed > 0 {
		d.log.Info("node addresses updated", zap.Int("changed", changed), zap.Int("removed", removed))
	}
	wantInbound := map[nodeAddrKey]uint32{}
	for addr, port := range inbound {
		wantInbound[nodeAddrKey{IP: addr.As16()}] = uint32(port)
	}
	if _, _, err := syncMap(d.maps[PinInboundPods], wantInbound); err != nil {
		return NodeAddrs{}, fmt.Errorf("inbound pods: %w", err)
	}
	return d.nodeAddrs()
}

// syncMap makes m hold exactly want, writing only what differs, and says
// how many entries it wrote and removed.
func syncMap[K, V comparable](m *ebpf.Map, want map[K]V) (changed, removed int, err error) {
	var stale []K
	same := map[K]bool{}
	var k K
	var v V
	it := m.Iterate()
	for it.Next(&k, &v) {
		if w, ok := want[k]; !ok {
			stale = append(stale, k)
		} else if w == v {
			same[k] = true
		}
	}
	if err := it.Err(); err != nil {
		return 0, 0, fmt.Errorf("read: %w", err)
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return changed, removed, err
		}
		removed++
	}
	for k, v := range want {
		if same[k] {
			continue
		}
		if err := m.Put(k, v); err != nil {
			return changed, removed, fmt.Errorf("write: %w", err)
		}
		changed++
	}
	return changed, removed, nil
}

func (d *Dataplane) nodeAddrs() (NodeAddrs, error) {
	out := NodeAddrs{Ambiguous: []string{}}
	var k nodeAddrKey
	var v nodeAddrValue
	it := d.maps[PinNodeAddrs].Iterate()
	for it.Next(&k, &v) {
		if v.Flags&nodeAddrAmbiguous != 0 {
			out.Ambiguous = append(out.Ambiguous, netip.AddrFrom16(k.IP).Unmap().String())
		} else {
			out.Unique++
		}
	}
	sort.Strings(out.Ambiguous)
	return out, it.Err()
}

// RefreshNodeAddrs collects the addresses of the network namespaces of the
// processes in the enabled cgroups, and of the namespaces at extraNetns,
// and syncs the node address table with them.
func (d *Dataplane) RefreshNodeAddrs(extraNetns ...string) (NodeAddrs, error) {
	cgs, err := d.enabledCgroups()
	if err != nil {
		return NodeAddrs{}, err
	}
	// One pass over the namespaces: every address, and those of the
	// redirect-mode sidecar pods with their inbound port.
	owners := nodeaddrs.Owners{}
	inbound := map[netip.Addr]uint16{}
	var collectErr error
	for _, cg := range cgs {
		found, err := nodeaddrs.Collect([]cgroup.Cgroup{cg})
		if err != nil && !errors.Is(err, nodeaddrs.ErrPermission) {
			return NodeAddrs{}, err
		}
		collectErr = errors.Join(collectErr, err)
		owners.Merge(found)
		var cfg cgroupConfig
		if d.maps[PinCgroupConfig].Lookup(cg.ID, &cfg) == nil && cfg.MeshMode == MeshRedirect && cfg.InboundPort != 0 {
			for addr := range found {
				inbound[addr] = cfg.InboundPort
			}
		}
	}
	nodeaddrs.CollectNetns(owners, extraNetns)
	addrs, err := d.syncNodeAddrs(owners, inbound)
	if err == nil && collectErr != nil {
		// Partial: what was found is in force, the rest stays unpaired.
		d.log.Warn("pod-to-pod pairing is partial", zap.Error(collectErr))
		err = collectErr
	}
	return addrs, err
}

// listenerNonblock mirrors LISTENER_NONBLOCK.
const listenerNonblock = 1 << 0

// RefreshListeners records the listening sockets of the processes in the
// enabled cgroups, and whether each blocks, in the listeners table: an
// accepted socket joins the sockhash only when its listener is known to be
// non-blocking. sock_ops records listeners when they call listen(); this
// covers listeners that existed before enable and servers that make their
// listener non-blocking after listen() (redis). It returns the number of
// listeners found.
func (d *Dataplane) RefreshListeners() (int, error) {
	cgs, err := d.enabledCgroups()
	if err != nil {
		return 0, err
	}
	return d.refreshListeners(cgs)
}

// refreshListeners records the listeners of the processes in cgs.
func (d *Dataplane) refreshListeners(cgs []cgroup.Cgroup) (int, error) {
	var pids []int
	for _, cg := range cgs {
		p, err := cg.Procs()
		if err != nil {
			continue // removed meanwhile
		}
		pids = append(pids, p...)
	}
	found, collectErr := listeners.Collect(pids)
	for _, l := range found {
		key := endpointKey{NetnsCookie: l.NetnsCookie, IP: l.Addr.As16(), Port: l.Port}
		var flags, old uint64
		if l.NonBlocking {
			flags = listenerNonblock
		}
		// Keep what sock_ops learnt about the listener's connections
		// (the bits above the flags byte: see "Short-lived listeners").
		if d.maps[PinListeners].Lookup(key, &old) == nil {
			flags |= old &^ 0xff
		}
		if err := d.maps[PinListeners].Put(key, flags); err != nil {
			return 0, fmt.Errorf("record listener %s: %w", netip.AddrPortFrom(l.Addr, l.Port), err)
		}
	}
	return len(found), collectErr
}

// endpointKey mirrors struct endpoint_key.
type endpointKey struct {
	NetnsCookie uint64
	IP          [16]byte
	Port        uint16
	Pad         uint16
	Pad2        uint32
}

// enabledCgroupPaths returns the enabled cgroup ids and, in one walk, the
// paths of those that still exist.
func (d *Dataplane) enabledCgroupPaths() ([]uint64, map[uint64]string, cgroup.Mounts, error) {
	ids, err := d.EnabledCgroupIDs()
	if err != nil {
		return nil, nil, cgroup.Mounts{}, err
	}
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return nil, nil, cgroup.Mounts{}, err
	}
	paths, err := mounts.PathsByID(ids)
	return ids, paths, mounts, err
}

// enabledCgroups resolves the enabled cgroups that still exist.
func (d *Dataplane) enabledCgroups() ([]cgroup.Cgroup, error) {
	_, paths, mounts, err := d.enabledCgroupPaths()
	if err != nil {
		return nil, err
	}
	var cgs []cgroup.Cgroup
	for _, p := range paths {
		if cg, err := mounts.Resolve(p); err == nil {
			cgs = append(cgs, cg)
		}
	}
	return cgs, nil
}
