package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// daemonProc is a sockbypass daemon running as a child process.
type daemonProc struct {
	cmd    *exec.Cmd
	config string // the config file's path
	logs   *testutil.SyncBuffer
	exited chan error
}

// startDaemon runs `sockbypass daemon --config configPath` as a child and
// stops it (SIGTERM, then SIGKILL) when the test ends.
func startDaemon(t *testing.T, pinDir, configPath string, extra ...string) *daemonProc {
	t.Helper()
	return startDaemonEnv(t, pinDir, configPath, "", extra...)
}

// startDaemonEnv is startDaemon with one more environment variable
// (KEY=VALUE, "" for none).
func startDaemonEnv(t *testing.T, pinDir, configPath, env string, extra ...string) *daemonProc {
	t.Helper()
	args := append([]string{"daemon", "--config", configPath, "--bpffs-dir", pinDir}, extra...)
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "SOCKBYPASS_TEST_MAIN=1")
	if env != "" {
		cmd.Env = append(cmd.Env, env)
	}
	logs := &testutil.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemonProc{cmd: cmd, config: configPath, logs: logs, exited: make(chan error, 1)}
	go func() { d.exited <- cmd.Wait() }()
	t.Cleanup(func() { d.stop(t) })
	return d
}

func (d *daemonProc) stop(t *testing.T) {
	if d.cmd.ProcessState != nil {
		return
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-d.exited
	}
}

func writeConfig(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// startDaemonWith writes config to a file of the test's own, starts the
// daemon on it (see startDaemon) and waits until exactly the cgroups want
// are enabled.
func startDaemonWith(t *testing.T, pinDir, config string, want ...cgroup.Cgroup) *daemonProc {
	t.Helper()
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, cfgPath, config)
	d := startDaemon(t, pinDir, cfgPath)
	waitEnabled(t, pinDir, d, want...)
	return d
}

// waitEnabled waits until exactly the cgroups want are enabled.
func waitEnabled(t *testing.T, pinDir string, d *daemonProc, want ...cgroup.Cgroup) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, out, _ := sockbypass(t, "status", "--json", "--bpffs-dir", pinDir)
		if code == 0 {
			got := map[uint64]bool{}
			st := statusJSON{}
			if jsonUnmarshal(out, &st) == nil && st.Status != nil {
				for _, cg := range st.Cgroups {
					got[cg.ID] = true
				}
				ok := len(got) == len(want)
				for _, cg := range want {
					ok = ok && got[cg.ID]
				}
				if ok {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not converge on %d enabled cgroups; logs:\n%s", len(want), d.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// echoListener serves echo connections (read/write loop) in cg.
func echoListener(t *testing.T, cg cgroup.Cgroup) net.Listener {
	t.Helper()
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(l)
	return l
}

// echoTransfer sends size bytes through conn in 16 KiB writes, pausing at
// each MiB (long enough to span a daemon kill), reads the echo
// concurrently, and fails unless the echo is identical.
func echoTransfer(c net.Conn, seed, size int) error {
	return transfer.RoundTrip(c, transfer.Pattern(uint64(seed), size),
		transfer.Options{WriteSize: 16 << 10, PauseEvery: 1 << 20, Pause: 2 * time.Millisecond})
}

func redirectedOf(t *testing.T, pinDir string, id uint64) uint64 {
	t.Helper()
	for _, c := range statsJSON(t, pinDir).Cgroups {
		if c.ID == id {
			return c.RedirectedBytes
		}
	}
	return 0
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }

func TestDaemonKill9DuringTransfersLosesNothingAndRestartAdopts(t *testing.T) {
	pinDir, cg := newInstallDir(t)
	d := startDaemonWith(t, pinDir, fmt.Sprintf("cgroups: [%s]\ntcDevices: []\nnoProbation: true\nmetricsAddr: ''\nrescanInterval: 200ms\n", cg.Path), cg)

	l := echoListener(t, cg)
	const conns = 32
	clients := make([]net.Conn, conns)
	for i := range clients {
		clients[i] = testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	}
	errs := make([]error, conns)
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = echoTransfer(c, i+1, 8<<20) }()
	}
	// Kill once the transfers are under way on the fast path.
	deadline := time.Now().Add(10 * time.Second)
	for redirectedOf(t, pinDir, cg.ID) < 8<<20 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if redirectedOf(t, pinDir, cg.ID) < 8<<20 {
		t.Fatal("nothing was redirected before the kill: the test did not exercise the fast path")
	}
	d.cmd.Process.Kill() // kill -9
	<-d.exited
	atKill := redirectedOf(t, pinDir, cg.ID)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("transfer %d across kill -9: %v", i, err)
		}
	}
	// The pinned programs kept redirecting with no daemon: the transfers
	// (2 x 32 x 8 MiB in all) did not fall back to the stack.
	before := redirectedOf(t, pinDir, cg.ID)
	if before < atKill+8<<20 {
		t.Errorf("only %d bytes redirected after kill -9 (%d at the kill): the datapath stopped with the daemon", before-atKill, atKill)
	}
	// New connections too, before any daemon is back.
	nc := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	if err := echoTransfer(nc, 98, 1<<20); err != nil {
		t.Fatal(err)
	}
	nc.Close()
	if mid := redirectedOf(t, pinDir, cg.ID); mid < before+2<<20 {
		t.Errorf("a connection made while no daemon ran was not accelerated: %d more bytes redirected, want %d", mid-before, 2<<20)
	}
	before = redirectedOf(t, pinDir, cg.ID)

	d2 := startDaemon(t, pinDir, d.config)
	waitEnabled(t, pinDir, d2, cg)
	deadline = time.Now().Add(10 * time.Second)
	for !strings.Contains(d2.logs.String(), "adopted pinned state") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(d2.logs.String(), "adopted pinned state") {
		t.Errorf("restarted daemon did not say it adopted the pins:\n%s", d2.logs.String())
	}
	c := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	if err := echoTransfer(c, 99, 4<<20); err != nil {
		t.Fatal(err)
	}
	if after := redirectedOf(t, pinDir, cg.ID); after <= before {
		t.Errorf("counters did not continue after the restart: %d then %d", before, after)
	}
}

func TestDaemonNoticesRemovedCgroupAndKeepsServing(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	parent := testutil.NewCgroup(t)
	mounts, _ := cgroup.ReadMounts()
	var pods []cgroup.Cgroup
	for _, name := range []string{"pod-a", "pod-b"} {
		dir := filepath.Join(parent.Path, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(dir) })
		cg, err := mounts.Resolve(dir)
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, cg)
	}
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	d := startDaemonWith(t, pinDir, fmt.Sprintf("cgroups: ['%s/pod-*']\ntcDevices: []\nnoProbation: true\nmetricsAddr: ''\nrescanInterval: 200ms\n", parent.Path), pods...)

	if err := os.Remove(pods[1].Path); err != nil {
		t.Fatal(err)
	}
	waitEnabled(t, pinDir, d, pods[0])
	if !strings.Contains(d.logs.String(), "cgroup removed") {
		t.Errorf("daemon did not log the removal:\n%s", d.logs.String())
	}
	if _, err := os.Stat(filepath.Join(pinDir, "cgroups", fmt.Sprint(pods[1].ID))); !os.IsNotExist(err) {
		t.Errorf("the removed cgroup's link pin is still there")
	}
	// The rest keeps working, and a new pod matching the glob is picked up.
	l := echoListener(t, pods[0])
	c := testutil.DialIn(t, pods[0], "tcp4", l.Addr().String())
	if err := echoTransfer(c, 3, 1<<20); err != nil {
		t.Fatal(err)
	}
	if redirectedOf(t, pinDir, pods[0].ID) == 0 {
		t.Error("the remaining cgroup is not accelerated")
	}
	dir := filepath.Join(parent.Path, "pod-c")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(dir) })
	podC, _ := mounts.Resolve(dir)
	waitEnabled(t, pinDir, d, pods[0], podC)
}

func TestDaemonSockhashFullFallsBackAndSaysSo(t *testing.T) {
	pinDir, cg := newInstallDir(t)
	d := startDaemonWith(t, pinDir, fmt.Sprintf("cgroups: [%s]\ntcDevices: []\nnoProbation: true\nmetricsAddr: ''\nrescanInterval: 200ms\nsockhashSize: 4\n", cg.Path), cg)

	l := echoListener(t, cg)
	var conns []net.Conn
	for i := 0; i < 6; i++ { // 12 sockets for 4 places
		c := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
		conns = append(conns, c)
	}
	for i, c := range conns {
		if err := echoTransfer(c, i+7, 256<<10); err != nil {
			t.Errorf("connection %d with a full sockhash: %v", i, err)
		}
	}
	r := statsJSON(t, pinDir)
	// Two pairs fill the 4 places; each of the 4 other connections counts
	// one failure (its client cannot join, so its server does not try)
	// and stays plain TCP, both ends.
	if len(r.Cgroups) != 1 || r.Cgroups[0].InsertFailures != 4 || r.Cgroups[0].SocketsInserted != 4 || r.SockhashCapacity != 4 {
		t.Fatalf("stats with a full sockhash: %+v capacity %d", r.Cgroups, r.SockhashCapacity)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(d.logs.String(), "sockhash full") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(d.logs.String(), "sockhash full") {
		t.Errorf("no log line about the full sockhash:\n%s", d.logs.String())
	}
}

func TestTenThousandShortConnectionsLeakNothing(t *testing.T) {
	pinDir, cg := newInstallDir(t)
	// --all-connections: every one of these short connections pairs
	// (by default the listener would soon leave them plain), so each
	// goes through the whole insert and remove bookkeeping.
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", cg.Path, "--no-tc", "--all-connections", "--bpffs-dir", pinDir)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeDiscard(l)
	const n = 10000
	failures, done := 0, 0
	start := time.Now()
	msg := []byte("short connection payload 0123456789abcdef0123456789abcdef0123456789")
	testutil.InCgroup(t, cg, func() {
		for i := 0; i < n && time.Since(start) < 90*time.Second; i++ {
			c, err := net.DialTimeout("tcp4", l.Addr().String(), 5*time.Second)
			if err != nil {
				failures++
				continue
			}
			if _, err := c.Write(msg); err != nil {
				failures++
			}
			c.Close()
			done++
		}
	})
	t.Logf("%d of %d connections in %v, %d failures", done, n, time.Since(start), failures)
	if done != n {
		t.Fatalf("only %d of %d connections were made within 90 s", done, n)
	}
	if failures != 0 {
		t.Errorf("%d of %d short connections failed", failures, n)
	}
	// Both ends of every connection join (a pair), or the client joined
	// and gave the pair up because it wrote before its server joined (the
	// server then stays out and takes it out again): 2 insertions per
	// connection, minus one per abandoned pair.
	r := statsJSON(t, pinDir)
	if got, abandoned := r.Cgroups[0].SocketsInserted, r.Cgroups[0].PairsAbandoned; got+abandoned != 2*n {
		t.Errorf("%d sockets inserted and %d pairs abandoned for %d connections: want inserted + abandoned = %d", got, abandoned, n, 2*n)
	}
	// Every socket leaves the sockhash, and our bookkeeping, when it closes.
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := map[string]int{}
		for _, name := range []string{"sockhash", "socket_cgroups", "pairs"} {
			m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), nil)
			if err != nil {
				t.Fatal(err)
			}
			var k, v []byte
			k = make([]byte, m.KeySize())
			v = make([]byte, m.ValueSize())
			it := m.Iterate()
			for it.Next(&k, &v) {
				left[name]++
			}
			m.Close()
		}
		if left["sockhash"] == 0 && left["socket_cgroups"] == 0 && left["pairs"] == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("entries left after every connection closed: %v", left)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestDaemonRefusesBadConfigsAndKeepsThePreviousOnReload(t *testing.T) {
	testutil.RequirePrivileged(t)
	pinDir := testutil.NewPinDir(t)
	dir := t.TempDir()
	for name, content := range map[string]string{
		"unknown-key": "cgroups: []\ncgroupz: [x]\n",
		"bad-glob":    "cgroups:\n  - 'x/[a-'\n",
		"missing":     "cgroups:\n  - no-such-cgroup-sockbypass\n",
		"wrong-type":  "cgroups: []\nrescanInterval: [1]\n",
	} {
		path := filepath.Join(dir, name+".yaml")
		writeConfig(t, path, content)
		code, _, errOut := sockbypass(t, "daemon", "--config", path, "--bpffs-dir", pinDir)
		if code == 0 || !strings.Contains(errOut, "line ") || !strings.Contains(errOut, path) {
			t.Errorf("%s: exit %d, stderr %q; want a refusal naming the file and line", name, code, errOut)
		}
	}
	if _, err := os.Stat(pinDir); !os.IsNotExist(err) {
		t.Errorf("a refused config left pins in %s", pinDir)
	}

	a := testutil.NewCgroup(t)
	b := testutil.NewCgroup(t)
	cfgPath := filepath.Join(dir, "config.yaml")
	writeConfig(t, cfgPath, fmt.Sprintf("cgroups: [%s]\ntcDevices: []\nnoProbation: true\nmetricsAddr: ''\nrescanInterval: 200ms\n", a.Path))
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	d := startDaemon(t, pinDir, cfgPath)
	waitEnabled(t, pinDir, d, a)

	writeConfig(t, cfgPath, fmt.Sprintf("cgroups: [%s]\nbogus: true\n", b.Path))
	d.cmd.Process.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(d.logs.String(), "reload refused") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if logs := d.logs.String(); !strings.Contains(logs, "reload refused") || !strings.Contains(logs, "line 2") {
		t.Fatalf("bad reload not refused with its line:\n%s", logs)
	}
	time.Sleep(500 * time.Millisecond)
	waitEnabled(t, pinDir, d, a) // the previous configuration stays

	writeConfig(t, cfgPath, fmt.Sprintf("cgroups: [%s, %s]\ntcDevices: []\nnoProbation: true\nmetricsAddr: ''\nrescanInterval: 200ms\n", a.Path, b.Path))
	d.cmd.Process.Signal(syscall.SIGHUP)
	waitEnabled(t, pinDir, d, a, b)
	writeConfig(t, cfgPath, fmt.Sprintf("cgroups: [%s]\ntcDevices: []\nnoProbation: true\nmetricsAddr: ''\nrescanInterval: 200ms\n", b.Path))
	d.cmd.Process.Signal(syscall.SIGHUP)
	waitEnabled(t, pinDir, d, b) // detaches what the config no longer names
}

func TestUpgradeCommand(t *testing.T) {
	pinDir, cg := newInstallDir(t)
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", cg.Path, "--tc-dev", "lo", "--bpffs-dir", pinDir)
	before := statusOf(t, pinDir)
	code, out, errOut := sockbypass(t, "upgrade", "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, "upgraded: programs of 1 cgroup(s), 1 TC device(s)") {
		t.Fatalf("upgrade: exit %d\n%s%s", code, out, errOut)
	}
	if strings.Contains(out, "tracer") {
		t.Errorf("upgrade of an install without a tracer mentions one: %s", out)
	}
	after := statusOf(t, pinDir)
	if after.SkMsgProgramID == before.SkMsgProgramID || after.Cgroups[0].SockOpsProgramID == before.Cgroups[0].SockOpsProgramID {
		t.Errorf("programs not replaced: sk_msg %d -> %d, sock_ops %d -> %d", before.SkMsgProgramID, after.SkMsgProgramID,
			before.Cgroups[0].SockOpsProgramID, after.Cgroups[0].SockOpsProgramID)
	}
	trafficIn(t, pinDir, cg, 1<<20)
}

// TestDaemonFlagsAndFailuresBeforeState: --metrics-addr with --config is
// refused (it used to be ignored silently), and a daemon that cannot bind
// its metrics address fails before it touches the pinned state (it used
// to replace every program first).
func TestDaemonFlagsAndFailuresBeforeState(t *testing.T) {
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, cfgPath, "cgroups: []\ntcDevices: []\nmetricsAddr: ''\n")
	// In a process of its own, bounded: should the check go, the daemon
	// would run instead of failing.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "daemon", "--config", cfgPath, "--metrics-addr", "127.0.0.1:19999", "--bpffs-dir", testutil.NewPinDir(t))
	cmd.Env = append(os.Environ(), "SOCKBYPASS_TEST_MAIN=1")
	out, _ := cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); code != exitUsage || !strings.Contains(string(out), "--metrics-addr") || !strings.Contains(string(out), "metricsAddr") {
		t.Errorf("--config with --metrics-addr: exit %d, output %q; want %d naming both", code, out, exitUsage)
	}

	pinDir, cg := newInstallDir(t)
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", cg.Path, "--no-tc", "--bpffs-dir", pinDir)
	pin := filepath.Join(pinDir, "cgroups", strconv.FormatUint(cg.ID, 10))
	before := testutil.LinkProgramID(t, pin)
	busy, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	writeConfig(t, cfgPath, fmt.Sprintf("cgroups: [%s]\ntcDevices: []\nmetricsAddr: %s\n", cg.Path, busy.Addr()))
	d := startDaemon(t, pinDir, cfgPath)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("daemon with a busy metrics address did not exit")
	}
	if !strings.Contains(d.logs.String(), busy.Addr().String()) {
		t.Errorf("the error does not name the metrics address:\n%s", d.logs.String())
	}
	if after := testutil.LinkProgramID(t, pin); after != before {
		t.Errorf("a daemon that failed to start replaced the cgroup's program (%d -> %d)", before, after)
	}
}
