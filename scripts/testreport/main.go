// Command testreport turns `go test -json` on stdin into what make test
// prints: each test as it finishes, a line while a long test is still
// running, the output of failures, then every skipped test with its reason
// and, when the kube-apiserver tests did not run, a banner that says so. It
// changes nothing about what runs, and exits 1 when a test or a package
// failed.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
)

// event is one line of go test -json (cmd/test2json).
type event struct {
	Action  string
	Package string
	Test    string
	Elapsed float64
	Output  string
}

// skipped is a test that did not run, and why.
type skipped struct {
	pkg, test, reason string
}

// report holds what the run printed so far.
type report struct {
	mu      sync.Mutex
	w       io.Writer
	started time.Time
	last    time.Time
	output  map[string][]string // package + test -> its output lines
	running map[string]time.Time
	pkgSeen map[string]bool
	skips   []skipped
	passed  int
	failed  []string
	// failTails holds each failed test's output, whose last lines are
	// repeated at the end: a log that keeps only its head and tail
	// (CI's record does) still says why a long test failed.
	failTails map[string][]string
	pkgFails  []string
	packages  int
}

func key(pkg, test string) string { return pkg + " " + test }

// short trims the module path off a package name.
func short(pkg string) string {
	return strings.TrimPrefix(pkg, "github.com/sockbypass/sockbypass/")
}

func (r *report) printf(format string, args ...any) {
	fmt.Fprintf(r.w, format, args...)
	r.last = time.Now()
}

// handle takes one event.
func (r *report) handle(e event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := key(e.Package, e.Test)
	switch e.Action {
	case "output", "build-output":
		r.output[k] = append(r.output[k], e.Output)
		if e.Action == "build-output" {
			r.printf("%s", e.Output)
		}
		return
	case "start":
		return
	case "run":
		if !r.pkgSeen[e.Package] {
			r.pkgSeen[e.Package] = true
			r.printf("=== %s\n", short(e.Package))
		}
		if !strings.Contains(e.Test, "/") {
			r.running[k] = time.Now()
		}
		return
	}
	if e.Test == "" { // the package's verdict
		switch e.Action {
		case "pass":
			r.packages++
			r.printf("ok    %s  %.1fs\n", short(e.Package), e.Elapsed)
		case "fail":
			r.packages++
			r.pkgFails = append(r.pkgFails, short(e.Package))
			r.printf("FAIL  %s  %.1fs\n", short(e.Package), e.Elapsed)
			for _, l := range r.output[k] { // build errors, panics, timeouts
				r.printf("      %s", l)
			}
		}
		delete(r.output, k)
		return
	}
	top := !strings.Contains(e.Test, "/")
	delete(r.running, k)
	switch e.Action {
	case "pass":
		if top {
			r.passed++
			r.printf("  PASS  %s (%.2fs)\n", e.Test, e.Elapsed)
		}
	case "skip":
		reason := skipReason(r.output[k])
		r.skips = append(r.skips, skipped{short(e.Package), e.Test, reason})
		r.printf("  SKIP  %s: %s\n", e.Test, reason)
	case "fail":
		name := short(e.Package) + " " + e.Test
		r.failed = append(r.failed, name)
		if r.failTails == nil {
			r.failTails = map[string][]string{}
		}
		r.failTails[name] = r.output[k]
		r.printf("  FAIL  %s (%.2fs)\n", e.Test, e.Elapsed)
		for _, l := range r.output[k] {
			r.printf("        %s", l)
		}
	}
	delete(r.output, k)
}

// failTailLines is how many of a failed test's last output lines the
// summary repeats, each cut to failTailWidth characters.
const (
	failTailLines = 30
	failTailWidth = 400
)

// tail returns the last n lines, each cut to failTailWidth.
func tail(lines []string, n int) []string {
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	out := make([]string, 0, len(lines))
	for _, l := range lines {
		l = strings.TrimRight(l, "\n")
		if len(l) > failTailWidth {
			l = l[:failTailWidth] + " […]"
		}
		out = append(out, l)
	}
	return out
}

// skipReason is the message a skipped test gave (its last output line
// before "--- SKIP").
func skipReason(lines []string) string {
	reason := "no reason given"
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- SKIP") {
			continue
		}
		// "file_test.go:12: message"
		if i := strings.Index(t, ".go:"); i >= 0 {
			if j := strings.Index(t[i+4:], ": "); j >= 0 {
				t = t[i+4+j+2:]
			}
		}
		reason = t
	}
	return reason
}

// heartbeat prints, after quiet periods, which tests are still running.
func (r *report) heartbeat(every time.Duration, done <-chan struct{}) {
	t := time.NewTicker(every / 4)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		r.mu.Lock()
		if time.Since(r.last) >= every && len(r.running) > 0 {
			var names []string
			for k, since := range r.running {
				pkg, test, _ := strings.Cut(k, " ")
				names = append(names, fmt.Sprintf("%s (%s, %.0fs)", test, short(pkg), time.Since(since).Seconds()))
			}
			sort.Strings(names)
			r.printf("  ...   still running: %s\n", strings.Join(names, ", "))
		}
		r.mu.Unlock()
	}
}

// kubeAPIServerSkip marks the skip of the tests against a real
// kube-apiserver (internal/testutil requireBinaries).
const kubeAPIServerSkip = "no kube-apiserver at"

// nodeE2ESkip marks the skip of the node e2e test (e2e/node TestNode:
// kubelet, containerd and the control plane not cached).
const nodeE2ESkip = "NODE E2E DID NOT RUN"

// finish prints the skipped tests, the banner and the totals, and returns
// the exit code.
func (r *report) finish() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	fmt.Fprintln(r.w)
	if len(r.skips) > 0 {
		fmt.Fprintf(r.w, "skipped tests (%d): they did not run\n", len(r.skips))
		for _, s := range r.skips {
			fmt.Fprintf(r.w, "  %s %s: %s\n", s.pkg, s.test, s.reason)
		}
	}
	for _, f := range r.failed {
		fmt.Fprintf(r.w, "FAILED: %s\n", f)
	}
	var k8s []string
	reason := ""
	for _, s := range r.skips {
		if strings.Contains(s.reason, kubeAPIServerSkip) {
			k8s = append(k8s, s.test)
			reason = s.reason
		}
	}
	if len(k8s) > 0 {
		bar := strings.Repeat("#", 78)
		fmt.Fprintf(r.w, "\n%s\n# THE KUBE-APISERVER TESTS DID NOT RUN (%d: %s)\n# why: %s\n# they run once `make kube-apiserver` has built and cached kube-apiserver (tens of minutes, once)\n%s\n",
			bar, len(k8s), strings.Join(k8s, ", "), reason, bar)
	}
	for _, s := range r.skips {
		if strings.Contains(s.reason, nodeE2ESkip) {
			bar := strings.Repeat("#", 78)
			fmt.Fprintf(r.w, "\n%s\n# THE NODE E2E TEST DID NOT RUN (%s %s): no kubelet, containerd and pod created by them\n# why: %s\n# it runs once `make node-e2e` has built and cached kubelet, kube-apiserver, the controller manager,\n# the scheduler and containerd (e2e/node/build.sh: tens of minutes, once)\n%s\n",
				bar, short(s.pkg), s.test, s.reason, bar)
		}
	}
	// The failures' last lines once more, last: a record that keeps only
	// a log's tail still says why. They share failTailLines.
	per := max(failTailLines/max(len(r.failed), 1), 5)
	for _, f := range r.failed {
		lines := tail(r.failTails[f], per)
		fmt.Fprintf(r.w, "\nFAILED: %s: its last %d output lines (the whole output is above)\n", f, len(lines))
		for _, l := range lines {
			fmt.Fprintf(r.w, "  | %s\n", l)
		}
	}
	code := 0
	verdict := "PASS"
	if len(r.failed) > 0 || len(r.pkgFails) > 0 {
		code, verdict = 1, "FAIL"
	}
	fmt.Fprintf(r.w, "\n%s: %d passed, %d failed, %d skipped, %d packages (%d failed), %s\n",
		verdict, r.passed, len(r.failed), len(r.skips), r.packages, len(r.pkgFails), time.Since(r.started).Round(time.Second))
	return code
}

func main() {
	r := &report{w: os.Stdout, started: time.Now(), last: time.Now(), output: map[string][]string{},
		running: map[string]time.Time{}, pkgSeen: map[string]bool{}}
	done := make(chan struct{})
	go r.heartbeat(20*time.Second, done)
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		var e event
		if !strings.HasPrefix(line, "{") || json.Unmarshal([]byte(line), &e) != nil {
			r.mu.Lock()
			r.printf("%s\n", line) // go test's own messages (build failures, FAIL)
			r.mu.Unlock()
			continue
		}
		r.handle(e)
	}
	close(done)
	os.Exit(r.finish())
}
