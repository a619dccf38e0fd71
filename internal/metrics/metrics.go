// Package metrics exposes sockbypass's per-cgroup figures as Prometheus
// metrics, read from the datapath at every scrape.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sockbypass/sockbypass/internal/stats"
)

// UnattributedLabel is the cgroup label of what belongs to no enabled
// cgroup.
const UnattributedLabel = "(none)"

// Source returns the current report; it is called at every scrape.
type Source func() (*stats.Report, error)

// Collector is a prometheus.Collector over a Source.
type Collector struct {
	source Source
	descs  []counterDesc

	fallbacks        *prometheus.Desc
	liveSockets      *prometheus.Desc
	bypassRatio      *prometheus.Desc
	sockhashSockets  *prometheus.Desc
	sockhashCapacity *prometheus.Desc
	enabledCgroups   *prometheus.Desc
	tcDevices        *prometheus.Desc
	ambiguousAddrs   *prometheus.Desc
	up               *prometheus.Desc
}

type counterDesc struct {
	desc  *prometheus.Desc
	value func(stats.Figures) uint64
}

// NewCollector returns a collector that reads source at every scrape.
func NewCollector(source Source) *Collector {
	cg := []string{"cgroup"}
	counter := func(name, help string, value func(stats.Figures) uint64) counterDesc {
		return counterDesc{prometheus.NewDesc("sockbypass_"+name, help, cg, nil), value}
	}
	return &Collector{
		source: source,
		descs: []counterDesc{
			counter("redirected_bytes_total", "Bytes redirected socket to socket, skipping the TCP/IP stack.", func(f stats.Figures) uint64 { return f.RedirectedBytes }),
			counter("redirected_messages_total", "Messages (sendmsg chunks) redirected socket to socket.", func(f stats.Figures) uint64 { return f.RedirectedMsgs }),
			counter("redirected_cross_netns_bytes_total", "Of the redirected bytes, those to a peer in another network namespace.", func(f stats.Figures) uint64 { return f.RedirectedCrossNetnsBytes }),
			counter("redirected_cross_netns_messages_total", "Of the redirected messages, those to a peer in another network namespace.", func(f stats.Figures) uint64 { return f.RedirectedCrossNetnsMsgs }),
			counter("sockets_ambiguous_total", "Sockets on ambiguous node addresses, kept namespace-local.", func(f stats.Figures) uint64 { return f.SocketsAmbiguous }),
			counter("mesh_paired_total", "Sidecar mode: app <-> sidecar connections paired.", func(f stats.Figures) uint64 { return f.MeshPaired }),
			counter("mesh_unpaired_total", "Sidecar mode: connections reaching a sidecar port left unpaired.", func(f stats.Figures) uint64 { return f.MeshUnpaired }),
			counter("mesh_ambiguous_total", "Sidecar mode: connections left unpaired because their app endpoint was shared.", func(f stats.Figures) uint64 { return f.MeshAmbiguous }),
			counter("mesh_intercepted_total", "Sidecar mode: app connects sent to the sidecar (intercept mode).", func(f stats.Figures) uint64 { return f.MeshIntercepted }),
			counter("intercepts_over_quota_total", "Intercept mode: connects left alone (sent where they asked, not to the sidecar) because the cgroup had its quota of handshakes in flight.", func(f stats.Figures) uint64 { return f.InterceptsOverQuota }),
			counter("intercepts_unrecorded_total", "Intercept mode: connects sent to the sidecar whose original destination could not be recorded (the node's orig_dsts map full): the sidecar gets no SO_ORIGINAL_DST.", func(f stats.Figures) uint64 { return f.InterceptsUnrecorded }),
			counter("mesh_orig_dst_answers_total", "Sidecar mode: SO_ORIGINAL_DST answered for the sidecar (intercept mode).", func(f stats.Figures) uint64 { return f.MeshOrigDstAnswers }),
			counter("stack_egress_bytes_total", "TCP payload bytes the cgroup's sockets sent through the stack to local peers, on any device.", func(f stats.Figures) uint64 { return f.StackEgressBytes }),
			counter("stack_egress_packets_total", "TCP packets with payload the cgroup's sockets sent through the stack to local peers, on any device.", func(f stats.Figures) uint64 { return f.StackEgressPackets }),
			counter("tc_egress_bytes_total", "TCP payload bytes seen leaving the interfaces with TC accounting (--tc-dev).", func(f stats.Figures) uint64 { return f.TCEgressBytes }),
			counter("tc_egress_packets_total", "TCP packets seen leaving the interfaces with TC accounting (--tc-dev).", func(f stats.Figures) uint64 { return f.TCEgressPackets }),
			counter("passed_bytes_total", "Bytes of accelerated sockets passed to the stack (no local peer).", func(f stats.Figures) uint64 { return f.PassedBytes }),
			counter("passed_messages_total", "Messages of accelerated sockets passed to the stack (no local peer).", func(f stats.Figures) uint64 { return f.PassedMsgs }),
			counter("passed_unread_messages_total", "Messages passed to the stack because the peer had earlier stack bytes unread.", func(f stats.Figures) uint64 { return f.PassedUnreadMsgs }),
			counter("passed_backpressure_messages_total", "Messages passed to the stack because the peer had 64 MiB of redirected bytes unread.", func(f stats.Figures) uint64 { return f.PassedBackpressureMsgs }),
			counter("sockets_unpaired_total", "Sockets left on the normal TCP path because their peer does not join the sockhash.", func(f stats.Figures) uint64 { return f.SocketsUnpaired }),
			counter("sockets_blocking_total", "Sockets left on the normal TCP path because they or their listener are blocking.", func(f stats.Figures) uint64 { return f.SocketsBlocking }),
			counter("pairs_abandoned_total", "Pairs given up because the client sent before its server joined.", func(f stats.Figures) uint64 { return f.PairsAbandoned }),
			counter("pairs_mismatched_total", "Pairs refused because the two ends' sequence numbers did not cross-match (not one connection).", func(f stats.Figures) uint64 { return f.PairsMismatched }),
			counter("sockets_stack_port_total", "Sockets left on the normal TCP path because their server port is a stack port (--stack-ports).", func(f stats.Figures) uint64 { return f.SocketsStackPort }),
			counter("connections_short_lived_total", "Connections to the cgroup's listeners left on the normal TCP path because those listeners' connections are short-lived.", func(f stats.Figures) uint64 { return f.ConnectionsShortLived }),
			counter("late_stack_options_total", "Members that asked for SO_RCVLOWAT, TCP_INQ or SO_OOBINLINE after joining: they leave the sockhash.", func(f stats.Figures) uint64 { return f.LateStackOptions }),
			counter("late_blocking_total", "Members that turned blocking after joining: they leave the sockhash.", func(f stats.Figures) uint64 { return f.LateBlocking }),
			counter("sockets_probation_total", "Connections left plain TCP while their listener was on probation (none of its accepted sockets read yet).", func(f stats.Figures) uint64 { return f.SocketsProbation }),
			counter("splice_readers_total", "Members read with splice: they leave the sockhash, and their process's new connections stay plain.", func(f stats.Figures) uint64 { return f.SpliceReaders }),
			counter("splice_stalled_total", "Members read with splice while redirected bytes waited: those connections stall until read with recvmsg.", func(f stats.Figures) uint64 { return f.SpliceStalled }),
			counter("pairs_full_total", "SYNs to the cgroup's listeners offered no pair because the node's pairs map was full: those connections stay plain TCP.", func(f stats.Figures) uint64 { return f.PairsFull }),
			counter("listeners_full_total", "Listening sockets of the cgroup not recorded because the node's listeners map was full: their connections stay plain TCP.", func(f stats.Figures) uint64 { return f.ListenersFull }),
			counter("members_left_total", "Sockets that left the sockhash while open (they or their peer stopped being safe members).", func(f stats.Figures) uint64 { return f.MembersLeft }),
			counter("redirect_failures_total", "Messages of redirecting sockets whose peer was gone, passed to the stack.", func(f stats.Figures) uint64 { return f.RedirectFailures }),
			counter("sockets_inserted_total", "Sockets added to the sockhash.", func(f stats.Figures) uint64 { return f.SocketsInserted }),
			counter("socket_insert_failures_total", "Sockets that could not be added to the sockhash (full).", func(f stats.Figures) uint64 { return f.InsertFailures }),
			counter("sockets_remote_total", "Sockets left out because their peer cannot be local.", func(f stats.Figures) uint64 { return f.SocketsRemote }),
			counter("would_pairs_total", "Account-only: pairs that would have joined the sockhash were the cgroup accelerated.", func(f stats.Figures) uint64 { return f.WouldPairs }),
			counter("would_redirect_bytes_total", "Account-only: stack egress bytes of those pairs, what acceleration would take off the stack.", func(f stats.Figures) uint64 { return f.WouldRedirectBytes }),
			counter("sockets_skipped_total", "Sockets left out because data moved before ESTABLISHED.", func(f stats.Figures) uint64 { return f.SocketsSkipped }),
		},
		fallbacks:        prometheus.NewDesc("sockbypass_fallbacks_total", "Sockets whose reader was kept on the normal TCP path, by reason (rcvlowat, tcp_inq, oobinline, waitall, oob_read).", []string{"cgroup", "reason"}, nil),
		liveSockets:      prometheus.NewDesc("sockbypass_live_sockets", "Sockets of the cgroup in the sockhash now.", cg, nil),
		bypassRatio:      prometheus.NewDesc("sockbypass_bypass_ratio", "Redirected bytes / (redirected + stack egress bytes), 0 to 1; absent before any traffic.", cg, nil),
		sockhashSockets:  prometheus.NewDesc("sockbypass_sockhash_sockets", "Sockets in the sockhash.", nil, nil),
		sockhashCapacity: prometheus.NewDesc("sockbypass_sockhash_capacity", "Capacity (max_entries) of the sockhash.", nil, nil),
		enabledCgroups:   prometheus.NewDesc("sockbypass_enabled_cgroups", "Number of enabled cgroups.", nil, nil),
		tcDevices:        prometheus.NewDesc("sockbypass_tc_devices", "Interfaces with TC egress accounting.", nil, nil),
		ambiguousAddrs:   prometheus.NewDesc("sockbypass_ambiguous_node_addresses", "Node addresses seen in several network namespaces, never paired across namespaces.", nil, nil),
		up:               prometheus.NewDesc("sockbypass_up", "1 when the pinned datapath could be read at this scrape.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d.desc
	}
	for _, d := range []*prometheus.Desc{c.fallbacks, c.liveSockets, c.bypassRatio, c.sockhashSockets, c.sockhashCapacity, c.enabledCgroups, c.tcDevices, c.ambiguousAddrs, c.up} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	r, err := c.source()
	if err != nil {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1)
	emit := func(label string, f stats.Figures) {
		for _, d := range c.descs {
			ch <- prometheus.MustNewConstMetric(d.desc, prometheus.CounterValue, float64(d.value(f)), label)
		}
		for reason, n := range f.Fallbacks {
			ch <- prometheus.MustNewConstMetric(c.fallbacks, prometheus.CounterValue, float64(n), label, reason)
		}
		if f.BypassRatio != nil {
			ch <- prometheus.MustNewConstMetric(c.bypassRatio, prometheus.GaugeValue, *f.BypassRatio, label)
		}
	}
	for _, cg := range append(r.Cgroups[:len(r.Cgroups):len(r.Cgroups)], r.DisabledCgroups...) {
		emit(cg.Cgroup, cg.Figures)
		ch <- prometheus.MustNewConstMetric(c.liveSockets, prometheus.GaugeValue, float64(cg.LiveSockets), cg.Cgroup)
	}
	emit(UnattributedLabel, r.Unattributed)
	ch <- prometheus.MustNewConstMetric(c.sockhashSockets, prometheus.GaugeValue, float64(r.LiveSockets))
	ch <- prometheus.MustNewConstMetric(c.sockhashCapacity, prometheus.GaugeValue, float64(r.SockhashCapacity))
	ch <- prometheus.MustNewConstMetric(c.enabledCgroups, prometheus.GaugeValue, float64(len(r.Cgroups)))
	ch <- prometheus.MustNewConstMetric(c.tcDevices, prometheus.GaugeValue, float64(len(r.TCDevices)))
	ch <- prometheus.MustNewConstMetric(c.ambiguousAddrs, prometheus.GaugeValue, float64(len(r.NodeAddresses.Ambiguous)))
}
