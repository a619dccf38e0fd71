package dataplane

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/skmsg"
	"github.com/sockbypass/sockbypass/sockops"
	"github.com/sockbypass/sockbypass/tc"
)

// cgroupProgram is one row of the table of programs attached to an enabled
// cgroup. Enable, disable, Upgrade, status and Uninstall (through disable)
// all walk cgroupPrograms: adding a program is one row.
type cgroupProgram struct {
	// What names the program in errors and logs.
	What string
	// Program is its name in its collection; Spec loads that collection.
	Program string
	Spec    func() (*ebpf.CollectionSpec, error)
	// Suffix names its link pin: cgroups/<id><Suffix>.
	Suffix string
	Attach ebpf.AttachType
	// SidecarOnly: attached only to cgroups in sidecar mode.
	SidecarOnly bool
	// AccountOnly: attached only to account-only cgroups; Accelerated:
	// only to the others (see appliesTo).
	AccountOnly bool
	Accelerated bool
	// Quota: the program sets the cgroup's intercept quota (see
	// InterceptQuota) as its constant cgroup.InterceptQuotaConstant.
	Quota bool
}

// InterceptQuota is how many intercepted handshakes in flight (orig_dsts
// entries) one cgroup in intercept mode may hold, for an orig_dsts map of
// capacity n: an eighth of it, so one pod cannot fill it for the others.
// Past it, the cgroup's connects go where they asked, unintercepted
// (counter intercepts_over_quota).
func InterceptQuota(n uint32) uint64 { return uint64(n / 8) }

// cgroupPrograms are the per-cgroup programs. The sock_ops program comes
// first: its link pin (no suffix) is what marks a cgroup enabled.
var cgroupPrograms = []cgroupProgram{
	{What: "sock_ops", Program: sockops.ProgramName, Spec: sockops.LoadSpec, Suffix: "", Attach: ebpf.AttachCGroupSockOps},
	// Stack bytes to local peers: counted per socket at close in
	// accelerated cgroups, per packet in account-only ones (whose egress
	// program also counts would_redirect_bytes).
	{What: "cgroup/sock_release accounting", Program: cgroup.ReleaseProgram, Spec: cgroup.LoadReleaseSpec, Suffix: "-release", Attach: ebpf.AttachCgroupInetSockRelease, Accelerated: true},
	{What: "cgroup_skb/egress accounting", Program: cgroup.EgressProgram, Spec: cgroup.LoadEgressSpec, Suffix: "-account", Attach: ebpf.AttachCGroupInetEgress, AccountOnly: true},
	{What: "cgroup/connect4", Program: cgroup.Connect4Program, Spec: cgroup.LoadSidecarSpec, Suffix: "-connect4", Attach: ebpf.AttachCGroupInet4Connect, SidecarOnly: true, Quota: true},
	{What: "cgroup/connect6", Program: cgroup.Connect6Program, Spec: cgroup.LoadSidecarSpec, Suffix: "-connect6", Attach: ebpf.AttachCGroupInet6Connect, SidecarOnly: true, Quota: true},
	{What: "cgroup/getsockopt", Program: cgroup.GetsockoptProgram, Spec: cgroup.LoadSidecarSpec, Suffix: "-getsockopt", Attach: ebpf.AttachCGroupGetsockopt, SidecarOnly: true},
	{What: "cgroup_skb/egress (sidecar SYNs)", Program: cgroup.SidecarEgressProgram, Spec: cgroup.LoadSidecarSpec, Suffix: "-egress", Attach: ebpf.AttachCGroupInetEgress, SidecarOnly: true},
}

// appliesTo reports whether p is attached to a cgroup with the settings
// cfg: sidecar rows in sidecar mode only, and the accounting rows by
// whether the cgroup is account-only.
func (p cgroupProgram) appliesTo(cfg cgroupConfig) bool {
	accountOnly := cfg.Flags&cgroupAccountOnly != 0
	switch {
	case p.SidecarOnly && cfg.MeshMode != MeshRedirect && cfg.MeshMode != MeshIntercept:
		return false
	case p.AccountOnly && !accountOnly, p.Accelerated && accountOnly:
		return false
	}
	return true
}

// load loads p's instance for the cgroup id, whose slot is slot, over the
// pinned maps. The caller owns the program.
func (p cgroupProgram) load(id uint64, slot uint32, maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	consts := map[string]any{sockops.CgroupIDConstant: id, sockops.CgroupSlotConstant: slot}
	if p.Quota {
		consts[cgroup.InterceptQuotaConstant] = InterceptQuota(maps[PinOrigDsts].MaxEntries())
	}
	return loadProgram(p.What, p.Spec, p.Program, consts, maps)
}

// The node-wide programs, loaded by create and Upgrade, and the TC
// attachment.
func loadSkMsg(maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	return loadProgram("sk_msg", skmsg.LoadSpec, skmsg.ProgramName, nil, maps)
}

// loadStackRead loads the stack-read tracer (see "Probation" in
// bpf/sockbypass.h) over the pinned maps.
func loadStackRead(maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	return loadProgram("stack-read tracer", sockops.LoadStackReadSpec, sockops.StackReadProgramName, nil, maps)
}

// attachStackRead attaches the stack-read tracer to its tracepoint and pins
// the link at pin, over whatever link was pinned there: the old one
// detaches once the new one is attached (the tracer is idempotent, two at a
// time do no harm, and none would let a splice pass unseen).
func attachStackRead(prog *ebpf.Program, pin string) error {
	l, err := link.AttachTracing(link.TracingOptions{Program: prog})
	if err != nil {
		return fmt.Errorf("attach stack-read tracer (tp_btf/tcp_rcv_space_adjust): %w", err)
	}
	defer l.Close() // detaches unless pinned
	return repinLink(l, pin)
}

func loadTC(l2Len uint32, maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	return loadProgram("tc", tc.LoadSpec, tc.ProgramName, map[string]any{tc.L2LenConstant: l2Len}, maps)
}

// loadProgram loads the program name of the collection loadSpec returns,
// with its constants set to consts and its maps replaced by the pinned
// maps (by name). The caller owns the program.
func loadProgram(what string, loadSpec func() (*ebpf.CollectionSpec, error), name string, consts map[string]any, maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	spec, err := loadSpec()
	if err != nil {
		return nil, err
	}
	for c, v := range consts {
		vs, ok := spec.Variables[c]
		if !ok {
			return nil, fmt.Errorf("load %s program: no constant %s", what, c)
		}
		if err := vs.Set(v); err != nil {
			return nil, fmt.Errorf("load %s program: set %s: %w", what, c, err)
		}
	}
	if _, ok := spec.Programs[name]; !ok {
		return nil, fmt.Errorf("load %s program: no program %s in its object", what, name)
	}
	for n := range spec.Programs {
		if n != name {
			delete(spec.Programs, n)
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: fitReplacements(spec, maps)})
	if err != nil {
		return nil, fmt.Errorf("load %s program: %w", what, err)
	}
	defer coll.Close()
	return coll.DetachProgram(name), nil
}

// fitReplacements makes spec's maps agree with the pinned maps that will
// replace them, in the property the user may size (max_entries), and
// drops the replacements spec does not declare. cilium/ebpf refuses a
// replacement whose spec differs; the sizes are decided once, when the
// pinned maps are created.
func fitReplacements(spec *ebpf.CollectionSpec, maps map[string]*ebpf.Map) map[string]*ebpf.Map {
	out := make(map[string]*ebpf.Map, len(maps))
	for name, m := range maps {
		ms, ok := spec.Maps[name]
		if !ok {
			continue
		}
		ms.MaxEntries = m.MaxEntries()
		out[name] = m
	}
	return out
}

// pinPath is the pin of name (one of the Pin* and Dir* names) in the pin
// directory dir, or below it with more path elements. Every pin is built
// here or by the helpers below.
func pinPath(dir, name string, below ...string) string {
	return filepath.Join(append([]string{dir, name}, below...)...)
}

// pin is the pin of name in d's pin directory.
func (d *Dataplane) pin(name string) string { return pinPath(d.pinDir, name) }

// cgroupPin is the link pin of program p for the cgroup id.
func (d *Dataplane) cgroupPin(id uint64, p cgroupProgram) string {
	return pinPath(d.pinDir, DirCgroups, strconv.FormatUint(id, 10)+p.Suffix)
}

// cgroupLinkPin is the sock_ops link pin of the cgroup id: it exists while
// the cgroup is enabled.
func (d *Dataplane) cgroupLinkPin(id uint64) string { return d.cgroupPin(id, cgroupPrograms[0]) }

// tcPin is the pin of the TC attachment of a device: its tcx link, or with
// clsact the program: tc/<netns inode>-<ifindex>.
func (d *Dataplane) tcPin(key tcDeviceKey) string {
	return pinPath(d.pinDir, DirTC, strconv.FormatUint(key.NetnsIno, 10)+"-"+strconv.FormatUint(uint64(key.Ifindex), 10))
}

// attachCgroupProgram attaches p (for slot) to cg and pins its link, unless it is
// pinned already. It returns how to undo what it did (nil when nothing was
// done).
func (d *Dataplane) attachCgroupProgram(cg cgroup.Cgroup, slot uint32, p cgroupProgram) (func(), error) {
	pin := d.cgroupPin(cg.ID, p)
	if _, err := os.Stat(pin); err == nil {
		return nil, nil
	}
	prog, err := p.load(cg.ID, slot, d.maps)
	if err != nil {
		return nil, err
	}
	defer prog.Close()
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cg.Path, Attach: p.Attach, Program: prog})
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", p.What, err)
	}
	defer l.Close() // detaches unless pinned
	if err := l.Pin(pin); err != nil {
		return nil, fmt.Errorf("pin %s link (this kernel needs bpf_link support for cgroups, Linux 5.7+): %w", p.What, err)
	}
	return func() { unpinLink(pin) }, nil
}

// convergePrograms makes the programs attached to cg exactly the rows of
// the table that apply to cfg: it attaches the missing ones first, then
// detaches the others. It returns how to undo the attachments it made.
func (d *Dataplane) convergePrograms(cg cgroup.Cgroup, slot uint32, cfg cgroupConfig) ([]func(), error) {
	var undo []func()
	for _, p := range cgroupPrograms {
		if !p.appliesTo(cfg) {
			continue
		}
		undoAttach, err := d.attachCgroupProgram(cg, slot, p)
		if err != nil {
			return undo, err
		}
		if undoAttach != nil {
			undo = append(undo, undoAttach)
		}
	}
	for _, p := range cgroupPrograms {
		if p.appliesTo(cfg) {
			continue
		}
		if err := d.detachCgroupProgram(cg.ID, p); err != nil {
			return undo, err
		}
	}
	return undo, nil
}

// detachCgroupProgram unpins (so detaches) p's link of the cgroup id, if
// it is pinned.
func (d *Dataplane) detachCgroupProgram(id uint64, p cgroupProgram) error {
	if err := unpinLink(d.cgroupPin(id, p)); err != nil {
		return fmt.Errorf("unpin %s link: %w", p.What, err)
	}
	return nil
}

// unpinLink removes the pin of a link and detaches it before returning
// (nothing when there is no pin). Removing the pin file alone would leave
// the detach to a kernel work item, after the caller has returned.
func unpinLink(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer l.Close() // the last reference: detaches now
	return l.Unpin()
}
