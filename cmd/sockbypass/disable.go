package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/lock"
)

var disableCommand = command{
	summary: "stop accelerating new connections of a cgroup; live ones keep working",
	usage:   "disable --cgroup PATH [--cgroup PATH ...] | disable --cgroup-id ID",
	run:     runDisable,
}

func runDisable(e *env, args []string) error {
	var pinDir, logLevel string
	var cgroups, ids stringList
	fs := newFlagSet("disable", e, &pinDir, &logLevel)
	fs.Var(&cgroups, "cgroup", "cgroup v2 directory, absolute or relative to the cgroup2 mount (repeatable)")
	fs.Var(&ids, "cgroup-id", "cgroup id as status shows it, for a cgroup that was removed (repeatable)")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	if len(cgroups) == 0 && len(ids) == 0 {
		return usagef("--cgroup is required: name the enabled cgroup to disable (or --cgroup-id for a removed one; see sockbypass status)")
	}
	if err := checkCgroupArgs(cgroups); err != nil {
		return err
	}
	for _, c := range cgroups {
		if _, err := resolveAll([]string{c}); errors.Is(err, cgroup.ErrNotExist) {
			// Most likely removed while enabled: that is what
			// --cgroup-id is for (not mkdir, as enable would say).
			return fmt.Errorf("cgroup %q does not exist (any more): %s", c, removedHint(e))
		}
	}
	resolved, err := resolveAll(cgroups)
	if err != nil {
		return err
	}
	for _, s := range ids {
		id, err := strconv.ParseUint(s, 10, 64)
		if err != nil || id == 0 {
			return usagef("--cgroup-id %q: use the numeric id that sockbypass status shows", s)
		}
		resolved = append(resolved, cgroup.Cgroup{ID: id, Path: "cgroup id " + s})
	}
	if info, ok, _ := lock.DaemonOwner(e.pinDir); ok {
		fmt.Fprintf(e.stderr, "warning: a sockbypass daemon (pid %d, %s) manages %s: a cgroup its configuration names is enabled again at its next rescan; to keep it disabled, take it out of the configuration\n", info.Pid, info.Config, e.pinDir)
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
	if _, err := dp.ReapPairs(dataplane.PairReapAge); err != nil {
		fmt.Fprintf(e.stderr, "warning: %v\n", err)
	}
	if _, err := dp.ForgetRemovedCgroups(); err != nil {
		fmt.Fprintf(e.stderr, "warning: %v\n", err)
	}
	return nil
}

// removedHint says how to disable a cgroup that was removed while enabled,
// naming the ids of the enabled cgroups that no longer exist.
func removedHint(e *env) string {
	hint := "a cgroup removed while enabled is disabled by id: sockbypass disable --cgroup-id ID (status lists the ids)"
	dp, err := openDataplane(e, false, 0)
	if err != nil {
		return hint
	}
	defer dp.Close()
	st, err := dp.Status()
	if err != nil {
		return hint
	}
	var gone []string
	for _, c := range st.Cgroups {
		if c.Path == "" {
			gone = append(gone, strconv.FormatUint(c.ID, 10))
		}
	}
	if len(gone) == 0 {
		return hint + "; no enabled cgroup has been removed"
	}
	return hint + "; enabled cgroups that no longer exist: id " + strings.Join(gone, ", ")
}
