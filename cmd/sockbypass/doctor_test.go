package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/semantics"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

func TestDoctorReportsEveryCaseAndCleansUp(t *testing.T) {
	testutil.RequirePrivileged(t)
	code, out, errOut := sockbypass(t, "doctor", "--json")
	if code != 0 {
		t.Fatalf("doctor exited %d: %s\n%s", code, errOut, out)
	}
	var rep doctorReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Broken != 0 || len(rep.Results) != len(semantics.Cases()) {
		t.Fatalf("doctor: %d broken, %d results", rep.Broken, len(rep.Results))
	}
	for _, r := range rep.Results {
		if r.Verdict == semantics.VerdictBroken {
			t.Errorf("%s: %s", r.Case, r.Verdict)
		}
	}
	// Nothing of the doctor's stays behind.
	if m, _ := filepath.Glob("/sys/fs/bpf/sockbypass-doctor-*"); len(m) > 0 {
		t.Errorf("doctor left pins: %v", m)
	}
	mounts, _ := cgroup.ReadMounts()
	if m, _ := filepath.Glob(filepath.Join(mounts.V2, "sockbypass-doctor-*")); len(m) > 0 {
		t.Errorf("doctor left cgroups: %v", m)
	}

	code, out, _ = sockbypass(t, "doctor", "--markdown")
	if code != 0 || !strings.HasPrefix(out, "| case | behaviour |") || !strings.Contains(out, semantics.VerdictKnown) {
		t.Errorf("doctor --markdown: exit %d\n%s", code, out)
	}
}

func TestEnableWarnsAboutKnownLimitations(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	cg := testutil.NewCgroup(t)
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	code, _, errOut := sockbypass(t, "enable", "--cgroup", cg.Path, "--no-tc", "--bpffs-dir", pinDir)
	if code != 0 {
		t.Fatal(errOut)
	}
	for _, name := range knownLimitations() {
		if !strings.Contains(errOut, name) {
			t.Errorf("enable's warning does not name %q:\n%s", name, errOut)
		}
	}
}
