// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * sk_msg program on the sockhash: redirects each message of a socket into the
 * receive queue of its local peer (the socket with the mirrored key in the
 * same network namespace) when the peer is known, and lets everything else
 * pass. It never drops: when in doubt, the message takes the TCP stack.
 */
#include "sockbypass.h"

SEC("sk_msg")
int sockbypass_skmsg(struct sk_msg_md *msg)
{
	struct sock_state *state;
	struct cgroup_counters *c;
	struct sock_key peer = {};
	__u32 local_ip6[4], remote_ip6[4];
	__u64 size = msg->size;
	__u64 cgroup_id = 0;
	long verdict;

	if (!msg->sk)
		return SK_PASS;

	state = bpf_sk_storage_get(&sock_state, msg->sk, 0, 0);
	if (state)
		cgroup_id = state->cgroup_id;
	c = counters_for(cgroup_id);

	/* Without state we cannot keep a flow on one path: stay on the stack. */
	if (!state || state->mode == SOCK_MODE_STACK)
		goto pass;

	local_ip6[0] = msg->local_ip6[0];
	local_ip6[1] = msg->local_ip6[1];
	local_ip6[2] = msg->local_ip6[2];
	local_ip6[3] = msg->local_ip6[3];
	remote_ip6[0] = msg->remote_ip6[0];
	remote_ip6[1] = msg->remote_ip6[1];
	remote_ip6[2] = msg->remote_ip6[2];
	remote_ip6[3] = msg->remote_ip6[3];

	/* The peer's key: our remote end is its local end. */
	if (fill_key(&peer, msg->family, msg->remote_ip4, msg->local_ip4,
		     remote_ip6, local_ip6, bpf_ntohl(msg->remote_port),
		     msg->local_port) < 0)
		goto pass;
	peer.netns_cookie = bpf_get_netns_cookie(msg);

	verdict = bpf_msg_redirect_hash(msg, &sockhash, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		state->mode = SOCK_MODE_REDIRECT;
		if (c) {
			__sync_fetch_and_add(&c->redirected_msgs, 1);
			__sync_fetch_and_add(&c->redirected_bytes, size);
		}
		return SK_PASS;
	}

	/* No peer: a redirecting socket lost it, a new one never had one. */
	if (state->mode == SOCK_MODE_REDIRECT) {
		if (c)
			__sync_fetch_and_add(&c->redirect_failures, 1);
	} else {
		state->mode = SOCK_MODE_STACK;
	}
pass:
	if (c) {
		__sync_fetch_and_add(&c->passed_msgs, 1);
		__sync_fetch_and_add(&c->passed_bytes, size);
	}
	return SK_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
