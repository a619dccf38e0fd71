package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const suiteMD = `# sockbypass e2e: plain vs accelerated (full)

2026-12-07 11:00 UTC, kernel test, 2 CPUs; 3 runs per mode of 2 s.

## loopback: one network namespace, 127.0.0.1

| case | kind | metric | plain | accelerated | accelerated/plain | spread plain / accel | redirected (accel runs) |
|---|---|---|---:|---:|---:|---|---|
| epoll-pingpong-64B-1cpu | accelerated | p50 RTT | 6.00 us | 4.00 us | 0.67x (better) | 1% / 1% | 19.0 MiB (100%) |
| sockperf-64B-1cpu | control: blocking, plain | p50 RTT | 4.00 us | 4.10 us | 1.02x (worse) | 1% / 1% | 0 B, not accelerated: sockperf uses blocking sockets |

## Integrity checks

- loopback/epoll-pingpong-64B-1cpu: accelerated: every echo equal to its message
`

const plainMD = `# What connections left plain pay: an enabled cgroup vs one that is not enabled

| case | metric | not enabled | enabled | enabled / not enabled |
|---|---|---:|---:|---:|
| short conns 64B blocking loopback 1cpu | connections/s | 60000.00 conn/s ±1.0% | 59000.00 conn/s ±1.0% | 0.983x |
`

// TestWritesTheResultsBetweenTheMarkers: benchreport replaces what is
// between the README's markers with the results it finds, in README order
// (the suite, whose tables lead with the accelerated workloads, first),
// drops the result files' titles and integrity lists, and leaves the rest
// of the README as it was.
func TestWritesTheResultsBetweenTheMarkers(t *testing.T) {
	dir := t.TempDir()
	results := filepath.Join(dir, "results")
	if err := os.MkdirAll(filepath.Join(results, "suite"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{"suite/results.md": suiteMD, "cost-plain.md": plainMD} {
		if err := os.WriteFile(filepath.Join(results, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	readme := filepath.Join(dir, "README.md")
	before, after := "# Title\n\nIntro.\n\n### Results\n\n", "\n\n## Next section\n\nText.\n"
	old := before + beginMarker + "\n\nold numbers | 1 | 2\n\n" + endMarker + after
	if err := os.WriteFile(readme, []byte(old), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run(results, readme); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	got := string(data)
	if !strings.HasPrefix(got, before+beginMarker+"\n") || !strings.HasSuffix(got, endMarker+after) {
		t.Errorf("the text around the markers changed:\n%s", got)
	}
	for _, gone := range []string{"old numbers", "\n# sockbypass e2e: plain vs accelerated", "## Integrity checks", "every echo equal", "\n# What connections left plain pay"} {
		if strings.Contains(got, gone) {
			t.Errorf("README still has %q:\n%s", gone, got)
		}
	}
	want := []string{
		"Measured by `make bench` on ",
		"#### Real programs (the e2e suite)",
		"##### loopback: one network namespace, 127.0.0.1",
		"| epoll-pingpong-64B-1cpu | accelerated | p50 RTT |",
		"| sockperf-64B-1cpu | control: blocking, plain | p50 RTT |",
		"#### What connections left plain pay: an enabled cgroup vs one that is not enabled",
		"| short conns 64B blocking loopback 1cpu | connections/s |",
	}
	last := -1
	for _, w := range want {
		i := strings.Index(got, w)
		if i < 0 {
			t.Errorf("README lacks %q:\n%s", w, got)
			continue
		}
		if i < last {
			t.Errorf("%q is out of order:\n%s", w, got)
		}
		last = i
	}

	// Run again: one results section, not two.
	if err := run(results, readme); err != nil {
		t.Fatal(err)
	}
	data, _ = os.ReadFile(readme)
	if n := strings.Count(string(data), "#### Real programs"); n != 1 || strings.Count(string(data), beginMarker) != 1 {
		t.Errorf("after a second run: %d suite sections, %d begin markers", n, strings.Count(string(data), beginMarker))
	}
}

// TestRefusesWithoutMarkersOrResults: no markers, or no result at all,
// is an error and the README stays as it was.
func TestRefusesWithoutMarkersOrResults(t *testing.T) {
	dir := t.TempDir()
	readme := filepath.Join(dir, "README.md")
	if err := os.WriteFile(readme, []byte("# no markers\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cost-plain.md"), []byte(plainMD), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run(dir, readme); err == nil || !strings.Contains(err.Error(), "markers") {
		t.Errorf("no markers: %v", err)
	}
	withMarkers := "x\n" + beginMarker + "\nkept\n" + endMarker + "\n"
	if err := os.WriteFile(readme, []byte(withMarkers), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run(t.TempDir(), readme); err == nil || !strings.Contains(err.Error(), "no results") {
		t.Errorf("no results: %v", err)
	}
	if data, _ := os.ReadFile(readme); string(data) != withMarkers {
		t.Errorf("README changed without results:\n%s", data)
	}
}
