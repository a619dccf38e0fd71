package conns

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/internal/sockdiag"
)

// StackSample is what the live TCP sockets of one accelerated cgroup have
// sent through the stack to local peers so far: they are counted in
// stack_egress_* only when they close (cgroup/release.c).
type StackSample struct {
	// Bytes and Packets by the formula of cgroup/release.c, from each
	// socket's tcp_info (SocketStack).
	Bytes, Packets uint64
	// Sockets is how many live sockets were counted.
	Sockets int
}

// SocketStack is what one socket sent through the stack, by the formula
// the release program applies when it closes (cgroup/release.c): the
// payload transmitted once (bytes_sent minus bytes_retrans), plus what is
// written and not transmitted yet (notsent_bytes, without a FIN that
// shutdown queued); packets are the segments with payload less the
// retransmitted ones.
func SocketStack(state uint8, info *unix.TCPInfo) (bytes, packets uint64) {
	if info.Bytes_sent > info.Bytes_retrans {
		bytes = info.Bytes_sent - info.Bytes_retrans
	}
	unsent := uint64(info.Notsent_bytes)
	if unsent > 0 && (state == sockdiag.StateFinWait1 || state == sockdiag.StateClosing || state == sockdiag.StateLastAck) {
		unsent--
	}
	if state == sockdiag.StateClose {
		unsent = 0
	}
	if info.Data_segs_out > info.Total_retrans {
		packets = uint64(info.Data_segs_out - info.Total_retrans)
	}
	return bytes + unsent, packets
}

// peerLocal is the rule of peer_local in bpf/sockbypass.h: either end on
// loopback, both ends on one address, or the peer at a node address.
func peerLocal(local, remote netip.Addr, nodeAddrs map[netip.Addr]bool) bool {
	return local.IsLoopback() || remote.IsLoopback() || local == remote || nodeAddrs[remote]
}

// SampleStack samples, for each accelerated enabled cgroup, what its live
// TCP sockets with a local peer have sent through the stack so far. It
// lists the sockets of the network namespaces of the enabled cgroups'
// processes (and its own) with their tcp_info and sock_state, and counts
// the sockets the release program will count when they close: those
// sock_ops classified as having a local peer, in the cgroup that
// classified them, and the unclassified ones of an enabled cgroup's tree
// whose peer is local by the same rule (in the innermost enabled cgroup;
// the release program of each enabled ancestor counts those, as the
// egress program counted their packets). Sockets that were closed (no
// file holds them) are counted already, and left out.
//
// It also returns each cgroup's counters as read just before the sockets
// were listed: a socket that closes meanwhile is in neither (a reading a
// little low, never one counted twice); when the stack counters moved
// during the listing it tries again, twice at most.
func SampleStack(dp *dataplane.Dataplane, mounts cgroup.Mounts) (map[uint64]StackSample, map[uint64]dataplane.CgroupCounters, error) {
	l, err := lock.Shared(dp.PinDir())
	if err != nil {
		return nil, nil, err
	}
	defer l.Unlock()
	settings, err := dp.SlotSettings()
	if err != nil {
		return nil, nil, err
	}
	accelerated := false
	for _, s := range settings {
		accelerated = accelerated || (s.Enabled && !s.AccountOnly)
	}
	if !accelerated {
		c, err := dp.Counters()
		return map[uint64]StackSample{}, c, err
	}
	tree, pids, err := walkEnabled(mounts, settings)
	if err != nil {
		return nil, nil, err
	}
	nodeAddrs, err := dp.NodeAddrSet()
	if err != nil {
		return nil, nil, err
	}
	namespaces := namespacesOf(pids)
	stateMap := dp.SockStateMap()
	info, err := stateMap.Info()
	if err != nil {
		return nil, nil, fmt.Errorf("read sock_state map info: %w", err)
	}
	stateMapID, _ := info.ID()
	req := sockdiag.Request{States: sockdiag.ConnectedStates, StorageMapFDs: []int{stateMap.FD()}, TCPInfo: true}

	var sample map[uint64]StackSample
	var before map[uint64]dataplane.CgroupCounters
	for try := 0; try < 3; try++ {
		if before, err = dp.Counters(); err != nil {
			return nil, nil, err
		}
		sample = map[uint64]StackSample{}
		for i, path := range namespaces {
			var socks []sockdiag.Socket
			if i == 0 {
				socks, err = sockdiag.Dump(req)
			} else {
				socks, err = sockdiag.DumpNetns(path, req)
			}
			if i > 0 && (errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH)) {
				if _, serr := os.Stat(path); serr != nil {
					continue // the namespace went away
				}
			}
			if err != nil {
				return nil, nil, fmt.Errorf("list the TCP sockets of network namespace %s: %w", path, err)
			}
			for _, s := range socks {
				id, ok, err := stackCgroup(s, uint32(stateMapID), tree, settings, nodeAddrs)
				if err != nil {
					return nil, nil, err
				}
				if !ok {
					continue
				}
				b, p := SocketStack(s.State, s.TCPInfo)
				x := sample[id]
				x.Bytes += b
				x.Packets += p
				x.Sockets++
				sample[id] = x
			}
		}
		after, err := dp.Counters()
		if err != nil {
			return nil, nil, err
		}
		if sameStack(before, after) {
			break
		}
	}
	return sample, before, nil
}

// stackCgroup returns the accelerated cgroup whose release program will
// count the socket s, if any.
func stackCgroup(s sockdiag.Socket, stateMapID uint32, tree map[uint64]cgInfo, settings map[uint64]dataplane.SlotSettings, nodeAddrs map[netip.Addr]bool) (uint64, bool, error) {
	// Closed: the release program counted it.
	if s.Inode == 0 || s.TCPInfo == nil {
		return 0, false, nil
	}
	var id uint64
	classified := false
	for _, stg := range s.Storages {
		if stg.MapID != stateMapID {
			continue
		}
		st, err := dataplane.DecodeSockState(stg.Value)
		if err != nil {
			return 0, false, err
		}
		if st.Flags&(dataplane.SockFlagLocalPeer|dataplane.SockFlagRemotePeer) != 0 {
			if st.Flags&dataplane.SockFlagLocalPeer == 0 {
				return 0, false, nil
			}
			id, classified = st.CgroupId, true
		}
	}
	if !classified {
		cg, ok := tree[s.CgroupID]
		if !ok || !peerLocal(s.Local.Addr(), s.Remote.Addr(), nodeAddrs) {
			return 0, false, nil
		}
		id = cg.enabled
	}
	set, ok := settings[id]
	return id, ok && set.Enabled && !set.AccountOnly, nil
}

// sameStack reports whether no cgroup's stack counters moved from a to b.
func sameStack(a, b map[uint64]dataplane.CgroupCounters) bool {
	for id, x := range b {
		y := a[id]
		if x.StackEgressBytes != y.StackEgressBytes || x.StackEgressPackets != y.StackEgressPackets {
			return false
		}
	}
	return true
}

// namespacesOf returns the network namespaces of the caller and of pids,
// the caller's first, each once.
func namespacesOf(pids []int) []string {
	seen := map[uint64]bool{}
	var out []string
	add := func(path string) {
		var st unix.Stat_t
		if unix.Stat(path, &st) != nil || seen[st.Ino] {
			return
		}
		seen[st.Ino] = true
		out = append(out, path)
	}
	add("/proc/self/ns/net")
	for _, pid := range pids {
		add("/proc/" + strconv.Itoa(pid) + "/ns/net")
	}
	return out
}

// StackSampler adds the live sockets' stack bytes to what status reports,
// and keeps the figures it returns from going backwards: a socket that
// closes while its cgroup is sampled may be missed by one reading (see
// SampleStack), and a later one must not show less than an earlier one.
// Its zero value is ready; it is safe for concurrent use.
type StackSampler struct {
	mu   sync.Mutex
	seen map[uint64][2]uint64
}

// AddLive samples the live sockets (SampleStack) and sets the stack
// counters of st's enabled cgroups, and its totals, to what closed sockets
// counted plus what the live ones sent, never below what this sampler
// returned before for the same cgroup. When the sample fails it returns
// the error, and st's figures are still kept from going backwards.
func (s *StackSampler) AddLive(dp *dataplane.Dataplane, mounts cgroup.Mounts, st *dataplane.Status) error {
	sample, closed, err := SampleStack(dp, mounts)
	if err != nil {
		// What status read: the closed sockets only.
		sample, closed = nil, map[uint64]dataplane.CgroupCounters{}
		for _, c := range st.Cgroups {
			closed[c.ID] = c.Counters
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.seen == nil {
		s.seen = map[uint64][2]uint64{}
	}
	for i := range st.Cgroups {
		c := &st.Cgroups[i]
		live := sample[c.ID]
		bytes := closed[c.ID].StackEgressBytes + live.Bytes
		packets := closed[c.ID].StackEgressPackets + live.Packets
		prev := s.seen[c.ID]
		bytes, packets = max(bytes, prev[0], c.Counters.StackEgressBytes), max(packets, prev[1], c.Counters.StackEgressPackets)
		s.seen[c.ID] = [2]uint64{bytes, packets}
		st.Totals.StackEgressBytes += bytes - c.Counters.StackEgressBytes
		st.Totals.StackEgressPackets += packets - c.Counters.StackEgressPackets
		c.Counters.StackEgressBytes, c.Counters.StackEgressPackets = bytes, packets
	}
	return err
}
