// Package stats turns the datapath's counters into the per-cgroup figures
// users read: what was redirected, what still crossed the stack, and the
// bypass ratio. `sockbypass stats` and the metrics endpoint both use it.
package stats

import (
	"fmt"
	"strings"
	"time"

	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// Report is one reading of every enabled cgroup's figures. Its JSON form is
// the documented output of `sockbypass stats --json`: fields may be added,
// none renamed or removed.
type Report struct {
	Time    time.Time `json:"time"`
	PinDir  string    `json:"pin_dir"`
	Cgroups []Cgroup  `json:"cgroups"`
	// DisabledCgroups are cgroups no longer enabled whose accelerated
	// sockets live on (Mode "disabled"): their counters still move.
	DisabledCgroups []Cgroup `json:"disabled_cgroups"`
	// Unattributed holds what belongs to no enabled cgroup and to none of
	// DisabledCgroups (stack egress of sockets outside enabled cgroups,
	// counters of cgroups disabled since). Cgroups, DisabledCgroups and
	// Unattributed add up to every counter there is.
	Unattributed Figures `json:"unattributed"`
	// LiveSockets is the number of sockets in the sockhash.
	LiveSockets int `json:"live_sockets"`
	// SockhashCapacity is the sockhash's max_entries.
	SockhashCapacity uint32                     `json:"sockhash_capacity"`
	TCDevices        []dataplane.TCDeviceStatus `json:"tc_devices"`
	// NodeAddresses says which addresses pair across namespaces.
	NodeAddresses dataplane.NodeAddrs `json:"node_addresses"`
}

// Cgroup is the figures of one enabled cgroup.
type Cgroup struct {
	// Cgroup is the path relative to the cgroup2 mount ("/kubepods/pod1"),
	// the same on hybrid and unified hosts; "(removed)" once it is gone.
	Cgroup string `json:"cgroup"`
	// Path is the absolute path of the cgroup directory.
	Path string `json:"path"`
	// ID is the cgroup id.
	ID uint64 `json:"id"`
	// Mode is "accelerate" or "account-only"; "disabled" in
	// DisabledCgroups.
	Mode string `json:"mode"`
	// LiveSockets is the number of its sockets in the sockhash now.
	LiveSockets int `json:"live_sockets"`
	Figures
}

// Figures are the counters of one cgroup, and the bypass ratio.
type Figures struct {
	RedirectedBytes uint64 `json:"redirected_bytes"`
	RedirectedMsgs  uint64 `json:"redirected_msgs"`
	// RedirectedCrossNetns*: of the redirected, to a peer in another
	// network namespace (pod to pod).
	RedirectedCrossNetnsBytes uint64 `json:"redirected_cross_netns_bytes"`
	RedirectedCrossNetnsMsgs  uint64 `json:"redirected_cross_netns_msgs"`
	// SocketsAmbiguous counts sockets whose addresses are ambiguous node
	// addresses, kept namespace-local.
	SocketsAmbiguous uint64 `json:"sockets_ambiguous"`
	// StackEgress*: TCP payload bytes and packets the cgroup's sockets
	// sent through the stack to local peers, on any device (counted at
	// the socket): what acceleration did not take off the stack.
	StackEgressBytes   uint64 `json:"stack_egress_bytes"`
	StackEgressPackets uint64 `json:"stack_egress_packets"`
	// TCEgress*: TCP payload bytes and packets seen leaving the
	// interfaces with TC accounting (--tc-dev), local peers or not.
	TCEgressBytes    uint64 `json:"tc_egress_bytes"`
	TCEgressPackets  uint64 `json:"tc_egress_packets"`
	PassedBytes      uint64 `json:"passed_bytes"`
	PassedMsgs       uint64 `json:"passed_msgs"`
	RedirectFailures uint64 `json:"redirect_failures"`
	SocketsInserted  uint64 `json:"sockets_inserted"`
	InsertFailures   uint64 `json:"insert_failures"`
	SocketsSkipped   uint64 `json:"sockets_skipped"`
	// SocketsRemote counts sockets left out because their peer cannot be
	// local (neither loopback nor the socket's own address).
	SocketsRemote uint64 `json:"sockets_remote"`
	// PassedUnreadMsgs: of PassedMsgs, those sent while the peer still
	// had earlier stack bytes of ours to read.
	PassedUnreadMsgs uint64 `json:"passed_unread_msgs"`
	// PassedBackpressureMsgs: of PassedMsgs, those sent while the peer had
	// 64 MiB of redirected bytes unread (flow control through the stack).
	PassedBackpressureMsgs uint64 `json:"passed_backpressure_msgs"`
	// SocketsUnpaired counts sockets left plain TCP because their peer
	// does not join (it is in no enabled cgroup, or declined).
	SocketsUnpaired uint64 `json:"sockets_unpaired"`
	// SocketsBlocking counts sockets left plain TCP because they (or
	// their listener) are blocking: a blocking recv on a sockhash member
	// may return EAGAIN.
	SocketsBlocking uint64 `json:"sockets_blocking"`
	// PairsAbandoned counts pairs given up because the client sent before
	// its server had joined.
	PairsAbandoned uint64 `json:"pairs_abandoned"`
	// PairsMismatched counts pairs refused because the two ends'
	// sequence numbers did not cross-match (not one connection).
	PairsMismatched uint64 `json:"pairs_mismatched"`
	// SocketsStackPort counts sockets left plain TCP because their
	// connection's server port is a stack port (enable --stack-ports).
	SocketsStackPort uint64 `json:"sockets_stack_port"`
	// ConnectionsShortLived counts connections to the cgroup's listeners
	// left plain TCP because those listeners' connections are
	// short-lived (pairing would cost more than it gains; enable
	// --all-connections pairs them too).
	ConnectionsShortLived uint64 `json:"connections_short_lived"`
	// LateStackOptions counts members that asked for SO_RCVLOWAT, TCP_INQ
	// or SO_OOBINLINE after joining; LateBlocking members that turned
	// blocking after joining. Such a member and its peer leave the
	// sockhash once it has read what was redirected to it: MembersLeft
	// counts the sockets that left while open.
	LateStackOptions uint64 `json:"late_stack_options"`
	LateBlocking     uint64 `json:"late_blocking"`
	MembersLeft      uint64 `json:"members_left"`
	// SocketsProbation counts connections to the cgroup's listeners left
	// plain TCP while the listener was on probation (until one of its
	// accepted sockets is read with recvmsg, without blocking).
	// SpliceReaders counts members read with splice that left the
	// sockhash; SpliceStalled members read with splice while redirected
	// bytes were waiting (those connections stall until their program
	// reads with recvmsg).
	SocketsProbation uint64 `json:"sockets_probation"`
	SpliceReaders    uint64 `json:"splice_readers"`
	SpliceStalled    uint64 `json:"splice_stalled"`
	// PairsFull counts SYNs to the cgroup's listeners offered no pair
	// because the node's pairs map was full: those connections stay
	// plain TCP.
	PairsFull uint64 `json:"pairs_full"`
	// ListenersFull counts the cgroup's listening sockets not recorded
	// because the node's listeners map was full: their connections stay
	// plain TCP.
	ListenersFull uint64 `json:"listeners_full"`
	// Fallbacks counts the sockets whose reader was kept on the stack, by
	// reason: rcvlowat, tcp_inq, oobinline, waitall, oob_read.
	Fallbacks map[string]uint64 `json:"fallbacks"`
	// Sidecar mode: app <-> sidecar connections paired, left unpaired at
	// a sidecar port, left unpaired because the app endpoint was shared;
	// connects intercepted; SO_ORIGINAL_DST answers.
	MeshPaired         uint64 `json:"mesh_paired"`
	MeshUnpaired       uint64 `json:"mesh_unpaired"`
	MeshAmbiguous      uint64 `json:"mesh_ambiguous"`
	MeshIntercepted    uint64 `json:"mesh_intercepted"`
	MeshOrigDstAnswers uint64 `json:"mesh_orig_dst_answers"`
	// Intercept mode: connects left alone because the cgroup had its
	// quota of handshakes in flight (they go where they asked, without
	// the sidecar), and connects sent to the sidecar whose destination
	// could not be recorded (the node's orig_dsts full).
	InterceptsOverQuota  uint64 `json:"intercepts_over_quota"`
	InterceptsUnrecorded uint64 `json:"intercepts_unrecorded"`
	// BypassRatio is redirected bytes / (redirected + stack egress
	// bytes), between 0 and 1; null while there has been no traffic.
	BypassRatio *float64 `json:"bypass_ratio"`
	// Account-only (a dry run): pairs that would have joined, the stack
	// egress bytes their sockets sent (what acceleration would take off
	// the stack), and WouldRedirectBytes / StackEgressBytes (null before
	// any stack egress).
	WouldPairs         uint64   `json:"would_pairs"`
	WouldRedirectBytes uint64   `json:"would_redirect_bytes"`
	WouldBypassRatio   *float64 `json:"would_bypass_ratio"`
}

// FiguresOf computes the figures of c.
func FiguresOf(c dataplane.CgroupCounters) Figures {
	f := Figures{
		RedirectedBytes:           c.RedirectedBytes,
		RedirectedMsgs:            c.RedirectedMsgs,
		RedirectedCrossNetnsBytes: c.RedirectedXnsBytes,
		RedirectedCrossNetnsMsgs:  c.RedirectedXnsMsgs,
		SocketsAmbiguous:          c.SocketsAmbiguous,
		StackEgressBytes:          c.StackEgressBytes,
		StackEgressPackets:        c.StackEgressPackets,
		TCEgressBytes:             c.TCEgressBytes,
		TCEgressPackets:           c.TCEgressPackets,
		PassedBytes:               c.PassedBytes,
		PassedMsgs:                c.PassedMsgs,
		RedirectFailures:          c.RedirectFailures,
		SocketsInserted:           c.SocketsInserted,
		InsertFailures:            c.InsertFailures,
		SocketsSkipped:            c.SocketsSkipped,
		PassedUnreadMsgs:          c.PassedUnreadMsgs,
		PassedBackpressureMsgs:    c.PassedBackpressure,
		SocketsRemote:             c.SocketsRemote,
		SocketsUnpaired:           c.SocketsUnpaired,
		SocketsBlocking:           c.SocketsBlocking,
		PairsAbandoned:            c.PairsAbandoned,
		PairsMismatched:           c.PairsMismatched,
		SocketsStackPort:          c.SocketsStackPort,
		ConnectionsShortLived:     c.ConnectionsShortLived,
		LateStackOptions:          c.LateStackOptions,
		LateBlocking:              c.LateBlocking,
		MembersLeft:               c.MembersLeft,
		SocketsProbation:          c.SocketsProbation,
		SpliceReaders:             c.SpliceReaders,
		SpliceStalled:             c.SpliceStalled,
		PairsFull:                 c.PairsFull,
		ListenersFull:             c.ListenersFull,
		InterceptsOverQuota:       c.InterceptsOverQuota,
		InterceptsUnrecorded:      c.InterceptsUnrecorded,
		MeshPaired:                c.MeshPaired,
		MeshUnpaired:              c.MeshUnpaired,
		MeshAmbiguous:             c.MeshAmbiguous,
		MeshIntercepted:           c.MeshIntercepted,
		MeshOrigDstAnswers:        c.MeshOrigDstAnswers,
		Fallbacks: map[string]uint64{
			"rcvlowat":  c.FallbackRcvlowat,
			"tcp_inq":   c.FallbackTCPInq,
			"oobinline": c.FallbackOOBInline,
			"waitall":   c.FallbackWaitall,
			"oob_read":  c.FallbackOOBRead,
		},
	}
	if total := c.RedirectedBytes + c.StackEgressBytes; total > 0 {
		r := float64(c.RedirectedBytes) / float64(total)
		f.BypassRatio = &r
	}
	f.WouldPairs, f.WouldRedirectBytes = c.WouldPairs, c.WouldRedirectBytes
	if c.StackEgressBytes > 0 {
		r := min(1, float64(c.WouldRedirectBytes)/float64(c.StackEgressBytes))
		f.WouldBypassRatio = &r
	}
	return f
}

// FromStatus builds a report from a dataplane status; cgroup2Mount is used
// to show cgroup paths relative to it.
func FromStatus(st *dataplane.Status, cgroup2Mount string, now time.Time) *Report {
	r := &Report{
		Time:             now,
		PinDir:           st.PinDir,
		Cgroups:          []Cgroup{},
		DisabledCgroups:  []Cgroup{},
		Unattributed:     FiguresOf(st.Unattributed),
		LiveSockets:      st.LiveSockets,
		SockhashCapacity: st.SockhashCapacity,
		TCDevices:        st.TCDevices,
		NodeAddresses:    st.NodeAddrs,
	}
	for _, cg := range st.Cgroups {
		r.Cgroups = append(r.Cgroups, Cgroup{
			Cgroup:      relative(cg.Path, cgroup2Mount),
			Path:        cg.Path,
			ID:          cg.ID,
			Mode:        cg.Mode,
			LiveSockets: cg.LiveSockets,
			Figures:     FiguresOf(cg.Counters),
		})
	}
	for _, cg := range st.DisabledCgroups {
		rel := relative(cg.Path, cgroup2Mount)
		if cg.Path == "" {
			// Unique per cgroup: these rows are metric labels too.
			rel = fmt.Sprintf("(removed id %d)", cg.ID)
		}
		r.DisabledCgroups = append(r.DisabledCgroups, Cgroup{
			Cgroup:      rel,
			Path:        cg.Path,
			ID:          cg.ID,
			Mode:        cg.Mode,
			LiveSockets: cg.LiveSockets,
			Figures:     FiguresOf(cg.Counters),
		})
	}
	return r
}

func relative(path, mount string) string {
	if path == "" {
		return "(removed)"
	}
	if path == mount {
		return "/"
	}
	if rel, ok := strings.CutPrefix(path, strings.TrimSuffix(mount, "/")+"/"); ok {
		return "/" + rel
	}
	return path
}

// HumanBytes prints a byte count in binary units: 512 B, 1.5 KiB, 6.6 GiB.
func HumanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
