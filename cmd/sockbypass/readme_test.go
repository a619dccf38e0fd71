package main

import (
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/internal/daemon"
	"github.com/sockbypass/sockbypass/internal/metrics"
	"github.com/sockbypass/sockbypass/internal/stats"
)

// servedMetrics returns the names of every metric the daemon serves.
func servedMetrics(t *testing.T) []string {
	t.Helper()
	cs := append([]prometheus.Collector{metrics.NewCollector(func() (*stats.Report, error) { return nil, nil })},
		daemon.New(nil, nil, zap.NewNop()).Collectors()...)
	fq := regexp.MustCompile(`fqName: "([a-z_]+)"`)
	seen := map[string]bool{}
	for _, c := range cs {
		ch := make(chan *prometheus.Desc, 256)
		c.Describe(ch)
		close(ch)
		for d := range ch {
			if m := fq.FindStringSubmatch(d.String()); m != nil {
				seen[m[1]] = true
			}
		}
	}
	var out []string
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// TestREADMEListsEveryMetric compares the metrics served with the list in
// README.md, both ways.
func TestREADMEListsEveryMetric(t *testing.T) {
	data, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(data)
	start := strings.Index(readme, "serves the same figures")
	end := strings.Index(readme, "### Inspecting with bpftool")
	if start < 0 || end < start {
		t.Fatal("README.md has no metric list between \"serves the same figures\" and \"### Inspecting with bpftool\"")
	}
	listed := map[string]bool{}
	for _, m := range regexp.MustCompile("`(sockbypass_[a-z_]+)").FindAllStringSubmatch(readme[start:end], -1) {
		listed[m[1]] = true
	}
	served := servedMetrics(t)
	if len(served) < 40 {
		t.Fatalf("only %d metrics found served: %v", len(served), served)
	}
	isServed := map[string]bool{}
	for _, n := range served {
		isServed[n] = true
		if !listed[n] {
			t.Errorf("metric %s is served but not in README.md's metric list", n)
		}
	}
	for n := range listed {
		if !isServed[n] {
			t.Errorf("README.md lists metric %s, which is not served", n)
		}
	}
}

// TestArchitectureSaysWhoCountsAccountOnlyBytes: the account-only
// (would-be) bytes are counted by cgroup/egress.c, not by TC; the docs
// name the program that does.
func TestArchitectureSaysWhoCountsAccountOnlyBytes(t *testing.T) {
	counts := func(path string) bool {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(string(data), "would_redirect_bytes")
	}
	if !counts("../../cgroup/egress.c") || counts("../../tc/tc.c") {
		t.Fatal("cgroup/egress.c no longer counts would_redirect_bytes (or tc/tc.c does): update this test and the docs")
	}
	data, err := os.ReadFile("../../docs/ARCHITECTURE.md")
	if err != nil {
		t.Fatal(err)
	}
	arch := string(data)
	i := strings.Index(arch, "would-be members'")
	if i < 0 {
		t.Fatal("docs/ARCHITECTURE.md no longer says who counts the would-be members' bytes")
	}
	sentence := arch[max(0, i-200):i]
	if strings.Contains(sentence, "TC counts") || !strings.Contains(sentence, "cgroup/egress.c") {
		t.Errorf("docs/ARCHITECTURE.md says the would-be members' bytes are counted by something other than cgroup/egress.c: %q", sentence)
	}
}
