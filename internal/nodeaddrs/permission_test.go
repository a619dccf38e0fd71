package nodeaddrs

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestCollectHelperProcess is not a test: run by
// TestCollectReportsNamespacesItCannotEnter in a child process without
// CAP_SYS_ADMIN, it collects the cgroup named by the environment and
// prints what Collect returned.
func TestCollectHelperProcess(t *testing.T) {
	path := os.Getenv("SOCKBYPASS_COLLECT_CGROUP")
	if path == "" {
		return // only in the helper process
	}
	cg, err := cgroup.Resolve(path)
	if err != nil {
		fmt.Printf("RESULT resolve: %v\n", err)
		return
	}
	_, err = Collect([]cgroup.Cgroup{cg})
	fmt.Printf("RESULT permission=%v eperm=%v err=%v\n", errors.Is(err, ErrPermission), errors.Is(err, unix.EPERM), err)
}

// TestCollectReportsNamespacesItCannotEnter: without CAP_SYS_ADMIN (no
// setns), the namespace of a pod's process cannot be entered; Collect must
// say so with ErrPermission and the namespace's path, not skip it as if
// the process had exited (a library that wraps EPERM with %v hides it from
// errors.Is).
func TestCollectReportsNamespacesItCannotEnter(t *testing.T) {
	testutil.RequirePrivileged(t)
	setpriv := testutil.RequireProgram(t, "setpriv", "(util-linux) to drop CAP_SYS_ADMIN")
	pod := testutil.NewPod(t)
	cmd := exec.Command(setpriv, "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
		os.Args[0], "-test.run", "^TestCollectHelperProcess$", "-test.count", "1")
	cmd.Env = append(os.Environ(), "SOCKBYPASS_COLLECT_CGROUP="+pod.Cgroup.Path)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "RESULT permission=true eperm=true err=") || !strings.Contains(string(out), "/proc/") {
		t.Errorf("Collect without CAP_SYS_ADMIN did not report ErrPermission with the namespace and its EPERM:\n%s", out)
	}

	// With the capability, the same pod is collected without an error.
	if _, err := Collect([]cgroup.Cgroup{pod.Cgroup}); err != nil {
		t.Errorf("Collect with privileges: %v", err)
	}
}
