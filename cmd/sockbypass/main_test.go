package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
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
