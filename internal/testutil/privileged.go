// Package testutil holds the helpers that privileged tests share: the
// skip-or-fail decision, and cgroups, pin directories and network namespaces
// that are created per test and removed after it, even when it fails.
package testutil

import (
	"os"
	"os/exec"
	"testing"

	"github.com/sockbypass/sockbypass/internal/privilege"
)

// InCI reports whether the tests run in CI (CI=true), where a privileged
// test that cannot run must fail instead of skipping.
func InCI() bool { return os.Getenv("CI") == "true" }

// RequirePrivileged skips tb (fails it under CI=true) unless the process may
// load BPF programs and the kernel supports sockbypass.
func RequirePrivileged(tb testing.TB) {
	tb.Helper()
	err := privilege.Check()
	if err == nil {
		err = privilege.CheckKernel()
	}
	if err == nil {
		return
	}
	if InCI() {
		tb.Fatalf("privileged test cannot run under CI=true: %v", err)
	}
	tb.Skipf("privileged test skipped: %v", err)
}

// RequireProgram returns the path of the program name (what it is needed
// for: why), and skips tb without it (fails it under CI=true, whose machine
// must have it).
func RequireProgram(tb testing.TB, name, why string) string {
	tb.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if InCI() {
		tb.Fatalf("%s is needed %s under CI=true: %v", name, why, err)
	}
	tb.Skipf("%s not found (needed %s): %v", name, why, err)
	return ""
}
