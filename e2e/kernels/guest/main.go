// Command kguest runs inside the kernel-matrix VMs (e2e/kernels/run.sh).
//
//	kguest probe                         kernel feature and socket-behaviour probes
//	kguest transfer --cgroup DIR ...     a sha256-checked echo inside an enabled cgroup
//	kguest doctor-summary FILE           verdict counts of a doctor --json document
//
// Every result is one line "KMATRIX probe=NAME value=VALUE" or
// "KMATRIX transfer KEY=VALUE" on stdout, which run.sh collects. The probes
// use their own tiny programs and maps (never sockbypass's), so they say
// what the kernel offers whether or not sockbypass loads.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kguest probe | transfer [flags] | doctor-summary FILE")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "probe":
		runProbes()
	case "doctor-summary":
		if len(os.Args) != 3 {
			fmt.Fprintln(os.Stderr, "usage: kguest doctor-summary FILE")
			os.Exit(2)
		}
		err = runDoctorSummary(os.Args[2])
	case "transfer":
		fs := flag.NewFlagSet("transfer", flag.ExitOnError)
		cg := fs.String("cgroup", "/sys/fs/cgroup/t", "enabled cgroup v2 directory to join first")
		bin := fs.String("sockbypass", "/bin/sockbypass", "sockbypass binary (for stats --json)")
		size := fs.Int("size", 4<<20, "bytes echoed")
		fs.Parse(os.Args[2:])
		err = runTransfer(*cg, *bin, *size)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kguest:", err)
		os.Exit(1)
	}
}

// value makes v one token-ish line: no newlines, trimmed.
func value(v string) string {
	v = strings.ReplaceAll(strings.TrimSpace(v), "\n", " | ")
	if v == "" {
		return "-"
	}
	return v
}

func report(name, v string) {
	fmt.Printf("KMATRIX probe=%s value=%s\n", name, value(v))
}

// errValue is "no: ERR" for an error, or yes.
func errValue(err error) string {
	if err != nil {
		return "no: " + err.Error()
	}
	return "yes"
}
