package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/bpffs"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/internal/nodeaddrs"
	"github.com/sockbypass/sockbypass/internal/privilege"
)

var enableCommand = command{
	summary: "accelerate the TCP sockets of a cgroup (idempotent)",
	usage:   "enable --cgroup PATH [--cgroup PATH ...] [--tc-dev [NETNS:]DEV ...] [--no-tc] [--account-only] [--all-connections] [--no-probation] [--stack-ports P,...] [--sockhash-size N]\n         [--mesh istio|linkerd|kuma [--intercept] [--sidecar-uid UID] [--outbound-port N] [--inbound-port N] [--exclude-ports P,...] [--exclude-cidrs CIDR,...]]",
	run:     runEnable,
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return fmt.Sprint(*s) }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func runEnable(e *env, args []string) error {
	var pinDir, logLevel string
	var cgroups stringList
	var sockhashSize uint
	var tcDevs stringList
	var noTC, accountOnly, allConnections, noProbation bool
	fs := newFlagSet("enable", e, &pinDir, &logLevel)
	fs.Var(&tcDevs, "tc-dev", "interface whose egress TCP traffic is also accounted by TC (a device view), optionally in another network namespace as /run/netns/NAME:DEV (repeatable; none by default: each enabled cgroup's stack bytes are counted at its sockets, on any device); on an enabled cgroup the list replaces its devices (a device stays while another enabled cgroup asks for it)")
	fs.BoolVar(&noTC, "no-tc", false, "attach no TC accounting (the default; the per-cgroup stack bytes are still counted); on an enabled cgroup, drops its devices")
	fs.BoolVar(&accountOnly, "account-only", false, "count the cgroup's traffic but do not accelerate it (a dry run; run enable again without it to accelerate)")
	fs.BoolVar(&allConnections, "all-connections", false, "pair every connection to the cgroup's listeners; by default, once a listener's last 8 connections were each short-lived (at most 4 messages from the server, under 64 KiB both ways), its new connections stay plain TCP, with one in 64 still paired to notice a change")
	fs.BoolVar(&noProbation, "no-probation", false, "pair connections to the cgroup's listeners from the first one; by default a new listener's connections stay plain TCP until one of its accepted sockets has been read with recvmsg without blocking (a Go io.Copy proxy splices, which cannot read redirected bytes): set it only when every server of the cgroup reads with recvmsg on non-blocking sockets")
	var stackPorts string
	fs.StringVar(&stackPorts, "stack-ports", "", "server ports whose connections stay on the normal TCP path, comma-separated (at most 16): for servers and proxies that read with splice(2), such as a Go io.Copy TCP proxy or HAProxy in splice mode. Covers connections to these ports (listed by either end's cgroup), and every connection a process of the cgroup makes, or accepts on another port, while it listens on one of them (a proxy's upstream connections): list the proxy's own port")
	var meshName, sidecarUID, outboundPort, inboundPort, excludePorts, excludeCIDRs string
	var intercept bool
	fs.StringVar(&meshName, "mesh", "", "sidecar mode for a pod with a mesh sidecar: istio (uid 1337, ports 15001/15006), linkerd (2102, 4140/4143) or kuma (5678, 15001/15006)")
	fs.BoolVar(&intercept, "intercept", false, "with --mesh: send the app's connects to the sidecar without iptables (cgroup/connect4) and answer SO_ORIGINAL_DST; default: pair under iptables REDIRECT")
	fs.StringVar(&sidecarUID, "sidecar-uid", "", "with --mesh: the uid the sidecar runs as in its pod (its connects are never intercepted; in a pod with its own user namespace, the uid inside it)")
	fs.StringVar(&outboundPort, "outbound-port", "", "with --mesh: the sidecar's outbound port")
	fs.StringVar(&inboundPort, "inbound-port", "", "with --mesh: the sidecar's inbound port")
	fs.StringVar(&excludePorts, "exclude-ports", "", "with --mesh: destination ports never intercepted, comma-separated (like excludeOutboundPorts)")
	fs.StringVar(&excludeCIDRs, "exclude-cidrs", "", "with --mesh: destination CIDRs never intercepted, comma-separated (like excludeOutboundIPRanges)")
	fs.Var(&cgroups, "cgroup", "cgroup v2 directory, absolute or relative to the cgroup2 mount (repeatable)")
	fs.UintVar(&sockhashSize, "sockhash-size", 0, "sockhash capacity when it is first created, 1 to 1048576 (default 65536); sockets beyond it use the normal TCP path; the maps that follow sockets are sized from it")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	if len(cgroups) == 0 {
		return usagef("--cgroup is required: name the cgroup v2 directory whose sockets to accelerate, e.g. --cgroup kubepods.slice/pod1234")
	}
	if flagSet(fs, "sockhash-size") && (sockhashSize == 0 || sockhashSize > maxSockhashSize) {
		return usagef("--sockhash-size %d: use a capacity from 1 to %d (default %d)", sockhashSize, maxSockhashSize, defaultSockhashSize)
	}
	if err := checkCgroupArgs(cgroups); err != nil {
		return err
	}
	if noTC && len(tcDevs) > 0 {
		return usagef("--no-tc and --tc-dev contradict each other: give one of them")
	}
	opts := dataplane.EnableOptions{AccountOnly: accountOnly, AllConnections: allConnections, NoProbation: noProbation}
	if stackPorts != "" {
		ports, err := dataplane.ParsePorts(stackPorts)
		if err != nil {
			return usagef("--stack-ports %q: %v", stackPorts, err)
		}
		if len(ports) > 16 {
			return usagef("--stack-ports: %d ports given, at most 16", len(ports))
		}
		opts.StackPorts = ports
	}
	if meshName == "" {
		for name, v := range map[string]string{"--sidecar-uid": sidecarUID, "--outbound-port": outboundPort, "--inbound-port": inboundPort, "--exclude-ports": excludePorts, "--exclude-cidrs": excludeCIDRs} {
			if v != "" {
				return usagef("%s needs --mesh istio|linkerd|kuma", name)
			}
		}
		if intercept {
			return usagef("--intercept needs --mesh istio|linkerd|kuma")
		}
	} else {
		m, err := meshSettings(meshName, intercept, sidecarUID, outboundPort, inboundPort, excludePorts, excludeCIDRs)
		if err != nil {
			return usageError{err.Error()}
		}
		if opts.Mesh, err = m.Options(); err != nil {
			return usageError{err.Error()}
		}
	}
	if !noTC {
		for _, s := range tcDevs {
			d, err := dataplane.ParseTCDevice(s)
			if err != nil {
				return usageError{err.Error()}
			}
			opts.TCDevices = append(opts.TCDevices, d)
		}
	}
	resolved, err := resolveAll(cgroups)
	if err != nil {
		return err
	}
	if err := refuseDaemonOwned(e.pinDir, "enable"); err != nil {
		return err
	}
	_, statErr := os.Stat(e.pinDir)
	fresh := os.IsNotExist(statErr)
	dp, err := openDataplane(e, true, uint32(sockhashSize))
	if err != nil {
		return err
	}
	defer dp.Close()
	if !fresh && flagSet(fs, "sockhash-size") {
		if capacity, err := dp.SockhashCapacity(); err == nil && capacity != uint32(sockhashSize) {
			fmt.Fprintf(e.stderr, "warning: --sockhash-size %d ignored: the sockhash in %s exists with capacity %d, and its size is fixed when it is created (sockbypass upgrade keeps it too); to resize it, run sockbypass uninstall, then enable again with --sockhash-size (live connections keep their acceleration until they close, new ones go into the new sockhash)\n",
				sockhashSize, e.pinDir, capacity)
		}
	}
	for _, cg := range resolved {
		before, wasEnabled, err := dp.Settings(cg.ID)
		if err != nil {
			return err
		}
		changed, err := dp.Enable(cg, opts)
		if err != nil {
			// A first enable that fails leaves nothing installed (a
			// later one leaves what earlier calls enabled).
			if fresh {
				if uerr := dp.Uninstall(); uerr != nil {
					return errors.Join(err, fmt.Errorf("remove the install this call created: %w", uerr))
				}
			}
			return err
		}
		what := "its new TCP connections are accelerated"
		if opts.Mesh != nil {
			what = fmt.Sprintf("its new TCP connections are accelerated, sidecar mode %s (uid %d, outbound %d, inbound %d)",
				opts.Mesh.Mode(), opts.Mesh.SidecarUID, opts.Mesh.OutboundPort, opts.Mesh.InboundPort)
		}
		if accountOnly {
			what = "its new TCP connections are counted, not accelerated (account-only)"
		}
		devices := "none (--no-tc)"
		if len(opts.TCDevices) > 0 {
			var names []string
			for _, d := range opts.TCDevices {
				names = append(names, d.String())
			}
			devices = strings.Join(names, ", ")
		}
		after, _, err := dp.Settings(cg.ID)
		if err != nil {
			return err
		}
		if changed || !wasEnabled {
			fmt.Fprintf(e.stdout, "enabled %s (cgroup id %d): %s; tc accounting: %s\n  settings: %s\n", cg.Path, cg.ID, what, devices, after)
			continue
		}
		changes := dataplane.SettingsChanges(before, after)
		if len(changes) == 0 {
			fmt.Fprintf(e.stdout, "%s (cgroup id %d) was already enabled with these settings; nothing changed: %s\n", cg.Path, cg.ID, after)
			continue
		}
		fmt.Fprintf(e.stdout, "%s (cgroup id %d) was already enabled; its settings are now those of this command line (flags left out take their defaults), for new connections; a TC device another enabled cgroup asks for stays attached:\n", cg.Path, cg.ID)
		for _, c := range changes {
			fmt.Fprintf(e.stdout, "  %s\n", c)
		}
	}
	if _, err := dp.RefreshListeners(); err != nil {
		fmt.Fprintf(e.stderr, "warning: %v; connections to listeners that could not be read take the normal TCP path\n", err)
	}
	if _, err := dp.ReapPairs(dataplane.PairReapAge); err != nil {
		fmt.Fprintf(e.stderr, "warning: %v\n", err)
	}
	if _, err := dp.ForgetRemovedCgroups(); err != nil {
		fmt.Fprintf(e.stderr, "warning: %v\n", err)
	}
	addrs, err := dp.RefreshNodeAddrs()
	if errors.Is(err, nodeaddrs.ErrPermission) {
		fmt.Fprintf(e.stderr, "warning: %v; pod-to-pod connections take the normal TCP path\n", err)
	} else if err != nil {
		return fmt.Errorf("refresh node addresses: %w", err)
	}
	if len(addrs.Ambiguous) > 0 {
		fmt.Fprintf(e.stdout, "node addresses: %d unique (paired across namespaces), %d ambiguous and kept namespace-local: %s\n",
			addrs.Unique, len(addrs.Ambiguous), strings.Join(addrs.Ambiguous, ", "))
	}
	if fresh && !accountOnly {
		fmt.Fprintf(e.stderr, "warning: on accelerated sockets this kernel cannot keep: %s (see sockbypass doctor)\n", strings.Join(knownLimitations(), "; "))
	}
	return nil
}

// Sockhash capacities enable accepts.
const (
	defaultSockhashSize = 65536
	maxSockhashSize     = 1 << 20
)

// checkCgroupArgs refuses empty --cgroup values as a bad command line.
func checkCgroupArgs(args []string) error {
	for _, a := range args {
		if strings.TrimSpace(a) == "" {
			return usagef("--cgroup %q: give a cgroup v2 directory, absolute or relative to the cgroup2 mount", a)
		}
	}
	return nil
}

// resolveAll resolves every cgroup argument before anything changes, so a
// bad one leaves nothing half-done.
func resolveAll(args []string) ([]cgroup.Cgroup, error) {
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return nil, err
	}
	out := make([]cgroup.Cgroup, 0, len(args))
	for _, a := range args {
		cg, err := mounts.Resolve(a)
		if err != nil {
			return nil, err
		}
		out = append(out, cg)
	}
	return out, nil
}

// openDataplane checks privileges and the kernel, then opens the pinned
// state (creating it when create is set).
func openDataplane(e *env, create bool, sockhashSize uint32) (*dataplane.Dataplane, error) {
	if err := privilege.Check(); err != nil {
		return nil, err
	}
	if err := bpffs.Ensure(e.pinDir); err != nil {
		return nil, err
	}
	dpOpts := dataplane.Options{PinDir: e.pinDir, Logger: e.log, SockhashMaxEntries: sockhashSize}
	if !create {
		return dataplane.Open(dpOpts)
	}
	if err := privilege.CheckKernel(); err != nil {
		return nil, err
	}
	return dataplane.OpenOrCreate(dpOpts)
}

// meshSettings turns the sidecar flags into settings, naming a bad flag.
func meshSettings(name string, intercept bool, uid, out, in, ports, cidrs string) (dataplane.MeshSettings, error) {
	m := dataplane.MeshSettings{Name: name, Intercept: intercept}
	if uid != "" {
		v, err := strconv.ParseUint(uid, 10, 32)
		if err != nil {
			return m, fmt.Errorf("--sidecar-uid %q: use a numeric uid", uid)
		}
		u := uint32(v)
		m.SidecarUID = &u
	}
	for flag, p := range map[string]struct {
		v   string
		dst *uint16
	}{"--outbound-port": {out, &m.OutboundPort}, "--inbound-port": {in, &m.InboundPort}} {
		if p.v == "" {
			continue
		}
		v, err := strconv.ParseUint(p.v, 10, 16)
		if err != nil || v == 0 {
			return m, fmt.Errorf("%s %q: use a port from 1 to 65535", flag, p.v)
		}
		*p.dst = uint16(v)
	}
	var err error
	if m.ExcludePorts, err = dataplane.ParsePorts(ports); err != nil {
		return m, fmt.Errorf("--exclude-ports: %w", err)
	}
	if m.ExcludeCIDRs, err = dataplane.ParseCIDRs(cidrs); err != nil {
		return m, fmt.Errorf("--exclude-cidrs: %w", err)
	}
	return m, nil
}

// refuseDaemonOwned refuses a change a running daemon would undo: a daemon
// with a configuration owns its pin directory (lock.ClaimDaemon) and, at
// its next rescan, disables every cgroup its configuration does not name
// and re-applies its own settings to those it does.
func refuseDaemonOwned(pinDir, what string) error {
	info, ok, err := lock.DaemonOwner(pinDir)
	if err != nil || !ok {
		return err
	}
	return fmt.Errorf("a sockbypass daemon (pid %d, %s) manages %s: it would undo this %s at its next rescan (it disables every cgroup its configuration does not name); add the cgroup to its configuration instead (cgroups in the file, then kill -HUP %d, or restart it with another --cgroup), or use another --bpffs-dir",
		info.Pid, info.Config, pinDir, what, info.Pid)
}
