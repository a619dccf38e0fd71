// Command benchreport puts the results of `make bench` into README.md: it
// replaces the text between the README's bench markers with the tables that
// the e2e suite and the Go-native benchmarks wrote, under a line that says
// when, on which kernel and CPU, and from which revision they were
// measured. README numbers then always come from a run, never from a hand.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	beginMarker = "<!-- bench:begin (written by make bench: e2e/cmd/benchreport; do not edit by hand) -->"
	endMarker   = "<!-- bench:end -->"
)

// sections are the result files, in README order, with their heading.
var sections = []struct{ file, heading string }{
	{"suite/results.md", "Real programs (the e2e suite)"},
	{"cost-per-message.md", "Per-message cost: plain TCP, the minimal redirector, sockbypass, the empty hooks"},
	{"cost-plain.md", "What connections left plain pay: an enabled cgroup vs one that is not enabled"},
	{"bystander-sockperf.md", "Bystander cost with sockperf: a cgroup that is not enabled, while another one is"},
	{"cost-bystander.md", "Bystander cost, Go-native non-blocking workload"},
	{"loopback.md", "Go-native loopback"},
	{"pod-to-pod.md", "Pod to pod over a veth"},
	{"sidecar.md", "Sidecar: app -> HAProxy -> server pod"},
}

func main() {
	results := flag.String("results", "e2e/results", "directory the benchmarks wrote their results to")
	readme := flag.String("readme", "README.md", "the README to update")
	flag.Parse()
	if err := run(*results, *readme); err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
}

func run(results, readme string) error {
	old, err := os.ReadFile(readme)
	if err != nil {
		return err
	}
	begin := bytes.Index(old, []byte(beginMarker))
	end := bytes.Index(old, []byte(endMarker))
	if begin < 0 || end < begin {
		return fmt.Errorf("%s has no %q ... %q section: add the two markers where the results go", readme, beginMarker, endMarker)
	}
	var b strings.Builder
	b.WriteString(beginMarker + "\n\n")
	fmt.Fprintf(&b, "Measured by `make bench` on %s: %s, kernel %s, %d CPUs, sockbypass %s.\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), cpuModel(), kernel(), cpus(), revision())
	b.WriteString("Medians of alternating runs with their spread; on this noisy VM compare ratios within one table, not values across days.\n")
	found := 0
	for _, s := range sections {
		data, err := os.ReadFile(filepath.Join(results, s.file))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		found++
		fmt.Fprintf(&b, "\n#### %s\n\n%s", s.heading, body(string(data)))
	}
	if found == 0 {
		return fmt.Errorf("no results in %s: run the benchmarks first (make bench)", results)
	}
	b.WriteString("\n" + endMarker)
	out := append(append(append([]byte{}, old[:begin]...), b.String()...), old[end+len(endMarker):]...)
	return os.WriteFile(readme, out, 0o644)
}

// body is a result file without its title and without the sections that
// are for the result file only (integrity check lists); its headings move
// below the README's.
func body(md string) string {
	var out strings.Builder
	sc := bufio.NewScanner(strings.NewReader(md))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "# "):
			continue
		case strings.HasPrefix(line, "## Integrity checks"):
			return strings.TrimLeft(out.String(), "\n")
		case strings.HasPrefix(line, "## "):
			line = "#####" + strings.TrimPrefix(line, "##")
		}
		out.WriteString(line + "\n")
	}
	return strings.TrimLeft(out.String(), "\n")
}

func cpuModel() string {
	data, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func kernel() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func cpus() int {
	var set unix.CPUSet
	if unix.SchedGetaffinity(0, &set) != nil {
		return 0
	}
	return set.Count()
}

func revision() string {
	out, err := exec.Command("git", "describe", "--always", "--dirty").Output()
	if err != nil {
		return "(not a git checkout)"
	}
	return strings.TrimSpace(string(out))
}
