package dataplane

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/tc"
)

// LayoutVersion is the version of the pin layout and map formats this
// binary writes and reads: bump it whenever a shared struct or map changes
// (TestLayoutVersionFollowsTheMaps checks it against the maps' BTF). Open refuses any other version with an error
// that says what to do; it never rewrites or removes foreign state.
const LayoutVersion = 12 // 12: offer_hints holds 1024 slots, each slot's two epochs side by side (offer_hint_index), and no cgroup/setsockopt program (reader options are read from the socket); 11: offer_hints and offer_epoch (both ends look pairs up only when their slot counts an offer), pair.hint_index; 10: orig_dsts is a plain hash whose entries name their slot, the intercepts map (per-cgroup intercept quota), cgroup_counters.intercepts_over_quota and intercepts_unrecorded; 9: pairs is a plain hash (no eviction), pair.offered_ns, cgroup_counters.pairs_full and listeners_full, sock_state.own_blocking_at, listeners and mesh_endpoints values tagged with their slot; 8: listeners on probation and the stack-read tracer (sock_state flags PROBATION and SPLICED, LISTENER_PROVEN, cgroup_counters.sockets_probation, splice_readers and splice_stalled, stack_procs' splicer bit); 7: sock_state.peer_state, peer_file and 64-bit flags, pair.client_state and server_state, cgroup_counters.late_blocking and members_left (leaving members); 6: cgroup_counters and cgroup_config are arrays indexed by slot (cgroup_slots), sock_state.slot; 5: listeners values are u64 (short-lived listeners), cgroup_counters.connections_short_lived, sock_state.msgs_sent

// PinLayout is the pin of the one-entry array map that holds the layout
// version.
const PinLayout = "layout_version"

var layoutSpec = &ebpf.MapSpec{
	Name:       "layout_version",
	Type:       ebpf.Array,
	KeySize:    4,
	ValueSize:  4,
	MaxEntries: 1,
	Key:        &btf.Int{Name: "__u32", Size: 4},
	Value:      &btf.Int{Name: "__u32", Size: 4},
}

// createLayoutMap creates the layout version map, set to LayoutVersion.
func createLayoutMap() (*ebpf.Map, error) {
	m, err := ebpf.NewMap(layoutSpec)
	if err != nil {
		return nil, fmt.Errorf("create layout version map: %w", err)
	}
	if err := m.Put(uint32(0), uint32(LayoutVersion)); err != nil {
		m.Close()
		return nil, fmt.Errorf("write layout version: %w", err)
	}
	return m, nil
}

// checkLayout returns an error unless the state in pinDir has this
// binary's layout version.
func checkLayout(pinDir string) error {
	path := pinPath(pinDir, PinLayout)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return fmt.Errorf("%w: pinned state in %s has no layout version (%v); this binary cannot adopt it: run that version's uninstall, or `sockbypass uninstall --bpffs-dir %s` (live connections stay accelerated until they close)", ErrIncompatible, pinDir, err, pinDir)
	}
	defer m.Close()
	var v uint32
	if err := m.Lookup(uint32(0), &v); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if v != LayoutVersion {
		return fmt.Errorf("%w: pinned state in %s has layout version %d; this binary reads version %d and cannot migrate it: run the sockbypass that made it, or `sockbypass uninstall --bpffs-dir %s` first (live connections stay accelerated until they close)", ErrIncompatible, pinDir, v, LayoutVersion, pinDir)
	}
	return nil
}

// UpgradeReport says what Upgrade replaced.
type UpgradeReport struct {
	Cgroups int `json:"cgroups"`
	// RemovedCgroups were removed while enabled (their links severed):
	// upgrade disabled them.
	RemovedCgroups int `json:"removed_cgroups"`
	TCDevices      int `json:"tc_devices"`
	// LegacyTracerRemoved: the install had the read-progress tracer of
	// layouts 4 and before, which this upgrade unpinned (nothing replaces
	// it: senders read their peer's progress themselves).
	LegacyTracerRemoved bool `json:"legacy_tracer_removed"`
}

// Upgrade replaces every program of the pinned state with this binary's,
// keeping the maps, so counters continue and live connections keep
// flowing: cgroup, tcx and sockmap links are updated in place
// (BPF_LINK_UPDATE), clsact filters replaced, and the read-progress
// tracer of older installs, when pinned, is removed. Sockets already in the sockhash
// keep the sk_msg program they were inserted with until they close (the
// kernel gives each its own reference).
func (d *Dataplane) Upgrade() (UpgradeReport, error) {
	var rep UpgradeReport
	l, err := lock.Exclusive(d.pinDir)
	if err != nil {
		return rep, err
	}
	defer l.Unlock()

	ids, err := d.EnabledCgroupIDs()
	if err != nil {
		return rep, err
	}
	paths, err := cgroupPaths(ids)
	if err != nil {
		// The programs are still updated in place; the daemon's next
		// enable completes the table.
		d.log.Warn("cannot find the enabled cgroups' directories: programs new in this version are attached at their next enable", zap.Error(err))
	}
	for _, id := range ids {
		slot, ok, err := d.slotOf(id)
		if err != nil {
			return rep, fmt.Errorf("upgrade cgroup id %d: %w", id, err)
		}
		if !ok {
			return rep, fmt.Errorf("upgrade cgroup id %d: it has no slot in %s; disable and enable it again", id, d.pin(PinCgroupSlots))
		}
		removed := false
		for _, p := range cgroupPrograms {
			err := updateLink(d.cgroupPin(id, p), func() (*ebpf.Program, error) { return p.load(id, slot, d.maps) })
			if errors.Is(err, unix.ENOLINK) {
				// The cgroup was removed while enabled: the kernel
				// severed its links. It is disabled, as the daemon's
				// rescan would.
				removed = true
				break
			}
			if err != nil && (p.Suffix == "" || !errors.Is(err, os.ErrNotExist)) {
				return rep, fmt.Errorf("upgrade cgroup id %d: %s: %w", id, p.What, err)
			}
		}
		if removed {
			if _, err := d.disableLocked(id); err != nil {
				return rep, fmt.Errorf("upgrade: disable cgroup id %d, removed while enabled: %w", id, err)
			}
			d.log.Info("cgroup removed while enabled: disabled", zap.Uint64("cgroup_id", id))
			rep.RemovedCgroups++
			continue
		}
		// Rows this binary attaches that the old one did not (or the
		// other way round: accelerated cgroups count at close where
		// they counted per packet), as enable would.
		if err := d.convergeUpgraded(id, slot, paths); err != nil {
			return rep, fmt.Errorf("upgrade cgroup id %d: %w", id, err)
		}
		rep.Cgroups++
	}

	// sk_msg: the sockmap link, or the legacy attachment.
	newSkMsg, err := loadSkMsg(d.maps)
	if err != nil {
		return rep, err
	}
	defer newSkMsg.Close()
	linkPin := d.pin(PinSkMsgLink)
	if sl, err := link.LoadPinnedLink(linkPin, nil); err == nil {
		err = sl.Update(newSkMsg)
		sl.Close()
		if err != nil {
			return rep, fmt.Errorf("upgrade sk_msg link: %w", err)
		}
	} else if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: d.maps[PinSockhash].FD(), Program: newSkMsg, Attach: ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return rep, fmt.Errorf("upgrade sk_msg (legacy attach): %w", err)
	}
	if err := repin(newSkMsg, d.pin(PinSkMsg)); err != nil {
		return rep, err
	}

	// The stack-read tracer: a new link pinned over the old one.
	tracer, err := loadStackRead(d.maps)
	if err != nil {
		return rep, err
	}
	defer tracer.Close()
	if err := attachStackRead(tracer, d.pin(PinStackReadLink)); err != nil {
		return rep, fmt.Errorf("upgrade: %w", err)
	}
	if err := repin(tracer, d.pin(PinStackRead)); err != nil {
		return rep, err
	}

	// Builds before this one attached a read-progress tracer: senders
	// now read their peer's progress themselves, so it goes.
	if l, err := link.LoadPinnedLink(d.pin(legacyPinRecvLink), nil); err == nil {
		err = l.Unpin()
		l.Close()
		if err != nil {
			return rep, fmt.Errorf("upgrade: unpin %s: %w", legacyPinRecvLink, err)
		}
		rep.LegacyTracerRemoved = true
	}

	devices, err := d.tcDevices()
	if err != nil {
		return rep, err
	}
	for key, v := range devices {
		netnsPath := cString(v.NetnsPath[:])
		var l2Len uint32
		err := inNetns(netnsPath, func() error {
			lnk, err := netlink.LinkByIndex(int(key.Ifindex))
			if err != nil {
				return err
			}
			if lnk.Attrs().EncapType != "none" {
				l2Len = 14
			}
			return nil
		})
		if err != nil {
			d.log.Warn("tc device gone; not upgraded", zap.String("device", deviceOf(v).String()), zap.Error(err))
			continue
		}
		prog, err := loadTC(l2Len, d.maps)
		if err != nil {
			return rep, err
		}
		pin := d.tcPin(key)
		switch v.Mode {
		case tcAttachTCX:
			err = updateLink(pin, func() (*ebpf.Program, error) { return prog, nil })
		case tcAttachClsact:
			err = inNetns(netnsPath, func() error {
				_, err := tc.AttachClsact(prog, int(key.Ifindex)) // replaces our filter in place
				return err
			})
			if err == nil {
				err = repin(prog, pin)
			}
		}
		prog.Close()
		if err != nil {
			return rep, fmt.Errorf("upgrade tc on %s: %w", cString(v.Ifname[:]), err)
		}
		rep.TCDevices++
	}
	d.log.Info("upgraded programs", zap.Int("cgroups", rep.Cgroups), zap.Int("tc_devices", rep.TCDevices))
	return rep, nil
}

// cgroupPaths finds the directories of the cgroup ids.
func cgroupPaths(ids []uint64) (map[uint64]string, error) {
	m, err := cgroup.ReadMounts()
	if err != nil {
		return nil, err
	}
	return m.PathsByID(ids)
}

// convergeUpgraded attaches to the cgroup id the rows of the program table
// that apply to its settings and are not attached, and detaches those that
// no longer apply, once its pinned links were updated. A cgroup whose
// directory is not in paths is left as it is.
func (d *Dataplane) convergeUpgraded(id uint64, slot uint32, paths map[uint64]string) error {
	path := paths[id]
	if path == "" {
		return nil
	}
	cfg, ok := d.configOf(id)
	if !ok {
		return nil
	}
	_, err := d.convergePrograms(cgroup.Cgroup{Path: path, ID: id}, slot, cfg)
	return err
}

// updateLink swaps the program of the link pinned at pin for the one load
// returns.
func updateLink(pin string, load func() (*ebpf.Program, error)) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return err
	}
	defer l.Close()
	prog, err := load()
	if err != nil {
		return err
	}
	defer prog.Close()
	return l.Update(prog)
}

// repin pins prog at path in place of whatever is pinned there.
func repin(prog *ebpf.Program, path string) error {
	tmp := path + "-new"
	os.Remove(tmp)
	if err := prog.Pin(tmp); err != nil {
		return fmt.Errorf("pin %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("replace pin %s: %w", path, err)
	}
	return nil
}

func repinLink(l link.Link, path string) error {
	tmp := path + "-new"
	os.Remove(tmp)
	if err := l.Pin(tmp); err != nil {
		return fmt.Errorf("pin %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Unpin()
		return fmt.Errorf("replace pin %s: %w", path, err)
	}
	return nil
}

// ErrIncompatible is wrapped by Open when the pinned state was made by a
// sockbypass with another layout.
var ErrIncompatible = errors.New("pinned state made by an incompatible sockbypass")

// RemoveForeign removes pinned state that this binary cannot open (another
// layout version): it unpins every link, which detaches it, and every
// other pin, without reading any map. Sockets in its sockhash keep their
// acceleration until they close, as with Uninstall. A clsact filter of a
// legacy TC attachment may stay on its interface; it reports them.
func RemoveForeign(pinDir string, log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	l, err := lock.Exclusive(pinDir)
	if err != nil {
		return err
	}
	defer l.Unlock()
	var dirs []string
	err = filepath.WalkDir(pinDir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, path)
			return nil
		}
		if lk, err := link.LoadPinnedLink(path, nil); err == nil {
			err = lk.Unpin()
			lk.Close()
			if err != nil {
				return fmt.Errorf("unpin link %s: %w", path, err)
			}
			return nil
		}
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("remove %s: %w", path, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", dirs[i], err)
		}
	}
	log.Info("removed foreign pinned state", zap.String("pin_dir", pinDir))
	return nil
}
