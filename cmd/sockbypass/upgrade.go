package main

import (
	"fmt"
)

var upgradeCommand = command{
	summary: "replace every pinned program with this binary's, in place, while connections flow",
	usage:   "upgrade",
	run:     runUpgrade,
}

func runUpgrade(e *env, args []string) error {
	var pinDir, logLevel string
	fs := newFlagSet("upgrade", e, &pinDir, &logLevel)
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	dp, err := openDataplane(e, false, 0)
	if err != nil {
		return err
	}
	defer dp.Close()
	rep, err := dp.Upgrade()
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "upgraded: programs of %d cgroup(s), %d TC device(s) and sk_msg replaced; maps and live connections kept\n", rep.Cgroups, rep.TCDevices)
	if rep.RemovedCgroups > 0 {
		fmt.Fprintf(e.stdout, "disabled %d cgroup(s) removed while enabled (their links were severed)\n", rep.RemovedCgroups)
	}
	if rep.LegacyTracerRemoved {
		fmt.Fprintln(e.stdout, "removed the read-progress tracer of the older install: senders now read their peer's progress themselves")
	}
	return nil
}
