package main

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestEnableRefusesWhileADaemonOwnsThePinDir: a daemon with a selection
// (here --cgroup, which the README documents as a configuration: it
// disables every cgroup it does not name) owns its pin directory; the
// CLI's enable there would be undone at the next rescan, so it refuses,
// naming the daemon's pid and what to do. Once the daemon exits, its
// marker is gone and enable works again.
func TestEnableRefusesWhileADaemonOwnsThePinDir(t *testing.T) {
	pinDir, cgA := newInstallDir(t)
	cgB := testutil.NewCgroup(t)
	mustSockbypass(t, "enable", "--cgroup", cgB.Path, "--bpffs-dir", pinDir)

	cmd := exec.Command(os.Args[0], "daemon", "--cgroup", cgA.Path, "--metrics-addr", "", "--bpffs-dir", pinDir)
	cmd.Env = append(os.Environ(), "SOCKBYPASS_TEST_MAIN=1")
	logs := &testutil.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemonProc{cmd: cmd, logs: logs, exited: make(chan error, 1)}
	go func() { d.exited <- cmd.Wait() }()
	t.Cleanup(func() { d.stop(t) })
	// daemon --cgroup A disables B, enabled by hand (as documented).
	waitEnabled(t, pinDir, d, cgA)

	code, _, errOut := sockbypass(t, "enable", "--cgroup", cgB.Path, "--bpffs-dir", pinDir)
	pid := fmt.Sprintf("pid %d", cmd.Process.Pid)
	if code != exitError || !strings.Contains(errOut, pid) || !strings.Contains(errOut, "add the cgroup to its configuration") || !strings.Contains(errOut, "--cgroup "+cgA.Path) {
		t.Errorf("enable beside a daemon: exit %d, stderr %q; want a refusal naming %s, its --cgroup and the fix", code, errOut, pid)
	}
	if st := statusOf(t, pinDir); len(st.Cgroups) != 1 || st.Cgroups[0].ID != cgA.ID {
		t.Errorf("the refused enable changed something: %+v", st.Cgroups)
	}
	_, _, errOut = sockbypass(t, "disable", "--cgroup", cgA.Path, "--bpffs-dir", pinDir)
	if !strings.Contains(errOut, pid) {
		t.Errorf("disable beside a daemon does not warn: %q", errOut)
	}

	d.stop(t)
	if _, err := os.Stat(lock.DaemonMarker(pinDir)); !os.IsNotExist(err) {
		t.Errorf("the daemon left its marker %s: %v", lock.DaemonMarker(pinDir), err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, out, errOut := sockbypass(t, "enable", "--cgroup", cgB.Path, "--bpffs-dir", pinDir)
		if code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("enable after the daemon exited: exit %d\n%s%s", code, out, errOut)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
