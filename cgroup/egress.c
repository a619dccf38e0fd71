// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * cgroup_skb/egress accounting, one instance per enabled cgroup: counts the
 * TCP packets with payload, and their payload bytes, that the cgroup's
 * sockets send through the stack to a local peer (stack_egress_*), whatever device they leave by:
 * loopback, a pod's veth, a bridge. With redirected_bytes this gives each
 * enabled cgroup a true bypass ratio without naming devices, and since it
 * runs only for the cgroup's own packets, sockets of other cgroups never
 * pay for it. In account-only cgroups it also counts the bytes of the pairs
 * that would have joined (would_redirect_bytes). It only counts: every
 * packet continues.
 */
#include "sockbypass.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP 6

/* Set by the loader: the enabled cgroup this instance is attached to. */
volatile const __u64 enabled_cgroup_id = 0;
/* And its slot (see "Slots" in sockbypass.h). */
volatile const __u32 cgroup_slot = 0;

/* dst_local reports whether a socket that sock_ops has not classified
 * (before ESTABLISHED, or established before the cgroup was enabled) sends
 * to a local peer, by the rule sock_ops classifies with (peer_local). */
static __always_inline int dst_local(struct bpf_sock *sk)
{
	__u32 src6[4] = {sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2], sk->src_ip6[3]};
	__u32 dst6[4] = {sk->dst_ip6[0], sk->dst_ip6[1], sk->dst_ip6[2], sk->dst_ip6[3]};
	struct sock_key key = {};

	if (fill_key(&key, sk->family, sk->src_ip4, sk->dst_ip4, src6, dst6, sk->src_port, 0) < 0)
		return 0;
	return peer_local(&key);
}

SEC("cgroup_skb/egress")
int sockbypass_account_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct bpf_sock *sk = skb->sk;
	struct sock_state *state;
	struct cgroup_counters *c;
	__u8 *ip = data, *tcp;
	__u32 off;

	if (!sk)
		return 1;
	/* Payload first: most packets of a connection carry none (SYN, ACK,
	 * FIN) and cost a few loads here, nothing more. The packet starts at
	 * the IP header, read in place (its headers are in the linear part). */
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if ((void *)(ip + 1) > data_end)
			return 1;
		off = (ip[0] & 0x0f) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		off = 40;
	} else {
		return 1;
	}
	/* TCP data offset: high nibble of byte 12 of the TCP header (a
	 * packet of another protocol is dropped below, by its socket). */
	tcp = ip + off;
	if ((void *)(tcp + 13) > data_end)
		return 1;
	off += (tcp[12] >> 4) * 4;
	if (skb->len <= off)
		return 1;

	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_TCP)
		return 1;
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	switch (classified_peer(state, enabled_cgroup_id)) {
	case 0:
		return 1;
	case -1:
		if (!dst_local(sk))
			return 1;
	}

	c = counters_for(cgroup_slot);
	if (!c)
		return 1;
	/* Process context, preemptible: another task on this CPU may count
	 * meanwhile, so the per-CPU values are added atomically. */
	__sync_fetch_and_add(&c->stack_egress_packets, skb->gso_segs ? skb->gso_segs : 1);
	__sync_fetch_and_add(&c->stack_egress_bytes, skb->len - off);
	/* Account-only: bytes of a pair that would have joined, what
	 * acceleration would take off the stack. */
	if (state && (state->flags & SOCK_FLAG_WOULD_PAIR)) {
		if (state->flags & SOCK_FLAG_PAIR_CLIENT) {
			struct pair *pair = bpf_map_lookup_elem(&pairs, &state->key);

			if (!pair)
				return 1;
			/* Sent before the server "joined": the pair would
			 * have been given up (pairs_abandoned). */
			if (pair->state == PAIR_DRY_CLIENT)
				__sync_val_compare_and_swap(&pair->state, PAIR_DRY_CLIENT, PAIR_ABANDONED);
			if (pair->state != PAIR_DRY_JOINED)
				return 1;
		}
		__sync_fetch_and_add(&c->would_redirect_bytes, skb->len - off);
	}
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
