package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/conns"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/stats"
)

var statusCommand = command{
	summary: "show enabled cgroups, program ids, live sockets and counters",
	usage:   "status [--json]",
	run:     runStatus,
}

// statusJSON is the --json document of status. Its fields are stable: new
// fields may be added, none renamed or removed. It is a superset of the
// stats --json document (stats.Report): every cgroup carries the same flat
// figures and relative path as in stats, plus its program and link ids and
// its raw counters (nested in "counters", as the BPF struct names them);
// unattributed and totals carry both the figures and the raw counter names.
type statusJSON struct {
	Installed bool `json:"installed"`
	*dataplane.Status
	PinDir string `json:"pin_dir"`
	// The fields below shadow those of Status with the stats shape.
	Time *time.Time `json:"time,omitempty"`
	// Cgroups and DisabledCgroups are always emitted ([] when empty), as
	// in stats --json.
	Cgroups         []statusCgroup      `json:"cgroups"`
	DisabledCgroups []statusCgroup      `json:"disabled_cgroups"`
	Unattributed    *countersAndFigures `json:"unattributed,omitempty"`
	Totals          *countersAndFigures `json:"totals,omitempty"`
}

// statusCgroup is a cgroup of stats --json with what status adds.
type statusCgroup struct {
	stats.Cgroup
	Slot             uint32 `json:"slot"`
	SockOpsProgramID uint32 `json:"sock_ops_program_id"`
	LinkID           uint32 `json:"link_id"`
	Mesh             string `json:"mesh,omitempty"`
	// Settings are every setting the cgroup was enabled with (enabled
	// cgroups only).
	Settings *dataplane.CgroupSettings `json:"settings,omitempty"`
	Counters dataplane.CgroupCounters  `json:"counters"`
}

// countersAndFigures holds the figures of stats --json and the raw counter
// names that status --json always had (the fallbacks flat).
type countersAndFigures struct {
	stats.Figures
	FallbackRcvlowat  uint64 `json:"fallback_rcvlowat"`
	FallbackTCPInq    uint64 `json:"fallback_tcp_inq"`
	FallbackOOBInline uint64 `json:"fallback_oobinline"`
	FallbackWaitall   uint64 `json:"fallback_waitall"`
	FallbackOOBRead   uint64 `json:"fallback_oob_read"`
}

func newCountersAndFigures(c dataplane.CgroupCounters) *countersAndFigures {
	return &countersAndFigures{Figures: stats.FiguresOf(c), FallbackRcvlowat: c.FallbackRcvlowat, FallbackTCPInq: c.FallbackTCPInq,
		FallbackOOBInline: c.FallbackOOBInline, FallbackWaitall: c.FallbackWaitall, FallbackOOBRead: c.FallbackOOBRead}
}

// newStatusJSON builds the status document of st at now.
func newStatusJSON(st *dataplane.Status, cgroup2Mount string, now time.Time) statusJSON {
	r := stats.FromStatus(st, cgroup2Mount, now)
	doc := statusJSON{Installed: true, Status: st, PinDir: st.PinDir, Time: &r.Time,
		Cgroups: []statusCgroup{}, DisabledCgroups: []statusCgroup{},
		Unattributed: newCountersAndFigures(st.Unattributed), Totals: newCountersAndFigures(st.Totals)}
	for i, cg := range st.Cgroups {
		doc.Cgroups = append(doc.Cgroups, statusCgroup{Cgroup: r.Cgroups[i], Slot: cg.Slot, SockOpsProgramID: cg.SockOpsProgramID, LinkID: cg.LinkID, Mesh: cg.Mesh, Settings: cg.Settings, Counters: cg.Counters})
	}
	for i, cg := range st.DisabledCgroups {
		doc.DisabledCgroups = append(doc.DisabledCgroups, statusCgroup{Cgroup: r.DisabledCgroups[i], Slot: cg.Slot, Counters: cg.Counters})
	}
	return doc
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
			return writeJSON(e.stdout, statusJSON{Installed: false, PinDir: e.pinDir, Cgroups: []statusCgroup{}, DisabledCgroups: []statusCgroup{}})
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
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return err
	}
	// Stack bytes count when their socket closes: the live sockets'
	// are sampled.
	var live conns.StackSampler
	if err := live.AddLive(dp, mounts, st); err != nil {
		e.log.Warn("cannot sample the live sockets: stack bytes show closed sockets only", zap.Error(err))
	}
	if asJSON {
		return writeJSON(e.stdout, newStatusJSON(st, mounts.V2, time.Now()))
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
	if len(st.TCDevices) == 0 {
		fmt.Fprintln(w, "  none (sk_msg runs for sockhash members only, the cgroup programs for their cgroups)")
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
		fmt.Fprintf(w, "  %s  cgroup id %d (slot %d), %s, sock_ops program %d, link %d, %d live socket(s)\n", path, cg.ID, cg.Slot, mode, cg.SockOpsProgramID, cg.LinkID, cg.LiveSockets)
		var progs []string
		for _, p := range cg.Programs {
			progs = append(progs, fmt.Sprintf("%s %d (link %d)", p.Program, p.ProgramID, p.LinkID))
		}
		if len(progs) > 0 {
			fmt.Fprintf(w, "    programs: %s\n", strings.Join(progs, ", "))
		}
		if cg.Settings != nil {
			fmt.Fprintf(w, "    settings: %s\n", cg.Settings)
		}
		if c := cg.Counters; cg.Mesh != "" {
			fmt.Fprintf(w, "    sidecar: paired %d, unpaired %d, ambiguous %d, connects intercepted %d, SO_ORIGINAL_DST answered %d, connects left alone over the intercept quota %d, intercepts without a recorded destination %d\n",
				c.MeshPaired, c.MeshUnpaired, c.MeshAmbiguous, c.MeshIntercepted, c.MeshOrigDstAnswers, c.InterceptsOverQuota, c.InterceptsUnrecorded)
		}
		fmt.Fprintf(w, "    %s\n", formatCounters(cg.Counters))
	}
	if len(st.DisabledCgroups) > 0 {
		fmt.Fprintf(w, "disabled cgroups whose accelerated sockets live on (%d):\n", len(st.DisabledCgroups))
	}
	for _, cg := range st.DisabledCgroups {
		path := cg.Path
		if path == "" {
			path = "(removed)"
		}
		fmt.Fprintf(w, "  %s  cgroup id %d (slot %d), disabled, %d live socket(s)\n    %s\n", path, cg.ID, cg.Slot, cg.LiveSockets, formatCounters(cg.Counters))
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

// formatCounters writes a cgroup's counters with the unit of each: sockets
// (one per end of a connection, so a connection left plain counts up to
// twice), connections (pairs), messages, packets or bytes.
func formatCounters(c dataplane.CgroupCounters) string {
	return fmt.Sprintf("sockets inserted %d (sockets refused: sockhash full %d, data before ESTABLISHED %d, remote peer %d); redirected %d msgs / %s (%d msgs / %s across namespaces); passed to stack %d msgs / %s (%d msgs while the peer had stack bytes unread); stack egress %d pkts / %s; redirect failures %d msgs\n"+
		"    left plain TCP, in sockets (both ends of a connection count): peer not joining %d sockets, blocking %d sockets, stack port %d sockets, listener on probation %d sockets, reader option before joining %d sockets (rcvlowat %d, tcp_inq %d, oobinline %d)\n"+
		"    left plain TCP, in connections: client sent first %d connections, short-lived listener %d connections, pair handshakes full %d connections; listeners not recorded (table full) %d sockets\n"+
		"    sockets that left the sockhash: %d sockets (after joining, turned blocking %d sockets, set a reader option %d sockets, read with splice %d sockets); read with splice while redirected bytes waited (stalled): %d sockets\n"+
		"    account-only (dry run): %d pairs (connections) would have joined, %s of stack egress would have been redirected",
		c.SocketsInserted, c.InsertFailures, c.SocketsSkipped, c.SocketsRemote,
		c.RedirectedMsgs, stats.HumanBytes(c.RedirectedBytes), c.RedirectedXnsMsgs, stats.HumanBytes(c.RedirectedXnsBytes), c.PassedMsgs, stats.HumanBytes(c.PassedBytes), c.PassedUnreadMsgs,
		c.StackEgressPackets, stats.HumanBytes(c.StackEgressBytes), c.RedirectFailures,
		c.SocketsUnpaired, c.SocketsBlocking, c.SocketsStackPort, c.SocketsProbation, c.FallbackRcvlowat+c.FallbackTCPInq+c.FallbackOOBInline,
		c.FallbackRcvlowat, c.FallbackTCPInq, c.FallbackOOBInline,
		c.PairsAbandoned, c.ConnectionsShortLived, c.PairsFull, c.ListenersFull,
		c.MembersLeft, c.LateBlocking, c.LateStackOptions, c.SpliceReaders, c.SpliceStalled,
		c.WouldPairs, stats.HumanBytes(c.WouldRedirectBytes))
}
