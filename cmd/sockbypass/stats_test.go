package main

import (
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/stats"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// trafficIn sends n bytes over a loopback connection whose two ends are in
// cg, enabled in pinDir, and checks the digest the server returns. It
// sends only once both ends have joined the sockhash, so that every byte
// can be redirected.
func trafficIn(t *testing.T, pinDir string, cg cgroup.Cgroup, n int) {
	t.Helper()
	inserted := insertedIn(t, pinDir, cg)
	// Both ends join at ESTABLISHED (the server before it is accepted),
	// and a client that sends before its server joined gives the pair
	// up: send once stats counts both.
	transferWhen(t, cg, n, "the connection's two sockets did not join the sockhash", func() bool {
		return insertedIn(t, pinDir, cg) >= inserted+2
	})
}

// transferWhen makes a connection in cg, waits (at most 5 s) until ready
// says the datapath has seen it, then sends n bytes and checks the digest
// the server answers.
func transferWhen(t *testing.T, cg cgroup.Cgroup, n int, notReady string, ready func() bool) {
	t.Helper()
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeDigest(l)
	c := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	deadline := time.Now().Add(5 * time.Second)
	for !ready() {
		if time.Now().After(deadline) {
			t.Fatal(notReady)
		}
		time.Sleep(5 * time.Millisecond)
	}
	payload := make([]byte, n)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	if err := transfer.DigestRoundTrip(c, payload, transfer.Options{}); err != nil {
		t.Fatalf("transfer of %d bytes: digest mismatch (%v)", n, err)
	}
}

// insertedIn is the sockets_inserted counter of cg as stats --json shows
// it (0 before cg has counters).
func insertedIn(t *testing.T, pinDir string, cg cgroup.Cgroup) uint64 {
	t.Helper()
	for _, c := range statsJSON(t, pinDir).Cgroups {
		if c.Cgroup == cg.Rel {
			return c.SocketsInserted
		}
	}
	return 0
}

func statsJSON(t *testing.T, pinDir string) stats.Report {
	t.Helper()
	code, out, errOut := sockbypass(t, "stats", "--json", "--bpffs-dir", pinDir)
	if code != 0 {
		t.Fatalf("stats --json: exit %d: %s", code, errOut)
	}
	var r stats.Report
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("stats --json: %v\n%s", err, out)
	}
	return r
}

func TestStatsShowsRedirectedAndStackBytes(t *testing.T) {
	pinDir, cg := newInstallDir(t)
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	trafficIn(t, pinDir, cg, 4<<20)
	r := statsJSON(t, pinDir)
	// No TC device by default: the stack side is counted at the
	// sockets, and a pair redirected from its first byte sends no
	// payload through the stack (handshake and FIN packets carry none).
	if len(r.Cgroups) != 1 || len(r.TCDevices) != 0 {
		t.Fatalf("stats: cgroups %+v, tc devices %+v", r.Cgroups, r.TCDevices)
	}
	c := r.Cgroups[0]
	if c.Cgroup != cg.Rel || c.RedirectedBytes < 4<<20 || c.StackEgressPackets != 0 || c.StackEgressBytes != 0 || c.BypassRatio == nil || *c.BypassRatio < 0.99 {
		t.Errorf("stats for %s: %+v (ratio %v)", cg.Rel, c, c.BypassRatio)
	}
	code, out, _ := sockbypass(t, "stats", "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, cg.Rel) || !strings.Contains(out, "BYPASS") || !strings.Contains(out, "%") || strings.Contains(out, "TC EGRESS") {
		t.Errorf("human stats: exit %d\n%s", code, out)
	}
	// A TC device adds its view.
	mustSockbypass(t, "enable", "--no-probation", "--cgroup", cg.Path, "--tc-dev", "lo", "--bpffs-dir", pinDir)
	trafficIn(t, pinDir, cg, 1<<20)
	if r := statsJSON(t, pinDir); len(r.TCDevices) != 1 || r.TCDevices[0].Name != "lo" || r.Cgroups[0].TCEgressPackets == 0 {
		t.Errorf("with --tc-dev lo: tc devices %+v, cgroups %+v", r.TCDevices, r.Cgroups)
	}
	if code, out, _ := sockbypass(t, "stats", "--bpffs-dir", pinDir); code != 0 || !strings.Contains(out, "TC EGRESS") {
		t.Errorf("human stats with a TC device: exit %d\n%s", code, out)
	}
	code, out, _ = sockbypass(t, "stats", "--json", "--watch", "100ms", "--count", "2", "--bpffs-dir", pinDir)
	if lines := strings.Count(strings.TrimSpace(out), "\n") + 1; code != 0 || lines != 2 {
		t.Errorf("stats --watch --count 2: exit %d, %d lines", code, lines)
	}
	if code, _, errOut := sockbypass(t, "stats", "--count", "2", "--bpffs-dir", pinDir); code != exitUsage || !strings.Contains(errOut, "--count") {
		t.Errorf("--count without --watch: exit %d, %s", code, errOut)
	}
}

func TestMetricsEndpointMatchesStats(t *testing.T) {
	pinDir, cg := newInstallDir(t)

	addr := testutil.FreeAddr(t)
	daemon := exec.Command(os.Args[0], "daemon", "--metrics-addr", addr, "--no-probation", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	daemon.Env = append(os.Environ(), "SOCKBYPASS_TEST_MAIN=1")
	daemon.Stderr = os.Stderr
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- daemon.Wait() }()
	t.Cleanup(func() {
		daemon.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			daemon.Process.Kill()
		}
	})
	base := "http://" + addr
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(base + "/healthz")
		if err == nil && resp.StatusCode == 200 {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon not healthy at %s: %v", base, err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Healthy means the pins can be read, not that the daemon has
	// enabled the cgroup yet: wait for that before sending.
	for len(statsJSON(t, pinDir).Cgroups) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the daemon did not enable the cgroup")
		}
		time.Sleep(50 * time.Millisecond)
	}
	trafficIn(t, pinDir, cg, 2<<20+3)
	r := statsJSON(t, pinDir)
	if len(r.Cgroups) != 1 || r.Cgroups[0].BypassRatio == nil {
		t.Fatalf("stats after the traffic: %+v", r.Cgroups)
	}
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	value := func(name, cgroupLabel string) (float64, bool) {
		mf := families[name]
		if mf == nil {
			return 0, false
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "cgroup" && l.GetValue() == cgroupLabel {
					if m.GetCounter() != nil {
						return m.GetCounter().GetValue(), true
					}
					return m.GetGauge().GetValue(), true
				}
			}
		}
		return 0, false
	}
	c := r.Cgroups[0]
	for name, want := range map[string]float64{
		"sockbypass_redirected_bytes_total":     float64(c.RedirectedBytes),
		"sockbypass_redirected_messages_total":  float64(c.RedirectedMsgs),
		"sockbypass_stack_egress_bytes_total":   float64(c.StackEgressBytes),
		"sockbypass_stack_egress_packets_total": float64(c.StackEgressPackets),
		"sockbypass_sockets_inserted_total":     float64(c.SocketsInserted),
		"sockbypass_bypass_ratio":               *c.BypassRatio,
		"sockbypass_live_sockets":               float64(c.LiveSockets),
	} {
		got, ok := value(name, cg.Rel)
		if !ok || got != want {
			t.Errorf("%s{cgroup=%q} = %v (present %v), stats --json says %v", name, cg.Rel, got, ok, want)
		}
	}
	if c.RedirectedBytes < 2<<20 {
		t.Errorf("redirected %d bytes, want at least %d", c.RedirectedBytes, 2<<20)
	}
	if up := families["sockbypass_up"]; up == nil || up.GetMetric()[0].GetGauge().GetValue() != 1 {
		t.Errorf("sockbypass_up is not 1")
	}
	if families["sockbypass_redirected_bytes_total"].GetType().String() != "COUNTER" {
		t.Errorf("redirected_bytes_total is not a counter")
	}
}
