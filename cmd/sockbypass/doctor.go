package main

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/bpffs"
	"github.com/sockbypass/sockbypass/internal/privilege"
	"github.com/sockbypass/sockbypass/internal/semantics"
)

var doctorCommand = command{
	summary: "probe this kernel: which application-visible behaviours acceleration preserves",
	usage:   "doctor [--json | --markdown]",
	run:     runDoctor,
}

// doctorReport is the --json document of doctor.
type doctorReport struct {
	Kernel  string             `json:"kernel"`
	Results []semantics.Result `json:"results"`
	// Broken counts cases that differ from plain TCP without being a
	// known limitation (0 on a healthy kernel).
	Broken int `json:"broken"`
}

func runDoctor(e *env, args []string) error {
	var pinDir, logLevel string
	var asJSON, asMarkdown bool
	fs := newFlagSet("doctor", e, &pinDir, &logLevel)
	fs.BoolVar(&asJSON, "json", false, "print JSON for machines instead of a table")
	fs.BoolVar(&asMarkdown, "markdown", false, "print the compatibility table as markdown (as in README.md)")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	if err := privilege.Check(); err != nil {
		return err
	}
	if err := privilege.CheckKernel(); err != nil {
		return err
	}
	results, err := doctorProbe()
	if err != nil {
		return err
	}
	release := ""
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		release = strings.TrimSpace(string(data))
	}
	rep := doctorReport{Kernel: release, Results: results}
	for _, r := range results {
		if r.Verdict == semantics.VerdictBroken {
			rep.Broken++
		}
	}
	if asJSON {
		if err := writeJSON(e.stdout, rep); err != nil {
			return err
		}
	} else if asMarkdown {
		fmt.Fprintln(e.stdout, "| case | behaviour | how it is guaranteed |")
		fmt.Fprintln(e.stdout, "|---|---|---|")
		for _, r := range rep.Results {
			fmt.Fprintf(e.stdout, "| %s | %s | %s |\n", r.Case, r.Verdict, r.How)
		}
	} else {
		printDoctor(e.stdout, rep)
	}
	if rep.Broken > 0 {
		return fmt.Errorf("%d case(s) behave differently from plain TCP on this kernel without being a known limitation: do not enable sockbypass here, and report it", rep.Broken)
	}
	return nil
}

// doctorProbe runs every transparency case in a private install, two
// private cgroups and a private network namespace, and removes them all.
func doctorProbe() (results []semantics.Result, err error) {
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return nil, err
	}
	if mounts.V2 == "" {
		return nil, cgroup.ErrNoCgroup2
	}
	if err := bpffs.Ensure(bpffs.DefaultPinDir); err != nil {
		return nil, err
	}
	suffix := fmt.Sprintf("%d-%x", os.Getpid(), rand.Uint32())
	pinDir := filepath.Join(bpffs.DefaultRoot, "sockbypass-doctor-"+suffix)
	var cleanups []func()
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}()
	newCgroup := func(name string) (cgroup.Cgroup, error) {
		dir := filepath.Join(mounts.V2, "sockbypass-doctor-"+name+"-"+suffix)
		if err := os.Mkdir(dir, 0o755); err != nil {
			return cgroup.Cgroup{}, err
		}
		cleanups = append(cleanups, func() { os.Remove(dir) })
		return mounts.Resolve(dir)
	}
	plain, err := newCgroup("plain")
	if err != nil {
		return nil, err
	}
	accel, err := newCgroup("accel")
	if err != nil {
		return nil, err
	}
	netns, err := testutils.NewNS()
	if err != nil {
		return nil, fmt.Errorf("create a private network namespace: %w", err)
	}
	cleanups = append(cleanups, func() { netns.Close(); testutils.UnmountNS(netns) })
	if err := netns.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	}); err != nil {
		return nil, err
	}

	modes, uninstall, err := semantics.Install(pinDir, plain, accel, netns)
	if err != nil {
		return nil, err
	}
	cleanups = append(cleanups, func() { uninstall(); os.RemoveAll(pinDir) })
	return semantics.RunAll(modes), nil
}

func printDoctor(w io.Writer, rep doctorReport) {
	fmt.Fprintf(w, "sockbypass doctor: kernel %s, plain TCP vs accelerated, each case in a private cgroup and network namespace\n\n", rep.Kernel)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CASE\tRESULT\tHOW")
	for _, r := range rep.Results {
		how := r.How
		if r.Err != "" {
			how = r.Err
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Case, r.Verdict, how)
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, r := range rep.Results {
		if r.Verdict == semantics.VerdictKnown || r.Verdict == semantics.VerdictBroken {
			fmt.Fprintf(w, "%s:\n  plain:       %s\n  accelerated: %s\n", r.Case, r.Plain, r.Accelerated)
		}
	}
}

// knownLimitations names the cases this kernel offers no hook to keep.
func knownLimitations() []string {
	var out []string
	for _, c := range semantics.Cases() {
		if c.Expect == semantics.Limitation {
			out = append(out, c.Name)
		}
	}
	return out
}
