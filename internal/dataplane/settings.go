package dataplane

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/sockops"
)

// CgroupSettings are the settings an enabled cgroup was last enabled
// with, as the datapath holds them (cgroup_config and tc_users): what
// enable converges on and what status shows.
type CgroupSettings struct {
	// AccountOnly: counted, not accelerated (enable --account-only).
	AccountOnly bool `json:"account_only"`
	// AllConnections: short-lived connections are paired too (enable
	// --all-connections).
	AllConnections bool `json:"all_connections"`
	// NoProbation: a listener's first connections pair too, before any
	// was read (enable --no-probation).
	NoProbation bool `json:"no_probation"`
	// StackPorts are the server ports whose connections stay plain TCP
	// (enable --stack-ports); empty, never null, when there are none.
	StackPorts []uint16 `json:"stack_ports"`
	// TCDevices are the interfaces the cgroup asked TC accounting for
	// (enable --tc-dev), as [NETNS_PATH:]DEV; empty when none.
	TCDevices []string `json:"tc_devices"`
	// Mesh is the sidecar mode, nil outside it (enable --mesh).
	Mesh *MeshSettingsStatus `json:"mesh,omitempty"`
}

// MeshSettingsStatus is the sidecar mode of a cgroup as the datapath holds
// it.
type MeshSettingsStatus struct {
	// Mode is "redirect" or "intercept".
	Mode string `json:"mode"`
	// SidecarUID is the uid the sidecar runs as.
	SidecarUID uint32 `json:"sidecar_uid"`
	// OutboundPort and InboundPort are the sidecar's ports.
	OutboundPort uint16 `json:"outbound_port"`
	InboundPort  uint16 `json:"inbound_port"`
	// ExcludePorts and ExcludeCIDRs are never intercepted.
	ExcludePorts []uint16 `json:"exclude_ports"`
	ExcludeCIDRs []string `json:"exclude_cidrs"`
}

// settingsOf decodes a cgroup's config and its TC devices.
func settingsOf(cfg cgroupConfig, devices []string) CgroupSettings {
	s := CgroupSettings{
		AccountOnly:    cfg.Flags&cgroupAccountOnly != 0,
		AllConnections: cfg.Flags&cgroupAllConnections != 0,
		NoProbation:    cfg.Flags&cgroupNoProbation != 0,
		StackPorts:     portList(cfg.StackPorts[:]),
		TCDevices:      devices,
	}
	if s.TCDevices == nil {
		s.TCDevices = []string{}
	}
	sort.Strings(s.TCDevices)
	if cfg.MeshMode == MeshRedirect || cfg.MeshMode == MeshIntercept {
		m := &MeshSettingsStatus{Mode: "redirect", SidecarUID: cfg.SidecarUid, OutboundPort: cfg.OutboundPort,
			InboundPort: cfg.InboundPort, ExcludePorts: portList(cfg.ExcludePorts[:]), ExcludeCIDRs: []string{}}
		if cfg.MeshMode == MeshIntercept {
			m.Mode = "intercept"
		}
		for i := 0; i < int(cfg.N_excludeCidrs) && i < len(cfg.ExcludeCidrs); i++ {
			c := cfg.ExcludeCidrs[i]
			a := sockops.AddrFromC(c.Ip)
			bits := int(c.Prefix)
			if a.Is4() {
				bits -= 96
			}
			m.ExcludeCIDRs = append(m.ExcludeCIDRs, netip.PrefixFrom(a, bits).String())
		}
		s.Mesh = m
	}
	return s
}

// portList returns the ports of a 0-terminated array, never nil.
func portList(ports []uint16) []uint16 {
	out := []uint16{}
	for _, p := range ports {
		if p == 0 {
			break
		}
		out = append(out, p)
	}
	return out
}

// tcDevicesByCgroup returns, per cgroup id, the TC devices it asked for.
func (d *Dataplane) tcDevicesByCgroup() (map[uint64][]string, error) {
	devices, err := d.tcDevices()
	if err != nil {
		return nil, err
	}
	out := map[uint64][]string{}
	var key tcUserKey
	var v uint32
	it := d.maps[PinTCUsers].Iterate()
	for it.Next(&key, &v) {
		if dev, ok := devices[key.Dev]; ok {
			out[key.CgroupId] = append(out[key.CgroupId], deviceOf(dev).String())
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read tc users: %w", err)
	}
	return out, nil
}

// Settings returns the settings of the enabled cgroup id, and false when
// it is not enabled.
func (d *Dataplane) Settings(id uint64) (CgroupSettings, bool, error) {
	l, err := lock.Shared(d.pinDir)
	if err != nil {
		return CgroupSettings{}, false, err
	}
	defer l.Unlock()
	ids, err := d.EnabledCgroupIDs()
	if err != nil {
		return CgroupSettings{}, false, err
	}
	enabled := false
	for _, e := range ids {
		enabled = enabled || e == id
	}
	if !enabled {
		return CgroupSettings{}, false, nil
	}
	cfg, ok := d.configOf(id)
	if !ok {
		return CgroupSettings{}, false, nil
	}
	devs, err := d.tcDevicesByCgroup()
	if err != nil {
		return CgroupSettings{}, false, err
	}
	return settingsOf(cfg, devs[id]), true, nil
}

// SettingsChanges lists, one per setting that differs, what changed from
// old to new, as "stack ports: 8080 -> (none)".
func SettingsChanges(old, new CgroupSettings) []string {
	var out []string
	add := func(name, a, b string) {
		if a != b {
			out = append(out, fmt.Sprintf("%s: %s -> %s", name, a, b))
		}
	}
	onOff := func(v bool) string {
		if v {
			return "on"
		}
		return "off"
	}
	add("account-only", onOff(old.AccountOnly), onOff(new.AccountOnly))
	add("all connections", onOff(old.AllConnections), onOff(new.AllConnections))
	add("probation", onOff(!old.NoProbation), onOff(!new.NoProbation))
	add("stack ports", FormatPorts(old.StackPorts), FormatPorts(new.StackPorts))
	add("tc devices", listOrNone(old.TCDevices), listOrNone(new.TCDevices))
	add("sidecar mode", old.Mesh.String(), new.Mesh.String())
	return out
}

// FormatPorts writes ports comma-separated, "(none)" when empty.
func FormatPorts(ports []uint16) string {
	s := make([]string, len(ports))
	for i, p := range ports {
		s[i] = strconv.Itoa(int(p))
	}
	return listOrNone(s)
}

func listOrNone(s []string) string {
	if len(s) == 0 {
		return "(none)"
	}
	return strings.Join(s, ",")
}

// String describes the sidecar mode in one line, "(none)" for nil.
func (m *MeshSettingsStatus) String() string {
	if m == nil {
		return "(none)"
	}
	return fmt.Sprintf("%s (uid %d, outbound %d, inbound %d, exclude ports %s, exclude cidrs %s)",
		m.Mode, m.SidecarUID, m.OutboundPort, m.InboundPort, FormatPorts(m.ExcludePorts), listOrNone(m.ExcludeCIDRs))
}

// String describes every setting in one line.
func (s CgroupSettings) String() string {
	onOff := map[bool]string{true: "on", false: "off"}
	return fmt.Sprintf("account-only %s, all connections %s, probation %s, stack ports %s, tc devices %s, sidecar mode %s",
		onOff[s.AccountOnly], onOff[s.AllConnections], onOff[!s.NoProbation], FormatPorts(s.StackPorts), listOrNone(s.TCDevices), s.Mesh.String())
}
