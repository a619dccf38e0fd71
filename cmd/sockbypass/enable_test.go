package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// sockOpsProgramsOn returns how many sock_ops programs are attached to cg.
func sockOpsProgramsOn(t *testing.T, cg cgroup.Cgroup) int {
	t.Helper()
	res, err := link.QueryPrograms(link.QueryOptions{Target: cgroupFD(t, cg), Attach: ebpf.AttachCGroupSockOps})
	if err != nil {
		t.Fatalf("query programs on %s: %v", cg.Path, err)
	}
	return len(res.Programs)
}

func cgroupFD(t *testing.T, cg cgroup.Cgroup) int {
	f, err := os.Open(cg.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

func statusOf(t *testing.T, pinDir string) statusJSON {
	t.Helper()
	code, out, errOut := sockbypass(t, "status", "--json", "--bpffs-dir", pinDir)
	if code != 0 {
		t.Fatalf("status exited %d: %s", code, errOut)
	}
	var st statusJSON
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json is not JSON: %v\n%s", err, out)
	}
	return st
}

func TestEnableDisableUninstallContract(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	cgA := testutil.NewCgroup(t)
	cgB := testutil.NewCgroup(t)
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })

	// Absolute path, then the same cgroup relative to the mount: idempotent.
	code, out, errOut := sockbypass(t, "enable", "--cgroup", cgA.Path, "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, "enabled "+cgA.Path) {
		t.Fatalf("enable: exit %d\n%s%s", code, out, errOut)
	}
	code, out, _ = sockbypass(t, "enable", "--cgroup", strings.TrimPrefix(cgA.Rel, "/"), "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, "already enabled") {
		t.Fatalf("second enable: exit %d: %s", code, out)
	}
	if n := sockOpsProgramsOn(t, cgA); n != 1 {
		t.Errorf("%d sock_ops programs on %s after enabling twice, want 1", n, cgA.Path)
	}
	if code, _, errOut := sockbypass(t, "enable", "--cgroup", cgB.Path, "--bpffs-dir", pinDir); code != 0 {
		t.Fatalf("enable B: %s", errOut)
	}

	st := statusOf(t, pinDir)
	if !st.Installed || len(st.Cgroups) != 2 || st.SkMsgProgramID == 0 || st.SockhashMapID == 0 {
		t.Fatalf("status after enabling two cgroups: %+v", st)
	}
	for _, cg := range st.Cgroups {
		if cg.SockOpsProgramID == 0 || (cg.Path != cgA.Path && cg.Path != cgB.Path) {
			t.Errorf("status cgroup entry %+v", cg)
		}
	}
	for _, name := range []string{"sockhash", "cgroup_counters", "sock_state", "sk_msg", "sk_msg_link", "cgroups/" + strconv.FormatUint(cgA.ID, 10)} {
		if _, err := os.Stat(filepath.Join(pinDir, name)); err != nil {
			t.Errorf("pin %s missing: %v", name, err)
		}
	}
	code, out, _ = sockbypass(t, "status", "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, cgA.Path) || !strings.Contains(out, "live socket") {
		t.Errorf("human status: exit %d\n%s", code, out)
	}

	code, out, _ = sockbypass(t, "disable", "--cgroup", cgA.Path, "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, "disabled "+cgA.Path) {
		t.Errorf("disable: exit %d: %s", code, out)
	}
	if n := sockOpsProgramsOn(t, cgA); n != 0 {
		t.Errorf("%d sock_ops programs still on %s after disable", n, cgA.Path)
	}
	code, out, _ = sockbypass(t, "disable", "--cgroup", cgA.Path, "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, "was not enabled") {
		t.Errorf("second disable: exit %d: %s", code, out)
	}

	code, out, errOut = sockbypass(t, "uninstall", "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, "uninstalled") {
		t.Fatalf("uninstall: exit %d\n%s%s", code, out, errOut)
	}
	if _, err := os.Stat(pinDir); !os.IsNotExist(err) {
		t.Errorf("pin directory %s still there after uninstall", pinDir)
	}
	if n := sockOpsProgramsOn(t, cgB); n != 0 {
		t.Errorf("%d sock_ops programs still on %s after uninstall", n, cgB.Path)
	}
	if st := statusOf(t, pinDir); st.Installed {
		t.Errorf("status after uninstall says installed")
	}
	code, out, _ = sockbypass(t, "uninstall", "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, "nothing to do") {
		t.Errorf("second uninstall: exit %d: %s", code, out)
	}
}

func TestEnableBadInputsLeaveNothingAttached(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	good := testutil.NewCgroup(t)
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		t.Fatal(err)
	}
	type tc struct {
		name string
		args []string
		want []string
	}
	cases := []tc{
		{"missing cgroup", []string{"--cgroup", good.Path, "--cgroup", "no-such-cgroup-xyz"}, []string{`"no-such-cgroup-xyz"`, "does not exist", "mkdir"}},
		{"outside the hierarchy", []string{"--cgroup", "/etc"}, []string{`"/etc"`, "not inside the cgroup v2 hierarchy", mounts.V2}},
		{"not on bpffs", []string{"--cgroup", good.Path, "--bpffs-dir", "/tmp/sockbypass-not-bpffs/pins"}, []string{"/tmp/sockbypass-not-bpffs/pins", "not on a bpf filesystem", "mount -t bpf"}},
		{"relative pin dir", []string{"--cgroup", good.Path, "--bpffs-dir", "relative/pins"}, []string{`"relative/pins"`, "absolute"}},
		// Found only once the install exists: the first enable that fails
		// removes it again (no maps, no sk_msg or tracing link left).
		{"missing tc device", []string{"--cgroup", good.Path, "--tc-dev", "nodev-xyz"}, []string{`"nodev-xyz"`, "ip link"}},
	}
	for mp := range mounts.V1 {
		cases = append(cases, tc{"cgroup v1 path", []string{"--cgroup", mp}, []string{mp, "cgroup v1", mounts.V2}})
		break
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			args := append([]string{"enable", "--bpffs-dir", pinDir}, c.args...)
			code, _, errOut := sockbypass(t, args...)
			want := exitError
			if c.name == "relative pin dir" { // a bad command line
				want = exitUsage
			}
			if code != want {
				t.Errorf("exit %d, want %d; stderr %q", code, want, errOut)
			}
			for _, w := range c.want {
				if !strings.Contains(errOut, w) {
					t.Errorf("stderr %q does not mention %q", errOut, w)
				}
			}
			if n := sockOpsProgramsOn(t, good); n != 0 {
				t.Errorf("%d programs left attached to %s", n, good.Path)
			}
			if _, err := os.Stat(pinDir); !os.IsNotExist(err) {
				t.Errorf("pin directory %s created by a failed enable", pinDir)
			}
			if strings.Contains(errOut, "cannot keep") {
				t.Errorf("a failed enable printed the kernel-limitations warning: %q", errOut)
			}
		})
	}
}

func TestNotRootIsRefusedWithAHint(t *testing.T) {
	testutil.RequirePrivileged(t) // we need root to drop to nobody
	pinDir := testutil.NewPinDir(t)
	cg := testutil.NewCgroup(t)
	cmd := exec.Command(worldExecutableCopy(t), "enable", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	cmd.Env = append(os.Environ(), "SOCKBYPASS_TEST_MAIN=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	exitErr, ok := err.(*exec.ExitError)
	if !ok || exitErr.ExitCode() != exitError {
		t.Fatalf("enable as nobody: %v\n%s", err, out)
	}
	for _, w := range []string{"uid 65534", "CAP_BPF", "sudo"} {
		if !strings.Contains(string(out), w) {
			t.Errorf("output %q does not mention %q", out, w)
		}
	}
	if n := sockOpsProgramsOn(t, cg); n != 0 {
		t.Errorf("%d programs attached by an unprivileged enable", n)
	}
}

// worldExecutableCopy copies this test binary where an unprivileged user
// can run it (go test builds it in a root-only directory).
func worldExecutableCopy(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sockbypass-test-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "sockbypass.test")
	if err := os.WriteFile(path, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestDisableRemovedCgroupByID(t *testing.T) {
	pinDir, cg := newInstallDir(t)
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", cg.Path, "--no-tc", "--bpffs-dir", pinDir)
	if err := os.Remove(cg.Path); err != nil {
		t.Fatal(err)
	}
	st := statusOf(t, pinDir)
	if len(st.Cgroups) != 1 || st.Cgroups[0].Path != "" {
		t.Fatalf("status of a removed enabled cgroup: %+v", st.Cgroups)
	}
	code, _, errOut := sockbypass(t, "disable", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	// The hint is --cgroup-id with this cgroup's id, not mkdir.
	if id := strconv.FormatUint(cg.ID, 10); code == 0 || !strings.Contains(errOut, "--cgroup-id") || !strings.Contains(errOut, "id "+id) || strings.Contains(errOut, "mkdir") {
		t.Errorf("disable of a removed path: exit %d, %s; want a hint naming --cgroup-id and id %s", code, errOut, id)
	}
	code, out, errOut := sockbypass(t, "disable", "--cgroup-id", strconv.FormatUint(cg.ID, 10), "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, "disabled cgroup id") {
		t.Fatalf("disable --cgroup-id: exit %d\n%s%s", code, out, errOut)
	}
	if st := statusOf(t, pinDir); len(st.Cgroups) != 0 {
		t.Errorf("still enabled: %+v", st.Cgroups)
	}
	if code, _, errOut := sockbypass(t, "disable", "--cgroup-id", "abc", "--bpffs-dir", pinDir); code != exitUsage || !strings.Contains(errOut, `"abc"`) {
		t.Errorf("bad --cgroup-id: exit %d, %s", code, errOut)
	}
}
