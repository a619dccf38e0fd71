// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * sock_ops program, one instance per enabled cgroup: inserts every TCP socket
 * of the cgroup into the shared sockhash when it reaches ESTABLISHED, and
 * records in its socket storage which enabled cgroup it belongs to and its
 * key. Inserting makes the socket's sends go through the sk_msg program; it
 * does not yet make it a redirect target (see sockbypass.h).
 */
#include "sockbypass.h"

/* Set by the loader: the id of the cgroup this instance is attached to. */
volatile const __u64 enabled_cgroup_id = 0;

static __always_inline void insert_socket(struct bpf_sock_ops *skops)
{
	struct sock_state *state;
	struct cgroup_counters *c;
	struct sock_key key = {};
	__u32 local_ip6[4], remote_ip6[4];

	if (!skops->sk)
		return;

	state = bpf_sk_storage_get(&sock_state, skops->sk, 0,
				   BPF_SK_STORAGE_GET_F_CREATE);
	if (!state)
		return; /* fail open: the socket stays on the stack path */

	/* Nested enabled cgroups: the innermost program runs first and wins. */
	if (state->flags & SOCK_FLAG_HANDLED)
		return;
	state->flags |= SOCK_FLAG_HANDLED;
	/* Storage cloned from a listener carries the listener's flags (for
	 * options such as SO_RCVLOWAT) but not its identity. */
	state->flags &= ~(SOCK_FLAG_INSERTED | SOCK_FLAG_REDIRECTING | SOCK_FLAG_PUBLISHED);
	state->cgroup_id = enabled_cgroup_id;

	c = counters_for(state->cgroup_id);

	struct cgroup_config *cfg = bpf_map_lookup_elem(&cgroup_config, &state->cgroup_id);
	if (cfg && (cfg->flags & CGROUP_ACCOUNT_ONLY))
		return; /* counted (TC finds the cgroup in sock_state), not accelerated */

	/*
	 * Data that moved before ESTABLISHED (TCP Fast Open) sits in the
	 * stack's queues: leave the socket out.
	 */
	if (skops->data_segs_in != 0 || skops->data_segs_out != 0) {
		if (c)
			__sync_fetch_and_add(&c->sockets_skipped, 1);
		return;
	}

	local_ip6[0] = skops->local_ip6[0];
	local_ip6[1] = skops->local_ip6[1];
	local_ip6[2] = skops->local_ip6[2];
	local_ip6[3] = skops->local_ip6[3];
	remote_ip6[0] = skops->remote_ip6[0];
	remote_ip6[1] = skops->remote_ip6[1];
	remote_ip6[2] = skops->remote_ip6[2];
	remote_ip6[3] = skops->remote_ip6[3];

	if (fill_key(&key, skops->family, skops->local_ip4, skops->remote_ip4,
		     local_ip6, remote_ip6, skops->local_port,
		     bpf_ntohl(skops->remote_port)) < 0)
		return;
	__u64 own_netns = bpf_get_netns_cookie(skops);
	__u64 peer_netns;
	int scope = key_scope(&key, own_netns, &peer_netns);

	if (scope == SCOPE_REMOTE) {
		if (c)
			__sync_fetch_and_add(&c->sockets_remote, 1);
		return;
	}
	if (scope == SCOPE_AMBIGUOUS && c)
		__sync_fetch_and_add(&c->sockets_ambiguous, 1);
	/* Node-scope keys carry no namespace: the two ends of a pod-to-pod
	 * connection live in two namespaces and must find each other. */
	key.netns_cookie = scope == SCOPE_NODE ? 0 : own_netns;

	if (bpf_sock_hash_update(skops, &sockhash, &key, BPF_NOEXIST) != 0) {
		if (c)
			__sync_fetch_and_add(&c->insert_failures, 1);
		return;
	}
	state->key = key;
	state->netns_cookie = own_netns;
	state->peer_netns_cookie = peer_netns;
	state->flags |= SOCK_FLAG_INSERTED;
	if (c)
		__sync_fetch_and_add(&c->sockets_inserted, 1);

	/* Remember the socket's cgroup for per-cgroup live counts, and ask
	 * for a callback when it closes to forget it again. */
	__u64 cookie = bpf_get_socket_cookie(skops);
	bpf_map_update_elem(&socket_cgroups, &cookie, &state->cgroup_id, BPF_ANY);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void forget_socket(struct bpf_sock_ops *skops)
{
	struct sock_state *state;
	__u64 cookie = bpf_get_socket_cookie(skops);

	bpf_map_delete_elem(&socket_cgroups, &cookie);
	if (!skops->sk)
		return;
	state = bpf_sk_storage_get(&sock_state, skops->sk, 0, 0);
	if (state && (state->flags & SOCK_FLAG_PUBLISHED)) {
		bpf_map_delete_elem(&receivers, &state->key);
		state->flags &= ~SOCK_FLAG_PUBLISHED;
	}
}

SEC("sockops")
int sockbypass_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		insert_socket(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			forget_socket(skops);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
