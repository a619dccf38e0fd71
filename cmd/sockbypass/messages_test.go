package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestMessagesNameTheInput checks issue 18 item 10: an unknown YAML key is
// named with its line and the valid keys (no Go type), and a daemon flag is
// named as the flag, not as a line of a file the user never wrote.
func TestMessagesNameTheInput(t *testing.T) {
	file := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(file, []byte("cgroups: []\nrescanIntervall: 2s\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := sockbypass(t, "daemon", "--config", file)
	if code == 0 || !strings.Contains(errOut, "line 2: unknown key rescanIntervall (valid keys: cgroups, tcDevices, accountOnly, allConnections, noProbation, stackPorts, metricsAddr, logLevel, rescanInterval,") ||
		strings.Contains(errOut, "config.Config") {
		t.Errorf("unknown key: exit %d, stderr %q", code, errOut)
	}
	code, _, errOut = sockbypass(t, "daemon", "--metrics-addr", "nonsense")
	if code != exitUsage || !strings.Contains(errOut, `--metrics-addr "nonsense"`) || strings.Contains(errOut, "line ") {
		t.Errorf("--metrics-addr nonsense: exit %d, stderr %q", code, errOut)
	}
}

// TestRootWithoutPerfmonNamesTheCapability runs status as root with
// CAP_PERFMON (and CAP_SYS_ADMIN, which stands in for it) dropped from the
// bounding set: the error names CAP_PERFMON and does not say "run as root".
func TestRootWithoutPerfmonNamesTheCapability(t *testing.T) {
	testutil.RequirePrivileged(t)
	setpriv := testutil.RequireProgram(t, "setpriv", "(util-linux) to drop capabilities")
	cmd := exec.Command(setpriv, "--bounding-set", "-perfmon,-sys_admin", "--inh-caps", "-perfmon,-sys_admin",
		os.Args[0], "status", "--bpffs-dir", "/sys/fs/bpf/sockbypass-test-absent")
	cmd.Env = append(os.Environ(), "SOCKBYPASS_TEST_MAIN=1")
	out, err := cmd.CombinedOutput()
	exitErr, ok := err.(*exec.ExitError)
	if !ok || exitErr.ExitCode() != exitError {
		t.Fatalf("status without CAP_PERFMON: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "running as root without CAP_PERFMON") || strings.Contains(string(out), "run sockbypass as root") {
		t.Errorf("status as root without CAP_PERFMON: %s", out)
	}
}
