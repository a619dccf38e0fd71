package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"

	"github.com/cilium/ebpf"
	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
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

// SyncNodeAddrs makes the node address table hold exactly owners: address
// -> the cookies of the namespaces that have it. Connections between two
// addresses that each have one owner pair across namespaces; an address
// with several owners is marked ambiguous.
func (d *Dataplane) SyncNodeAddrs(owners map[netip.Addr]map[uint64]bool) (NodeAddrs, error) {
	l, err := lock.Exclusive(d.pinDir)
	if err != nil {
		return NodeAddrs{}, err
	}
	defer l.Unlock()
	m := d.maps[PinNodeAddrs]
	want := map[nodeAddrKey]nodeAddrValue{}
	for addr, cookies := range owners {
		k := nodeAddrKey{IP: addr.As16()}
		if len(cookies) == 1 {
			for c := range cookies {
				want[k] = nodeAddrValue{NetnsCookie: c}
			}
		} else {
			want[k] = nodeAddrValue{Flags: nodeAddrAmbiguous}
		}
	}
	var stale []nodeAddrKey
	var k nodeAddrKey
	var v nodeAddrValue
	it := m.Iterate()
	for it.Next(&k, &v) {
		if w, ok := want[k]; !ok {
			stale = append(stale, k)
		} else if w == v {
			delete(want, k)
		}
	}
	if err := it.Err(); err != nil {
		return NodeAddrs{}, fmt.Errorf("read node addresses: %w", err)
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return NodeAddrs{}, err
		}
	}
	for k, v := range want {
		if err := m.Put(k, v); err != nil {
			return NodeAddrs{}, fmt.Errorf("write node address %s: %w", netip.AddrFrom16(k.IP).Unmap(), err)
		}
	}
	if len(want) > 0 || len(stale) > 0 {
		d.log.Info("node addresses updated", zap.Int("changed", len(want)), zap.Int("removed", len(stale)))
	}
	return d.nodeAddrs()
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
	ids, err := d.EnabledCgroupIDs()
	if err != nil {
		return NodeAddrs{}, err
	}
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return NodeAddrs{}, err
	}
	paths, err := mounts.PathsByID(ids)
	if err != nil {
		return NodeAddrs{}, err
	}
	var cgs []cgroup.Cgroup
	for _, p := range paths {
		if cg, err := mounts.Resolve(p); err == nil {
			cgs = append(cgs, cg)
		}
	}
	owners, collectErr := nodeaddrs.Collect(cgs)
	if collectErr != nil && !errors.Is(collectErr, nodeaddrs.ErrPermission) {
		return NodeAddrs{}, collectErr
	}
	if err := d.syncInboundPods(cgs); err != nil {
		return NodeAddrs{}, err
	}
	nodeaddrs.CollectNetns(owners, extraNetns)
	addrs, err := d.SyncNodeAddrs(owners)
	if err == nil && collectErr != nil {
		// Partial: what was found is in force, the rest stays unpaired.
		d.log.Warn("pod-to-pod pairing is partial", zap.Error(collectErr))
		err = collectErr
	}
	return addrs, err
}

// syncInboundPods makes inbound_pods hold the addresses of the namespaces
// of the redirect-mode (iptables) sidecar cgroups among cgs, with their
// sidecar's inbound port: connections to them are paired with that sidecar.
func (d *Dataplane) syncInboundPods(cgs []cgroup.Cgroup) error {
	want := map[nodeAddrKey]uint32{}
	for _, cg := range cgs {
		var cfg cgroupConfig
		if d.maps[PinCgroupConfig].Lookup(cg.ID, &cfg) != nil || cfg.MeshMode != MeshRedirect || cfg.InboundPort == 0 {
			continue
		}
		owners, err := nodeaddrs.Collect([]cgroup.Cgroup{cg})
		if err != nil && !errors.Is(err, nodeaddrs.ErrPermission) {
			return err
		}
		for addr := range owners {
			want[nodeAddrKey{IP: addr.As16()}] = uint32(cfg.InboundPort)
		}
	}
	m := d.maps[PinInboundPods]
	var stale []nodeAddrKey
	var k nodeAddrKey
	var v uint32
	it := m.Iterate()
	for it.Next(&k, &v) {
		if _, ok := want[k]; !ok {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read inbound pods: %w", err)
	}
	for _, k := range stale {
		m.Delete(k)
	}
	for k, v := range want {
		if err := m.Put(k, v); err != nil {
			return fmt.Errorf("write inbound pod %s: %w", netip.AddrFrom16(k.IP).Unmap(), err)
		}
	}
	return nil
}
