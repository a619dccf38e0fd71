package main

import (
	"fmt"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/bpffs"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/privilege"
)

var enableCommand = command{
	summary: "accelerate the TCP sockets of a cgroup (idempotent)",
	usage:   "enable --cgroup PATH [--cgroup PATH ...] [--sockhash-size N]",
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
	fs := newFlagSet("enable", e, &pinDir, &logLevel)
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
	resolved, err := resolveAll(cgroups)
	if err != nil {
		return err
	}
	dp, err := openDataplane(e, true, uint32(sockhashSize))
	if err != nil {
		return err
	}
	defer dp.Close()
	for _, cg := range resolved {
		changed, err := dp.Enable(cg, dataplane.EnableOptions{})
		if err != nil {
			return err
		}
		if changed {
			fmt.Fprintf(e.stdout, "enabled %s (cgroup id %d): its new TCP connections are accelerated\n", cg.Path, cg.ID)
		} else {
			fmt.Fprintf(e.stdout, "%s (cgroup id %d) was already enabled\n", cg.Path, cg.ID)
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
	opts := dataplane.Options{PinDir: e.pinDir, Logger: e.log, SockhashMaxEntries: sockhashSize}
	if !create {
		return dataplane.Open(opts)
	}
	if err := privilege.CheckKernel(); err != nil {
		return nil, err
	}
	return dataplane.OpenOrCreate(opts)
}
