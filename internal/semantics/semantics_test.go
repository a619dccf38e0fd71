package semantics

import (
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// testModes sets up a private install, a plain and an enabled cgroup and a
// network namespace, and returns the two environments.
func testModes(t *testing.T) Modes {
	pinDir := testutil.NewPinDir(t)
	plain := testutil.NewCgroup(t)
	accel := testutil.NewCgroup(t)
	netns := testutil.NewNetNS(t)
	dp, err := dataplane.OpenOrCreate(dataplane.Options{PinDir: pinDir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if dp != nil {
			dp.Uninstall()
		}
	})
	if _, err := dp.Enable(accel, dataplane.EnableOptions{}); err != nil {
		t.Fatal(err)
	}
	connectIn := func(cg cgroup.Cgroup) func() (Pair, error) {
		return func() (p Pair, err error) {
			testutil.InCgroup(t, cg, func() {
				err = netns.Do(func(ns.NetNS) error {
					p, err = ConnectLoopback()
					return err
				})
			})
			return p, err
		}
	}
	// Counters of installs that Disrupt replaced.
	var carried dataplane.CgroupCounters
	disrupt := func() error {
		// Disable, uninstall, and install again (an upgrade): the slow
		// reader's bytes must survive all of it.
		if c, err := dp.Counters(); err == nil {
			carried.Add(c[accel.ID])
		}
		if _, err := dp.Disable(accel.ID); err != nil {
			return err
		}
		if err := dp.Uninstall(); err != nil {
			return err
		}
		if dp, err = dataplane.OpenOrCreate(dataplane.Options{PinDir: pinDir}); err != nil {
			return err
		}
		_, err := dp.Enable(accel, dataplane.EnableOptions{})
		return err
	}
	return Modes{
		Plain:       &Env{Connect: connectIn(plain)},
		Accelerated: &Env{Connect: connectIn(accel), Disrupt: disrupt},
		Counters: func() (dataplane.CgroupCounters, error) {
			c, err := dp.Counters()
			sum := carried
			sum.Add(c[accel.ID])
			return sum, err
		},
	}
}

// TestTransparency runs every case plain and accelerated: each must observe
// the same as plain TCP, on the fast path or by falling back automatically
// (and counted); only the known limitations may differ, and they must be
// reported as such.
func TestTransparency(t *testing.T) {
	m := testModes(t)
	for _, c := range Cases() {
		t.Run(c.Name, func(t *testing.T) {
			r := RunCase(c, m)
			t.Logf("plain:       %s", r.Plain)
			t.Logf("accelerated: %s", r.Accelerated)
			t.Logf("verdict %q: redirected %d, passed %d, fallbacks %d", r.Verdict, r.RedirectedBytes, r.PassedBytes, r.Fallbacks)
			if r.Err != "" {
				t.Fatal(r.Err)
			}
			switch c.Expect {
			case FastPath:
				if r.Verdict != VerdictPreserved {
					t.Errorf("verdict %q, want %q on the fast path", r.Verdict, VerdictPreserved)
				}
			case Fallback:
				if r.Verdict != VerdictFallback {
					t.Errorf("verdict %q, want %q", r.Verdict, VerdictFallback)
				}
				if c.Counter != "" && r.Fallbacks == 0 {
					t.Errorf("fallback not counted")
				}
			case Limitation:
				if r.Verdict != VerdictKnown && r.Verdict != VerdictPreserved && r.Verdict != VerdictFallback {
					t.Errorf("verdict %q", r.Verdict)
				}
			}
		})
	}
}
