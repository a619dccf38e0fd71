package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestReportShowsProgressSkipsAndTheKubeAPIServerBanner feeds events as
// go test -json writes them.
func TestReportShowsProgressSkipsAndTheKubeAPIServerBanner(t *testing.T) {
	var out bytes.Buffer
	r := &report{w: &out, started: time.Now(), output: map[string][]string{}, running: map[string]time.Time{}, pkgSeen: map[string]bool{}}
	pkg := "github.com/sockbypass/sockbypass/internal/k8s"
	for _, e := range []event{
		{Action: "run", Package: pkg, Test: "TestRules"},
		{Action: "pass", Package: pkg, Test: "TestRules", Elapsed: 0.5},
		{Action: "run", Package: pkg, Test: "TestInformer"},
		{Action: "output", Package: pkg, Test: "TestInformer", Output: "=== RUN   TestInformer\n"},
		{Action: "output", Package: pkg, Test: "TestInformer", Output: "    apiserver.go:90: SKIPPED: no kube-apiserver at /var/cache/sockbypass-k8s/kube-apiserver-v1.37.2: run `make kube-apiserver` once\n"},
		{Action: "output", Package: pkg, Test: "TestInformer", Output: "--- SKIP: TestInformer (0.00s)\n"},
		{Action: "skip", Package: pkg, Test: "TestInformer"},
		{Action: "run", Package: pkg, Test: "TestBroken"},
		{Action: "output", Package: pkg, Test: "TestBroken", Output: "    x_test.go:3: it broke\n"},
		{Action: "fail", Package: pkg, Test: "TestBroken", Elapsed: 1},
		{Action: "fail", Package: pkg, Elapsed: 2},
	} {
		r.handle(e)
	}
	code := r.finish()
	text := out.String()
	for _, want := range []string{
		"=== internal/k8s\n", "  PASS  TestRules (0.50s)\n", "  FAIL  TestBroken", "it broke",
		"skipped tests (1): they did not run\n  internal/k8s TestInformer: SKIPPED: no kube-apiserver at",
		"# THE KUBE-APISERVER TESTS DID NOT RUN (1: TestInformer)",
		"FAIL: 1 passed, 1 failed, 1 skipped",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("report lacks %q:\n%s", want, text)
		}
	}
	if code != 1 {
		t.Errorf("exit code %d with a failure, want 1", code)
	}
	if _, err := json.Marshal(r.skips); err != nil {
		t.Fatal(err)
	}
}

// TestReportShowsTheNodeE2EBanner: a TestNode skipped for want of the
// cached kubelet and containerd builds gets a banner of its own; a run
// without that skip gets none.
func TestReportShowsTheNodeE2EBanner(t *testing.T) {
	for _, skipped := range []bool{true, false} {
		var out bytes.Buffer
		r := &report{w: &out, started: time.Now(), output: map[string][]string{}, running: map[string]time.Time{}, pkgSeen: map[string]bool{}}
		pkg := "github.com/sockbypass/sockbypass/e2e/node"
		events := []event{{Action: "run", Package: pkg, Test: "TestNode"}}
		if skipped {
			events = append(events,
				event{Action: "output", Package: pkg, Test: "TestNode", Output: "    node_test.go:90: SKIPPED: NODE E2E DID NOT RUN: no cached builds (/var/cache/sockbypass-k8s/kubelet-v1.37.2): run `make node-e2e` once\n"},
				event{Action: "skip", Package: pkg, Test: "TestNode"})
		} else {
			events = append(events, event{Action: "pass", Package: pkg, Test: "TestNode", Elapsed: 100})
		}
		for _, e := range append(events, event{Action: "pass", Package: pkg}) {
			r.handle(e)
		}
		r.finish()
		text := out.String()
		has := strings.Contains(text, "# THE NODE E2E TEST DID NOT RUN (e2e/node TestNode)") && strings.Contains(text, "kubelet-v1.37.2")
		if has != skipped {
			t.Errorf("skipped=%v: banner shown=%v:\n%s", skipped, has, text)
		}
	}
}

// TestReportRepeatsTheFailuresLastLinesAtTheEnd: a record that keeps
// only the head and tail of the log (CI's does) must still say why a long
// test failed, so the failure's last lines come again just before the
// verdict, and only its last ones.
func TestReportRepeatsTheFailuresLastLinesAtTheEnd(t *testing.T) {
	var out bytes.Buffer
	r := &report{w: &out, started: time.Now(), output: map[string][]string{}, running: map[string]time.Time{}, pkgSeen: map[string]bool{}}
	pkg := "github.com/sockbypass/sockbypass/e2e/node"
	r.handle(event{Action: "run", Package: pkg, Test: "TestNode"})
	for i := 0; i < 100; i++ {
		r.handle(event{Action: "output", Package: pkg, Test: "TestNode", Output: fmt.Sprintf("    node_test.go:62: step %d\n", i)})
	}
	r.handle(event{Action: "output", Package: pkg, Test: "TestNode", Output: "    traffic_test.go:260: accel/client-a: not accelerated\n"})
	r.handle(event{Action: "fail", Package: pkg, Test: "TestNode", Elapsed: 31})
	r.handle(event{Action: "fail", Package: pkg, Elapsed: 32})
	r.finish()
	text := out.String()
	verdict := strings.LastIndex(text, "FAIL: 0 passed, 1 failed")
	repeat := strings.LastIndex(text, "FAILED: e2e/node TestNode: its last")
	if verdict < 0 || repeat < 0 || repeat > verdict {
		t.Fatalf("no repeat of the failure's last lines before the verdict:\n%s", text)
	}
	end := text[repeat:verdict]
	if !strings.Contains(end, "| "+"    traffic_test.go:260: accel/client-a: not accelerated") {
		t.Errorf("the repeat lacks the failure's last line:\n%s", end)
	}
	if strings.Contains(end, "step 70\n") || !strings.Contains(end, "step 71\n") {
		t.Errorf("the repeat is not the last %d lines:\n%s", failTailLines, end)
	}
}
