// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * cgroup/sock_release accounting, one instance per accelerated cgroup: when
 * one of the cgroup's TCP sockets with a local peer is closed (close() of
 * its last file reference, before TCP queues its FIN), it adds to the
 * cgroup's stack_egress_* what the socket sent through the stack, read from
 * the socket's own counters:
 *
 *   bytes   = bytes_sent - bytes_retrans   (payload transmitted, once)
 *           + write_seq - snd_nxt          (written, not transmitted yet;
 *                                           minus a FIN queued by shutdown)
 *   packets = data_segs_out - total_retrans
 *
 * the payload the application wrote that did not take the redirect. It
 * replaces the per-packet cgroup_skb/egress program (egress.c) in
 * accelerated cgroups: one run per socket instead of one per packet.
 * Account-only cgroups keep egress.c, which also counts
 * would_redirect_bytes. Live sockets are sampled by user space with the
 * same formula (sock_diag tcp_info), so stats show them before they close.
 *
 * Which sockets count, as in egress.c: those sock_ops classified as having
 * a local peer (SOCK_FLAG_LOCAL_PEER) in this cgroup (nested enabled
 * cgroups: the innermost one's program classified it, and only its
 * instance counts), and sockets sock_ops never classified (established
 * before the cgroup was enabled) whose peer is local by the same rule
 * (peer_local). It only reads: the close always proceeds (return 1).
 */
#include "sockbypass.h"

#define IPPROTO_TCP 6

/* Set by the loader: the enabled cgroup this instance is attached to. */
volatile const __u64 enabled_cgroup_id = 0;
/* And its slot (see "Slots" in sockbypass.h). */
volatile const __u32 cgroup_slot = 0;

/* Views of the kernel's tcp_sock and of the addresses in sock_common
 * (cgroup/sock_release may not read src_ip* from its context). Relocated
 * against the running kernel's BTF (CO-RE); read with bpf_rdonly_cast. */
struct tcp_sock___acct {
	__u64 bytes_sent;
	__u64 bytes_retrans;
	__u32 data_segs_out;
	__u32 total_retrans;
	__u32 write_seq;
	__u32 snd_nxt;
} __attribute__((preserve_access_index));

struct in6_addr___acct {
	union {
		__u32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common___acct {
	__u32 skc_rcv_saddr;
	struct in6_addr___acct skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct sock___acct {
	struct sock_common___acct __sk_common;
} __attribute__((preserve_access_index));

/* local_peer reports whether a socket sock_ops has not classified sends to
 * a local peer, by the rule sock_ops classifies with (peer_local). */
static __always_inline int local_peer(struct bpf_sock *sk)
{
	struct sock___acct *s = bpf_rdonly_cast(sk, __builtin_btf_type_id(*(struct sock___acct *)0, 1));
	__u32 src6[4], dst6[4] = {sk->dst_ip6[0], sk->dst_ip6[1], sk->dst_ip6[2], sk->dst_ip6[3]};
	struct sock_key key = {};

	src6[0] = s->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32[0];
	src6[1] = s->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32[1];
	src6[2] = s->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32[2];
	src6[3] = s->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32[3];
	if (fill_key(&key, sk->family, s->__sk_common.skc_rcv_saddr, sk->dst_ip4, src6, dst6, 0, 0) < 0)
		return 0;
	return peer_local(&key);
}

SEC("cgroup/sock_release")
int sockbypass_account_release(struct bpf_sock *sk)
{
	struct tcp_sock___acct *tp;
	struct sock_state *state;
	struct cgroup_counters *c;
	__u64 bytes, sent, retrans;
	__u32 unsent = 0, segs, rsegs, tcp_state;

	if (sk->protocol != IPPROTO_TCP)
		return 1;
	tcp_state = sk->state;
	/* A listener, or a socket that never connected, sent nothing. */
	if (tcp_state == BPF_TCP_LISTEN || tcp_state == BPF_TCP_SYN_SENT)
		return 1;
	tp = bpf_rdonly_cast(sk, __builtin_btf_type_id(*(struct tcp_sock___acct *)0, 1));
	sent = tp->bytes_sent;
	retrans = tp->bytes_retrans;
	bytes = sent > retrans ? sent - retrans : 0;
	/* Written, not transmitted yet: TCP sends it after close (a reset
	 * socket, TCP_CLOSE, never will). A FIN queued by shutdown() holds
	 * the last sequence number until it is sent. */
	if (tcp_state != BPF_TCP_CLOSE) {
		unsent = tp->write_seq - tp->snd_nxt;
		if ((__s32)unsent < 0)
			unsent = 0;
		if (unsent && (tcp_state == BPF_TCP_FIN_WAIT1 || tcp_state == BPF_TCP_CLOSING ||
			       tcp_state == BPF_TCP_LAST_ACK))
			unsent--;
	}
	bytes += unsent;
	/* Most sockets of an accelerated cgroup sent nothing through the
	 * stack (every byte redirected): done, without a lookup. */
	if (!bytes)
		return 1;

	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	switch (classified_peer(state, enabled_cgroup_id)) {
	case 0:
		return 1;
	case -1:
		if (!local_peer(sk))
			return 1;
	}

	c = counters_for(cgroup_slot);
	if (!c)
		return 1;
	/* Segments with payload, retransmissions taken out (a SYN's
	 * retransmissions too, which carry none: rare, and never below 0). */
	segs = tp->data_segs_out;
	rsegs = tp->total_retrans;
	/* Process context, preemptible: added atomically (see egress.c). */
	__sync_fetch_and_add(&c->stack_egress_packets, segs > rsegs ? segs - rsegs : 0);
	__sync_fetch_and_add(&c->stack_egress_bytes, bytes);
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
