package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/sockbypass/sockbypass/sockops"
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
	// intercepted. It is the uid in the pod: the datapath maps it through
	// the uid_map of the user namespace that owns the pod's network
	// namespace, as iptables' --uid-owner does.
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
	if len(m.ExcludeCIDRs) > len(cfg.ExcludeCidrs) {
		return fmt.Errorf("at most %d excluded CIDRs", len(cfg.ExcludeCidrs))
	}
	cfg.MeshMode = MeshRedirect
	if m.Intercept {
		cfg.MeshMode = MeshIntercept
	}
	cfg.SidecarUid = m.SidecarUID
	cfg.OutboundPort = m.OutboundPort
	cfg.InboundPort = m.InboundPort
	copy(cfg.ExcludePorts[:], m.ExcludePorts)
	for i, p := range m.ExcludeCIDRs {
		p = p.Masked()
		bits := p.Bits()
		if p.Addr().Is4() {
			bits += 96
		}
		cfg.ExcludeCidrs[i] = sockops.Cidr{Ip: sockops.AddrToC(p.Addr()), Prefix: uint32(bits)}
	}
	cfg.N_excludeCidrs = uint32(len(m.ExcludeCIDRs))
	return nil
}

// MeshPresets are the sidecar settings of the meshes sockbypass knows:
// the uid the sidecar runs as and its outbound and inbound ports.
var MeshPresets = map[string]MeshOptions{
	"istio":   {SidecarUID: 1337, OutboundPort: 15001, InboundPort: 15006},
	"linkerd": {SidecarUID: 2102, OutboundPort: 4140, InboundPort: 4143},
	"kuma":    {SidecarUID: 5678, OutboundPort: 15001, InboundPort: 15006},
}

// MeshSettings are the sidecar settings as users write them: a preset and
// overrides (zero values keep the preset's).
type MeshSettings struct {
	Name         string
	Intercept    bool
	SidecarUID   *uint32
	OutboundPort uint16
	InboundPort  uint16
	ExcludePorts []uint16
	ExcludeCIDRs []netip.Prefix
}

// Options resolves the preset and the overrides. It returns an error that
// names the bad value.
func (s MeshSettings) Options() (*MeshOptions, error) {
	preset, ok := MeshPresets[s.Name]
	if !ok {
		return nil, fmt.Errorf("mesh %q: use istio, linkerd or kuma (and override ports and uid as needed)", s.Name)
	}
	o := preset
	o.Intercept = s.Intercept
	if s.SidecarUID != nil {
		o.SidecarUID = *s.SidecarUID
	}
	if s.OutboundPort != 0 {
		o.OutboundPort = s.OutboundPort
	}
	if s.InboundPort != 0 {
		o.InboundPort = s.InboundPort
	}
	o.ExcludePorts = s.ExcludePorts
	o.ExcludeCIDRs = s.ExcludeCIDRs
	if err := o.fill(&cgroupConfig{}); err != nil {
		return nil, err
	}
	return &o, nil
}

// ParsePorts parses "15090,15021" (what --exclude-ports takes).
func ParsePorts(s string) ([]uint16, error) {
	var out []uint16
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }) {
		p, err := strconv.ParseUint(f, 10, 16)
		if err != nil || p == 0 {
			return nil, fmt.Errorf("port %q: use a number from 1 to 65535", f)
		}
		out = append(out, uint16(p))
	}
	return out, nil
}

// ParseCIDRs parses "10.0.0.0/8,fd00::/8" (what --exclude-cidrs takes).
func ParseCIDRs(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }) {
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("CIDR %q: write it as 10.0.0.0/8 or fd00::/8", f)
		}
		out = append(out, p)
	}
	return out, nil
}
