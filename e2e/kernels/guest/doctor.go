package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

// shortVerdicts names doctor's verdicts in one word each.
var shortVerdicts = map[string]string{
	"preserved":                "preserved",
	"falls back automatically": "fallback",
	"not accelerated":          "not_accelerated",
	"broken: known limitation": "known_limitation",
	"not measured":             "not_measured",
	"BROKEN":                   "BROKEN",
}

// runDoctorSummary prints the verdict counts of a `sockbypass doctor
// --json` document, per mode, as KMATRIX lines.
func runDoctorSummary(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var doc struct {
		Kernel  string   `json:"kernel"`
		Modes   []string `json:"modes"`
		Broken  int      `json:"broken"`
		Results []struct {
			Case    string `json:"case"`
			Mode    string `json:"mode"`
			Verdict string `json:"verdict"`
			Err     string `json:"error"`
		} `json:"results"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		fmt.Println("KMATRIX doctor verdicts=unavailable (no JSON document)")
		return fmt.Errorf("doctor JSON: %w", err)
	}
	for _, m := range doc.Modes {
		counts := map[string]int{}
		for _, r := range doc.Results {
			if r.Mode == m {
				counts[r.Verdict]++
			}
		}
		var parts []string
		for _, v := range []string{"preserved", "falls back automatically", "not accelerated", "broken: known limitation", "not measured", "BROKEN"} {
			if counts[v] > 0 {
				parts = append(parts, fmt.Sprintf("%s=%d", shortVerdicts[v], counts[v]))
			}
			delete(counts, v)
		}
		for v, n := range counts {
			parts = append(parts, fmt.Sprintf("%q=%d", v, n))
		}
		fmt.Printf("KMATRIX doctor mode=%s verdicts=%s\n", m, strings.Join(parts, ","))
	}
	for _, r := range doc.Results {
		if r.Verdict == "BROKEN" {
			fmt.Printf("KMATRIX doctor broken_case=%q mode=%s error=%s\n", r.Case, r.Mode, value(r.Err))
		}
	}
	fmt.Printf("KMATRIX doctor broken=%d results=%d\n", doc.Broken, len(doc.Results))
	return nil
}
