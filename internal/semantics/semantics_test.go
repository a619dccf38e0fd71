package semantics

import (
	"testing"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// testModes sets up a private install, a plain and an enabled cgroup and a
// network namespace, and returns the two environments.
func testModes(t *testing.T) Modes {
	m, uninstall, err := Install(testutil.NewPinDir(t), testutil.NewCgroup(t), testutil.NewCgroup(t), testutil.NewNetNS(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(uninstall)
	return m
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
