package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/cilium/ebpf/link"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/mesh"
)

// Mesh modes (struct cgroup_config.mesh_mode).
const (
	MeshRedirect  = 1
	MeshIntercept = 2
)

// MeshOptions put an enabled cgroup (a pod with a sidecar) in sidecar mode.
type MeshOptions struct {
	// Intercept sends the app's connects to the sidecar with
	// cgroup/connect4 (no iptables needed) and answers SO_ORIGINAL_DST;
	// otherwise iptables REDIRECT is expected and app and sidecar sockets
	// are paired through the tuple their SYN had after NAT.
	Intercept bool
	// SidecarUID is the uid the sidecar runs as: its connects are never
	// intercepted.
	SidecarUID uint32
	// OutboundPort and InboundPort are the sidecar's ports.
	OutboundPort, InboundPort uint16
	// ExcludePorts and ExcludeCIDRs are destinations never intercepted
	// (like Istio's excludeOutboundPorts and excludeOutboundIPRanges).
	ExcludePorts []uint16
	ExcludeCIDRs []netip.Prefix
}

// Mode returns "redirect" or "intercept".
func (m *MeshOptions) Mode() string {
	if m.Intercept {
		return "intercept"
	}
	return "redirect"
}

func (m *MeshOptions) fill(cfg *cgroupConfig) error {
	if m.OutboundPort == 0 {
		return errors.New("sidecar mode needs an outbound port (--outbound-port)")
	}
	if len(m.ExcludePorts) > len(cfg.ExcludePorts) {
		return fmt.Errorf("at most %d excluded ports", len(cfg.ExcludePorts))
	}
	if len(m.ExcludeCIDRs) > len(cfg.ExcludeCIDRs) {
		return fmt.Errorf("at most %d excluded CIDRs", len(cfg.ExcludeCIDRs))
	}
	cfg.MeshMode = MeshRedirect
	if m.Intercept {
		cfg.MeshMode = MeshIntercept
	}
	cfg.SidecarUID = m.SidecarUID
	cfg.OutboundPort = m.OutboundPort
	cfg.InboundPort = m.InboundPort
	copy(cfg.ExcludePorts[:], m.ExcludePorts)
	for i, p := range m.ExcludeCIDRs {
		p = p.Masked()
		bits := p.Bits()
		if p.Addr().Is4() {
			bits += 96
		}
		cfg.ExcludeCIDRs[i] = cidrValue{IP: p.Addr().As16(), Prefix: uint32(bits)}
	}
	cfg.NExcludeCIDRs = uint32(len(m.ExcludeCIDRs))
	return nil
}

func (d *Dataplane) meshLinkPin(id uint64, suffix string) string {
	return d.cgroupLinkPin(id) + "-" + suffix
}

// syncMeshLinks attaches the sidecar-mode programs to cg when want is set
// (those not attached yet), or detaches them when it is not. It returns how
// to undo what it attached.
func (d *Dataplane) syncMeshLinks(cg cgroup.Cgroup, want bool) ([]func(), error) {
	if !want {
		return nil, d.unpinMeshLinks(cg.ID)
	}
	var undo []func()
	for _, p := range mesh.Programs {
		pin := d.meshLinkPin(cg.ID, p.Suffix)
		if _, err := os.Stat(pin); err == nil {
			continue
		}
		prog, err := mesh.Load(p.Name, cg.ID, d.maps)
		if err != nil {
			return undo, err
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cg.Path, Attach: p.Attach, Program: prog})
		prog.Close()
		if err != nil {
			return undo, fmt.Errorf("attach %s: %w", p.Name, err)
		}
		err = l.Pin(pin)
		l.Close()
		if err != nil {
			return undo, fmt.Errorf("pin %s: %w", pin, err)
		}
		undo = append(undo, func() { os.Remove(pin) })
	}
	return undo, nil
}

// unpinMeshLinks detaches the sidecar-mode programs of a cgroup.
func (d *Dataplane) unpinMeshLinks(id uint64) error {
	for _, p := range mesh.Programs {
		pin := d.meshLinkPin(id, p.Suffix)
		if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("unpin %s: %w", pin, err)
		}
	}
	return nil
}
