package dataplane

import (
	"reflect"

	"github.com/sockbypass/sockbypass/sockops"
)

// SockKey is struct sock_key of bpf/sockbypass.h, the sockhash key of a
// TCP socket, as bpf2go generates it (sockops.SockKey, with Local and
// Remote).
type SockKey = sockops.SockKey

// CgroupCounters is what the datapath counted for one enabled cgroup,
// summed over CPUs, as the CLI, the metrics and JSON output name it: the
// fields of struct cgroup_counters (sockops.CgroupCounters, what the map
// holds), in the same order. countersFromC converts; the layout test checks
// that the fields correspond.
type CgroupCounters struct {
	SocketsInserted    uint64 `json:"sockets_inserted"`
	InsertFailures     uint64 `json:"insert_failures"`
	SocketsSkipped     uint64 `json:"sockets_skipped"`
	RedirectedMsgs     uint64 `json:"redirected_msgs"`
	RedirectedBytes    uint64 `json:"redirected_bytes"`
	PassedMsgs         uint64 `json:"passed_msgs"`
	PassedBytes        uint64 `json:"passed_bytes"`
	RedirectFailures   uint64 `json:"redirect_failures"`
	StackEgressPackets uint64 `json:"stack_egress_packets"`
	StackEgressBytes   uint64 `json:"stack_egress_bytes"`
	PassedUnreadMsgs   uint64 `json:"passed_unread_msgs"`
	FallbackRcvlowat   uint64 `json:"fallback_rcvlowat"`
	FallbackTCPInq     uint64 `json:"fallback_tcp_inq"`
	FallbackOOBInline  uint64 `json:"fallback_oobinline"`
	FallbackWaitall    uint64 `json:"fallback_waitall"`
	FallbackOOBRead    uint64 `json:"fallback_oob_read"`
	SocketsRemote      uint64 `json:"sockets_remote"`
	RedirectedXnsMsgs  uint64 `json:"redirected_cross_netns_msgs"`
	RedirectedXnsBytes uint64 `json:"redirected_cross_netns_bytes"`
	SocketsAmbiguous   uint64 `json:"sockets_ambiguous"`
	MeshIntercepted    uint64 `json:"mesh_intercepted"`
	MeshOrigDstAnswers uint64 `json:"mesh_orig_dst_answers"`
	MeshPaired         uint64 `json:"mesh_paired"`
	MeshUnpaired       uint64 `json:"mesh_unpaired"`
	MeshAmbiguous      uint64 `json:"mesh_ambiguous"`
	PassedBackpressure uint64 `json:"passed_backpressure_msgs"`
	SocketsUnpaired    uint64 `json:"sockets_unpaired"`
	SocketsBlocking    uint64 `json:"sockets_blocking"`
	PairsAbandoned     uint64 `json:"pairs_abandoned"`
	PairsMismatched    uint64 `json:"pairs_mismatched"`
	SocketsStackPort   uint64 `json:"sockets_stack_port"`
	LateStackOptions   uint64 `json:"late_stack_options"`
	TCEgressPackets    uint64 `json:"tc_egress_packets"`
	TCEgressBytes      uint64 `json:"tc_egress_bytes"`
	WouldPairs         uint64 `json:"would_pairs"`
	WouldRedirectBytes uint64 `json:"would_redirect_bytes"`
	// ConnectionsShortLived counts connections to the cgroup's listeners
	// left plain because those listeners' connections are short-lived.
	ConnectionsShortLived uint64 `json:"connections_short_lived"`
	// LateBlocking counts members that turned blocking after they
	// joined; MembersLeft members that left the sockhash while open
	// (they or their peer turned blocking or set a stack-reader option
	// late, and the pair dissolved).
	LateBlocking uint64 `json:"late_blocking"`
	MembersLeft  uint64 `json:"members_left"`
	// SocketsProbation counts connections left plain because their
	// listener was on probation (its first accepted socket not yet read:
	// see "Probation" in bpf/sockbypass.h). SpliceReaders counts members
	// read with splice that left the sockhash; SpliceStalled members
	// read with splice while redirected bytes were unread (those bytes
	// reach the program only through recvmsg).
	SocketsProbation uint64 `json:"sockets_probation"`
	SpliceReaders    uint64 `json:"splice_readers"`
	SpliceStalled    uint64 `json:"splice_stalled"`
	// PairsFull counts SYNs to the cgroup's listeners offered no pair
	// because the pairs map was full (they stay plain TCP).
	PairsFull uint64 `json:"pairs_full"`
	// ListenersFull counts listening sockets not recorded because the
	// listeners map was full (their connections stay plain TCP).
	ListenersFull uint64 `json:"listeners_full"`
	// InterceptsOverQuota counts connects of an intercept-mode cgroup
	// left alone (not sent to its sidecar) because the cgroup had its
	// quota of handshakes in flight.
	InterceptsOverQuota uint64 `json:"intercepts_over_quota"`
	// InterceptsUnrecorded counts connects sent to the sidecar whose
	// destination could not be recorded (orig_dsts full).
	InterceptsUnrecorded uint64 `json:"intercepts_unrecorded"`
}

// Add adds o to c field by field.
func (c *CgroupCounters) Add(o CgroupCounters) {
	c.SocketsInserted += o.SocketsInserted
	c.InsertFailures += o.InsertFailures
	c.SocketsSkipped += o.SocketsSkipped
	c.RedirectedMsgs += o.RedirectedMsgs
	c.RedirectedBytes += o.RedirectedBytes
	c.PassedMsgs += o.PassedMsgs
	c.PassedBytes += o.PassedBytes
	c.RedirectFailures += o.RedirectFailures
	c.StackEgressPackets += o.StackEgressPackets
	c.StackEgressBytes += o.StackEgressBytes
	c.PassedUnreadMsgs += o.PassedUnreadMsgs
	c.FallbackRcvlowat += o.FallbackRcvlowat
	c.FallbackTCPInq += o.FallbackTCPInq
	c.FallbackOOBInline += o.FallbackOOBInline
	c.FallbackWaitall += o.FallbackWaitall
	c.FallbackOOBRead += o.FallbackOOBRead
	c.SocketsRemote += o.SocketsRemote
	c.RedirectedXnsMsgs += o.RedirectedXnsMsgs
	c.RedirectedXnsBytes += o.RedirectedXnsBytes
	c.SocketsAmbiguous += o.SocketsAmbiguous
	c.MeshIntercepted += o.MeshIntercepted
	c.MeshOrigDstAnswers += o.MeshOrigDstAnswers
	c.MeshPaired += o.MeshPaired
	c.MeshUnpaired += o.MeshUnpaired
	c.MeshAmbiguous += o.MeshAmbiguous
	c.PassedBackpressure += o.PassedBackpressure
	c.SocketsUnpaired += o.SocketsUnpaired
	c.SocketsBlocking += o.SocketsBlocking
	c.PairsAbandoned += o.PairsAbandoned
	c.PairsMismatched += o.PairsMismatched
	c.SocketsStackPort += o.SocketsStackPort
	c.LateStackOptions += o.LateStackOptions
	c.TCEgressPackets += o.TCEgressPackets
	c.TCEgressBytes += o.TCEgressBytes
	c.WouldPairs += o.WouldPairs
	c.WouldRedirectBytes += o.WouldRedirectBytes
	c.ConnectionsShortLived += o.ConnectionsShortLived
	c.LateBlocking += o.LateBlocking
	c.MembersLeft += o.MembersLeft
	c.SocketsProbation += o.SocketsProbation
	c.SpliceReaders += o.SpliceReaders
	c.SpliceStalled += o.SpliceStalled
	c.PairsFull += o.PairsFull
	c.ListenersFull += o.ListenersFull
	c.InterceptsOverQuota += o.InterceptsOverQuota
	c.InterceptsUnrecorded += o.InterceptsUnrecorded
}

// Sub returns c minus o field by field (for deltas between two reads).
func (c CgroupCounters) Sub(o CgroupCounters) CgroupCounters {
	return CgroupCounters{
		SocketsInserted:    c.SocketsInserted - o.SocketsInserted,
		InsertFailures:     c.InsertFailures - o.InsertFailures,
		SocketsSkipped:     c.SocketsSkipped - o.SocketsSkipped,
		RedirectedMsgs:     c.RedirectedMsgs - o.RedirectedMsgs,
		RedirectedBytes:    c.RedirectedBytes - o.RedirectedBytes,
		PassedMsgs:         c.PassedMsgs - o.PassedMsgs,
		PassedBytes:        c.PassedBytes - o.PassedBytes,
		RedirectFailures:   c.RedirectFailures - o.RedirectFailures,
		StackEgressPackets: c.StackEgressPackets - o.StackEgressPackets,
		StackEgressBytes:   c.StackEgressBytes - o.StackEgressBytes,
		PassedUnreadMsgs:   c.PassedUnreadMsgs - o.PassedUnreadMsgs,
		FallbackRcvlowat:   c.FallbackRcvlowat - o.FallbackRcvlowat,
		FallbackTCPInq:     c.FallbackTCPInq - o.FallbackTCPInq,
		FallbackOOBInline:  c.FallbackOOBInline - o.FallbackOOBInline,
		FallbackWaitall:    c.FallbackWaitall - o.FallbackWaitall,
		FallbackOOBRead:    c.FallbackOOBRead - o.FallbackOOBRead,
		SocketsRemote:      c.SocketsRemote - o.SocketsRemote,
		RedirectedXnsMsgs:  c.RedirectedXnsMsgs - o.RedirectedXnsMsgs,
		RedirectedXnsBytes: c.RedirectedXnsBytes - o.RedirectedXnsBytes,
		SocketsAmbiguous:   c.SocketsAmbiguous - o.SocketsAmbiguous,
		MeshIntercepted:    c.MeshIntercepted - o.MeshIntercepted,
		MeshOrigDstAnswers: c.MeshOrigDstAnswers - o.MeshOrigDstAnswers,
		MeshPaired:         c.MeshPaired - o.MeshPaired,
		MeshUnpaired:       c.MeshUnpaired - o.MeshUnpaired,
		MeshAmbiguous:      c.MeshAmbiguous - o.MeshAmbiguous,
		PassedBackpressure: c.PassedBackpressure - o.PassedBackpressure,
		SocketsUnpaired:    c.SocketsUnpaired - o.SocketsUnpaired,
		SocketsBlocking:    c.SocketsBlocking - o.SocketsBlocking,
		PairsAbandoned:     c.PairsAbandoned - o.PairsAbandoned,
		PairsMismatched:    c.PairsMismatched - o.PairsMismatched,
		SocketsStackPort:   c.SocketsStackPort - o.SocketsStackPort,
		LateStackOptions:   c.LateStackOptions - o.LateStackOptions,
		TCEgressPackets:    c.TCEgressPackets - o.TCEgressPackets,
		TCEgressBytes:      c.TCEgressBytes - o.TCEgressBytes,
		WouldPairs:         c.WouldPairs - o.WouldPairs,
		WouldRedirectBytes: c.WouldRedirectBytes - o.WouldRedirectBytes,

		ConnectionsShortLived: c.ConnectionsShortLived - o.ConnectionsShortLived,
		LateBlocking:          c.LateBlocking - o.LateBlocking,
		MembersLeft:           c.MembersLeft - o.MembersLeft,
		SocketsProbation:      c.SocketsProbation - o.SocketsProbation,
		SpliceReaders:         c.SpliceReaders - o.SpliceReaders,
		SpliceStalled:         c.SpliceStalled - o.SpliceStalled,
		PairsFull:             c.PairsFull - o.PairsFull,
		ListenersFull:         c.ListenersFull - o.ListenersFull,
		InterceptsOverQuota:   c.InterceptsOverQuota - o.InterceptsOverQuota,
		InterceptsUnrecorded:  c.InterceptsUnrecorded - o.InterceptsUnrecorded,
	}
}

// countersFromC converts the counters of one CPU as the map holds them.
// The fields correspond by position (TestGoMirrorsMatchTheCStructs checks
// names and count); the generated struct's blank layout marker is skipped.
func countersFromC(c sockops.CgroupCounters) CgroupCounters {
	var out CgroupCounters
	src, dst := reflect.ValueOf(c), reflect.ValueOf(&out).Elem()
	j := 0
	for i := 0; i < src.NumField() && j < dst.NumField(); i++ {
		if src.Type().Field(i).Name == "_" {
			continue
		}
		dst.Field(j).SetUint(src.Field(i).Uint())
		j++
	}
	return out
}
