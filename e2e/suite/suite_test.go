package suite

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestSuiteQuick is the CI subset of the e2e suite: every workload starts
// briefly plain and accelerated, verifies its content, must take the fast
// path over loopback and pod to pod over a veth (at least MinRedirected of
// its payload redirected, nothing of a pair through the stack; blocking
// programs must stay plain, counted as blocking), and tears down: no
// process left in the cgroups after a case, no cgroup, pin directory or
// network namespace after the suite. Timings are logged, never asserted.
func TestSuiteQuick(t *testing.T) {
	testutil.RequirePrivileged(t)
	if err := CheckTools(); err != nil {
		if testutil.InCI() {
			t.Fatalf("e2e suite cannot run under CI=true: %v", err)
		}
		t.Skip(err)
	}
	env, err := NewEnv()
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			env.Close()
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cfg := Config{Runs: 1, Duration: time.Second, Smoke: true}
	for _, c := range SmokeCases() {
		t.Run(strings.ReplaceAll(c.Name, "/", "_"), func(t *testing.T) {
			res, err := env.RunCase(ctx, c, cfg)
			if err != nil {
				t.Fatal(err)
			}
			// RunCase failed unless: plain runs were not accelerated;
			// blocking workloads were not either, every connection
			// counted as blocking; the others, over loopback and pod to
			// pod over the veth alike, redirected at least
			// c.MinRedirected of their payload.
			// (but a member that turned blocking leaves: its pair's
			// later bytes take the stack; and what a member sends after
			// its peer closed takes the stack, as a write to a closed
			// peer does: counted in RedirectFailures. wrk closes its
			// connections at the end of a run while nginx may still be
			// sending: 6 messages, 1548 bytes, once in 12 runs).
			if c.Blocking == "" && res.AccelTraffic.PassedBytes != 0 && res.AccelTraffic.LateBlocking == 0 && res.AccelTraffic.RedirectFailures == 0 {
				t.Errorf("a pair redirects from its first byte, yet %d bytes took the stack: %+v", res.AccelTraffic.PassedBytes, res.AccelTraffic)
			}
			if (c.Workload == "redis" || c.Workload == "nginx" || c.Workload == "connrate") && len(res.Checks) == 0 {
				t.Errorf("no integrity check ran")
			}
			for _, m := range []*Mode{env.Plain, env.Accel} {
				procs, err := os.ReadFile(m.Cgroup.Path + "/cgroup.procs")
				if err != nil {
					t.Fatal(err)
				}
				if s := strings.TrimSpace(string(procs)); s != "" {
					t.Errorf("processes left in the %s cgroup after the case: %s", m.Label(), s)
				}
			}
			for _, m := range res.Metrics {
				t.Logf("%s: plain %s, accelerated %s (%.2fx)", m.Metric, formatValue(m.PlainMedian, m.Unit), formatValue(m.AccelMedian, m.Unit), m.Ratio)
			}
			t.Logf("accelerated traffic %+v (%.3f%% redirected), checks %q, note %q", res.AccelTraffic, 100*res.AccelTraffic.RedirectedShare(), res.Checks, res.Note)
		})
	}

	paths := []string{env.Plain.Cgroup.Path, env.Accel.Cgroup.Path, env.DP.PinDir(), env.TempDir}
	for _, topo := range env.Topologies {
		paths = append(paths, topo.Server.Path(), topo.Client.Path())
	}
	closed = true
	if err := env.Close(); err != nil {
		t.Fatalf("teardown: %v", err)
	}
	for _, p := range paths {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s still exists after teardown", p)
		}
	}
}
