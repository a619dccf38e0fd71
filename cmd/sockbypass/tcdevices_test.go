package main

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// tcDevicesOf returns the accounted devices ([NETNS:]DEV), sorted.
func tcDevicesOf(t *testing.T, pinDir string) []string {
	t.Helper()
	var out []string
	for _, d := range statusOf(t, pinDir).TCDevices {
		out = append(out, d.TCDevice.String())
	}
	sort.Strings(out)
	return out
}

// TestEnableConvergesOnTheGivenTCDevices checks issue 18 item 6: enable on
// an enabled cgroup makes its devices exactly the ones given (--tc-dev
// replaces, --no-tc removes), and never detaches a device that another
// enabled cgroup still asks for.
func TestEnableConvergesOnTheGivenTCDevices(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	a, b := testutil.NewCgroup(t), testutil.NewCgroup(t)
	netns := testutil.NewNetNS(t)
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	podLo := netns.Path() + ":lo"
	enable := func(args ...string) string {
		t.Helper()
		code, out, errOut := sockbypass(t, append([]string{"enable", "--bpffs-dir", pinDir}, args...)...)
		if code != 0 {
			t.Fatalf("enable %q: exit %d: %s", args, code, errOut)
		}
		return out
	}
	check := func(step string, want ...string) {
		t.Helper()
		sort.Strings(want)
		if got := tcDevicesOf(t, pinDir); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s: tc devices %q, want %q", step, got, want)
		}
	}
	enable("--cgroup", a.Path)
	check("enable a (no TC device by default)")
	enable("--cgroup", a.Path, "--tc-dev", "lo")
	check("enable a --tc-dev lo", "lo")
	enable("--cgroup", a.Path, "--tc-dev", podLo)
	check("enable a --tc-dev NETNS:lo (replaces lo)", podLo)
	enable("--cgroup", a.Path, "--tc-dev", "lo", "--tc-dev", podLo)
	check("enable a --tc-dev lo --tc-dev NETNS:lo", "lo", podLo)
	enable("--cgroup", a.Path, "--no-tc")
	check("enable a --no-tc")

	// Shared devices: b asks for lo, a asks for lo then nothing; lo stays
	// while b asks for it.
	enable("--cgroup", b.Path, "--tc-dev", "lo")
	enable("--cgroup", a.Path, "--tc-dev", "lo", "--tc-dev", podLo)
	check("a: lo + NETNS:lo, b: lo", "lo", podLo)
	enable("--cgroup", a.Path, "--no-tc")
	check("a: none, b: lo", "lo")
	enable("--cgroup", b.Path, "--no-tc")
	check("a: none, b: none")
}

// TestDaemonLogsOnlyChangesAtInfo checks issue 18 item 11: the daemon's
// default level is info and --help says so; at info a rescan that changes
// nothing logs nothing about the cgroup; a detached device is logged with
// its full spec.
func TestDaemonLogsOnlyChangesAtInfo(t *testing.T) {
	code, out, _ := sockbypass(t, "daemon", "--help")
	if code != 0 || !strings.Contains(out, `(default "info")`) {
		t.Errorf("daemon --help does not give info as the default log level:\n%s", out)
	}
	pinDir := testutil.NewPinDir(t)
	cg := testutil.NewCgroup(t)
	netns := testutil.NewNetNS(t)
	podLo := netns.Path() + ":lo"
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	addr := testutil.FreeAddr(t)
	d := startDaemonWith(t, pinDir, fmt.Sprintf("cgroups: [%s]\ntcDevices: [%q]\nmetricsAddr: %s\nrescanInterval: 100ms\n", cg.Path, podLo, addr), cg)
	waitReconciles(t, d, addr, 10)
	d.stop(t)
	logs := d.logs.String()
	if !strings.Contains(logs, "enabled cgroup") || strings.Contains(logs, "DEBUG") {
		t.Errorf("daemon without --log-level does not log at info:\n%s", logs)
	}
	if strings.Contains(logs, "already enabled") {
		t.Errorf("rescans that changed nothing were logged at info:\n%s", logs)
	}

	code, _, errOut := sockbypass(t, "disable", "--cgroup", cg.Path, "--bpffs-dir", pinDir, "--log-level", "info")
	if code != 0 || !strings.Contains(errOut, "detached tc egress accounting") || !strings.Contains(errOut, `"`+podLo+`"`) {
		t.Errorf("disable: exit %d; the detached device is not logged as %s:\n%s", code, podLo, errOut)
	}
}

// waitReconciles waits until the daemon d, serving its metrics at addr,
// has finished at least n reconciles (sockbypass_reconciles_total): its
// first, then one per rescan.
func waitReconciles(t *testing.T, d *daemonProc, addr string, n int) {
	t.Helper()
	re := regexp.MustCompile(`(?m)^sockbypass_reconciles_total (\d+)$`)
	deadline := time.Now().Add(20 * time.Second)
	got := "none"
	for {
		if _, body := httpGet("http://" + addr + "/metrics"); body != "" {
			if m := re.FindStringSubmatch(body); m != nil {
				got = m[1]
				if v, _ := strconv.Atoi(m[1]); v >= n {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("sockbypass_reconciles_total %s after 20 s, want %d; logs:\n%s", got, n, d.logs.String())
		}
		time.Sleep(20 * time.Millisecond) // poll interval
	}
}

// TestDaemonConvergesOnItsTCDevices: a device added to a cgroup the daemon
// manages (by another tool: the CLI refuses beside a daemon) is dropped at the next rescan, since
// the daemon's tcDevices say what the cgroup accounts (issue 18 item 6).
func TestDaemonConvergesOnItsTCDevices(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	cg := testutil.NewCgroup(t)
	netns := testutil.NewNetNS(t)
	podLo := netns.Path() + ":lo"
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	d := startDaemonWith(t, pinDir, fmt.Sprintf("cgroups: [%s]\ntcDevices: [lo]\nmetricsAddr: ''\nrescanInterval: 100ms\n", cg.Path), cg)
	// The CLI refuses to enable beside the daemon (it owns the pin
	// directory): drift made by another tool (an older CLI) goes through
	// the dataplane directly.
	if code, _, errOut := sockbypass(t, "enable", "--cgroup", cg.Path, "--tc-dev", "lo", "--tc-dev", podLo, "--bpffs-dir", pinDir); code == 0 || !strings.Contains(errOut, "manages "+pinDir) {
		t.Errorf("enable beside the daemon: exit %d, %s", code, errOut)
	}
	dp, err := dataplane.Open(dataplane.Options{PinDir: pinDir})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dp.Enable(cg, dataplane.EnableOptions{NoProbation: true, TCDevices: []dataplane.TCDevice{{Name: "lo"}, {NetnsPath: netns.Path(), Name: "lo"}}}); err != nil {
		t.Fatal(err)
	}
	dp.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := tcDevicesOf(t, pinDir)
		if fmt.Sprint(got) == "[lo]" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon (tcDevices: [lo]) left tc devices %q attached; logs:\n%s", got, d.logs.String())
		}
		time.Sleep(50 * time.Millisecond) // poll interval
	}
	if !strings.Contains(d.logs.String(), "cgroup settings changed") {
		t.Errorf("the daemon did not log the change at info:\n%s", d.logs.String())
	}
}
