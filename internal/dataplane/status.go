package dataplane

import (
	"errors"
	"fmt"
	"os"
	"sort"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/sockops"
)

// Status is a snapshot of the pinned state.
type Status struct {
	// PinDir is the pin directory.
	PinDir string `json:"pin_dir"`
	// SkMsgProgramID is the kernel id of the sk_msg program.
	SkMsgProgramID uint32 `json:"sk_msg_program_id"`
	// SkMsgAttach is "link" (sockmap bpf_link) or "legacy" (BPF_PROG_ATTACH).
	SkMsgAttach string `json:"sk_msg_attach"`
	// SockhashMapID is the kernel id of the sockhash.
	SockhashMapID uint32 `json:"sockhash_map_id"`
	// SockhashCapacity is the sockhash's max_entries.
	SockhashCapacity uint32 `json:"sockhash_capacity"`
	// LiveSockets is the number of sockets in the sockhash now.
	LiveSockets int `json:"live_sockets"`
	// Cgroups lists the enabled cgroups.
	Cgroups []CgroupStatus `json:"cgroups"`
	// TCDevices lists the interfaces with TC egress accounting.
	TCDevices []TCDeviceStatus `json:"tc_devices"`
	// NodeAddrs says which addresses pair across namespaces.
	NodeAddrs NodeAddrs `json:"node_addresses"`
	// DisabledCgroups lists the cgroups that are no longer enabled but
	// still have accelerated sockets (Mode "disabled"): their counters
	// still move.
	DisabledCgroups []CgroupStatus `json:"disabled_cgroups"`
	// Unattributed counts what belongs to no enabled cgroup and to none
	// of DisabledCgroups: stack egress of sockets outside enabled
	// cgroups, and the counters of cgroups disabled since (their sockets
	// closed). Cgroups, DisabledCgroups and Unattributed add up to Totals.
	Unattributed CgroupCounters `json:"unattributed"`
	// Totals sums the counters of every cgroup, including cgroups that are
	// no longer enabled and what could not be attributed to one.
	Totals CgroupCounters `json:"totals"`
}

// ProgramCost is what a program has cost since it was loaded, as the
// kernel's BPF statistics count it: only while they are on
// (kernel.bpf_stats_enabled=1, or a BPF_ENABLE_STATS holder).
type ProgramCost struct {
	Runs      uint64 `json:"runs"`
	RunTimeNs uint64 `json:"run_time_ns"`
}

// PerRunNs is the mean run time of one run, 0 without runs.
func (c ProgramCost) PerRunNs() uint64 {
	if c.Runs == 0 {
		return 0
	}
	return c.RunTimeNs / c.Runs
}

// programCost reads the statistics of program id (nil when it is gone).
func programCost(id ebpf.ProgramID) *ProgramCost {
	prog, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return nil
	}
	defer prog.Close()
	st, err := prog.Stats()
	if err != nil {
		return nil
	}
	return &ProgramCost{Runs: st.RunCount, RunTimeNs: uint64(st.Runtime)}
}

// CgroupStatus describes one enabled cgroup (or a disabled one with live
// accelerated sockets).
type CgroupStatus struct {
	// ID is the cgroup id.
	ID uint64 `json:"id"`
	// Path is the cgroup's directory, "" when the cgroup was removed.
	Path string `json:"path"`
	// Slot indexes its counters and settings in cgroup_counters and
	// cgroup_config (see "Slots" in bpf/sockbypass.h).
	Slot uint32 `json:"slot"`
	// SockOpsProgramID is the kernel id of its sock_ops program.
	SockOpsProgramID uint32 `json:"sock_ops_program_id"`
	// LinkID is the kernel id of its cgroup link.
	LinkID uint32 `json:"link_id"`
	// LiveSockets is the number of its sockets in the sockhash now.
	LiveSockets int `json:"live_sockets"`
	// Mode is "accelerate" or "account-only"; "disabled" for a cgroup
	// that is no longer enabled and still has accelerated sockets.
	Mode string `json:"mode"`
	// Mesh is the sidecar mode: "", "redirect" or "intercept".
	Mesh string `json:"mesh,omitempty"`
	// Settings are every setting it was enabled with (nil for a
	// disabled cgroup).
	Settings *CgroupSettings `json:"settings,omitempty"`
	// Counters are its counters, summed over CPUs.
	Counters CgroupCounters `json:"counters"`
	// Programs are the programs attached to it, one per row of the
	// program table that applies to its mode, sock_ops first.
	Programs []CgroupProgramStatus `json:"programs,omitempty"`
}

// CgroupProgramStatus is one program attached to an enabled cgroup.
type CgroupProgramStatus struct {
	// Program names it as the program table does ("sock_ops",
	// "cgroup/sock_release accounting", ...).
	Program string `json:"program"`
	// Attach is its attach type, as bpftool cgroup show prints it.
	Attach string `json:"attach"`
	// ProgramID and LinkID are the kernel ids of the program and its link.
	ProgramID uint32 `json:"program_id"`
	LinkID    uint32 `json:"link_id"`
	// Pin is its link's pin.
	Pin string `json:"pin"`
}

// cgroupProgramStatus walks the program table for the cgroup id: each
// program whose link is pinned, with its ids.
func (d *Dataplane) cgroupProgramStatus(id uint64) ([]CgroupProgramStatus, error) {
	var out []CgroupProgramStatus
	for _, p := range cgroupPrograms {
		pin := d.cgroupPin(id, p)
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue // not attached in this mode
		}
		if err != nil {
			return nil, fmt.Errorf("open the %s link of cgroup id %d: %w", p.What, id, err)
		}
		ps := CgroupProgramStatus{Program: p.What, Attach: p.Attach.String(), Pin: pin}
		if info, err := l.Info(); err == nil {
			ps.LinkID = uint32(info.ID)
			ps.ProgramID = uint32(info.Program)
		}
		l.Close()
		out = append(out, ps)
	}
	return out, nil
}

// Counters returns the counters of every cgroup id that has a slot
// (enabled, or disabled and not yet replaced), summed over CPUs. Id 0 holds
// what could not be attributed to an enabled cgroup.
func (d *Dataplane) Counters() (map[uint64]CgroupCounters, error) {
	slots, err := d.slots()
	if err != nil {
		return nil, err
	}
	slots[0] = 0
	out := make(map[uint64]CgroupCounters, len(slots))
	for id, slot := range slots {
		var perCPU []sockops.CgroupCounters
		if err := d.maps[PinCounters].Lookup(slot, &perCPU); err != nil {
			return nil, fmt.Errorf("read the counters of cgroup id %d (slot %d): %w", id, slot, err)
		}
		var sum CgroupCounters
		for _, c := range perCPU {
			sum.Add(countersFromC(c))
		}
		out[id] = sum
	}
	return out, nil
}

// Sockets returns the keys of the sockets in the sockhash, with their
// socket cookies.
func (d *Dataplane) Sockets() (map[SockKey]uint64, error) {
	return readMap[SockKey, uint64](d.maps[PinSockhash], PinSockhash)
}

// Status returns a snapshot of the pinned state.
func (d *Dataplane) Status() (*Status, error) {
	l, err := lock.Shared(d.pinDir)
	if err != nil {
		return nil, err
	}
	defer l.Unlock()

	st := &Status{PinDir: d.pinDir, Cgroups: []CgroupStatus{}, DisabledCgroups: []CgroupStatus{}}
	sockhash := d.maps[PinSockhash]
	st.SockhashCapacity = sockhash.MaxEntries()
	if info, err := sockhash.Info(); err == nil {
		if id, ok := info.ID(); ok {
			st.SockhashMapID = uint32(id)
		}
	}
	if prog, err := ebpf.LoadPinnedProgram(d.pin(PinSkMsg), nil); err == nil {
		if info, err := prog.Info(); err == nil {
			if id, ok := info.ID(); ok {
				st.SkMsgProgramID = uint32(id)
			}
		}
		prog.Close()
	}
	st.SkMsgAttach = attachLegacy
	if l, err := link.LoadPinnedLink(d.pin(PinSkMsgLink), nil); err == nil {
		st.SkMsgAttach = attachLink
		l.Close()
	}

	socks, err := d.Sockets()
	if err != nil {
		return nil, err
	}
	st.LiveSockets = len(socks)
	live, err := d.liveSocketsByCgroup(socks)
	if err != nil {
		return nil, err
	}
	if st.TCDevices, err = d.tcDeviceStatus(); err != nil {
		return nil, err
	}
	if st.NodeAddrs, err = d.nodeAddrs(); err != nil {
		return nil, err
	}

	counters, err := d.Counters()
	if err != nil {
		return nil, err
	}
	for _, c := range counters {
		st.Totals.Add(c)
	}
	st.Unattributed = counters[0]

	ids, paths, _, err := d.enabledCgroupPaths()
	if err != nil {
		return nil, err
	}
	slots, err := d.slots()
	if err != nil {
		return nil, err
	}
	tcByCgroup, err := d.tcDevicesByCgroup()
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		cs := CgroupStatus{ID: id, Slot: slots[id], Counters: counters[id], LiveSockets: live[id], Mode: "accelerate"}
		if cfg, ok := d.configOf(id); ok {
			settings := settingsOf(cfg, tcByCgroup[id])
			cs.Settings = &settings
			if cfg.Flags&cgroupAccountOnly != 0 {
				cs.Mode = "account-only"
			}
			switch cfg.MeshMode {
			case MeshRedirect:
				cs.Mesh = "redirect"
			case MeshIntercept:
				cs.Mesh = "intercept"
			}
		}
		if l, err := link.LoadPinnedLink(d.cgroupLinkPin(id), nil); err == nil {
			if info, err := l.Info(); err == nil {
				cs.LinkID = uint32(info.ID)
				cs.SockOpsProgramID = uint32(info.Program)
			}
			l.Close()
		} else if !errors.Is(err, ebpf.ErrNotSupported) {
			return nil, fmt.Errorf("open link of cgroup id %d: %w", id, err)
		}
		if cs.Programs, err = d.cgroupProgramStatus(id); err != nil {
			return nil, err
		}
		cs.Path = paths[id]
		st.Cgroups = append(st.Cgroups, cs)
	}
	sort.Slice(st.Cgroups, func(i, j int) bool { return st.Cgroups[i].Path < st.Cgroups[j].Path })

	// Cgroups no longer enabled: those with accelerated sockets left get
	// a row of their own, the others count as no enabled cgroup.
	enabled := map[uint64]bool{0: true}
	for _, id := range ids {
		enabled[id] = true
	}
	var disabled []uint64
	for id, c := range counters {
		if enabled[id] {
			continue
		}
		if live[id] == 0 {
			st.Unattributed.Add(c)
			continue
		}
		disabled = append(disabled, id)
	}
	if len(disabled) > 0 {
		mounts, err := cgroup.ReadMounts()
		if err != nil {
			return nil, err
		}
		paths, err := mounts.PathsByID(disabled)
		if err != nil {
			return nil, err
		}
		for _, id := range disabled {
			st.DisabledCgroups = append(st.DisabledCgroups, CgroupStatus{ID: id, Slot: slots[id], Path: paths[id], Mode: "disabled", LiveSockets: live[id], Counters: counters[id]})
		}
		sort.Slice(st.DisabledCgroups, func(i, j int) bool { return st.DisabledCgroups[i].ID < st.DisabledCgroups[j].ID })
	}
	return st, nil
}

// liveSocketsByCgroup counts the sockets of socks (the sockhash) per
// enabled cgroup, through the socket_cgroups map.
func (d *Dataplane) liveSocketsByCgroup(socks map[SockKey]uint64) (map[uint64]int, error) {
	inSockhash := make(map[uint64]bool, len(socks))
	for _, cookie := range socks {
		inSockhash[cookie] = true
	}
	out := map[uint64]int{}
	var cookie, cgroupID uint64
	it := d.maps[PinSocketCgs].Iterate()
	for it.Next(&cookie, &cgroupID) {
		if inSockhash[cookie] {
			out[cgroupID]++
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read socket cgroups: %w", err)
	}
	return out, nil
}
