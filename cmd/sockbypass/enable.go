package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/bpffs"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/nodeaddrs"
	"github.com/sockbypass/sockbypass/internal/privilege"
)

var enableCommand = command{
	summary: "accelerate the TCP sockets of a cgroup (idempotent)",
	usage:   "enable --cgroup PATH [--cgroup PATH ...] [--tc-dev [NETNS:]DEV ...] [--no-tc] [--account-only] [--sockhash-size N]",
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
	var noTC, accountOnly bool
	fs := newFlagSet("enable", e, &pinDir, &logLevel)
	fs.Var(&tcDevs, "tc-dev", "interface whose egress TCP traffic is accounted, optionally in another network namespace as /run/netns/NAME:DEV (repeatable; default lo)")
	fs.BoolVar(&noTC, "no-tc", false, "attach no TC accounting (stack egress is then not counted)")
	fs.BoolVar(&accountOnly, "account-only", false, "count the cgroup's traffic but do not accelerate it (a dry run; run enable again without it to accelerate)")
	fs.Var(&cgroups, "cgroup", "cgroup v2 directory, absolute or relative to the cgroup2 mount (repeatable)")
	fs.UintVar(&sockhashSize, "sockhash-size", 0, "sockhash capacity when it is first created (default 65536); sockets beyond it use the normal TCP path")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	if len(cgroups) == 0 {
		return usagef("--cgroup is required: name the cgroup v2 directory whose sockets to accelerate, e.g. --cgroup kubepods.slice/pod1234")
	}
	if sockhashSize > 1<<20 {
		return usagef("--sockhash-size %d is too large: use at most %d", sockhashSize, 1<<20)
	}
	if noTC && len(tcDevs) > 0 {
		return usagef("--no-tc and --tc-dev contradict each other: give one of them")
	}
	opts := dataplane.EnableOptions{AccountOnly: accountOnly}
	if !noTC {
		if len(tcDevs) == 0 {
			tcDevs = stringList{dataplane.DefaultTCDevice.String()}
		}
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
	dp, err := openDataplane(e, true, uint32(sockhashSize))
	if err != nil {
		return err
	}
	defer dp.Close()
	if !accountOnly {
		fmt.Fprintf(e.stderr, "warning: on accelerated sockets this kernel cannot keep: %s (see sockbypass doctor)\n", strings.Join(knownLimitations(), "; "))
	}
	for _, cg := range resolved {
		changed, err := dp.Enable(cg, opts)
		if err != nil {
			return err
		}
		what := "its new TCP connections are accelerated"
		if accountOnly {
			what = "its new TCP connections are counted, not accelerated (account-only)"
		}
		if changed {
			fmt.Fprintf(e.stdout, "enabled %s (cgroup id %d): %s\n", cg.Path, cg.ID, what)
		} else {
			fmt.Fprintf(e.stdout, "%s (cgroup id %d) was already enabled; settings applied: %s\n", cg.Path, cg.ID, what)
		}
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
