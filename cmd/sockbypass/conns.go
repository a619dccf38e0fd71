package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/conns"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/stats"
)

var connsCommand = command{
	summary: "one line per TCP connection of the enabled cgroups: paired (bytes redirected) or plain TCP and why",
	usage: "conns [--json] [--cgroup PATH] [--port N] [--state STATE]\n\n" +
		"Each end of a connection is a line of its own: local and remote address, state,\n" +
		"bytes it redirected, its process (pid/comm), cgroup and network namespace (net:[INODE],\n" +
		"and the pod UID for kubelet pod cgroups). Found with the kernel's socket diagnostics\n" +
		"in every network namespace the enabled cgroups' processes use, and /proc.\n\n" +
		"States: " + strings.Join(conns.States, ", ") + ". Reasons a connection is plain (or leaving):\n" + reasonsHelp(),
	run: runConns,
}

// reasonsHelp lists the reason codes for --help.
func reasonsHelp() string {
	var b strings.Builder
	for _, r := range conns.Reasons {
		fmt.Fprintf(&b, "  %-21s %s\n", r.Code, r.Text)
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// connsJSON is the --json document of conns. Its fields are stable: new
// fields may be added, none renamed or removed.
type connsJSON struct {
	Time   time.Time `json:"time"`
	PinDir string    `json:"pin_dir"`
	// Counts are the connections listed per state.
	Counts      map[string]int `json:"counts"`
	Connections []conns.Conn   `json:"connections"`
}

func runConns(e *env, args []string) error {
	var pinDir, logLevel, cgroupArg, portArg, state string
	var asJSON bool
	fs := newFlagSet("conns", e, &pinDir, &logLevel)
	fs.BoolVar(&asJSON, "json", false, "print JSON for machines instead of a table")
	fs.StringVar(&cgroupArg, "cgroup", "", "only connections of this cgroup and the cgroups below it: as conns shows it (/app.slice/web, below the cgroup2 mount), or its absolute path")
	fs.StringVar(&portArg, "port", "", "only connections whose local or remote port is N (1-65535)")
	fs.StringVar(&state, "state", "", "only connections in this state ("+strings.Join(conns.States, ", ")+") or with this reason (e.g. blocking)")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	var filter conns.Filter
	if flagSet(fs, "port") {
		p, err := strconv.ParseUint(portArg, 10, 16)
		if err != nil || p == 0 {
			return usagef("--port %q: use a port from 1 to 65535", portArg)
		}
		filter.Port = uint16(p)
	}
	if flagSet(fs, "state") {
		if err := conns.CheckState(state); err != nil {
			return usageError{err.Error()}
		}
		filter.State = state
	}
	if flagSet(fs, "cgroup") && strings.TrimSpace(cgroupArg) == "" {
		return usagef("--cgroup \"\": name a cgroup, e.g. --cgroup kubepods.slice (or leave the flag out for all)")
	}
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return err
	}
	dp, err := openDataplane(e, false, 0)
	if errors.Is(err, dataplane.ErrNotInstalled) {
		return fmt.Errorf("%w (pin directory %s)", err, e.pinDir)
	}
	if err != nil {
		return err
	}
	defer dp.Close()
	if cgroupArg != "" {
		arg := cgroupArg
		if strings.HasPrefix(arg, "/") && arg != mounts.V2 && !strings.HasPrefix(arg, strings.TrimSuffix(mounts.V2, "/")+"/") {
			// The form conns and stats print: relative to the mount,
			// with a leading "/".
			arg = strings.TrimPrefix(arg, "/")
		}
		cg, err := mounts.Resolve(arg)
		if errors.Is(err, cgroup.ErrNotExist) {
			return fmt.Errorf("--cgroup %q: no such cgroup below %s; name an enabled cgroup or one below it (see sockbypass status for the enabled cgroups)", cgroupArg, mounts.V2)
		}
		if err != nil {
			return fmt.Errorf("--cgroup %q: %w (see sockbypass status for the enabled cgroups)", cgroupArg, err)
		}
		if err := checkEnabledTree(dp, mounts, cg); err != nil {
			return err
		}
		filter.Cgroup = cg.Rel
	}

	start := time.Now()
	all, err := conns.Collect(dp, conns.Options{Mounts: mounts, Logger: e.log})
	if err != nil {
		return err
	}
	list := filter.Select(all)
	e.log.Debug("conns", zap.Int("listed", len(list)), zap.Int("collected", len(all)), zap.Duration("took", time.Since(start)))
	counts := map[string]int{}
	for _, s := range conns.States {
		counts[s] = 0
	}
	for _, c := range list {
		counts[c.State]++
	}
	if asJSON {
		return writeJSON(e.stdout, connsJSON{Time: time.Now().UTC(), PinDir: e.pinDir, Counts: counts, Connections: list})
	}
	printConns(e.stdout, list, counts)
	return nil
}

// checkEnabledTree returns an error naming cg and the fix unless cg is, or
// is below, a cgroup that is enabled (or was, and still has accelerated
// sockets).
func checkEnabledTree(dp *dataplane.Dataplane, mounts cgroup.Mounts, cg cgroup.Cgroup) error {
	settings, err := dp.SlotSettings()
	if err != nil {
		return err
	}
	var ids []uint64
	for id := range settings {
		ids = append(ids, id)
	}
	paths, err := mounts.PathsByID(ids)
	if err != nil {
		return err
	}
	for _, p := range paths {
		if cg.Path == p || strings.HasPrefix(cg.Path, p+"/") {
			return nil
		}
	}
	return fmt.Errorf("--cgroup %q: %s is not enabled, nor below an enabled cgroup: it has no connections to list (enable it with: sockbypass enable --cgroup %s; see sockbypass status for the enabled cgroups)", cg.Rel, cg.Path, cg.Rel)
}

// printConns prints the connections as an aligned table, then the counts.
func printConns(w io.Writer, list []conns.Conn, counts map[string]int) {
	pods := false
	for _, c := range list {
		pods = pods || c.PodUID != ""
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	head := "LOCAL\tREMOTE\tSTATE\tREASON\tREDIRECTED\tPROCESS\tCGROUP\tNETNS\t"
	if pods {
		head += "POD\t"
	}
	fmt.Fprintln(tw, head)
	for _, c := range list {
		redirected, reason, process := "-", "-", "-"
		if c.State != conns.StatePlain {
			redirected = stats.HumanBytes(c.RedirectedBytes)
		}
		if c.Reason != "" {
			reason = c.Reason
		}
		if c.Detail != "" {
			reason = strings.TrimPrefix(reason+" ("+c.Detail+")", "- ")
		}
		if c.PID != 0 {
			process = fmt.Sprintf("%d/%s", c.PID, c.Comm)
		}
		cg := c.Cgroup
		if cg == "" {
			cg = fmt.Sprintf("(id %d)", c.CgroupID)
		}
		state := c.State
		if c.TCPState != "ESTABLISHED" {
			state += " " + strings.ToLower(c.TCPState)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\tnet:[%d]\t", addr(c.Local), addr(c.Remote), state, reason, redirected, process, cg, c.Netns)
		if pods {
			pod := c.PodUID
			if pod == "" {
				pod = "-"
			}
			fmt.Fprintf(tw, "%s\t", pod)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	var parts []string
	for _, s := range conns.States {
		parts = append(parts, fmt.Sprintf("%d %s", counts[s], s))
	}
	fmt.Fprintf(w, "%d connection end(s): %s\n", len(list), strings.Join(parts, ", "))
}

// addr prints an address as ss does ([::1]:80, 127.0.0.1:80).
func addr(a netip.AddrPort) string { return a.String() }
