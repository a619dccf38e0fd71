// Command sockbench runs the loopback workloads of e2e/workload over
// connections in a plain cgroup and in an accelerated (enabled) cgroup,
// alternating, and prints the side-by-side table. The demo uses it.
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
	results, err := workload.Compare(plain, accel, workload.DefaultCases, *runs, *dur, progress)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sockbench:", err)
		os.Exit(1)
	}
	workload.PrintTable(os.Stdout, results, *runs)
}
