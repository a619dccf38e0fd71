package main

import (
	"errors"
	"fmt"

	"github.com/sockbypass/sockbypass/internal/dataplane"
)

var uninstallCommand = command{
	summary: "detach every program and remove every pin; live connections finish undisturbed",
	usage:   "uninstall",
	run:     runUninstall,
}

func runUninstall(e *env, args []string) error {
	var pinDir, logLevel string
	fs := newFlagSet("uninstall", e, &pinDir, &logLevel)
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	dp, err := openDataplane(e, false, 0)
	if errors.Is(err, dataplane.ErrNotInstalled) {
		fmt.Fprintf(e.stdout, "nothing installed at %s; nothing to do\n", e.pinDir)
		return nil
	}
	if errors.Is(err, dataplane.ErrIncompatible) {
		// Made by another version: detach and unpin without reading it.
		if err := dataplane.RemoveForeign(e.pinDir, e.log); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "uninstalled state of another sockbypass version: unpinned its links (detaching them) and removed %s\n", e.pinDir)
		return nil
	}
	if err != nil {
		return err
	}
	st, err := dp.Status()
	if err != nil {
		dp.Close()
		return err
	}
	if err := dp.Uninstall(); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "uninstalled: detached %d cgroup(s) and removed %s\n", len(st.Cgroups), e.pinDir)
	if st.LiveSockets > 0 {
		fmt.Fprintf(e.stdout, "%d live socket(s) keep their acceleration until they close; no byte is dropped\n", st.LiveSockets)
	}
	return nil
}
