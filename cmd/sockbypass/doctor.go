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
	// non-blocking; each result's "expected" is what sockbypass promises
	// in its mode ("not accelerated" for every blocking run).
	Results []semantics.Result `json:"results"`
	// Summary counts the verdicts per mode, as the text and markdown
	// outputs print them.
	Summary map[semantics.Mode]map[string]int `json:"summary"`
	// Broken counts the results that differ from plain TCP unexpectedly
	// (verdict "BROKEN"; 0 on a healthy kernel). KnownLimitations counts
	// those that differ exactly as a known limitation says (verdict
	// "broken: known limitation"): the kernel offers no hook in time.
	Broken           int `json:"broken"`
	KnownLimitations int `json:"known_limitations"`
}

// newDoctorReport counts the results.
func newDoctorReport(kernel string, results []semantics.Result) doctorReport {
	rep := doctorReport{Kernel: kernel, Modes: semantics.AllModes(), Results: results, Summary: map[semantics.Mode]map[string]int{}}
	for _, m := range rep.Modes {
		rep.Summary[m] = map[string]int{}
	}
	for _, r := range results {
		if rep.Summary[r.Mode] == nil {
			rep.Summary[r.Mode] = map[string]int{}
		}
		rep.Summary[r.Mode][r.Verdict]++
		switch r.Verdict {
		case semantics.VerdictBroken:
			rep.Broken++
		case semantics.VerdictKnown:
			rep.KnownLimitations++
		}
	}
	return rep
}

// verdictOrder is the order the summary lists verdicts in.
var verdictOrder = []string{semantics.VerdictPreserved, semantics.VerdictFallback, semantics.VerdictNotAccelerated,
	semantics.VerdictKnown, semantics.VerdictNotMeasured, semantics.VerdictBroken}

// summaryLines are the per-mode counts and the totals, the same in the
// text and markdown outputs (and in JSON's summary, broken and
// known_limitations).
func summaryLines(rep doctorReport) []string {
	var out []string
	for _, m := range rep.Modes {
		var parts []string
		for _, v := range verdictOrder {
			if n := rep.Summary[m][v]; n > 0 {
				parts = append(parts, fmt.Sprintf("%d %s", n, v))
			}
		}
		out = append(out, fmt.Sprintf("%s: %s", m, strings.Join(parts, ", ")))
	}
	out = append(out, fmt.Sprintf("broken unexpectedly (BROKEN): %d; known limitations (differ from plain TCP as documented, no kernel hook in time): %d", rep.Broken, rep.KnownLimitations))
	return out
}

func runDoctor(e *env, args []string) error {
	var pinDir, logLevel string
	var asJSON, asMarkdown bool
	fs := newFlagSet("doctor", e, &pinDir, &logLevel)
	fs.BoolVar(&asJSON, "json", false, "print JSON for machines instead of a table (not with --markdown)")
	fs.BoolVar(&asMarkdown, "markdown", false, "print the compatibility table as markdown, as in README.md (not with --json)")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	if asJSON && asMarkdown {
		return usagef("--json and --markdown contradict each other: give one of them (--json for machines, --markdown for README.md's table)")
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
		each = doctorRowPrinter(e.stdout)
	}
	results, err := doctorProbe(e.pinDir, each)
	if err != nil {
		return err
	}
	rep := newDoctorReport(release, results)
	switch {
	case asJSON:
		if err := writeJSON(e.stdout, rep); err != nil {
			return err
		}
	case asMarkdown:
		printDoctorMarkdown(e.stdout, rep)
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

// doctorWidth is the width the people output wraps its explanations at.
const doctorWidth = 100

// Columns of the people output: the blocking and the non-blocking
// verdict, then the case.
const (
	blockingColumn    = len(semantics.VerdictNotAccelerated) + 2 // "not accelerated *"
	nonBlockingColumn = len(semantics.VerdictFallback)
)

func printDoctorHeader(w io.Writer, kernel, pinDir string) {
	fmt.Fprintf(w, "sockbypass doctor: kernel %s, plain TCP vs accelerated, each case with blocking and with non-blocking sockets,\n", kernel)
	fmt.Fprintf(w, "in a private install (%s-doctor-*), cgroup and network namespace; rows appear as cases finish\n", pinDir)
	for _, l := range wrapText("(* "+semantics.WhyBlocking+")", doctorWidth) {
		fmt.Fprintln(w, l)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "%-*s  %-*s  %s\n", blockingColumn, "BLOCKING", nonBlockingColumn, "NON-BLOCKING", "CASE")
}

// doctorHow is what a result's explanation says: the mechanism, or why the
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

// blockingAsExpected reports whether r is the blocking run most cases
// have: not accelerated, its sockets counted blocking (the footnote). A
// blocking run whose sockets were kept off for another reason first (a
// stack reader, a stack port) says so below its row.
func blockingAsExpected(r semantics.Result) bool {
	return r.Mode == semantics.Blocking && r.Verdict == semantics.VerdictNotAccelerated && r.Why == semantics.WhyBlocking
}

// doctorRowPrinter returns a callback that prints a case, one line with
// its verdict in each mode and its explanation wrapped below, once its
// last mode finished.
func doctorRowPrinter(w io.Writer) func(semantics.Result) {
	modes := semantics.AllModes()
	var pending []semantics.Result
	return func(r semantics.Result) {
		pending = append(pending, r)
		if len(pending) < len(modes) {
			return
		}
		printDoctorCase(w, pending)
		pending = nil
	}
}

// printDoctorCase prints one case's results (blocking, then non-blocking).
func printDoctorCase(w io.Writer, results []semantics.Result) {
	var cols [2]string
	var notes []string
	for i, r := range results {
		if i >= len(cols) {
			break
		}
		cols[i] = r.Verdict
		if blockingAsExpected(r) {
			cols[i] += " *"
			continue
		}
		prefix := ""
		if r.Mode == semantics.Blocking {
			prefix = "blocking: "
		}
		notes = append(notes, prefix+doctorHow(r))
	}
	fmt.Fprintf(w, "%-*s  %-*s  %s\n", blockingColumn, cols[0], nonBlockingColumn, cols[1], results[0].Case)
	for _, n := range notes {
		for _, l := range wrapText(n, doctorWidth-4) {
			fmt.Fprintf(w, "    %s\n", l)
		}
	}
}

// wrapText breaks s into lines of at most width characters, at spaces.
func wrapText(s string, width int) []string {
	var lines []string
	line := ""
	for _, word := range strings.Fields(s) {
		if line != "" && len(line)+1+len(word) > width {
			lines = append(lines, line)
			line = ""
		}
		if line != "" {
			line += " "
		}
		line += word
	}
	if line != "" {
		lines = append(lines, line)
	}
	return lines
}

func printDoctorFooter(w io.Writer, rep doctorReport) {
	fmt.Fprintln(w)
	blockingExpected, blockingRuns := 0, 0
	for _, r := range rep.Results {
		if r.Mode == semantics.Blocking {
			blockingRuns++
		}
		if blockingAsExpected(r) {
			blockingExpected++
		}
	}
	for _, l := range wrapText(fmt.Sprintf("* %d of %d blocking runs: %s", blockingExpected, blockingRuns, semantics.WhyBlocking), doctorWidth) {
		fmt.Fprintln(w, l)
	}
	var differ []semantics.Result
	for _, r := range rep.Results {
		if r.Verdict == semantics.VerdictKnown || r.Verdict == semantics.VerdictBroken {
			differ = append(differ, r)
		}
	}
	if len(differ) > 0 {
		fmt.Fprintln(w, "\nwhere the accelerated run differs from plain TCP:")
	}
	for _, r := range differ {
		fmt.Fprintf(w, "%s (%s, %s):\n  plain:       %s\n  accelerated: %s\n", r.Case, r.Mode, r.Verdict, r.Plain, r.Accelerated)
	}
	fmt.Fprintln(w)
	for _, l := range summaryLines(rep) {
		fmt.Fprintln(w, l)
	}
}

// printDoctorMarkdown prints the compatibility table of README.md, then
// the same summary as the other outputs.
func printDoctorMarkdown(w io.Writer, rep doctorReport) {
	cell := func(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
	fmt.Fprintln(w, "| case | mode | behaviour | how it is guaranteed |")
	fmt.Fprintln(w, "|---|---|---|---|")
	for _, r := range rep.Results {
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", cell(r.Case), r.Mode, r.Verdict, cell(doctorHow(r)))
	}
	fmt.Fprintln(w)
	for _, l := range summaryLines(rep) {
		fmt.Fprintf(w, "%s  \n", l)
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
