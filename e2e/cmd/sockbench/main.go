// Command sockbench runs the loopback workloads of e2e/workload over
// connections in a plain cgroup and in an accelerated (enabled) cgroup,
// alternating, and prints the side-by-side table, a line explaining each
// row that reads slower, and a summary line. The demo uses it.
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/e2e/workload"
)

func main() {
	plainArg := flag.String("plain-cgroup", "", "cgroup whose sockets are not accelerated")
	accelArg := flag.String("accel-cgroup", "", "cgroup enabled with sockbypass enable")
	runs := flag.Int("runs", 3, "alternating runs per case and mode")
	dur := flag.Duration("duration", 500*time.Millisecond, "length of one run")
	quiet := flag.Bool("quiet", false, "no progress line per measurement on stderr (errors still go there)")
	flag.Parse()
	if *plainArg == "" || *accelArg == "" {
		fmt.Fprintln(os.Stderr, "sockbench: --plain-cgroup and --accel-cgroup are required")
		os.Exit(2)
	}
	plain, err := cgroup.Resolve(*plainArg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sockbench:", err)
		os.Exit(1)
	}
	accel, err := cgroup.Resolve(*accelArg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sockbench:", err)
		os.Exit(1)
	}
	progress := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "  "+format+"\n", args...) }
	if *quiet {
		progress = nil
	}
	results, err := workload.Compare(plain, accel, workload.DefaultCases, *runs, *dur, progress)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sockbench:", err)
		os.Exit(1)
	}
	workload.PrintTable(os.Stdout, results, *runs)
	// Rows that read "slower" get a line saying why (noise, or a real
	// cost), then one line sums the table up.
	var notes []string
	for _, r := range results {
		if e := workload.Explain(r, *runs); e != "" {
			notes = append(notes, e)
		}
	}
	if len(notes) > 0 {
		fmt.Println()
	}
	for _, n := range notes {
		fmt.Println("note:", n)
	}
	fmt.Println()
	fmt.Println("summary:", workload.Summary(results))
}
