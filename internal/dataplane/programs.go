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
	"github.com/sockbypass/sockbypass/internal/fallback"
	"github.com/sockbypass/sockbypass/internal/mesh"
	"github.com/sockbypass/sockbypass/sockops"
)

// cgroupProgram is one row of the table of programs attached to an enabled
// cgroup. Enable, disable, Upgrade and status all walk cgroupPrograms:
// adding a program is one row.
type cgroupProgram struct {
	// What names the program in errors and logs.
	What string
	// Suffix names its link pin: cgroups/<id><Suffix>.
	Suffix string
	Attach ebpf.AttachType
	// SidecarOnly: attached only to cgroups in sidecar mode.
	SidecarOnly bool
	// Load loads the cgroup's instance over the pinned maps.
	Load func(cgroupID uint64, maps map[string]*ebpf.Map) (*ebpf.Program, error)
}

// loadMesh loads a sidecar-mode program of internal/mesh by name.
func loadMesh(name string) func(uint64, map[string]*ebpf.Map) (*ebpf.Program, error) {
	return func(id uint64, maps map[string]*ebpf.Map) (*ebpf.Program, error) { return mesh.Load(name, id, maps) }
}

// cgroupPrograms are the per-cgroup programs. The sock_ops program comes
// first: its link pin (no suffix) is what marks a cgroup enabled.
var cgroupPrograms = []cgroupProgram{
	{What: "sock_ops", Suffix: "", Attach: ebpf.AttachCGroupSockOps, Load: sockops.Load},
	{What: "cgroup/setsockopt", Suffix: "-setsockopt", Attach: ebpf.AttachCGroupSetsockopt, Load: fallback.LoadSetsockopt},
	{What: "cgroup_skb/egress accounting", Suffix: "-account", Attach: ebpf.AttachCGroupInetEgress, Load: cgroup.LoadEgress},
	{What: "cgroup/connect4", Suffix: "-connect4", Attach: ebpf.AttachCGroupInet4Connect, SidecarOnly: true, Load: loadMesh(mesh.Connect4Program)},
	{What: "cgroup/connect6", Suffix: "-connect6", Attach: ebpf.AttachCGroupInet6Connect, SidecarOnly: true, Load: loadMesh(mesh.Connect6Program)},
	{What: "cgroup/getsockopt", Suffix: "-getsockopt", Attach: ebpf.AttachCGroupGetsockopt, SidecarOnly: true, Load: loadMesh(mesh.GetsockoptProgram)},
	{What: "cgroup_skb/egress (sidecar SYNs)", Suffix: "-egress", Attach: ebpf.AttachCGroupInetEgress, SidecarOnly: true, Load: loadMesh(mesh.EgressProgram)},
}

// cgroupPin is the link pin of program p for the cgroup id.
func (d *Dataplane) cgroupPin(id uint64, p cgroupProgram) string {
	return filepath.Join(d.pinDir, DirCgroups, strconv.FormatUint(id, 10)+p.Suffix)
}

// cgroupLinkPin is the sock_ops link pin of the cgroup id: it exists while
// the cgroup is enabled.
func (d *Dataplane) cgroupLinkPin(id uint64) string { return d.cgroupPin(id, cgroupPrograms[0]) }

// attachCgroupProgram attaches p to cg and pins its link, unless it is
// pinned already. It returns how to undo what it did (nil when nothing was
// done).
func (d *Dataplane) attachCgroupProgram(cg cgroup.Cgroup, p cgroupProgram) (func(), error) {
	pin := d.cgroupPin(cg.ID, p)
	if _, err := os.Stat(pin); err == nil {
		return nil, nil
	}
	prog, err := p.Load(cg.ID, d.maps)
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
