package e2e

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/dptest"
)

// Helpers of the application-level regression tests in apps_test.go.

// plainEnv is the switch that runs the application tests without
// acceleration: SOCKBYPASS_TEST_PLAIN=1 installs the dataplane but never
// enables a cgroup (nor refreshes node addresses), and skips the assertions
// that acceleration engaged. Every other check stays, so a test that fails
// with it set is wrong itself (or the machine is), not the datapath:
//
//	SOCKBYPASS_TEST_PLAIN=1 go test -count=1 -run 'TestNginx|TestBlocking|TestFIONREAD|TestSenderFirst' -v ./e2e/
const plainEnv = "SOCKBYPASS_TEST_PLAIN"

// pythonBin is the interpreter of the embedded scripts (the system one, not
// whatever a version manager puts first in PATH).
const pythonBin = "/usr/bin/python3"

// plainMode reports whether SOCKBYPASS_TEST_PLAIN=1 is set.
func plainMode() bool { return os.Getenv(plainEnv) == "1" }

// appsDataplane installs a dataplane of the test's own (uninstalled at its
// end), in both modes.
func appsDataplane(t *testing.T) *dataplane.Dataplane {
	t.Helper()
	testutil.RequirePrivileged(t)
	if plainMode() {
		t.Logf("%s=1: acceleration is NOT enabled, this is the plain-TCP reference run", plainEnv)
	}
	return dptest.Install(t)
}

// enable enables cgs in dp without probation (their listeners' first
// connections pair too), unless in plain mode.
func enable(t testing.TB, dp *dataplane.Dataplane, cgs ...cgroup.Cgroup) {
	t.Helper()
	enableWith(t, dp, dataplane.EnableOptions{NoProbation: true}, cgs...)
}

// enableDefaults enables cgs in dp with the default settings (a new
// listener is on probation: see "Probation" in bpf/sockbypass.h), unless
// in plain mode.
func enableDefaults(t testing.TB, dp *dataplane.Dataplane, cgs ...cgroup.Cgroup) {
	t.Helper()
	enableWith(t, dp, dataplane.EnableOptions{}, cgs...)
}

// enableWith enables cgs in dp with opts, unless in plain mode.
func enableWith(t testing.TB, dp *dataplane.Dataplane, opts dataplane.EnableOptions, cgs ...cgroup.Cgroup) {
	t.Helper()
	if plainMode() {
		return
	}
	for _, cg := range cgs {
		if _, err := dp.Enable(cg, opts); err != nil {
			t.Fatalf("enable %s: %v", cg.Path, err)
		}
	}
}

// counters returns dp's counters of cg (zero when nothing was counted).
func counters(t testing.TB, dp *dataplane.Dataplane, cg cgroup.Cgroup) dataplane.CgroupCounters {
	t.Helper()
	c, err := dp.Counters()
	if err != nil {
		t.Fatalf("read counters: %v", err)
	}
	return c[cg.ID]
}

// counterSummary lists the non-zero counters of c by name (by reflection,
// so that it follows the counters the datapath has).
func counterSummary(c dataplane.CgroupCounters) string {
	v := reflect.ValueOf(c)
	var parts []string
	for i := 0; i < v.NumField(); i++ {
		if f := v.Field(i); f.Kind() == reflect.Uint64 && f.Uint() != 0 {
			parts = append(parts, fmt.Sprintf("%s=%d", v.Type().Field(i).Name, f.Uint()))
		}
	}
	if len(parts) == 0 {
		return "(all counters zero)"
	}
	return strings.Join(parts, " ")
}

// eventLog collects the datapath's fallback events (late_blocking,
// listener_blocking_children, ...) while a test runs, in the order the
// datapath emitted them.
type eventLog struct {
	r      *dataplane.EventReader
	mu     sync.Mutex
	events []dataplane.FallbackEvent
	done   chan struct{}
	once   sync.Once
}

// collectEvents starts collecting dp's fallback events until stop (or the
// end of t).
func collectEvents(t testing.TB, dp *dataplane.Dataplane) *eventLog {
	t.Helper()
	r, err := dp.ReadEvents()
	if err != nil {
		t.Fatalf("read events: %v", err)
	}
	l := &eventLog{r: r, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for {
			e, err := r.Read()
			if err != nil {
				return
			}
			l.mu.Lock()
			l.events = append(l.events, e)
			l.mu.Unlock()
		}
	}()
	t.Cleanup(func() { l.stop() })
	return l
}

// stop stops collecting (after a moment for the events already emitted to
// be read) and returns the events.
func (l *eventLog) stop() []dataplane.FallbackEvent {
	l.once.Do(func() {
		time.Sleep(100 * time.Millisecond)
		l.r.Close()
		<-l.done
	})
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.events
}

// eventSummary lists events of cgroup id: how many of each reason, and,
// with all, each one in order.
func eventSummary(events []dataplane.FallbackEvent, id uint64, all bool) string {
	counts := map[string]int{}
	var reasons, lines []string
	for _, e := range events {
		if e.CgroupID != id {
			continue
		}
		if counts[e.Reason] == 0 {
			reasons = append(reasons, e.Reason)
		}
		counts[e.Reason]++
		if e.Remote.IsValid() {
			lines = append(lines, fmt.Sprintf("  %s %s -> %s", e.Reason, e.Local, e.Remote))
		} else {
			lines = append(lines, fmt.Sprintf("  %s %s", e.Reason, e.Local))
		}
	}
	if len(reasons) == 0 {
		return "(no events)"
	}
	var parts []string
	for _, r := range reasons {
		parts = append(parts, fmt.Sprintf("%s=%d", r, counts[r]))
	}
	out := strings.Join(parts, " ")
	if all {
		out += "\n" + strings.Join(lines, "\n")
	}
	return out
}

// child is a program the test started in a cgroup (and optionally a
// network namespace). It is stopped by its PID when the test ends.
type child struct {
	name string
	cmd  *exec.Cmd
	out  *testutil.SyncBuffer
	done chan struct{}
	err  error
}

// startChild starts args in cg (born there: CLONE_INTO_CGROUP) and, when
// netns is not nil, in that network namespace. Its output is collected;
// it is killed, by PID, when t ends.
func startChild(t testing.TB, name string, cg cgroup.Cgroup, netns ns.NetNS, dir string, args ...string) *child {
	t.Helper()
	cgDir, err := os.Open(cg.Path)
	if err != nil {
		t.Fatalf("open cgroup %s: %v", cg.Path, err)
	}
	defer cgDir.Close()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = dir
	out := &testutil.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgDir.Fd()), Pdeathsig: syscall.SIGKILL}
	if netns != nil {
		// The child inherits the namespace of the thread that forks it.
		err = netns.Do(func(ns.NetNS) error { return cmd.Start() })
	} else {
		err = cmd.Start()
	}
	if err != nil {
		t.Fatalf("start %s (%s): %v", name, strings.Join(args, " "), err)
	}
	c := &child{name: name, cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(c.stop)
	return c
}

// pid is the child's process id.
func (c *child) pid() int { return c.cmd.Process.Pid }

// exited reports whether the child has exited.
func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop ends the child: SIGTERM, SIGKILL after 3 s, and reaps it.
func (c *child) stop() {
	if c.exited() {
		return
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
		return
	case <-time.After(3 * time.Second):
	}
	c.cmd.Process.Kill()
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
	}
}

// wait waits up to timeout for the child to exit (killing it after that)
// and returns its exit error, or a timeout error.
func (c *child) wait(timeout time.Duration) error { return c.waitOr(timeout, nil) }

// waitOr is wait, calling beforeKill (when not nil) on a timeout, while
// the child still runs.
func (c *child) waitOr(timeout time.Duration, beforeKill func()) error {
	select {
	case <-c.done:
		return c.err
	case <-time.After(timeout):
		if beforeKill != nil {
			beforeKill()
		}
		c.cmd.Process.Kill()
		<-c.done
		return fmt.Errorf("%s (pid %d) did not finish within %v, killed", c.name, c.pid(), timeout)
	}
}

// waitListening waits up to timeout for the child to listen on port in its
// network namespace.
func (c *child) waitListening(t testing.TB, port int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !listening(c.pid(), port) {
		if c.exited() {
			t.Fatalf("%s exited before listening on port %d: %v\n%s", c.name, port, c.err, tail(c.out.String(), 3000))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not listen on port %d after %v:\n%s", c.name, port, timeout, tail(c.out.String(), 3000))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitLine waits up to timeout for a line of the child's output starting
// with prefix and returns the rest of it.
func (c *child) waitLine(prefix string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		sc := bufio.NewScanner(strings.NewReader(c.out.String()))
		for sc.Scan() {
			if rest, ok := strings.CutPrefix(sc.Text(), prefix); ok {
				return rest, nil
			}
		}
		if c.exited() {
			return "", fmt.Errorf("%s exited (%v) without printing %q:\n%s", c.name, c.err, prefix, tail(c.out.String(), 3000))
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("%s printed no %q within %v:\n%s", c.name, prefix, timeout, tail(c.out.String(), 3000))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sockets returns what ss(8) says about the TCP sockets on ports (local or
// remote): states, queues, owning processes, tcp_info. netnsPath, when not
// empty, is the network namespace to look in. For failure messages.
func sockets(netnsPath string, ports ...int) string {
	var filter []string
	for _, p := range ports {
		filter = append(filter, fmt.Sprintf("sport = :%d or dport = :%d", p, p))
	}
	args := []string{"ss", "-tanpi", "( " + strings.Join(filter, " or ") + " )"}
	if netnsPath != "" {
		args = append([]string{"nsenter", "--net=" + netnsPath}, args...)
	}
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("(%s: %v) %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// tail returns the last n bytes of s.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}

// writeScript writes a script into dir and returns its path.
func writeScript(t testing.TB, dir, name, src string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// requireTool skips (fails under CI=true) when bin is not installed.
func requireTool(t testing.TB, bin string) {
	t.Helper()
	if _, err := exec.LookPath(bin); err != nil {
		if testutil.InCI() {
			t.Fatalf("%s is not installed (make deps)", bin)
		}
		t.Skipf("%s is not installed", bin)
	}
}
