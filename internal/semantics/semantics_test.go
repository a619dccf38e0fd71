package semantics

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// testSetup sets up a private install, a plain and an enabled cgroup and a
// network namespace.
func testSetup(t *testing.T) Setup {
	s, uninstall, err := Install(testutil.NewPinDir(t), testutil.NewCgroup(t), testutil.NewCgroup(t), testutil.NewNetNS(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(uninstall)
	return s
}

// pinned is each case's verdict on this kernel: blocking, non-blocking.
// Blocking sockets are never accelerated, so every blocking run must
// redirect nothing; with non-blocking sockets each case must take the
// path it claims. A change in behaviour flips a test here.
var pinned = map[string][2]string{
	"reads and writes of many sizes": {VerdictNotAccelerated, VerdictPreserved},
	"MSG_PEEK":                       {VerdictNotAccelerated, VerdictPreserved},
	"FIONREAD":                       {VerdictNotAccelerated, VerdictPreserved},
	"FIONREAD on the first bytes of a connection, before any read": {VerdictNotAccelerated, VerdictPreserved},
	"FIONREAD on a reader that set SO_RCVLOWAT before connect":     {VerdictNotAccelerated, VerdictFallback},
	"poll and epoll readiness":                                     {VerdictNotAccelerated, VerdictPreserved},
	"half-close (shutdown SHUT_WR), reply after EOF":               {VerdictNotAccelerated, VerdictPreserved},
	"RST after data":                  {VerdictNotAccelerated, VerdictPreserved},
	"close right after a large write": {VerdictNotAccelerated, VerdictPreserved},
	"sendfile into the socket":        {VerdictNotAccelerated, VerdictPreserved},
	"short connections writing right after connect, records in order":                     {VerdictNotAccelerated, VerdictPreserved},
	"MSG_WAITALL from the first read":                                                     {VerdictNotAccelerated, VerdictPreserved},
	"SO_RCVLOWAT set on the listener":                                                     {VerdictNotAccelerated, VerdictFallback},
	"SO_RCVLOWAT set on the listener after listen()":                                      {VerdictNotAccelerated, VerdictFallback},
	"TCP_INQ set on the listener":                                                         {VerdictNotAccelerated, VerdictFallback},
	"MSG_OOB with SO_OOBINLINE set on the listener":                                       {VerdictNotAccelerated, VerdictFallback},
	"splice(2) from the socket (never read with recvmsg)":                                 {VerdictNotAccelerated, VerdictFallback},
	"Go io.Copy TCP->TCP proxy (splice)":                                                  {VerdictNotAccelerated, VerdictKnown},
	"Go io.Copy TCP->TCP proxy (splice) with its port in --stack-ports":                   {VerdictNotAccelerated, VerdictFallback},
	"a stalled reader makes its writer block (flow control)":                              {VerdictNotAccelerated, VerdictPreserved},
	"slow reader holding 4+ MiB across disable and uninstall":                             {VerdictNotAccelerated, VerdictPreserved},
	"MSG_WAITALL after plain reads":                                                       {VerdictNotAccelerated, VerdictPreserved},
	"SO_RCVLOWAT set after the connection is established":                                 {VerdictNotAccelerated, VerdictFallback},
	"SO_RCVLOWAT set after bytes were redirected":                                         {VerdictNotAccelerated, VerdictPreserved},
	"TCP_INQ set after the connection is established":                                     {VerdictNotAccelerated, VerdictFallback},
	"write after shutdown(SHUT_WR)":                                                       {VerdictNotAccelerated, VerdictPreserved},
	"server made blocking after bytes were redirected, FIONREAD on later bytes":           {VerdictNotAccelerated, VerdictPreserved},
	"client made blocking after bytes were redirected, sends, then FIONREAD on the reply": {VerdictNotAccelerated, VerdictPreserved},
	"MSG_OOB without SO_OOBINLINE":                                                        {VerdictNotAccelerated, VerdictKnown},
	"recv, then splice(2) on the same socket":                                             {VerdictNotAccelerated, VerdictPreserved},
}

func pinnedVerdict(t *testing.T, name string, mode Mode) string {
	t.Helper()
	v, ok := pinned[name]
	if !ok {
		t.Fatalf("case %q has no pinned verdict", name)
	}
	if mode == Blocking {
		return v[0]
	}
	return v[1]
}

// TestTransparency runs every case plain and accelerated, blocking and
// non-blocking, and checks the verdict pinned for this kernel and what it
// rests on, in the counters: a preserved case redirected bytes and no byte
// of a member took the stack (unless its members leave mid-connection by
// design, counted), a fallback stayed on the stack with its fallback
// counted, a known limitation observed exactly its pinned output, and
// nothing blocking was accelerated while the datapath saw its sockets
// (counted blocking, or kept off by the case's own counter).
func TestTransparency(t *testing.T) {
	s := testSetup(t)
	for _, c := range Cases() {
		for _, mode := range AllModes() {
			t.Run(c.Name+"/"+string(mode), func(t *testing.T) {
				want := pinnedVerdict(t, c.Name, mode)
				r := RunCase(c, mode, s)
				t.Logf("plain:       %s", r.Plain)
				t.Logf("accelerated: %s", r.Accelerated)
				t.Logf("verdict %q: redirected %d, passed %d, fallbacks %d, late options %d, blocking %d, unpaired %d, abandoned %d, stack port %d, counter %q %d; %s",
					r.Verdict, r.RedirectedBytes, r.PassedBytes, r.Fallbacks, r.LateStackOptions, r.SocketsBlocking, r.SocketsUnpaired, r.PairsAbandoned, r.SocketsStackPort, r.Counter, r.Counted, r.Why)
				if r.Err != "" {
					t.Fatal(r.Err)
				}
				if r.Mode != mode {
					t.Errorf("result mode %q, want %q", r.Mode, mode)
				}
				if r.Verdict != want {
					t.Errorf("verdict %q, want %q", r.Verdict, want)
				}
				if mode == Blocking {
					// Evidence, not the mode: the datapath counted the
					// sockets blocking, or kept them off before their
					// blocking mattered (a stack reader, a stack port:
					// the case's own counter).
					switch {
					case r.RedirectedBytes != 0 || r.PassedBytes != 0:
						t.Errorf("blocking run: redirected %d, passed %d bytes; want 0 and 0", r.RedirectedBytes, r.PassedBytes)
					case r.SocketsBlocking == 0 && r.Counted == 0:
						t.Errorf("blocking run: no socket counted blocking and counter %q did not move: the datapath never saw the sockets (why %q)", c.Counter, r.Why)
					case r.SocketsBlocking > 0 && r.Why != WhyBlocking:
						t.Errorf("blocking run: %d socket(s) counted blocking, why %q; want %q", r.SocketsBlocking, r.Why, WhyBlocking)
					}
					return
				}
				switch r.Verdict {
				case VerdictPreserved:
					if r.RedirectedBytes == 0 || !r.Same {
						t.Errorf("preserved with %d bytes redirected, same=%v", r.RedirectedBytes, r.Same)
					}
					if r.PassedBytes != 0 && !c.PassesLater {
						t.Errorf("preserved, yet %d bytes of members took the stack in a case whose members never leave", r.PassedBytes)
					}
				case VerdictFallback:
					if r.RedirectedBytes != 0 || !r.Same {
						t.Errorf("fell back with %d bytes redirected, same=%v", r.RedirectedBytes, r.Same)
					}
				case VerdictKnown:
					if r.Accelerated != c.Limit || r.RedirectedBytes == 0 {
						t.Errorf("known limitation: accelerated %q (redirected %d), pinned %q", r.Accelerated, r.RedirectedBytes, c.Limit)
					}
				}
				if c.Counter != "" && r.Counted == 0 {
					t.Errorf("counter %s did not move", c.Counter)
				}
			})
		}
	}
}

// TestSemanticsCasesArePinned: every case has a pinned verdict (and no pin
// names a case that is gone), every known limitation pins its accelerated
// output, and names are unique.
func TestSemanticsCasesArePinned(t *testing.T) {
	seen := map[string]bool{}
	for _, c := range Cases() {
		if seen[c.Name] {
			t.Errorf("case %q twice", c.Name)
		}
		seen[c.Name] = true
		if _, ok := pinned[c.Name]; !ok {
			t.Errorf("case %q has no pinned verdict", c.Name)
		}
		if (c.Expect == Limitation) != (c.Limit != "") {
			t.Errorf("case %q: expectation %q with pinned limitation %q", c.Name, c.Expect, c.Limit)
		}
		if c.How == "" {
			t.Errorf("case %q says nothing about how it is kept", c.Name)
		}
		if c.Counter != "" && !knownCounter(c.Counter) {
			t.Errorf("case %q names counter %q, which CounterValue does not know", c.Name, c.Counter)
		}
		if c.PassesLater && c.Counter == "" {
			t.Errorf("case %q: its members leave mid-connection, but it names no counter that counts it", c.Name)
		}
	}
	for name := range pinned {
		if !seen[name] {
			t.Errorf("pinned verdict for %q, which is no case", name)
		}
	}
}

// knownCounter reports whether CounterValue knows the counter name.
func knownCounter(name string) bool {
	var all dataplane.CgroupCounters
	v := reflect.ValueOf(&all).Elem()
	for i := 0; i < v.NumField(); i++ {
		v.Field(i).SetUint(uint64(i + 1))
	}
	return CounterValue(all, name) != 0
}

// TestSemanticsVerdicts checks the classification with made-up runs and
// counters: no case passes by never being accelerated.
func TestSemanticsVerdicts(t *testing.T) {
	type run struct {
		plain, accel string
		plainErr     error
		d            dataplane.CgroupCounters
	}
	fast := Case{Name: "fast", Expect: FastPath}
	fallback := Case{Name: "fallback", Expect: Fallback, Counter: "rcvlowat"}
	limit := Case{Name: "limit", Expect: Limitation, Limit: "short"}
	leaving := Case{Name: "leaving", Expect: FastPath, Counter: "members_left", PassesLater: true}
	for _, tc := range []struct {
		name string
		c    Case
		mode Mode
		run  run
		want string
		why  string
	}{
		{"fast path taken", fast, NonBlocking, run{"x", "x", nil, dataplane.CgroupCounters{RedirectedBytes: 10}}, VerdictPreserved, ""},
		{"fast path never taken", fast, NonBlocking, run{"x", "x", nil, dataplane.CgroupCounters{SocketsUnpaired: 2}}, VerdictNotAccelerated, "2 socket(s) left unpaired"},
		{"fast path with stack bytes", fast, NonBlocking, run{"x", "x", nil, dataplane.CgroupCounters{RedirectedBytes: 10, PassedBytes: 5}}, VerdictNotAccelerated, "never leave the sockhash"},
		{"leaving, counted", leaving, NonBlocking, run{"x", "x", nil, dataplane.CgroupCounters{RedirectedBytes: 10, PassedBytes: 5, MembersLeft: 2}}, VerdictPreserved, ""},
		{"leaving, not counted", leaving, NonBlocking, run{"x", "x", nil, dataplane.CgroupCounters{RedirectedBytes: 10, PassedBytes: 5}}, VerdictNotAccelerated, "members_left, which counts the members leaving, did not move"},
		{"leaving, no stack bytes", leaving, NonBlocking, run{"x", "x", nil, dataplane.CgroupCounters{RedirectedBytes: 10}}, VerdictPreserved, ""},
		{"blocking", fast, Blocking, run{"x", "x", nil, dataplane.CgroupCounters{SocketsBlocking: 1}}, VerdictNotAccelerated, WhyBlocking},
		{"blocking, nothing counted", fast, Blocking, run{"x", "x", nil, dataplane.CgroupCounters{}}, VerdictNotAccelerated, WhyNothingCounted},
		{"blocking, stack port", fast, Blocking, run{"x", "x", nil, dataplane.CgroupCounters{SocketsStackPort: 3, SocketsUnpaired: 1}}, VerdictNotAccelerated, "3 socket(s) on a stack port"},
		{"fast path differs", fast, NonBlocking, run{"x", "y", nil, dataplane.CgroupCounters{RedirectedBytes: 10}}, VerdictBroken, ""},
		{"fell back", fallback, NonBlocking, run{"x", "x", nil, dataplane.CgroupCounters{FallbackRcvlowat: 1}}, VerdictFallback, ""},
		{"fallback not counted", fallback, NonBlocking, run{"x", "x", nil, dataplane.CgroupCounters{SocketsUnpaired: 1}}, VerdictNotAccelerated, "left unpaired"},
		{"fallback redirected", fallback, NonBlocking, run{"x", "x", nil, dataplane.CgroupCounters{FallbackRcvlowat: 1, RedirectedBytes: 5}}, VerdictPreserved, ""},
		{"fallback blocking", fallback, Blocking, run{"x", "x", nil, dataplane.CgroupCounters{FallbackRcvlowat: 1, SocketsBlocking: 1}}, VerdictNotAccelerated, WhyBlocking},
		{"fallback blocking, stack reader first", fallback, Blocking, run{"x", "x", nil, dataplane.CgroupCounters{FallbackRcvlowat: 1}}, VerdictNotAccelerated, "asked for stack-reader semantics"},
		{"limitation as pinned", limit, NonBlocking, run{"long", "short", nil, dataplane.CgroupCounters{RedirectedBytes: 5}}, VerdictKnown, ""},
		{"limitation otherwise", limit, NonBlocking, run{"long", "other", nil, dataplane.CgroupCounters{RedirectedBytes: 5}}, VerdictBroken, ""},
		{"limitation blocking", limit, Blocking, run{"long", "short", nil, dataplane.CgroupCounters{}}, VerdictBroken, ""},
		{"limitation gone", limit, NonBlocking, run{"long", "long", nil, dataplane.CgroupCounters{RedirectedBytes: 5}}, VerdictPreserved, ""},
		{"precondition", fast, NonBlocking, run{"", "", notMeasured("too small"), dataplane.CgroupCounters{}}, VerdictNotMeasured, "too small"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var counters dataplane.CgroupCounters
			c := tc.c
			c.Run = func(env *Env) (string, error) {
				if env.Disrupt == nil { // plain
					return tc.run.plain, tc.run.plainErr
				}
				counters.Add(tc.run.d)
				return tc.run.accel, nil
			}
			s := Setup{
				Disrupt:  func() error { return nil },
				Counters: func() (dataplane.CgroupCounters, error) { return counters, nil },
			}
			r := RunCase(c, tc.mode, s)
			if r.Verdict != tc.want || !strings.Contains(r.Why, tc.why) {
				t.Errorf("verdict %q (why %q), want %q (why containing %q)", r.Verdict, r.Why, tc.want, tc.why)
			}
		})
	}
	if !errors.Is(notMeasured("x"), ErrNotMeasured) {
		t.Error("notMeasured does not wrap ErrNotMeasured")
	}
}
