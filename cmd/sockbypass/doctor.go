package main

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/bpffs"
	"github.com/sockbypass/sockbypass/internal/netnsutil"
	"github.com/sockbypass/sockbypass/internal/privilege"
	"github.com/sockbypass/sockbypass/internal/semantics"
)

var doctorCommand = command{
	summary: "probe this kernel: which application-visible behaviours acceleration preserves",
	usage:   "doctor [--json | --markdown]   (runs in a private install next to --bpffs-dir, cgroups under <cgroup2>/sockbypass-doctor-*, removed after)",
	run:     runDoctor,
}

// doctorReport is the --json document of doctor.
type doctorReport struct {
	Kernel string `json:"kernel"`
	// Modes are the socket modes every case ran in.
	Modes []semantics.Mode `json:"modes"`
	// Results has one entry per case and mode, each case blocking then
	// non-blocking.
	Results []semantics.Result `json:"results"`
	// Broken counts results that differ from plain TCP without being a
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
	release := ""
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		release = strings.TrimSpace(string(data))
	}
	people := !asJSON && !asMarkdown
	var each func(semantics.Result)
	if people {
		// Each case as it finishes: the whole run takes a while.
		printDoctorHeader(e.stdout, release, e.pinDir)
		each = func(r semantics.Result) { printDoctorRow(e.stdout, r) }
	}
	results, err := doctorProbe(e.pinDir, each)
	if err != nil {
		return err
	}
	rep := doctorReport{Kernel: release, Modes: semantics.AllModes(), Results: results}
	for _, r := range results {
		if r.Verdict == semantics.VerdictBroken {
			rep.Broken++
		}
	}
	switch {
	case asJSON:
		if err := writeJSON(e.stdout, rep); err != nil {
			return err
		}
	case asMarkdown:
		printDoctorMarkdown(e.stdout, rep.Results)
	default:
		printDoctorFooter(e.stdout, rep)
	}
	if rep.Broken > 0 {
		return fmt.Errorf("%d case(s) behave differently from plain TCP on this kernel without being a known limitation: do not enable sockbypass here, and report it", rep.Broken)
	}
	return nil
}

// doctorProbe runs every transparency case in a private install next to
// pinDir (on the same bpffs: <pinDir>-doctor-<pid>-<rand>), in two cgroups
// under one parent (<cgroup2>/sockbypass-doctor-<pid>-<rand>/{plain,accel})
// and a private network namespace, and removes them all. each, when set,
// gets every result as it is known.
func doctorProbe(pinDir string, each func(semantics.Result)) (results []semantics.Result, err error) {
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return nil, err
	}
	if mounts.V2 == "" {
		return nil, cgroup.ErrNoCgroup2
	}
	if err := bpffs.Ensure(pinDir); err != nil {
		return nil, err
	}
	suffix := fmt.Sprintf("%d-%x", os.Getpid(), rand.Uint32())
	privatePins := pinDir + "-doctor-" + suffix
	var cleanups []func()
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}()
	parent := filepath.Join(mounts.V2, "sockbypass-doctor-"+suffix)
	if err := os.Mkdir(parent, 0o755); err != nil {
		return nil, fmt.Errorf("create the doctor's cgroup: %w", err)
	}
	cleanups = append(cleanups, func() { os.Remove(parent) })
	newCgroup := func(name string) (cgroup.Cgroup, error) {
		dir := filepath.Join(parent, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			return cgroup.Cgroup{}, fmt.Errorf("create the doctor's cgroup: %w", err)
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
	netns, removeNetns, err := netnsutil.New("sockbypass-doctor")
	if err != nil {
		return nil, fmt.Errorf("create a private network namespace: %w", err)
	}
	cleanups = append(cleanups, func() { removeNetns() })

	setup, uninstall, err := semantics.Install(privatePins, plain, accel, netns)
	if err != nil {
		return nil, err
	}
	cleanups = append(cleanups, func() { uninstall(); os.RemoveAll(privatePins) })
	return semantics.RunAll(setup, each), nil
}

// doctorColumns are the widths of the case and mode columns.
func doctorColumns() (caseWidth, modeWidth int) {
	for _, c := range semantics.Cases() {
		caseWidth = max(caseWidth, len(c.Name))
	}
	for _, m := range semantics.AllModes() {
		modeWidth = max(modeWidth, len(m))
	}
	return caseWidth, modeWidth
}

// verdictWidth fits every verdict.
const verdictWidth = len(semantics.VerdictKnown)

func printDoctorHeader(w io.Writer, kernel, pinDir string) {
	fmt.Fprintf(w, "sockbypass doctor: kernel %s, plain TCP vs accelerated, each case with blocking and with non-blocking sockets, in a private install (%s-doctor-*), cgroup and network namespace; rows appear as cases finish\n\n", kernel, pinDir)
	cw, mw := doctorColumns()
	fmt.Fprintf(w, "%-*s  %-*s  %-*s  %s\n", cw, "CASE", mw, "MODE", verdictWidth, "RESULT", "HOW")
}

// doctorHow is what a result's last column says: the mechanism, or why the
// case was not accelerated or measured, or how it failed.
func doctorHow(r semantics.Result) string {
	switch {
	case r.Err != "":
		return r.Err
	case r.Why != "":
		return r.Why
	}
	return r.How
}

func printDoctorRow(w io.Writer, r semantics.Result) {
	cw, mw := doctorColumns()
	fmt.Fprintf(w, "%-*s  %-*s  %-*s  %s\n", cw, r.Case, mw, r.Mode, verdictWidth, r.Verdict, doctorHow(r))
}

func printDoctorFooter(w io.Writer, rep doctorReport) {
	fmt.Fprintln(w)
	for _, r := range rep.Results {
		if r.Verdict == semantics.VerdictKnown || r.Verdict == semantics.VerdictBroken {
			fmt.Fprintf(w, "%s (%s):\n  plain:       %s\n  accelerated: %s\n", r.Case, r.Mode, r.Plain, r.Accelerated)
		}
	}
	fmt.Fprintln(w)
	for _, m := range rep.Modes {
		counts := map[string]int{}
		var order []string
		for _, r := range rep.Results {
			if r.Mode != m {
				continue
			}
			if counts[r.Verdict] == 0 {
				order = append(order, r.Verdict)
			}
			counts[r.Verdict]++
		}
		var parts []string
		for _, v := range order {
			parts = append(parts, fmt.Sprintf("%d %s", counts[v], v))
		}
		fmt.Fprintf(w, "%s: %s\n", m, strings.Join(parts, ", "))
	}
}

// printDoctorMarkdown prints the compatibility table of README.md.
func printDoctorMarkdown(w io.Writer, results []semantics.Result) {
	cell := func(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
	fmt.Fprintln(w, "| case | mode | behaviour | how it is guaranteed |")
	fmt.Fprintln(w, "|---|---|---|---|")
	for _, r := range results {
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", cell(r.Case), r.Mode, r.Verdict, cell(doctorHow(r)))
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
