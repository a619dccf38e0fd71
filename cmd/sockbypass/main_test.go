package main

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestMain lets tests run this binary's main in a child process (for
// example as an unprivileged user) by setting SOCKBYPASS_TEST_MAIN=1.
func TestMain(m *testing.M) {
	if os.Getenv("SOCKBYPASS_TEST_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// sockbypass runs the command line in-process and returns its exit code
// and output.
func sockbypass(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// mustSockbypass runs the command line in-process like sockbypass and fails
// t with its stderr unless it exits 0; it returns its stdout.
func mustSockbypass(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errOut := sockbypass(t, args...)
	if code != 0 {
		t.Fatal(errOut)
	}
	return out
}

// newInstallDir returns a pin directory of the test's own and a fresh
// cgroup, and runs `sockbypass uninstall` on the directory when the test
// ends (before the cgroup and the directory are removed).
func newInstallDir(t *testing.T) (pinDir string, cg cgroup.Cgroup) {
	t.Helper()
	pinDir = testutil.NewPinDir(t)
	cg = testutil.NewCgroup(t)
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	return pinDir, cg
}

func TestHelpListsEveryCommand(t *testing.T) {
	code, out, _ := sockbypass(t, "help")
	if code != 0 {
		t.Fatalf("help exited %d", code)
	}
	for name := range commands {
		if !strings.Contains(out, "\n  "+name+" ") {
			t.Errorf("help does not list %q:\n%s", name, out)
		}
	}
	if !strings.Contains(out, "--bpffs-dir") {
		t.Errorf("help does not document --bpffs-dir")
	}
}

func TestUnknownCommandAndFlag(t *testing.T) {
	code, _, errOut := sockbypass(t, "frobnicate")
	if code != exitUsage || !strings.Contains(errOut, `unknown command "frobnicate"`) {
		t.Errorf("unknown command: exit %d, stderr %q", code, errOut)
	}
	code, _, errOut = sockbypass(t, "enable", "--cgroupz", "x")
	if code != exitUsage || !strings.Contains(errOut, "cgroupz") {
		t.Errorf("unknown flag: exit %d, stderr %q", code, errOut)
	}
	code, _, errOut = sockbypass(t, "enable")
	if code != exitUsage || !strings.Contains(errOut, "--cgroup is required") {
		t.Errorf("missing --cgroup: exit %d, stderr %q", code, errOut)
	}
	code, _, errOut = sockbypass(t, "status", "--log-level", "loud")
	if code != exitUsage || !strings.Contains(errOut, `--log-level "loud"`) {
		t.Errorf("bad log level: exit %d, stderr %q", code, errOut)
	}
}
