// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * sock_ops program, one instance per enabled cgroup: inserts every TCP socket
 * of the cgroup into the shared sockhash when it reaches ESTABLISHED, and
 * records in its socket storage which enabled cgroup it belongs to, its key
 * and how it pairs. Inserting makes the socket's sends go through the sk_msg
 * program; it does not yet make it a redirect target (see sockbypass.h).
 */
#include "sockbypass.h"

/* Set by the loader: the id of the cgroup this instance is attached to. */
volatile const __u64 enabled_cgroup_id = 0;

/* own_key builds the socket's key (without netns_cookie). */
static __always_inline int own_key(struct bpf_sock_ops *skops, struct sock_key *key)
{
	__u32 local_ip6[4], remote_ip6[4];

	/* Volatile: the verifier wants each context field read at a
	 * constant offset from the context pointer, not from a pointer
	 * the compiler derived from it. */
	local_ip6[0] = *(volatile __u32 *)&skops->local_ip6[0];
	local_ip6[1] = *(volatile __u32 *)&skops->local_ip6[1];
	local_ip6[2] = *(volatile __u32 *)&skops->local_ip6[2];
	local_ip6[3] = *(volatile __u32 *)&skops->local_ip6[3];
	remote_ip6[0] = *(volatile __u32 *)&skops->remote_ip6[0];
	remote_ip6[1] = *(volatile __u32 *)&skops->remote_ip6[1];
	remote_ip6[2] = *(volatile __u32 *)&skops->remote_ip6[2];
	remote_ip6[3] = *(volatile __u32 *)&skops->remote_ip6[3];
	return fill_key(key, *(volatile __u32 *)&skops->family,
			*(volatile __u32 *)&skops->local_ip4, *(volatile __u32 *)&skops->remote_ip4,
			local_ip6, remote_ip6, *(volatile __u32 *)&skops->local_port,
			bpf_ntohl(*(volatile __u32 *)&skops->remote_port));
}

/*
 * endpoint_of gives the app endpoint of a key's local end. A unique node
 * address names its namespace by itself, so its endpoints are node-scope
 * (netns 0): the sidecar of another pod can then find them.
 */
static __always_inline void endpoint_of(const struct sock_key *key, __u64 netns, struct endpoint_key *ek)
{
	struct node_addr_key nk = {};
	struct node_addr *na;

	__builtin_memcpy(nk.ip, key->local_ip, sizeof(nk.ip));
	na = bpf_map_lookup_elem(&node_addrs, &nk);
	ek->netns_cookie = (na && !(na->flags & NODE_ADDR_AMBIGUOUS) && na->netns_cookie == netns) ? 0 : netns;
	__builtin_memcpy(ek->ip, key->local_ip, sizeof(ek->ip));
	ek->port = key->local_port;
}

/* unique_owner returns the namespace owning ip when it is a unique node
 * address, else 0. */
static __always_inline __u64 unique_owner(const __u32 *ip)
{
	struct node_addr_key nk = {};
	struct node_addr *na;

	__builtin_memcpy(nk.ip, ip, sizeof(nk.ip));
	na = bpf_map_lookup_elem(&node_addrs, &nk);
	if (!na || (na->flags & NODE_ADDR_AMBIGUOUS))
		return 0;
	return na->netns_cookie;
}

/*
 * mesh_connect runs before an app socket of a sidecar-mode cgroup sends its
 * SYN: it records the socket's key (for the egress program), counts the
 * sockets sharing its local endpoint, and remembers the original
 * destination of an intercepted connect for SO_ORIGINAL_DST.
 */
static __always_inline void mesh_connect(struct bpf_sock_ops *skops)
{
	__u64 cgroup_id = enabled_cgroup_id;
	struct cgroup_config *cfg;
	struct sock_state *state;
	struct endpoint_key ek = {};
	struct sock_key key = {};
	__u64 one = 1, *users;

	cfg = bpf_map_lookup_elem(&cgroup_config, &cgroup_id);
	if (!cfg || cfg->mesh_mode == MESH_NONE || !skops->sk)
		return;
	state = bpf_sk_storage_get(&sock_state, skops->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state || (state->flags & SOCK_FLAG_MESH_APP))
		return;
	if (own_key(skops, &key) < 0)
		return;
	key.netns_cookie = bpf_get_netns_cookie(skops);
	state->key = key;
	state->netns_cookie = key.netns_cookie;
	state->cgroup_id = cgroup_id;
	state->flags |= SOCK_FLAG_MESH_APP;

	endpoint_of(&key, key.netns_cookie, &ek);
	state->app_endpoint = ek; /* as registered, to unregister at close */
	if (bpf_map_update_elem(&mesh_endpoints, &ek, &one, BPF_NOEXIST) != 0) {
		users = bpf_map_lookup_elem(&mesh_endpoints, &ek);
		if (users)
			__sync_fetch_and_add(users, 1);
	}
	/* Connecting to a pod whose sidecar captures inbound: let that
	 * sidecar find us by our endpoint. */
	if (ek.netns_cookie == 0) {
		struct node_addr_key rk = {};

		__builtin_memcpy(rk.ip, key.remote_ip, sizeof(rk.ip));
		if (bpf_map_lookup_elem(&inbound_pods, &rk)) {
			struct mesh_client mc = {};

			mc.client_key = key;
			mc.client_netns = key.netns_cookie;
			bpf_map_update_elem(&mesh_clients, &ek, &mc, BPF_ANY);
		}
	}
	if (state->flags & SOCK_FLAG_INTERCEPTED) {
		struct orig_dst od = {};
		__builtin_memcpy(od.ip, state->orig_dst_ip, sizeof(od.ip));
		od.port = state->orig_dst_port;
		od.family = state->orig_dst_family;
		bpf_map_update_elem(&orig_dsts, &ek, &od, BPF_ANY);
	}
	/* To forget the endpoint when the socket closes. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* endpoint_shared reports whether several app sockets use ek. */
static __always_inline int endpoint_shared(struct endpoint_key *ek)
{
	__u64 *users = bpf_map_lookup_elem(&mesh_endpoints, ek);

	return users && *users > 1;
}

static __always_inline void insert_socket(struct bpf_sock_ops *skops, int passive)
{
	struct sock_state *state;
	struct cgroup_counters *c;
	struct cgroup_config *cfg;
	struct sock_key key = {};
	__u64 own_netns, peer_netns = 0;
	int scope, explicit_peer = 0;

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
	state->flags &= ~(SOCK_FLAG_INSERTED | SOCK_FLAG_REDIRECTING | SOCK_FLAG_PUBLISHED |
			  SOCK_FLAG_EXPLICIT_PEER);
	if (passive)
		state->flags &= ~(SOCK_FLAG_MESH_APP | SOCK_FLAG_SYN_REDIRECTED | SOCK_FLAG_INTERCEPTED);
	state->cgroup_id = enabled_cgroup_id;

	c = counters_for(state->cgroup_id);
	cfg = bpf_map_lookup_elem(&cgroup_config, &state->cgroup_id);
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
	if (own_key(skops, &key) < 0)
		return;
	own_netns = bpf_get_netns_cookie(skops);

	if (!passive && (state->flags & SOCK_FLAG_SYN_REDIRECTED)) {
		/* An app socket whose SYN iptables sent to the sidecar: its
		 * peer is the sidecar's accepted socket, keyed by the tuple
		 * after NAT, and nothing else. */
		struct endpoint_key ek = {};

		endpoint_of(&key, own_netns, &ek);
		if (endpoint_shared(&ek)) {
			if (c)
				__sync_fetch_and_add(&c->mesh_ambiguous, 1);
			return;
		}
		state->peer_key.netns_cookie = own_netns;
		__builtin_memcpy(state->peer_key.local_ip, state->nat_dst_ip, sizeof(state->peer_key.local_ip));
		__builtin_memcpy(state->peer_key.remote_ip, state->nat_src_ip, sizeof(state->peer_key.remote_ip));
		state->peer_key.local_port = state->nat_dst_port;
		state->peer_key.remote_port = state->nat_src_port;
		state->peer_key.family = family_of(state->nat_dst_ip);
		state->peer_key.pad = 0;
		state->app_endpoint = ek;
		explicit_peer = 1;
	} else if (!passive && (state->flags & SOCK_FLAG_MESH_APP)) {
		/* Connecting to a pod whose sidecar captures inbound: the
		 * peer is that sidecar's accepted socket on its inbound port. */
		struct node_addr_key rk = {};
		struct endpoint_key ek = {};
		__u32 *inbound;
		__u64 owner;

		__builtin_memcpy(rk.ip, key.remote_ip, sizeof(rk.ip));
		inbound = bpf_map_lookup_elem(&inbound_pods, &rk);
		owner = unique_owner(key.remote_ip);
		endpoint_of(&key, own_netns, &ek);
		/* Another pod: inbound capture applies to traffic that
		 * arrives from outside its namespace. */
		if (inbound && owner && owner != own_netns && ek.netns_cookie == 0) {
			if (endpoint_shared(&ek)) {
				if (c)
					__sync_fetch_and_add(&c->mesh_ambiguous, 1);
				return;
			}
			state->peer_key.netns_cookie = owner;
			__builtin_memcpy(state->peer_key.local_ip, key.remote_ip, sizeof(state->peer_key.local_ip));
			__builtin_memcpy(state->peer_key.remote_ip, key.local_ip, sizeof(state->peer_key.remote_ip));
			state->peer_key.local_port = (__u16)*inbound;
			state->peer_key.remote_port = key.local_port;
			state->peer_key.family = key.family;
			state->peer_key.pad = 0;
			state->app_endpoint = ek;
			peer_netns = owner;
			explicit_peer = 2;
		}
	} else if (passive && cfg && cfg->mesh_mode == MESH_REDIRECT &&
		   (key.local_port == cfg->outbound_port || key.local_port == cfg->inbound_port)) {
		/* The sidecar's accepted socket: find the app socket whose
		 * SYN became this connection. */
		struct nat_tuple t = {};
		struct mesh_syn *syn;

		t.netns_cookie = own_netns;
		__builtin_memcpy(t.src_ip, key.remote_ip, sizeof(t.src_ip));
		__builtin_memcpy(t.dst_ip, key.local_ip, sizeof(t.dst_ip));
		t.src_port = key.remote_port;
		t.dst_port = key.local_port;
		syn = bpf_map_lookup_elem(&mesh_syns, &t);
		if (syn) {
			struct endpoint_key ek = {};

			endpoint_of(&syn->app_key, own_netns, &ek);
			if (endpoint_shared(&ek)) {
				if (c)
					__sync_fetch_and_add(&c->mesh_unpaired, 1);
			} else {
				state->peer_key = syn->app_key;
				state->app_endpoint = ek;
				explicit_peer = 1;
				if (c)
					__sync_fetch_and_add(&c->mesh_paired, 1);
			}
			bpf_map_delete_elem(&mesh_syns, &t);
		} else {
			/* From another pod: find its connecting socket by the
			 * endpoint it came from. */
			struct endpoint_key ek = {};
			struct mesh_client *mc;

			ek.netns_cookie = 0;
			__builtin_memcpy(ek.ip, key.remote_ip, sizeof(ek.ip));
			ek.port = key.remote_port;
			mc = key.local_port == cfg->inbound_port ? bpf_map_lookup_elem(&mesh_clients, &ek) : 0;
			if (mc && same_ip(mc->client_key.remote_ip, key.local_ip) && !endpoint_shared(&ek)) {
				state->peer_key = mc->client_key;
				state->app_endpoint = ek;
				peer_netns = mc->client_netns;
				explicit_peer = 2;
				if (c)
					__sync_fetch_and_add(&c->mesh_paired, 1);
			} else if (c) {
				__sync_fetch_and_add(&c->mesh_unpaired, 1);
			}
		}
	}

	if (explicit_peer) {
		/* Explicit pairs use namespace-scope keys; an app and its
		 * sidecar (1) share the pod's namespace, two pods' sidecars
		 * (2) have peer_netns set above. */
		scope = SCOPE_NETNS;
		if (explicit_peer == 1)
			peer_netns = own_netns;
		state->flags |= SOCK_FLAG_EXPLICIT_PEER;
	} else {
		scope = key_scope(&key, own_netns, &peer_netns);
		if (scope == SCOPE_REMOTE) {
			if (c)
				__sync_fetch_and_add(&c->sockets_remote, 1);
			return;
		}
		if (scope == SCOPE_AMBIGUOUS && c)
			__sync_fetch_and_add(&c->sockets_ambiguous, 1);
	}
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
	state->last_copied_seq = skops->rcv_nxt; /* nothing read yet */
	state->redirected_read = 0;
	state->redirected_sent = 0;
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
	if (!state)
		return;
	if (state->flags & SOCK_FLAG_PUBLISHED) {
		bpf_map_delete_elem(&receivers, &state->key);
		state->flags &= ~SOCK_FLAG_PUBLISHED;
	}
	if (state->flags & SOCK_FLAG_MESH_APP) {
		struct endpoint_key ek = state->app_endpoint;
		__u64 *users;

		state->flags &= ~SOCK_FLAG_MESH_APP;
		users = bpf_map_lookup_elem(&mesh_endpoints, &ek);
		if (users && __sync_fetch_and_add(users, -1) <= 1)
			bpf_map_delete_elem(&mesh_endpoints, &ek);
		bpf_map_delete_elem(&orig_dsts, &ek);
		if (ek.netns_cookie == 0)
			bpf_map_delete_elem(&mesh_clients, &ek);
	}
}

SEC("sockops")
int sockbypass_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		mesh_connect(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		insert_socket(skops, 0);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		insert_socket(skops, 1);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			forget_socket(skops);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
