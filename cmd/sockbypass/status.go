package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/stats"
)

var statusCommand = command{
	summary: "show enabled cgroups, program ids, live sockets and counters",
	usage:   "status [--json]",
	run:     runStatus,
}

// statusJSON is the --json document of status. Its fields are stable: new
// fields may be added, none renamed or removed.
type statusJSON struct {
	Installed bool `json:"installed"`
	*dataplane.Status
	PinDir string `json:"pin_dir"`
}

func runStatus(e *env, args []string) error {
	var pinDir, logLevel string
	var asJSON bool
	fs := newFlagSet("status", e, &pinDir, &logLevel)
	fs.BoolVar(&asJSON, "json", false, "print JSON for machines instead of text")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	dp, err := openDataplane(e, false, 0)
	if errors.Is(err, dataplane.ErrNotInstalled) {
		if asJSON {
			return writeJSON(e.stdout, statusJSON{Installed: false, PinDir: e.pinDir})
		}
		fmt.Fprintf(e.stdout, "sockbypass is not installed at %s (enable a cgroup with: sockbypass enable --cgroup PATH)\n", e.pinDir)
		return nil
	}
	if err != nil {
		return err
	}
	defer dp.Close()
	st, err := dp.Status()
	if err != nil {
		return err
	}
	if asJSON {
		return writeJSON(e.stdout, statusJSON{Installed: true, Status: st, PinDir: st.PinDir})
	}
	printStatus(e.stdout, st)
	return nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printStatus(w io.Writer, st *dataplane.Status) {
	fmt.Fprintf(w, "sockbypass installed at %s\n", st.PinDir)
	fmt.Fprintf(w, "  sk_msg program %d (attached by %s) on sockhash map %d: %d live socket(s), capacity %d\n",
		st.SkMsgProgramID, st.SkMsgAttach, st.SockhashMapID, st.LiveSockets, st.SockhashCapacity)
	fmt.Fprintln(w, "node-wide programs (they run for every process of the node):")
	switch {
	case !st.RecvTraceAttached:
		fmt.Fprintln(w, "  read-progress tracer (tp_btf/sock_recv_length): detached (no cgroup enabled, no accelerated socket left)")
	case len(st.Cgroups) == 0:
		fmt.Fprintf(w, "  read-progress tracer (tp_btf/sock_recv_length, every recvmsg): attached for %d live accelerated socket(s) of disabled cgroups; %s\n",
			st.LiveSockets, costText(st.RecvTraceCost))
		fmt.Fprintln(w, "    it is detached once they close, at the daemon's next rescan or the next sockbypass disable")
	default:
		fmt.Fprintf(w, "  read-progress tracer (tp_btf/sock_recv_length, every recvmsg): attached; %s\n", costText(st.RecvTraceCost))
	}
	for _, d := range st.TCDevices {
		fmt.Fprintf(w, "  tc egress on %s (every packet leaving it): %s\n", d.TCDevice, costText(d.Cost))
	}
	if len(st.Cgroups) == 0 {
		fmt.Fprintln(w, "enabled cgroups: none")
	} else {
		fmt.Fprintf(w, "enabled cgroups (%d):\n", len(st.Cgroups))
	}
	for _, cg := range st.Cgroups {
		path := cg.Path
		if path == "" {
			path = "(removed)"
		}
		mode := cg.Mode
		if cg.Mesh != "" {
			mode += ", sidecar mode " + cg.Mesh
		}
		fmt.Fprintf(w, "  %s  cgroup id %d, %s, sock_ops program %d, link %d, %d live socket(s)\n", path, cg.ID, mode, cg.SockOpsProgramID, cg.LinkID, cg.LiveSockets)
		if c := cg.Counters; cg.Mesh != "" {
			fmt.Fprintf(w, "    sidecar: paired %d, unpaired %d, ambiguous %d, connects intercepted %d, SO_ORIGINAL_DST answered %d\n",
				c.MeshPaired, c.MeshUnpaired, c.MeshAmbiguous, c.MeshIntercepted, c.MeshOrigDstAnswers)
		}
		fmt.Fprintf(w, "    %s\n", formatCounters(cg.Counters))
	}
	if len(st.TCDevices) == 0 {
		fmt.Fprintln(w, "tc egress accounting: none")
	} else {
		fmt.Fprintf(w, "tc egress accounting (%d):\n", len(st.TCDevices))
	}
	for _, d := range st.TCDevices {
		fmt.Fprintf(w, "  %s  ifindex %d, %s, program %d\n", d.TCDevice, d.Ifindex, d.Mode, d.ProgramID)
	}
	fmt.Fprintf(w, "node addresses: %d unique (paired across namespaces), %d ambiguous (namespace-local only)", st.NodeAddrs.Unique, len(st.NodeAddrs.Ambiguous))
	if len(st.NodeAddrs.Ambiguous) > 0 {
		fmt.Fprintf(w, ": %s", strings.Join(st.NodeAddrs.Ambiguous, ", "))
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "totals (all cgroups, including disabled ones):\n    %s\n", formatCounters(st.Totals))
}

// costText says what a node-wide program has cost, or how to measure it.
func costText(c *dataplane.ProgramCost) string {
	switch {
	case c == nil:
		return "cost unknown"
	case c.Runs == 0:
		return "no runs recorded (BPF statistics are off: sysctl kernel.bpf_stats_enabled=1 to measure)"
	}
	return fmt.Sprintf("%d runs, %d ns each (counted while BPF statistics are on)", c.Runs, c.PerRunNs())
}

func formatCounters(c dataplane.CgroupCounters) string {
	return fmt.Sprintf("sockets inserted %d (failed %d, skipped %d, remote peer %d); redirected %d msgs / %s (%d msgs / %s across namespaces); passed to stack %d msgs / %s (%d while the peer had stack bytes unread); stack egress %d pkts / %s; redirect failures %d\n"+
		"    connections left plain TCP: peer not joining %d, blocking %d, stack port %d, client sent first %d; reader options before joining: rcvlowat %d, tcp_inq %d, oobinline %d; after joining (counted only): %d",
		c.SocketsInserted, c.InsertFailures, c.SocketsSkipped, c.SocketsRemote,
		c.RedirectedMsgs, stats.HumanBytes(c.RedirectedBytes), c.RedirectedXnsMsgs, stats.HumanBytes(c.RedirectedXnsBytes), c.PassedMsgs, stats.HumanBytes(c.PassedBytes), c.PassedUnreadMsgs,
		c.StackEgressPackets, stats.HumanBytes(c.StackEgressBytes), c.RedirectFailures,
		c.SocketsUnpaired, c.SocketsBlocking, c.SocketsStackPort, c.PairsAbandoned,
		c.FallbackRcvlowat, c.FallbackTCPInq, c.FallbackOOBInline, c.LateStackOptions)
}
