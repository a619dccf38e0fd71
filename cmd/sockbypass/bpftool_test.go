package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// readmeBpftoolRow returns the second column of the README's bpftool
// table row whose command starts with command.
func readmeBpftoolRow(t *testing.T, command string) string {
	t.Helper()
	data, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if cols := strings.Split(line, " | "); strings.HasPrefix(line, "| `"+command) && len(cols) >= 2 {
			return cols[1]
		}
	}
	t.Fatalf("README.md has no bpftool table row for %q", command)
	return ""
}

// readmeBpftoolShape returns the output shape the README documents for
// command: the first `code` of its row's second column.
func readmeBpftoolShape(t *testing.T, command string) string {
	t.Helper()
	m := regexp.MustCompile("`([^`]*)`").FindStringSubmatch(readmeBpftoolRow(t, command))
	if m == nil {
		t.Fatalf("README.md documents no output shape for %q", command)
	}
	return m[1]
}

// shape makes bpftool output comparable with the README: numbers become N,
// runs of blanks one space.
func shape(s string) string {
	s = regexp.MustCompile(`[0-9]+`).ReplaceAllString(s, "N")
	return strings.Join(strings.Fields(s), " ")
}

// TestReadmeBpftoolTableMatchesBpftool runs the bpftool commands of the
// README's table against a real install and checks that the output shapes
// it documents are what this bpftool prints (issue 18 item 8).
func TestReadmeBpftoolTableMatchesBpftool(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	cg := testutil.NewCgroup(t)
	bpftool, err := exec.LookPath("bpftool")
	if err != nil {
		if testutil.InCI() {
			t.Fatalf("bpftool is needed under CI=true (scripts/install-deps.sh installs it): %v", err)
		}
		t.Skipf("bpftool not found: %v", err)
	}
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", cg.Path, "--tc-dev", "lo", "--bpffs-dir", pinDir)
	bt := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(bpftool, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("bpftool %q: %v\n%s", args, err, out)
		}
		return string(out)
	}
	tcPins, _ := filepath.Glob(filepath.Join(pinDir, "tc", "*"))
	if len(tcPins) != 1 {
		t.Fatalf("tc pins %v, want one (lo)", tcPins)
	}
	mode := statusOf(t, pinDir).TCDevices[0].Mode
	links := map[string]string{
		"bpftool link show pinned /sys/fs/bpf/sockbypass/sk_msg_link": filepath.Join(pinDir, "sk_msg_link"),
	}
	if mode == "tcx" {
		links["bpftool link show pinned /sys/fs/bpf/sockbypass/tc/"] = tcPins[0]
	}
	for row, pin := range links {
		out := bt("link", "show", "pinned", pin)
		want := shape(strings.Split(readmeBpftoolShape(t, row), " / ")[0])
		if got := shape(strings.SplitN(out, "\n", 2)[0]); got != want {
			t.Errorf("%s prints %q; README documents %q", row, got, want)
		}
	}
	// bpftool net: the README says whether this bpftool lists tcx programs.
	net := bt("net")
	listed := strings.Contains(net, "sockbypass_tc_egress")
	if claimsNot := strings.Contains(readmeBpftoolRow(t, "bpftool net"), "does not list tcx"); mode == "tcx" && listed == claimsNot {
		t.Errorf("bpftool net lists the tcx program: %v; README.md says it does not: %v\n%s", listed, claimsNot, net)
	}
	want := readmeBpftoolShape(t, "bpftool cgroup show")
	if out := bt("cgroup", "show", cg.Path); !strings.Contains(shape(out), shape(want)) {
		t.Errorf("bpftool cgroup show prints\n%s\nREADME documents %q", out, want)
	}
}
