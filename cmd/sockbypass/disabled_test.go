package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/conns"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// liveConn is an accelerated connection in cg that stays open: send
// writes n bytes and waits until the server has read them.
type liveConn struct {
	c    net.Conn
	read atomic.Int64
}

// openLiveConn connects to a listener of cg and returns once conns (in
// the install at pinDir) shows both ends paired: from the first byte on,
// everything is redirected.
func openLiveConn(t *testing.T, pinDir string, cg cgroup.Cgroup) *liveConn {
	t.Helper()
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	lc := &liveConn{}
	accepted := make(chan bool, 1)
	go func() {
		s, err := l.Accept()
		accepted <- err == nil
		if err != nil {
			return
		}
		defer s.Close()
		buf := make([]byte, 64<<10)
		for {
			n, err := s.Read(buf)
			lc.read.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	lc.c = testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	select {
	case ok := <-accepted:
		if !ok {
			t.Fatal("accept failed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the server accepted nothing within 5 s")
	}
	// The server end joins the pair before the first byte.
	client := endsOf(lc.c)
	server := ends{client[1], client[0]}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := connsOf(t, pinDir)
		if got[client].State == conns.StatePaired && got[server].State == conns.StatePaired {
			return lc
		}
		if time.Now().After(deadline) {
			t.Fatalf("the connection did not pair within 5 s: client %+v, server %+v", got[client], got[server])
		}
		time.Sleep(5 * time.Millisecond) // poll interval
	}
}

func (lc *liveConn) send(t *testing.T, n int) {
	t.Helper()
	want := lc.read.Load() + int64(n)
	if _, err := lc.c.Write(make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for lc.read.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("server read %d bytes, want %d", lc.read.Load(), want)
		}
		time.Sleep(5 * time.Millisecond) // poll interval
	}
}

// TestDisabledCgroupWithLiveSocketsStaysVisible checks issue 18 item 5: a
// connection that stays accelerated after disable keeps counting under its
// cgroup, marked disabled, in stats, stats --json and the metrics; once it
// closes, its cgroup's counters count as no enabled cgroup. Rows and
// unattributed always add up to the status totals.
func TestDisabledCgroupWithLiveSocketsStaysVisible(t *testing.T) {
	pinDir, cg := newInstallDir(t)
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	lc := openLiveConn(t, pinDir, cg)
	lc.send(t, 1<<20)
	mustSockbypass(t, "disable", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	lc.send(t, 3<<20)

	r := statsJSON(t, pinDir)
	if len(r.Cgroups) != 0 || len(r.DisabledCgroups) != 1 {
		t.Fatalf("stats --json after disable: cgroups %+v, disabled_cgroups %+v", r.Cgroups, r.DisabledCgroups)
	}
	c := r.DisabledCgroups[0]
	if c.ID != cg.ID || c.Cgroup != cg.Rel || c.Mode != "disabled" || c.LiveSockets != 2 || c.RedirectedBytes < 4<<20 {
		t.Errorf("disabled row: %+v, want id %d, %s, mode disabled, 2 live sockets, >= %d bytes redirected", c, cg.ID, cg.Rel, 4<<20)
	}
	checkTotals(t, pinDir)
	code, out, _ := sockbypass(t, "stats", "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, cg.Rel) || !strings.Contains(out, "disabled, live sockets") {
		t.Errorf("stats table after disable:\n%s", out)
	}

	// The metrics, as the daemon serves them.
	dp, err := dataplane.Open(dataplane.Options{PinDir: pinDir})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	mounts, _ := cgroup.ReadMounts()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := newMetricsServer(dp, mounts.V2, nil, zap.NewNop())
	go srv.Serve(ln)
	defer srv.Close()
	resp, err := http.Get("http://" + ln.Addr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, m := range families["sockbypass_redirected_bytes_total"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "cgroup" && l.GetValue() == cg.Rel && m.GetCounter().GetValue() >= 4<<20 {
				found = true
			}
		}
	}
	if !found {
		t.Errorf("no sockbypass_redirected_bytes_total{cgroup=%q} >= %d in the metrics:\n%s", cg.Rel, 4<<20, body)
	}

	// Closed: the counters count as no enabled cgroup.
	before := r.Unattributed.RedirectedBytes
	lc.c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for len(statsJSON(t, pinDir).DisabledCgroups) != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond) // poll interval; the check below fails on the deadline
	}
	r = statsJSON(t, pinDir)
	if len(r.DisabledCgroups) != 0 || r.Unattributed.RedirectedBytes < before+4<<20 {
		t.Errorf("after the last socket closed: disabled_cgroups %+v, unattributed redirected %d (was %d)", r.DisabledCgroups, r.Unattributed.RedirectedBytes, before)
	}
	checkTotals(t, pinDir)
}

// checkTotals checks that the rows of status --json and its unattributed
// add up to its totals.
func checkTotals(t *testing.T, pinDir string) {
	t.Helper()
	st := statusOf(t, pinDir)
	var sum dataplane.CgroupCounters
	for _, c := range st.Status.Cgroups {
		sum.Add(c.Counters)
	}
	for _, c := range st.Status.DisabledCgroups {
		sum.Add(c.Counters)
	}
	sum.Add(st.Status.Unattributed)
	if sum != st.Status.Totals {
		t.Errorf("rows + unattributed = %+v\ntotals = %+v", sum, st.Status.Totals)
	}
}

// TestStatusJSONIsASupersetOfStatsJSON checks issue 18 item 14: every
// field of stats --json is in status --json, with the same value (cgroups
// matched by id), so both describe a cgroup in one shape.
func TestStatusJSONIsASupersetOfStatsJSON(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	a, b := testutil.NewCgroup(t), testutil.NewCgroup(t)
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	for _, cg := range []cgroup.Cgroup{a, b} {
		mustSockbypass(t, "enable", "--no-probation", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	}
	trafficIn(t, pinDir, a, 1<<20)
	lc := openLiveConn(t, pinDir, b)
	lc.send(t, 1<<20)
	mustSockbypass(t, "disable", "--cgroup", b.Path, "--bpffs-dir", pinDir)
	decode := func(args ...string) map[string]any {
		code, out, errOut := sockbypass(t, append(args, "--json", "--bpffs-dir", pinDir)...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, errOut)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	statsDoc, statusDoc := decode("stats"), decode("status")
	if n := len(statsDoc["disabled_cgroups"].([]any)); n != 1 {
		t.Fatalf("stats --json lists %d disabled cgroups, want 1", n)
	}
	for _, p := range missingFrom(statsDoc, statusDoc, "") {
		t.Errorf("status --json lacks or differs at %s", p)
	}
}

// missingFrom returns the paths of sub that whole lacks or holds with
// another value (time: only present). Arrays of objects are matched by id.
func missingFrom(sub, whole any, path string) []string {
	if path == ".time" {
		if whole == nil {
			return []string{path}
		}
		return nil
	}
	switch s := sub.(type) {
	case map[string]any:
		w, ok := whole.(map[string]any)
		if !ok {
			return []string{path}
		}
		var out []string
		for k, v := range s {
			wv, ok := w[k]
			if !ok {
				out = append(out, path+"."+k)
				continue
			}
			out = append(out, missingFrom(v, wv, path+"."+k)...)
		}
		return out
	case []any:
		w, ok := whole.([]any)
		if !ok || len(w) != len(s) {
			return []string{path}
		}
		var out []string
		for i, v := range s {
			var match any = w[i]
			if m, ok := v.(map[string]any); ok && m["id"] != nil {
				match = nil
				for _, wv := range w {
					if wm, ok := wv.(map[string]any); ok && wm["id"] == m["id"] {
						match = wm
					}
				}
			}
			out = append(out, missingFrom(v, match, fmt.Sprintf("%s[%d]", path, i))...)
		}
		return out
	default:
		if fmt.Sprint(sub) != fmt.Sprint(whole) {
			return []string{fmt.Sprintf("%s (%v vs %v)", path, sub, whole)}
		}
		return nil
	}
}
