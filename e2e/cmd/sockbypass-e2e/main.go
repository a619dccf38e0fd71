// Command sockbypass-e2e runs the e2e benchmark and acceptance suite of
// sockbypass (package e2e/suite): real clients and servers, plain vs
// accelerated side by side, over loopback in one network namespace and
// over a veth pair between two, with content verification. It writes
// results.json, results.md and PNG charts to -out and exits 1 when a case
// fails (a program error or a failed integrity check). Timings are
// reported, never judged. Needs root.
//
//	sockbypass-e2e                 # the full suite (under 15 minutes on 2 cores)
//	sockbypass-e2e -quick          # the quick subset (under 3 minutes)
//	sockbypass-e2e -case 'loopback/redis'   # the cases whose name matches
//	sockbypass-e2e -list           # the case names
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sockbypass/sockbypass/e2e/suite"
	"github.com/sockbypass/sockbypass/internal/privilege"
)

func main() {
	os.Exit(run())
}

func run() int {
	out := flag.String("out", "e2e/results", "directory for results.json, results.md and the PNG charts")
	quick := flag.Bool("quick", false, "the quick subset with 1 s runs (make bench-quick)")
	runs := flag.Int("runs", 3, "runs per case and mode, alternating; medians are reported")
	dur := flag.Duration("duration", 0, "length of one timed run, whole seconds (default 2s, 1s with -quick)")
	pattern := flag.String("case", "", "run only the cases whose name matches this regular expression (see -list)")
	smoke := flag.Bool("smoke", false, "shortest possible runs: a functional check, not a measurement")
	list := flag.Bool("list", false, "print the case names and exit")
	flag.Parse()
	if flag.NArg() > 0 || *runs < 1 {
		flag.Usage()
		return 2
	}

	cases, label := suite.FullCases(), "full"
	if *quick {
		cases, label = suite.QuickCases(), "quick"
	}
	if *pattern != "" {
		var err error
		if cases, err = suite.Select(suite.AllCases(), *pattern); err != nil {
			fmt.Fprintln(os.Stderr, "sockbypass-e2e:", err)
			return 2
		}
		label = "cases matching " + *pattern
	}
	if *list {
		for _, c := range cases {
			fmt.Println(c.Name)
		}
		return 0
	}
	if *dur == 0 {
		*dur = 2 * time.Second
		if *quick {
			*dur = time.Second
		}
	}

	for _, check := range []func() error{privilege.Check, privilege.CheckKernel, suite.CheckTools} {
		if err := check(); err != nil {
			fmt.Fprintln(os.Stderr, "sockbypass-e2e:", err)
			return 1
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	began := time.Now()
	env, err := suite.NewEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, "sockbypass-e2e: set up:", err)
		return 1
	}
	cfg := suite.Config{
		Runs: *runs, Duration: *dur, Smoke: *smoke,
		Progress: func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "[%5.0fs] "+format+"\n", append([]any{time.Since(began).Seconds()}, args...)...)
		},
	}
	fmt.Fprintf(os.Stderr, "sockbypass-e2e: %d cases (%s), %d runs per mode of %s\n", len(cases), label, *runs, dur)
	report := env.Run(ctx, cases, cfg, label)
	if err := env.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "sockbypass-e2e: teardown:", err)
		report.Failures = append(report.Failures, "teardown: "+err.Error())
	}
	files, err := report.WriteFiles(*out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sockbypass-e2e: write results:", err)
		return 1
	}
	var md strings.Builder
	report.WriteMarkdown(&md)
	fmt.Print(md.String())
	fmt.Fprintf(os.Stderr, "sockbypass-e2e: wrote %s in %.0f s\n", strings.Join(files, ", "), time.Since(began).Seconds())
	if len(report.Failures) > 0 {
		fmt.Fprintf(os.Stderr, "sockbypass-e2e: %d failures\n", len(report.Failures))
		return 1
	}
	return 0
}
