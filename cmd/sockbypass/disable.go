package main

import (
	"fmt"
)

var disableCommand = command{
	summary: "stop accelerating new connections of a cgroup; live ones keep working",
	usage:   "disable --cgroup PATH [--cgroup PATH ...]",
	run:     runDisable,
}

func runDisable(e *env, args []string) error {
	var pinDir, logLevel string
	var cgroups stringList
	fs := newFlagSet("disable", e, &pinDir, &logLevel)
	fs.Var(&cgroups, "cgroup", "cgroup v2 directory, absolute or relative to the cgroup2 mount (repeatable)")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	if len(cgroups) == 0 {
		return usagef("--cgroup is required: name the enabled cgroup to disable (see sockbypass status)")
	}
	resolved, err := resolveAll(cgroups)
	if err != nil {
		return err
	}
	dp, err := openDataplane(e, false, 0)
	if err != nil {
		return err
	}
	defer dp.Close()
	for _, cg := range resolved {
		changed, err := dp.Disable(cg.ID)
		if err != nil {
			return err
		}
		if changed {
			fmt.Fprintf(e.stdout, "disabled %s: new connections take the normal TCP path; accelerated ones continue until they close\n", cg.Path)
		} else {
			fmt.Fprintf(e.stdout, "%s was not enabled; nothing to do\n", cg.Path)
		}
	}
	return nil
}
