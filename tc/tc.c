// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * TC egress program: counts the TCP packets and payload bytes that leave an
 * interface through the stack (tc_egress_*: the device view; the
 * per-cgroup stack bytes are counted at the socket by cgroup/egress.c),
 * per enabled cgroup (from the socket's
 * sock_state; cgroup 0 when the socket belongs to no enabled cgroup). It
 * only counts: every packet continues unchanged to the next program.
 */
#include "sockbypass.h"

#define TC_ACT_UNSPEC (-1)
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP 6

/* Set by the loader: bytes of link-layer header before the IP header on
 * the interface this instance is attached to (14 for Ethernet and lo, 0
 * for layer-3 devices). */
volatile const __u32 l2_len = 14;

SEC("tc")
int sockbypass_tc_egress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct sock_state *state;
	struct cgroup_counters *c;
	__u32 ip_len, off = l2_len;
	__u8 b;

	if (!sk)
		return TC_ACT_UNSPEC;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_TCP)
		return TC_ACT_UNSPEC;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, off, &b, 1) < 0)
			return TC_ACT_UNSPEC;
		ip_len = (b & 0x0f) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		ip_len = 40;
	} else {
		return TC_ACT_UNSPEC;
	}
	off += ip_len;
	/* TCP data offset: high nibble of byte 12 of the TCP header. */
	if (bpf_skb_load_bytes(skb, off + 12, &b, 1) < 0)
		return TC_ACT_UNSPEC;
	off += (b >> 4) * 4;

	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	c = counters_for(state ? state->slot : 0);
	if (!c)
		return TC_ACT_UNSPEC;
	/* Per-CPU values, and TC runs with bottom halves disabled: nothing
	 * else on this CPU touches them meanwhile, no atomics needed. */
	c->tc_egress_packets += skb->gso_segs ? skb->gso_segs : 1;
	if (skb->len > off)
		c->tc_egress_bytes += skb->len - off;
	return TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "Dual BSD/GPL";
