package suite

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/sockbypass/sockbypass/internal/stats"
)

// Report is the content of results.json.
type Report struct {
	Started time.Time `json:"started"`
	// ElapsedSeconds is the wall time of the whole suite.
	ElapsedSeconds float64 `json:"elapsed_seconds"`
	Kernel         string  `json:"kernel"`
	CPUs           int     `json:"cpus"`
	// Runs is the number of runs per mode and case; RunSeconds the length
	// of one timed run.
	Runs       int            `json:"runs"`
	RunSeconds int            `json:"run_seconds"`
	Smoke      bool           `json:"smoke,omitempty"`
	Label      string         `json:"label"`
	Topologies []TopologyInfo `json:"topologies"`
	Cases      []CaseResult   `json:"cases"`
	// Failures lists the cases that failed (a program error or a failed
	// integrity check); the suite fails when it is not empty.
	Failures []string `json:"failures"`
}

// TopologyInfo describes a topology in the report.
type TopologyInfo struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	CrossNetns  bool   `json:"cross_netns"`
}

// WriteFiles writes results.json, results.md and the PNG charts into dir.
func (r *Report) WriteFiles(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, err
	}
	jsonPath := filepath.Join(dir, "results.json")
	if err := os.WriteFile(jsonPath, append(data, '\n'), 0o644); err != nil {
		return nil, err
	}
	var md strings.Builder
	r.WriteMarkdown(&md)
	mdPath := filepath.Join(dir, "results.md")
	if err := os.WriteFile(mdPath, []byte(md.String()), 0o644); err != nil {
		return nil, err
	}
	charts, err := r.WriteCharts(dir)
	return append([]string{jsonPath, mdPath}, charts...), err
}

// WriteMarkdown writes the report as markdown: one table per topology
// with, for each case and metric, plain, accelerated, their ratio and the
// spread of the runs; then the integrity checks and failures.
func (r *Report) WriteMarkdown(w io.Writer) {
	fmt.Fprintf(w, "# sockbypass e2e: plain vs accelerated (%s)\n\n", r.Label)
	fmt.Fprintf(w, "%s, kernel %s, %d CPUs; %d runs per mode of %d s, alternating plain and accelerated; "+
		"values are medians, spread is (max-min)/median of the runs; whole suite %.0f s.\n\n",
		r.Started.UTC().Format("2006-01-02 15:04 UTC"), r.Kernel, r.CPUs, r.Runs, r.RunSeconds, r.ElapsedSeconds)
	for _, t := range r.Topologies {
		var rows []CaseResult
		for _, c := range r.Cases {
			if c.Topology == t.Name {
				rows = append(rows, c)
			}
		}
		if len(rows) == 0 {
			continue
		}
		// Accelerated workloads lead; the controls (blocking sockets,
		// left plain) follow.
		sort.SliceStable(rows, func(i, j int) bool { return kindRank(rows[i].Kind) < kindRank(rows[j].Kind) })
		fmt.Fprintf(w, "## %s: %s\n\n", t.Name, t.Description)
		fmt.Fprintln(w, "| case | kind | metric | plain | accelerated | accelerated/plain | spread plain / accel | redirected (accel runs) |")
		fmt.Fprintln(w, "|---|---|---|---:|---:|---:|---|---|")
		for _, c := range rows {
			short := strings.TrimPrefix(c.Name, c.Topology+"/")
			if c.Error != "" {
				fmt.Fprintf(w, "| %s | %s | FAILED | | | | | %s |\n", short, c.Kind, mdEscape(firstLine(c.Error)))
				continue
			}
			for i, m := range c.Metrics {
				redirected := ""
				if i == 0 {
					redirected = redirectedCell(c)
				}
				fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %.0f%% / %.0f%% | %s |\n",
					short, c.Kind, m.Metric, formatValue(m.PlainMedian, m.Unit), formatValue(m.AccelMedian, m.Unit),
					ratioCell(m), m.PlainSpread, m.AccelSpread, redirected)
			}
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, "## Integrity checks")
	fmt.Fprintln(w)
	for _, c := range r.Cases {
		if len(c.Checks) > 0 {
			fmt.Fprintf(w, "- %s: %s\n", c.Name, strings.Join(c.Checks, "; "))
		}
	}
	fmt.Fprintln(w)
	if len(r.Failures) > 0 {
		fmt.Fprintln(w, "## Failures")
		fmt.Fprintln(w)
		for _, f := range r.Failures {
			fmt.Fprintf(w, "- %s\n", mdEscape(firstLine(f)))
		}
		fmt.Fprintln(w)
	}
}

// ratioCell is accelerated/plain with a verdict that accounts for the
// metric's direction.
func ratioCell(m MetricResult) string {
	if m.Ratio == 0 {
		return "-"
	}
	better := (m.LowerIsBetter && m.Ratio < 1) || (!m.LowerIsBetter && m.Ratio > 1)
	verdict := "worse"
	switch {
	case math.Abs(m.Ratio-1) < 0.01:
		verdict = "same"
	case better:
		verdict = "better"
	}
	return fmt.Sprintf("%.2fx (%s)", m.Ratio, verdict)
}

// redirectedCell says how much of the accelerated traffic took the fast
// path (the share of the payload, stack egress included), or why none did.
func redirectedCell(c CaseResult) string {
	t := c.AccelTraffic
	share := ""
	if t.RedirectedBytes+t.StackEgressBytes > 0 {
		share = fmt.Sprintf(" (%.0f%%)", 100*t.RedirectedShare())
	}
	cell := stats.HumanBytes(t.RedirectedBytes) + share
	if c.Note != "" {
		cell += ", " + c.Note
	}
	return cell
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

func mdEscape(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
