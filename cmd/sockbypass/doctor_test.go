package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/semantics"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestDoctorReportsEveryCaseAndCleansUp runs doctor for machines: one
// result per case and mode, none BROKEN, nothing blocking accelerated, and
// the non-blocking runs really exercise the fast path. The verdict of each
// case is pinned in internal/semantics.
//
// It runs under --bpffs-dir: the private install goes next to that pin
// directory, and the cgroups under one parent (issue 18 item 13).
func TestDoctorReportsEveryCaseAndCleansUp(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	t.Cleanup(func() {
		m, _ := filepath.Glob(pinDir + "-doctor-*")
		for _, d := range m {
			os.RemoveAll(d)
		}
	})
	mounts, _ := cgroup.ReadMounts()
	type ran struct {
		code        int
		out, errOut string
	}
	done := make(chan ran, 1)
	go func() {
		var out, errOut bytes.Buffer
		code := run([]string{"doctor", "--json", "--bpffs-dir", pinDir}, &out, &errOut)
		done <- ran{code, out.String(), errOut.String()}
	}()
	// While it runs: its pins next to pinDir, its cgroups under one parent.
	var sawPins, sawCgroups, sawFlat bool
	var res ran
wait:
	for {
		select {
		case res = <-done:
			break wait
		case <-time.After(20 * time.Millisecond):
		}
		if m, _ := filepath.Glob(pinDir + "-doctor-*"); len(m) > 0 {
			sawPins = true
		}
		plain, _ := filepath.Glob(filepath.Join(mounts.V2, "sockbypass-doctor-*", "plain"))
		accel, _ := filepath.Glob(filepath.Join(mounts.V2, "sockbypass-doctor-*", "accel"))
		if len(plain) == 1 && len(accel) == 1 && filepath.Dir(plain[0]) == filepath.Dir(accel[0]) {
			sawCgroups = true
		}
		if m, _ := filepath.Glob(filepath.Join(mounts.V2, "sockbypass-doctor-[pa][lc]*-*")); len(m) > 0 {
			sawFlat = true // sockbypass-doctor-plain-*, -accel-*: at the root
		}
	}
	code, out, errOut := res.code, res.out, res.errOut
	if code != 0 {
		t.Fatalf("doctor exited %d: %s\n%s", code, errOut, out)
	}
	if !sawPins || !sawCgroups || sawFlat {
		t.Errorf("doctor --bpffs-dir %s: private pins next to it seen %v, plain and accel under one parent seen %v, cgroups at the cgroup2 root seen %v", pinDir, sawPins, sawCgroups, sawFlat)
	}
	var rep doctorReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	cases := semantics.Cases()
	if rep.Broken != 0 || rep.KnownLimitations == 0 || len(rep.Results) != len(cases)*len(semantics.AllModes()) || len(rep.Modes) != 2 {
		t.Fatalf("doctor: %d broken, %d results for %d cases, modes %v", rep.Broken, len(rep.Results), len(cases), rep.Modes)
	}
	verdicts := map[semantics.Mode]map[string]int{semantics.Blocking: {}, semantics.NonBlocking: {}}
	for i, r := range rep.Results {
		c, mode := cases[i/2], semantics.AllModes()[i%2]
		if r.Case != c.Name || r.Mode != mode {
			t.Errorf("result %d is %q (%s), want %q (%s)", i, r.Case, r.Mode, c.Name, mode)
		}
		verdicts[r.Mode][r.Verdict]++
		if r.Mode == semantics.Blocking && r.Expect != semantics.NotAccelerated {
			t.Errorf("%s (blocking): expected %q, but blocking sockets are never accelerated", r.Case, r.Expect)
		}
		// What the counters say: a blocking run's sockets were counted
		// blocking (its why is then WhyBlocking) or kept off by the
		// case's own counter; a preserved run redirected, and its members
		// passed nothing to the stack unless they leave by design.
		switch {
		case r.Verdict == semantics.VerdictBroken:
			t.Errorf("%s (%s): %s: %s", r.Case, r.Mode, r.Verdict, r.Err)
		case r.Mode == semantics.Blocking && (r.Verdict != semantics.VerdictNotAccelerated || r.RedirectedBytes != 0 || r.PassedBytes != 0):
			t.Errorf("%s (blocking): %s, redirected %d, passed %d", r.Case, r.Verdict, r.RedirectedBytes, r.PassedBytes)
		case r.Mode == semantics.Blocking && ((r.SocketsBlocking == 0 && r.Counted == 0) || (r.SocketsBlocking > 0) != (r.Why == semantics.WhyBlocking)):
			t.Errorf("%s (blocking): %d socket(s) counted blocking, counter %q moved by %d, why %q", r.Case, r.SocketsBlocking, r.Counter, r.Counted, r.Why)
		case r.Verdict == semantics.VerdictPreserved && (r.RedirectedBytes == 0 || (r.PassedBytes != 0 && !c.PassesLater)):
			t.Errorf("%s (%s): preserved with %d bytes redirected and %d bytes of members on the stack", r.Case, r.Mode, r.RedirectedBytes, r.PassedBytes)
		}
	}
	// The summary counts what the rows say, and broken/known_limitations
	// agree with it.
	for m, counts := range verdicts {
		for v, n := range counts {
			if rep.Summary[m][v] != n {
				t.Errorf("summary %s %q: %d, rows say %d", m, v, rep.Summary[m][v], n)
			}
		}
	}
	if rep.KnownLimitations != verdicts[semantics.NonBlocking][semantics.VerdictKnown]+verdicts[semantics.Blocking][semantics.VerdictKnown] {
		t.Errorf("known_limitations %d, rows say %v", rep.KnownLimitations, verdicts)
	}
	nb := verdicts[semantics.NonBlocking]
	if nb[semantics.VerdictPreserved] == 0 || nb[semantics.VerdictFallback] == 0 || nb[semantics.VerdictKnown] == 0 || nb[semantics.VerdictNotAccelerated] != 0 {
		t.Errorf("non-blocking verdicts %v: want preserved, fallbacks and known limitations, and every case accelerated or falling back", nb)
	}
	// Nothing of the doctor's stays behind.
	if m, _ := filepath.Glob(pinDir + "-doctor-*"); len(m) > 0 {
		t.Errorf("doctor left pins: %v", m)
	}
	if m, _ := filepath.Glob(filepath.Join(mounts.V2, "sockbypass-doctor-*")); len(m) > 0 {
		t.Errorf("doctor left cgroups: %v", m)
	}

	// The markdown table (README.md's): a row per case and mode.
	var md bytes.Buffer
	printDoctorMarkdown(&md, rep)
	table, summary, _ := strings.Cut(md.String(), "\n\n")
	lines := strings.Split(strings.TrimSpace(table), "\n")
	for _, l := range summaryLines(rep) {
		if !strings.Contains(summary, l) {
			t.Errorf("markdown summary lacks %q:\n%s", l, summary)
		}
	}
	if lines[0] != "| case | mode | behaviour | how it is guaranteed |" || len(lines) != 2+len(rep.Results) {
		t.Errorf("markdown: %d lines:\n%s", len(lines), md.String())
	}
	for i, r := range rep.Results {
		if want := "| " + r.Case + " | " + string(r.Mode) + " | " + r.Verdict + " | "; !strings.HasPrefix(lines[2+i], want) {
			t.Errorf("markdown row %d: %q, want it to start with %q", i, lines[2+i], want)
		}
	}
}

// TestDoctorPrintsEachCaseAsItFinishes: the people format shows a row per
// case, with its verdict in both modes, as each finishes (the first long
// before the run ends), its explanation wrapped below (no line much wider
// than 100 columns), the blocking runs' shared explanation once, then the
// details of the known limitations and a summary per mode.
func TestDoctorPrintsEachCaseAsItFinishes(t *testing.T) {
	testutil.RequirePrivileged(t)
	pr, pw := io.Pipe()
	var errOut bytes.Buffer
	start := time.Now()
	ended := make(chan time.Time, 1)
	code := -1
	go func() {
		code = run([]string{"doctor"}, pw, &errOut)
		ended <- time.Now()
		pw.Close()
	}()
	cases := semantics.Cases()
	var out strings.Builder
	var firstRow time.Time
	rows, starred, whyBlocking := 0, 0, 0
	footnote := regexp.MustCompile(`^\* (\d+) of (\d+) blocking runs: `)
	var footStarred, footRuns string
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		line := sc.Text()
		out.WriteString(line + "\n")
		if len(line) > doctorWidth+blockingColumn+nonBlockingColumn+4 {
			t.Errorf("doctor line of %d characters: %q", len(line), line)
		}
		if strings.Contains(line, "blocking sockets are never accelerated") {
			whyBlocking++
		}
		// One line per case, with both verdicts, in order; the blocking
		// runs whose sockets were counted blocking carry the footnote's
		// star.
		if rows < len(cases) && strings.HasSuffix(line, "  "+cases[rows].Name) && strings.HasPrefix(line, semantics.VerdictNotAccelerated) {
			if rows == 0 {
				firstRow = time.Now()
			}
			rows++
			if strings.HasPrefix(line, semantics.VerdictNotAccelerated+" *") {
				starred++
			}
		}
		if m := footnote.FindStringSubmatch(line); m != nil {
			footStarred, footRuns = m[1], m[2]
		}
	}
	end := <-ended
	if code != 0 {
		t.Fatalf("doctor exited %d: %s\n%s", code, errOut.String(), out.String())
	}
	if rows != len(cases) {
		t.Fatalf("doctor printed %d case rows in order, want %d:\n%s", rows, len(cases), out.String())
	}
	// The footnote counts the starred rows: most blocking runs, each
	// counted blocking.
	if footStarred != strconv.Itoa(starred) || footRuns != strconv.Itoa(len(cases)) || starred < len(cases)/2 {
		t.Errorf("%d of %d rows starred, the footnote says %s of %s blocking runs:\n%s", starred, rows, footStarred, footRuns, out.String())
	}
	// The blocking runs' one explanation, grouped: in the header and the
	// footnote, not on every row.
	if whyBlocking != 2 {
		t.Errorf("the blocking explanation is printed %d times, want 2 (header and footnote):\n%s", whyBlocking, out.String())
	}
	// Printed at the end, the first row would come out just before it.
	if first, total := firstRow.Sub(start), end.Sub(start); first > total/2 {
		t.Errorf("the first row came out after %v of %v: rows are not printed as cases finish", first, total)
	}
	text := out.String()
	for _, want := range []string{"BLOCKING", "NON-BLOCKING", "CASE", "accelerated: ", "\nblocking: ", "\nnon-blocking: ", "\nbroken unexpectedly (BROKEN): 0; known limitations"} {
		if !strings.Contains(text, want) {
			t.Errorf("doctor output lacks %q:\n%s", want, text)
		}
	}
}

// TestDoctorJSONAndMarkdownAreExclusive: both at once used to print JSON
// and exit 0.
func TestDoctorJSONAndMarkdownAreExclusive(t *testing.T) {
	code, out, errOut := sockbypass(t, "doctor", "--json", "--markdown")
	if code != exitUsage || out != "" || !strings.Contains(errOut, "--json and --markdown contradict each other") {
		t.Errorf("doctor --json --markdown: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

func TestEnableWarnsAboutKnownLimitations(t *testing.T) {
	pinDir, cg := newInstallDir(t)
	code, _, errOut := sockbypass(t, "enable", "--cgroup", cg.Path, "--no-tc", "--bpffs-dir", pinDir)
	if code != 0 {
		t.Fatal(errOut)
	}
	for _, name := range knownLimitations() {
		if !strings.Contains(errOut, name) {
			t.Errorf("enable's warning does not name %q:\n%s", name, errOut)
		}
	}
}
