// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * sock_ops program, one instance per enabled cgroup: runs the pair
 * handshake (see "Pairs" in sockbypass.h) so that both ends of a local
 * connection join the shared sockhash at ESTABLISHED, or neither does;
 * records listeners and whether they block; and keeps in each socket's
 * storage which enabled cgroup it belongs to, its key and how it pairs.
 */
#include "sockbypass.h"
#include "stack_reader.h"

/* Set by the loader: the id of the cgroup this instance is attached to,
 * and its slot (see "Slots" in sockbypass.h). */
volatile const __u64 enabled_cgroup_id = 0;
volatile const __u32 cgroup_slot = 0;

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
/* stack_process_connect marks a socket that a stack process connects (see
 * stack_procs: one listening on a stack port, or learnt to splice or to use
 * kernel TLS, in any cgroup): connect() runs in the process's context. One
 * hash lookup per connect. */
static __noinline void stack_process_connect(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *state;
	__u32 tgid;

	if (!sk)
		return;
	tgid = bpf_get_current_pid_tgid() >> 32;
	if (!bpf_map_lookup_elem(&stack_procs, &tgid))
		return;
	state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (state)
		state->flags |= SOCK_FLAG_STACK_PROCESS;
}

static __noinline void mesh_connect(struct bpf_sock_ops *skops)
{
	__u64 cgroup_id = enabled_cgroup_id;
	struct cgroup_config *cfg;
	struct sock_state *state;
	struct endpoint_key ek = {};
	struct sock_key key = {};
	__u64 one = 1 | ((__u64)(cgroup_slot + 1) << ENDPOINT_SLOT_SHIFT), *users;

	cfg = config_for(cgroup_slot);
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
	state->slot = cgroup_slot;
	state->flags |= SOCK_FLAG_MESH_APP;

	endpoint_of(&key, key.netns_cookie, &ek);
	state->app_endpoint = ek; /* as registered, to unregister at close */
	if (bpf_map_update_elem(&mesh_endpoints, &ek, &one, BPF_NOEXIST) == 0) {
		state->flags |= SOCK_FLAG_ENDPOINT_COUNTED;
	} else {
		users = bpf_map_lookup_elem(&mesh_endpoints, &ek);
		if (users) {
			__sync_fetch_and_add(users, 1);
			state->flags |= SOCK_FLAG_ENDPOINT_COUNTED;
		}
		/* Else the map is full: the endpoint has no count and is
		 * never unique (endpoint_shared), so it stays unpaired. */
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
		__u32 slot = cgroup_slot;
		__u64 *n;

		__builtin_memcpy(od.ip, state->orig_dst_ip, sizeof(od.ip));
		od.port = state->orig_dst_port;
		od.family = state->orig_dst_family;
		od.slot = cgroup_slot + 1;
		/* A stale entry of the same endpoint (its socket's close was
		 * not seen) gives its count back first. */
		forget_orig_dst(&ek);
		if (bpf_map_update_elem(&orig_dsts, &ek, &od, BPF_NOEXIST) == 0) {
			n = bpf_map_lookup_elem(&intercepts, &slot);
			if (n)
				__sync_fetch_and_add(n, 1);
		} else {
			struct cgroup_counters *c = counters_for(cgroup_slot);

			if (c)
				__sync_fetch_and_add(&c->intercepts_unrecorded, 1);
		}
	}
	/* To forget the endpoint when the socket closes. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* endpoint_shared reports whether ek may be used by several app sockets:
 * yes unless it is counted once. An endpoint without a count (its socket
 * found mesh_endpoints full) is never taken for unique. */
static __always_inline int endpoint_shared(struct endpoint_key *ek)
{
	__u64 *users = bpf_map_lookup_elem(&mesh_endpoints, ek);

	return !users || (*users & ENDPOINT_COUNT_MASK) != 1;
}

/* The callbacks a member asks for to settle a dissolving pair: one for
 * each packet it sends and receives through the stack. */
#define WATCH_CB_FLAGS (BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)

#define COUNT(c, field)                                   \
	do {                                              \
		if (c)                                    \
			__sync_fetch_and_add(&(c)->field, 1); \
	} while (0)

/*
 * How a socket pairs: the key its peer has (or will have) in the sockhash,
 * the namespace the peer must be in, and for sidecar pairs the app
 * endpoint that must stay unique.
 */
struct pairing {
	struct sock_key peer;
	struct endpoint_key app_endpoint;
	__u64 own_netns;
	__u64 peer_netns;
	int scope;
	int explicit_peer;
};

/* set_explicit makes p an explicit pair with peer in peer_netns. */
static __always_inline void set_explicit(struct pairing *p, __u64 peer_netns, const struct endpoint_key *ek)
{
	p->scope = SCOPE_NETNS;
	p->explicit_peer = 1;
	p->peer_netns = peer_netns;
	p->app_endpoint = *ek;
}

/* set_mirror pairs with the mirror of key, by scope (SCOPE_REMOTE: no pair). */
static __noinline void set_mirror(struct pairing *p, const struct sock_key *key, __u64 own_netns)
{
	p->explicit_peer = 0;
	p->scope = key_scope(key, own_netns, &p->peer_netns);
	p->peer = *key;
	p->peer.netns_cookie = p->scope == SCOPE_NODE ? 0 : own_netns;
	__builtin_memcpy(p->peer.local_ip, key->remote_ip, sizeof(p->peer.local_ip));
	__builtin_memcpy(p->peer.remote_ip, key->local_ip, sizeof(p->peer.remote_ip));
	p->peer.local_port = key->remote_port;
	p->peer.remote_port = key->local_port;
}

/*
 * active_pairing: the peer of a connecting socket. An app socket whose SYN
 * iptables sent to the sidecar pairs with the sidecar's accepted socket
 * (keyed by the tuple after NAT); an app socket connecting to a pod whose
 * sidecar captures inbound pairs with that sidecar's accepted socket on its
 * inbound port. Returns 0 for those explicit pairs, 1 when the socket pairs
 * with its mirror, and -1 when an app endpoint is shared (never paired).
 */
static __noinline int active_pairing(struct sock_state *state, const struct sock_key *key, struct pairing *p,
				     struct cgroup_counters *c)
{
	struct endpoint_key ek = {};
	__u64 own_netns = p->own_netns;

	if (state->flags & SOCK_FLAG_SYN_REDIRECTED) {
		endpoint_of(key, own_netns, &ek);
		if (endpoint_shared(&ek)) {
			COUNT(c, mesh_ambiguous);
			return -1;
		}
		p->peer.netns_cookie = own_netns;
		__builtin_memcpy(p->peer.local_ip, state->nat_dst_ip, sizeof(p->peer.local_ip));
		__builtin_memcpy(p->peer.remote_ip, state->nat_src_ip, sizeof(p->peer.remote_ip));
		p->peer.local_port = state->nat_dst_port;
		p->peer.remote_port = state->nat_src_port;
		p->peer.family = family_of(state->nat_dst_ip);
		p->peer.pad = 0;
		set_explicit(p, own_netns, &ek);
		return 0;
	}
	if (state->flags & SOCK_FLAG_MESH_APP) {
		struct node_addr_key rk = {};
		__u32 *inbound;
		__u64 owner;

		__builtin_memcpy(rk.ip, key->remote_ip, sizeof(rk.ip));
		inbound = bpf_map_lookup_elem(&inbound_pods, &rk);
		owner = unique_owner(key->remote_ip);
		endpoint_of(key, own_netns, &ek);
		/* Another pod: inbound capture applies to traffic that
		 * arrives from outside its namespace. */
		if (inbound && owner && owner != own_netns && ek.netns_cookie == 0) {
			if (endpoint_shared(&ek)) {
				COUNT(c, mesh_ambiguous);
				return -1;
			}
			p->peer.netns_cookie = owner;
			__builtin_memcpy(p->peer.local_ip, key->remote_ip, sizeof(p->peer.local_ip));
			__builtin_memcpy(p->peer.remote_ip, key->local_ip, sizeof(p->peer.remote_ip));
			p->peer.local_port = (__u16)*inbound;
			p->peer.remote_port = key->local_port;
			p->peer.family = key->family;
			p->peer.pad = 0;
			set_explicit(p, owner, &ek);
			return 0;
		}
	}
	return 1;
}

/*
 * passive_pairing: the peer of an accepted socket (or of a request socket,
 * before the handshake completes). On a sidecar port in redirect mode it is
 * the app socket whose SYN NAT turned into this connection (mesh_syns), or
 * the connecting socket of another pod whose endpoint it sees
 * (mesh_clients); anything else pairs with its mirror. established: count
 * the outcome and consume the SYN record (PASSIVE_ESTABLISHED: c is set).
 * Returns 0 for those explicit pairs, 1 when the socket pairs with its mirror.
 */
static __noinline int passive_pairing(const struct cgroup_config *cfg, const struct sock_key *key,
				      struct pairing *p, struct cgroup_counters *c)
{
	__u64 own_netns = p->own_netns;
	int established = c != 0;
	struct endpoint_key ek = {};
	struct nat_tuple t = {};
	struct mesh_syn *syn;
	struct mesh_client *mc;

	if (!cfg || cfg->mesh_mode != MESH_REDIRECT ||
	    (key->local_port != cfg->outbound_port && key->local_port != cfg->inbound_port))
		return 1;
	t.netns_cookie = own_netns;
	__builtin_memcpy(t.src_ip, key->remote_ip, sizeof(t.src_ip));
	__builtin_memcpy(t.dst_ip, key->local_ip, sizeof(t.dst_ip));
	t.src_port = key->remote_port;
	t.dst_port = key->local_port;
	syn = bpf_map_lookup_elem(&mesh_syns, &t);
	if (syn) {
		endpoint_of(&syn->app_key, own_netns, &ek);
		if (endpoint_shared(&ek)) {
			if (established) {
				COUNT(c, mesh_unpaired);
				bpf_map_delete_elem(&mesh_syns, &t);
			}
			return 1;
		}
		p->peer = syn->app_key;
		set_explicit(p, own_netns, &ek);
		if (established) {
			COUNT(c, mesh_paired);
			bpf_map_delete_elem(&mesh_syns, &t);
		}
		return 0;
	}
	/* From another pod: find its connecting socket by the endpoint it
	 * came from. */
	ek.netns_cookie = 0;
	__builtin_memcpy(ek.ip, key->remote_ip, sizeof(ek.ip));
	ek.port = key->remote_port;
	mc = key->local_port == cfg->inbound_port ? bpf_map_lookup_elem(&mesh_clients, &ek) : 0;
	if (mc && same_ip(mc->client_key.remote_ip, key->local_ip) && !endpoint_shared(&ek)) {
		p->peer = mc->client_key;
		set_explicit(p, mc->client_netns, &ek);
		if (established) {
			COUNT(c, mesh_paired);
			/* Consumed: the map holds handshakes in flight only. */
			bpf_map_delete_elem(&mesh_clients, &ek);
		}
		return 0;
	}
	if (established)
		COUNT(c, mesh_unpaired);
	return 1;
}

/*
 * local_scope counts how the socket pairs and sets the namespace of the key
 * it inserts under. Returns -1 when its peer cannot be local.
 */
static __always_inline int local_scope(struct sock_key *key, const struct pairing *p, struct cgroup_counters *c)
{
	if (p->scope == SCOPE_REMOTE) {
		COUNT(c, sockets_remote);
		return -1;
	}
	if (p->scope == SCOPE_AMBIGUOUS)
		COUNT(c, sockets_ambiguous);
	/* Node-scope keys carry no namespace: the two ends of a pod-to-pod
	 * connection live in two namespaces and must find each other. */
	key->netns_cookie = p->scope == SCOPE_NODE ? 0 : p->own_netns;
	return 0;
}

/*
 * listener_may_pair reports whether a listener with flags lflags (NULL:
 * not known) can pair at all:
 * known, non-blocking, its accepted sockets not turned blocking, no stack
 * reader (a listener on probation may: its first connection is marked at
 * PASSIVE_ESTABLISHED). A SYN to any other listener gets no offer, so its
 * connection costs no pair entry and its client no sockhash round trip.
 */
static __always_inline int listener_may_pair(__u64 *lflags)
{
	return lflags && (*lflags & (LISTENER_NONBLOCK | LISTENER_STACK_READER | LISTENER_BLOCKING_CHILDREN)) == LISTENER_NONBLOCK;
}

/* count_not_offered counts a server socket left plain because its
 * listener cannot pair (see listener_may_pair): offer_pair made it no
 * offer, or join_passive declines its client. */
static __always_inline void count_not_offered(struct cgroup_counters *c, __u64 *lflags)
{
	if (lflags && (*lflags & LISTENER_STACK_READER))
		COUNT(c, sockets_unpaired);
	else
		COUNT(c, sockets_blocking);
}

/* count_server_unpaired counts a server socket that found no pair: for
 * its listener's reason when the listener cannot pair, else unpaired (the
 * client is in no enabled cgroup, or never offered). */
static __always_inline void count_server_unpaired(struct cgroup_counters *c, __u64 *lflags)
{
	if (!listener_may_pair(lflags))
		count_not_offered(c, lflags);
	else
		COUNT(c, sockets_unpaired);
}

/* listener_eligible reports whether the sockets accepted by the listener
 * of key may join pairs: it is known non-blocking, no stack reader, and
 * past its probation. */
static __always_inline int listener_eligible(const struct sock_key *key, __u64 netns)
{
	__u64 *flags = listener_flags(key->local_ip, key->local_port, netns);

	return listener_may_pair(flags) && (*flags & LISTENER_PROVEN);
}

/*
 * short_lived reports whether a connection reaching the listener with
 * these flags should stay plain because the listener's connections are short-lived
 * (see "Short-lived listeners" in sockbypass.h); every SHORT_PROBE_EVERY-th
 * such connection is still offered a pair, as a probe.
 */
static __always_inline int short_lived(__u64 *flags)
{
	__u64 skipped;

	if (!flags || (*flags & LISTENER_SHORT_MASK) < SHORT_STREAK * LISTENER_SHORT_ONE)
		return 0;
	skipped = __sync_fetch_and_add(flags, LISTENER_SKIP_ONE) / LISTENER_SKIP_ONE;
	return skipped % SHORT_PROBE_EVERY != SHORT_PROBE_EVERY - 1;
}

/*
 * report_to_listener: an end of a pair closes and tells the server's
 * listener whether its side of the connection was short-lived (at most
 * SHORT_CONN_MSGS messages and SHORT_CONN_BYTES sent). The server's report
 * counts a short connection; either end's long side resets the count, so a
 * connection is short only when neither end sent much (an upload of many
 * bytes answered once is long).
 */
static __always_inline void report_to_listener(const struct sock_state *state, int server)
{
	int is_short = state->msgs_sent <= SHORT_CONN_MSGS && state->redirected_sent < SHORT_CONN_BYTES;
	__u64 *flags;

	if (!server && is_short)
		return; /* the server's report counts it */
	if (server)
		flags = listener_flags(state->key.local_ip, state->key.local_port, state->netns_cookie);
	else
		flags = listener_flags(state->key.remote_ip, state->key.remote_port, state->peer_netns_cookie);
	if (!flags)
		return;
	if (is_short) {
		if ((*flags & LISTENER_SHORT_MASK) < SHORT_STREAK_MAX * LISTENER_SHORT_ONE)
			__sync_fetch_and_add(flags, LISTENER_SHORT_ONE);
	} else if (*flags & LISTENER_SHORT_MASK) {
		__sync_fetch_and_and(flags, ~LISTENER_SHORT_MASK);
	}
}

/*
 * join inserts the socket into the sockhash under key: a redirect target
 * from then on. Returns 0, or -1 when the sockhash refused it.
 */
static __noinline int join(struct bpf_sock_ops *skops, struct sock_state *state, const struct sock_key *key,
			   const struct pairing *p, struct cgroup_counters *c)
{
	__u64 own_netns = p->own_netns;

	if (bpf_sock_hash_update(skops, &sockhash, (void *)key, BPF_NOEXIST) != 0) {
		COUNT(c, insert_failures);
		return -1;
	}
	state->key = *key;
	state->netns_cookie = own_netns;
	state->peer_netns_cookie = p->peer_netns;
	state->peer_key = p->peer;
	if (p->explicit_peer) {
		state->app_endpoint = p->app_endpoint;
		state->flags |= SOCK_FLAG_EXPLICIT_PEER;
	}
	state->redirected_sent = 0;
	state->peer_read_seen = 0;
	state->peer_sk = 0;
	state->peer_cookie = 0;
	state->peer_state = 0;
	state->peer_file = 0;
	state->peer_file_at = 0;
	state->own_blocking_at = 0;
	state->flags |= SOCK_FLAG_INSERTED;
	COUNT(c, sockets_inserted);

	/* Remember the socket's cgroup for per-cgroup live counts, and ask
	 * for a callback when it closes to forget it again, and for each
	 * packet it sends or receives through the stack (see "Leaving"). */
	__u64 cookie = bpf_get_socket_cookie(skops);
	bpf_map_update_elem(&socket_cgroups, &cookie, &state->cgroup_id, BPF_ANY);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG | WATCH_CB_FLAGS);
	return 0;
}

/* unwatch stops the per-packet callbacks of a socket that left. */
static __always_inline void unwatch(struct bpf_sock_ops *skops)
{
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~WATCH_CB_FLAGS);
}

/* leave undoes join: for a socket whose pair did not form (nothing was
 * redirected to it, so nothing is discarded), and for a member of a
 * dissolving pair once settle found it safe (see "Leaving"). Returns 0 when
 * it removed the socket from the sockhash (not when the peer already had). */
static __noinline int leave(struct bpf_sock_ops *skops, struct sock_state *state, const struct sock_key *key)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	int err = bpf_map_delete_elem(&sockhash, (void *)key);

	bpf_map_delete_elem(&socket_cgroups, &cookie);
	state->flags &= ~(SOCK_FLAG_INSERTED | SOCK_FLAG_EXPLICIT_PEER | SOCK_FLAG_PAIRED);
	unwatch(skops);
	return err;
}

/* dry_run reports whether cfg's cgroup is account-only: its sockets run
 * the pair handshake as a dry run and never join. */
static __always_inline int dry_run(const struct cgroup_config *cfg)
{
	return cfg && (cfg->flags & CGROUP_ACCOUNT_ONLY);
}

/*
 * classify_peer records whether the socket's peer is local, for the
 * cgroup's egress accounting: the stack bytes of a socket with a local
 * peer are what acceleration could have taken off the stack.
 */
static __noinline void classify_peer(struct bpf_sock_ops *skops)
{
	struct sock_state *state;
	struct sock_key key = {};

	if (!skops->sk)
		return;
	state = bpf_sk_storage_get(&sock_state, skops->sk, 0, 0);
	/* Once, by the program that handled the socket (the innermost
	 * enabled cgroup's). */
	if (!state || state->cgroup_id != enabled_cgroup_id ||
	    (state->flags & (SOCK_FLAG_LOCAL_PEER | SOCK_FLAG_REMOTE_PEER)))
		return;
	if (own_key(skops, &key) < 0)
		return;
	if (peer_local(&key))
		state->flags |= SOCK_FLAG_LOCAL_PEER;
	else
		state->flags |= SOCK_FLAG_REMOTE_PEER;
}

/*
 * prepare runs the checks both ends share at ESTABLISHED and returns the
 * socket's state, or NULL when the socket stays plain TCP.
 */
static __noinline struct sock_state *prepare(struct bpf_sock_ops *skops, int passive, struct cgroup_config **cfg,
						   struct cgroup_counters **c)
{
	struct sock_state *state;

	if (!skops->sk)
		return 0;
	state = bpf_sk_storage_get(&sock_state, skops->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state)
		return 0; /* fail open: the socket stays on the stack path */
	/* Nested enabled cgroups: the innermost program runs first and wins. */
	if (state->flags & SOCK_FLAG_HANDLED)
		return 0;
	state->flags |= SOCK_FLAG_HANDLED;
	/* Storage created before ESTABLISHED (by connect)
	 * holds only what those recorded; accepted sockets do not clone
	 * their listener's (its options are in `listeners`). Clear any
	 * identity all the same. */
	state->flags &= ~(SOCK_FLAG_INSERTED | SOCK_FLAG_REDIRECTING | SOCK_FLAG_EXPLICIT_PEER |
			  SOCK_FLAG_PAIRED | SOCK_FLAG_PAIR_CLIENT | SOCK_FLAG_LISTENER | SOCK_FLAG_LATE_OPTION |
			  SOCK_FLAG_LOCAL_PEER | SOCK_FLAG_REMOTE_PEER | SOCK_FLAG_PASSED |
			  SOCK_FLAG_WOULD_PAIR | SOCK_FLAG_ACCEPTED | SOCK_FLAG_LEAVING | SOCK_FLAG_PEER_REMOVED |
			  SOCK_FLAG_PROBATION | SOCK_FLAG_PROBATION_CHILD | SOCK_FLAG_SPLICED);
	state->msgs_sent = 0;
	if (passive)
		state->flags &= ~(SOCK_FLAG_MESH_APP | SOCK_FLAG_SYN_REDIRECTED | SOCK_FLAG_INTERCEPTED |
				  SOCK_FLAG_ORIG_DST | SOCK_FLAG_ENDPOINT_COUNTED);
	state->cgroup_id = enabled_cgroup_id;
	state->slot = cgroup_slot;

	*c = counters_for(cgroup_slot);
	*cfg = config_for(cgroup_slot);
	/* Account-only (dry_run): counted (TC finds the cgroup in
	 * sock_state), never accelerated; the caller runs the pair
	 * handshake as a dry run. Data that moved before ESTABLISHED (TCP
	 * Fast Open) sits in the stack's queues: leave the socket out. */
	if (skops->data_segs_in != 0 || skops->data_segs_out != 0) {
		if (!dry_run(*cfg))
			COUNT(*c, sockets_skipped);
		return 0;
	}
	return state;
}

/*
 * offer_pair runs on the server side when a SYN reaches a listener of an
 * enabled cgroup (sock_ops RWND_INIT on the request socket, before the
 * SYN-ACK leaves): it tells the client, which decides at ACTIVE_ESTABLISHED,
 * that this end will decide at PASSIVE_ESTABLISHED.
 */
static __noinline void offer_pair(struct bpf_sock_ops *skops)
{
	struct cgroup_config *cfg;
	struct pairing p = {};
	struct sock_key key = {};
	struct pair offer = {.state = PAIR_OFFERED};
	struct offer_epoch *epoch;
	__u32 zero, index;
	__u64 own_netns, *lflags, *hint;

	cfg = config_for(cgroup_slot);
	if (cfg && (cfg->flags & CGROUP_ACCOUNT_ONLY))
		offer.state = PAIR_DRY_OFFERED; /* account-only: a dry run */
	if (own_key(skops, &key) < 0)
		return;
	if (stack_port(cfg, key.local_port))
		return;
	own_netns = bpf_get_netns_cookie(skops);
	p.own_netns = own_netns;
	if (passive_pairing(cfg, &key, &p, 0))
		set_mirror(&p, &key, own_netns);
	if (p.scope == SCOPE_REMOTE)
		return;
	lflags = listener_flags(key.local_ip, key.local_port, own_netns);
	if (!listener_may_pair(lflags))
		return;
	if (!(cfg && (cfg->flags & CGROUP_ALL_CONNECTIONS)) && short_lived(lflags)) {
		struct cgroup_counters *c = counters_for(cgroup_slot);

		COUNT(c, connections_short_lived);
		return;
	}
	offer.offered_ns = bpf_ktime_get_ns();
	zero = 0;
	epoch = bpf_map_lookup_elem(&offer_epoch, &zero);
	index = offer_hint_index(offer_hint_slot(&p.peer), epoch ? epoch->current : 0);
	hint = bpf_map_lookup_elem(&offer_hints, &index);
	if (hint)
		offer.hint_index = index + 1;
	if (bpf_map_update_elem(&pairs, &p.peer, &offer, BPF_ANY)) {
		struct cgroup_counters *c = counters_for(cgroup_slot);

		COUNT(c, pairs_full);
		return;
	}
	/* Before the SYN-ACK leaves, so before either end can look (see
	 * "Offer hints" in sockbypass.h). */
	if (hint)
		__sync_fetch_and_add(hint, 1);
}

/* consume_offer_hint: the server found its offer at PASSIVE_ESTABLISHED;
 * the offer's count goes back, once (see "Offer hints" in sockbypass.h). */
static __always_inline void consume_offer_hint(struct pair *pair)
{
	__u64 v = pair->hint_index, *hint;
	__u32 index;

	if (!v || __sync_val_compare_and_swap(&pair->hint_index, v, 0) != v)
		return;
	index = (__u32)(v - 1);
	hint = bpf_map_lookup_elem(&offer_hints, &index);
	/* Zeroed by an epoch change since (a handshake older than any
	 * lasts): never below 0. */
	if (hint && __sync_fetch_and_add(hint, -1) == 0)
		__sync_fetch_and_add(hint, 1);
}

/*
 * dry_active: the client's half of the pair handshake of an account-only
 * socket, which never joins: the checks of join_active that come after
 * the scope, and the dry states in `pairs`.
 */
static __noinline void dry_active(struct bpf_sock_ops *skops, struct sock_state *state, const struct cgroup_config *cfg,
				  const struct sock_key *key)
{
	struct pair *pair;

	if (stack_port(cfg, key->remote_port) || reader_option(skops->sk) >= 0 || sock_nonblocking(skops->sk) != 1)
		return;
	pair = bpf_map_lookup_elem(&pairs, key);
	if (!pair || __sync_val_compare_and_swap(&pair->state, PAIR_DRY_OFFERED, PAIR_DRY_CLIENT) != PAIR_DRY_OFFERED)
		return;
	pair->client_snd_nxt = skops->snd_nxt;
	pair->client_rcv_nxt = skops->rcv_nxt;
	state->key = *key;
	state->flags |= SOCK_FLAG_PAIR_CLIENT | SOCK_FLAG_WOULD_PAIR;
	/* forget_socket removes the pair when the socket closes. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* dry_passive: the server's half of the dry run, at PASSIVE_ESTABLISHED,
 * after the checks of join_passive up to the pair lookup; eligible: its
 * listener is known non-blocking and it is no stack reader. */
static __noinline void dry_passive(struct bpf_sock_ops *skops, struct sock_state *state, const struct sock_key *peer,
				   int eligible, struct cgroup_counters *c)
{
	struct pair *pair = bpf_map_lookup_elem(&pairs, peer);

	if (!pair)
		return;
	consume_offer_hint(pair);
	if (pair->state == PAIR_DRY_OFFERED) {
		/* The client did not take the offer (it is in no enabled
		 * cgroup, blocks, or lists the port): it has passed its
		 * ACTIVE_ESTABLISHED, so nobody else will free the entry. */
		bpf_map_delete_elem(&pairs, (void *)peer);
		return;
	}
	if (pair->state != PAIR_DRY_CLIENT)
		return;
	if (pair->client_snd_nxt != skops->rcv_nxt || pair->client_rcv_nxt != skops->snd_nxt || !eligible) {
		__sync_val_compare_and_swap(&pair->state, PAIR_DRY_CLIENT, PAIR_DECLINED);
		return;
	}
	if (__sync_val_compare_and_swap(&pair->state, PAIR_DRY_CLIENT, PAIR_DRY_JOINED) != PAIR_DRY_CLIENT)
		return; /* the client sent first */
	state->flags |= SOCK_FLAG_WOULD_PAIR;
	COUNT(c, would_pairs);
}

/*
 * offered: for a socket with no storage, outside sidecar mode (so it pairs
 * with its mirror), whether its connection was offered a pair or a dry run:
 * the client looks its own key up in `pairs', the server its client's. A
 * socket that was not stays plain and gets no storage: connections to
 * short-lived listeners, or between an enabled cgroup and another one, cost
 * next to nothing. Counts it when not, as the full path would. Fills key
 * and p; the caller fills them again.
 */
static __noinline int offered(struct bpf_sock_ops *skops, struct sock_key *key, struct pairing *p, int passive)
{
	struct cgroup_counters *c;
	struct cgroup_config *cfg;
	__u16 server_port;

	cfg = config_for(cgroup_slot);
	if (cfg && cfg->mesh_mode != MESH_NONE)
		return 1; /* the sidecar pairings consume their records */
	if (own_key(skops, key) < 0)
		return 0;
	p->own_netns = bpf_get_netns_cookie(skops);
	set_mirror(p, key, p->own_netns);
	key->netns_cookie = p->scope == SCOPE_NODE ? 0 : p->own_netns;
	server_port = passive ? key->local_port : key->remote_port;
	if (p->scope != SCOPE_REMOTE && !stack_port(cfg, server_port) && may_be_offered(passive ? &p->peer : key)) {
		struct pair *pair = bpf_map_lookup_elem(&pairs, passive ? &p->peer : key);

		if (pair) {
			if (passive)
				consume_offer_hint(pair);
			return 1;
		}
	}
	c = counters_for(cgroup_slot);
	if (p->scope == SCOPE_REMOTE) {
		COUNT(c, sockets_remote);
		return 0;
	}
	if (p->scope == SCOPE_AMBIGUOUS)
		COUNT(c, sockets_ambiguous);
	if (stack_port(cfg, server_port)) {
		COUNT(c, sockets_stack_port);
	} else if (dry_run(cfg)) {
		/* account-only: nothing left plain to count */
	} else if (passive) {
		count_server_unpaired(c, listener_flags(key->local_ip, key->local_port, p->own_netns));
	} else if (sock_nonblocking(skops->sk) == 0) {
		COUNT(c, sockets_blocking); /* it would never have joined */
	} else {
		COUNT(c, sockets_unpaired);
	}
	return 0;
}

/* join_active: the client's half of the pair handshake, at ACTIVE_ESTABLISHED. */
static __noinline void join_active(struct bpf_sock_ops *skops)
{
	struct cgroup_counters *c = 0;
	struct cgroup_config *cfg = 0;
	struct sock_state *state;
	struct pairing p = {};
	struct sock_key key = {};
	struct pair *pair;
	__u64 own_netns;
	int reason;

	if (!skops->sk)
		return;
	/* key and p are filled again below. */
	if (!bpf_sk_storage_get(&sock_state, skops->sk, 0, 0) && !offered(skops, &key, &p, 0))
		return;
	state = prepare(skops, 0, &cfg, &c);
	if (!state || own_key(skops, &key) < 0)
		return;
	own_netns = bpf_get_netns_cookie(skops);
	p.own_netns = own_netns;
	switch (active_pairing(state, &key, &p, c)) {
	case -1:
		return;
	case 1:
		set_mirror(&p, &key, own_netns);
	}
	if (local_scope(&key, &p, c) < 0)
		return;
	if (dry_run(cfg)) {
		if (!p.explicit_peer) /* sidecar pairs: no dry run */
			dry_active(skops, state, cfg, &key);
		return;
	}

	pair = bpf_map_lookup_elem(&pairs, &key);
	if (stack_port(cfg, key.remote_port)) {
		if (pair)
			pair->state = PAIR_DECLINED;
		COUNT(c, sockets_stack_port);
		return;
	}
	if (state->flags & SOCK_FLAG_STACK_PROCESS) {
		if (pair)
			pair->state = PAIR_DECLINED;
		COUNT(c, sockets_stack_port);
		return;
	}
	/* Offered: the server's listener is in an enabled cgroup and will decide. */
	if (!pair || pair->state != PAIR_OFFERED) {
		COUNT(c, sockets_unpaired);
		return;
	}
	/* Its reader set an option only plain TCP serves (before connect:
	 * a ULP needs an established socket). */
	reason = reader_option(skops->sk);
	if (reason >= 0) {
		mark_stack_reader(state, cgroup_slot, reason);
		pair->state = PAIR_DECLINED;
		COUNT(c, sockets_unpaired);
		return;
	}

	if (sock_nonblocking(skops->sk) != 1) {
		pair->state = PAIR_DECLINED;
		COUNT(c, sockets_blocking);
		return;
	}
	if (join(skops, state, &key, &p, c) < 0) {
		pair->state = PAIR_DECLINED;
		return;
	}
	if (__sync_val_compare_and_swap(&pair->state, PAIR_OFFERED, PAIR_CLIENT_JOINED) != PAIR_OFFERED) {
		leave(skops, state, &key);
		COUNT(c, sockets_unpaired);
		return;
	}
	/* Before our ACK leaves, so before the server can look. */
	pair->client_snd_nxt = skops->snd_nxt;
	pair->client_rcv_nxt = skops->rcv_nxt;
	pair->client_sk = (__u64)(long)skops->sk;
	pair->client_cookie = bpf_get_socket_cookie(skops);
	pair->client_state = (__u64)(long)state;
	state->flags |= SOCK_FLAG_PAIR_CLIENT;
}

/* decline_client removes a client that joined from the sockhash: its pair
 * will not form, and nothing was redirected to it. */
static __noinline void decline_client(struct pair *pair, const struct sock_key *client)
{
	__u64 old = __sync_val_compare_and_swap(&pair->state, PAIR_CLIENT_JOINED, PAIR_DECLINED);

	if (old == PAIR_CLIENT_JOINED || old == PAIR_ABANDONED)
		bpf_map_delete_elem(&sockhash, (void *)client);
	bpf_map_delete_elem(&pairs, (void *)client);
}

/* probation marks an accepted socket whose listener is on probation (see
 * "Probation" in sockbypass.h): it stays plain, and its first read through
 * the stack tells the listener (stackread.c) how its sockets are read. */
static __always_inline void probation(struct sock_state *state, const struct sock_key *key, __u64 netns)
{
	state->key = *key;
	state->netns_cookie = netns;
	state->flags |= SOCK_FLAG_PROBATION | SOCK_FLAG_PROBATION_CHILD;
}

/* join_passive: the server's half of the pair handshake, at
 * PASSIVE_ESTABLISHED. Returns 1 when the socket joined its pair. */
static __noinline int join_passive(struct bpf_sock_ops *skops)
{
	struct cgroup_counters *c = 0;
	struct cgroup_config *cfg = 0;
	struct sock_state *state;
	struct pairing p = {};
	struct sock_key key = {};
	struct pair *pair;
	__u64 own_netns, *lflags;
	int reason;

	if (!skops->sk)
		return 0;
	/* key and p are filled again below. */
	if (!bpf_sk_storage_get(&sock_state, skops->sk, 0, 0) && !offered(skops, &key, &p, 1))
		return 0;
	state = prepare(skops, 1, &cfg, &c);
	if (!state || own_key(skops, &key) < 0)
		return 0;
	own_netns = bpf_get_netns_cookie(skops);
	p.own_netns = own_netns;
	if (passive_pairing(cfg, &key, &p, c))
		set_mirror(&p, &key, own_netns);
	if (local_scope(&key, &p, c) < 0)
		return 0;

	if (stack_port(cfg, key.local_port)) {
		COUNT(c, sockets_stack_port);
		return 0;
	}
	lflags = listener_flags(key.local_ip, key.local_port, own_netns);
	/* An accepted socket has its listener's options: one only plain TCP
	 * serves keeps this connection plain, and its listener's later ones
	 * (they are then offered no pair). */
	reason = reader_option(skops->sk);
	if (reason >= 0) {
		mark_stack_reader(state, cgroup_slot, reason);
		if (lflags && !(*lflags & LISTENER_STACK_READER))
			__sync_fetch_and_or(lflags, LISTENER_STACK_READER);
	}
	if (lflags && !(*lflags & (LISTENER_PROVEN | LISTENER_STACK_READER | LISTENER_BLOCKING_CHILDREN))) {
		if (cfg && (cfg->flags & CGROUP_NO_PROBATION))
			__sync_fetch_and_or(lflags, LISTENER_PROVEN);
		else
			probation(state, &key, own_netns);
	}
	if (dry_run(cfg)) {
		if (!p.explicit_peer) /* sidecar pairs: no dry run */
			dry_passive(skops, state, &p.peer, reason < 0 && listener_eligible(&key, own_netns), c);
		return 0;
	}
	pair = bpf_map_lookup_elem(&pairs, &p.peer);
	if (!pair) {
		count_server_unpaired(c, lflags);
		return 0;
	}
	consume_offer_hint(pair);
	if (pair->state != PAIR_CLIENT_JOINED) {
		/* The client is in no enabled cgroup, declined, or sent
		 * first (then it is still in the sockhash). */
		decline_client(pair, &p.peer);
		COUNT(c, sockets_unpaired);
		return 0;
	}
	if (pair->client_snd_nxt != skops->rcv_nxt || pair->client_rcv_nxt != skops->snd_nxt) {
		decline_client(pair, &p.peer);
		COUNT(c, pairs_mismatched);
		return 0;
	}
	if (reason >= 0) {
		decline_client(pair, &p.peer);
		COUNT(c, sockets_unpaired);
		return 0;
	}
	if (!listener_may_pair(lflags)) {
		decline_client(pair, &p.peer);
		count_not_offered(c, lflags);
		return 0;
	}
	if (state->flags & SOCK_FLAG_PROBATION) {
		decline_client(pair, &p.peer);
		COUNT(c, sockets_probation);
		return 0;
	}
	if (join(skops, state, &key, &p, c) < 0) {
		decline_client(pair, &p.peer);
		return 0;
	}
	/* Each end learns the other's socket (see peer_progress); ours
	 * before JOINED, which the client reads it after. */
	state->peer_sk = pair->client_sk;
	state->peer_cookie = pair->client_cookie;
	state->peer_state = pair->client_state;
	pair->server_sk = (__u64)(long)skops->sk;
	pair->server_cookie = bpf_get_socket_cookie(skops);
	pair->server_state = (__u64)(long)state;
	if (__sync_val_compare_and_swap(&pair->state, PAIR_CLIENT_JOINED, PAIR_JOINED) != PAIR_CLIENT_JOINED) {
		/* The client sent before we joined: its bytes are on their
		 * way through the stack. */
		leave(skops, state, &key);
		decline_client(pair, &p.peer);
		COUNT(c, sockets_unpaired);
		return 0;
	}
	state->flags |= SOCK_FLAG_PAIRED | SOCK_FLAG_ACCEPTED;
	return 1;
}

/*
 * mesh_accept: in intercept mode, the sidecar's socket accepted on its
 * outbound port takes over its app's original destination (recorded by
 * mesh_connect under the app's endpoint, its remote end) into its own
 * storage, where cgroup/getsockopt answers SO_ORIGINAL_DST from, for as long
 * as it lives; the shared map only ever holds handshakes in flight.
 */
static __noinline void mesh_accept(struct bpf_sock_ops *skops)
{
	struct cgroup_config *cfg;
	struct sock_state *state;
	struct endpoint_key ek = {};
	struct sock_key key = {};
	struct orig_dst *od;
	struct bpf_sock *sk;

	cfg = config_for(cgroup_slot);
	if (!cfg || cfg->mesh_mode != MESH_INTERCEPT)
		return;
	if (own_key(skops, &key) < 0 || key.local_port != cfg->outbound_port)
		return;
	ek.netns_cookie = bpf_get_netns_cookie(skops);
	__builtin_memcpy(ek.ip, key.remote_ip, sizeof(ek.ip));
	ek.port = key.remote_port;
	od = bpf_map_lookup_elem(&orig_dsts, &ek);
	if (!od) {
		/* An app bound to its pod's address registered a node-scope
		 * endpoint (see endpoint_of). */
		if (unique_owner(ek.ip) != ek.netns_cookie)
			return;
		ek.netns_cookie = 0;
		od = bpf_map_lookup_elem(&orig_dsts, &ek);
		if (!od)
			return;
	}
	sk = skops->sk;
	if (!sk)
		return;
	state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state)
		return; /* getsockopt still finds it in the map */
	__builtin_memcpy(state->orig_dst_ip, od->ip, sizeof(state->orig_dst_ip));
	state->orig_dst_port = od->port;
	state->orig_dst_family = od->family;
	state->flags |= SOCK_FLAG_ORIG_DST;
	forget_orig_dst(&ek);
}

/* add_listener counts a listening socket on ek (see listeners): a new
 * entry, or one more SO_REUSEPORT sibling, whose flags join the entry's: a
 * stack-reader sibling makes the group one, a blocking sibling makes it
 * blocking. Returns -1 when the map is full. */
static __always_inline int add_listener(const struct endpoint_key *ek, __u64 flags)
{
	__u64 v = flags | LISTENER_REF_ONE | ((__u64)(cgroup_slot + 1) << LISTENER_SLOT_SHIFT), *lf;

	lf = bpf_map_lookup_elem(&listeners, ek);
	if (!lf) {
		if (!bpf_map_update_elem(&listeners, ek, &v, BPF_NOEXIST))
			return 0;
		lf = bpf_map_lookup_elem(&listeners, ek); /* a sibling was first */
		if (!lf)
			return -1;
	}
	__sync_fetch_and_add(lf, LISTENER_REF_ONE);
	__sync_fetch_and_and(lf, ~(__u64)(LISTENER_UNSEEN | (flags & LISTENER_NONBLOCK ? 0 : LISTENER_NONBLOCK)));
	if (flags & LISTENER_STACK_READER)
		__sync_fetch_and_or(lf, LISTENER_STACK_READER);
	return 0;
}

/* record_listener: a socket of an enabled cgroup listens. Its accepted
 * sockets may join pairs only while it is known to be non-blocking. */
static __noinline void record_listener(struct bpf_sock_ops *skops)
{
	__u64 cgroup_id = enabled_cgroup_id;
	struct sock_state *state;
	struct endpoint_key ek = {};
	struct sock_key key = {};
	__u64 flags = 0;
	int reason;

	/* Account-only cgroups too: their dry pair handshake needs it. */
	if (!skops->sk)
		return;
	state = bpf_sk_storage_get(&sock_state, skops->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state || own_key(skops, &key) < 0)
		return;
	key.netns_cookie = bpf_get_netns_cookie(skops);
	listener_endpoint(&ek, key.netns_cookie, key.local_ip, key.local_port);
	if (sock_nonblocking(skops->sk) == 1)
		flags = LISTENER_NONBLOCK;
	/* Options set before listen() (after it: its first accepted socket
	 * has them, and teaches it at PASSIVE_ESTABLISHED). */
	reason = reader_option(skops->sk);
	if (reason >= 0) {
		mark_stack_reader(state, cgroup_slot, reason);
		flags |= LISTENER_STACK_READER;
	}
	/* listen() runs in its process's context: a listener on a stack port
	 * makes its process a stack process, and the other listeners of a
	 * stack process keep their connections plain. */
	{
		__u32 tgid = bpf_get_current_pid_tgid() >> 32;
		__u64 one = 1, *n;

		if (stack_port(config_for(cgroup_slot), key.local_port)) {
			n = bpf_map_lookup_elem(&stack_procs, &tgid);
			if (n)
				__sync_fetch_and_add(n, 1);
			else
				bpf_map_update_elem(&stack_procs, &tgid, &one, BPF_ANY);
			state->stack_tgid = tgid;
		} else if (bpf_map_lookup_elem(&stack_procs, &tgid)) {
			flags |= LISTENER_STACK_READER;
		}
	}
	if (!(state->flags & SOCK_FLAG_LISTENER) && add_listener(&ek, flags) < 0) {
		struct cgroup_counters *c = counters_for(cgroup_slot);

		COUNT(c, listeners_full);
		return;
	}
	state->key = key;
	state->cgroup_id = cgroup_id;
	state->slot = cgroup_slot;
	state->flags |= SOCK_FLAG_LISTENER;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* own_turned_blocking: the member's file is blocking. A server end whose
 * listener is known to make its accepted sockets non-blocking
 * (LISTENER_READ_NONBLOCK) is taken for blocking only when it still is
 * ACCEPT_GRACE_NS after settle first saw it so: a server that accept()s a
 * blocking socket and sets O_NONBLOCK right after (Python's asyncio,
 * redis) may get a packet in between. Without that evidence (a gunicorn
 * sync worker makes them blocking; --no-probation never learns) it is
 * taken at once: a blocking reader must leave as soon as possible. */
static __always_inline int own_turned_blocking(struct bpf_sock *sk, struct sock_state *state)
{
	__u64 now, *lf;

	if (!own_blocking(sk))
		return 0;
	if (!(state->flags & SOCK_FLAG_ACCEPTED))
		return 1;
	lf = listener_flags(state->key.local_ip, state->key.local_port, state->netns_cookie);
	if (!lf || !(*lf & LISTENER_READ_NONBLOCK))
		return 1;
	now = bpf_ktime_get_ns();
	if (!state->own_blocking_at) {
		state->own_blocking_at = now;
		return 0;
	}
	return now - state->own_blocking_at >= ACCEPT_GRACE_NS;
}

/* count_left counts a member that left the sockhash, in its cgroup's slot. */
static __always_inline void count_left(__u32 slot)
{
	struct cgroup_counters *c = counters_for(slot);

	if (c)
		__sync_fetch_and_add(&c->members_left, 1);
}

/*
 * settle runs steps 2 and 3 of "Leaving" (sockbypass.h) for a member, on
 * each packet it sends or receives through the stack: it removes its
 * leaving peer, then itself, each once the rules there allow it.
 */
static __noinline void settle(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *state;
	struct tcp_sock *tp;
	__u32 queued = 0, peer_queued = 0, peer_slot = 0;
	__u64 peer_flags;
	__s32 refs = 0, peer_refs = 0;
	int peer_psock, peer_in_map, peer_unsafe, peer_gone;
	__s64 cookie = 0;

	if (!skops->is_fullsock || !sk)
		return;
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state || !(state->flags & SOCK_FLAG_INSERTED)) {
		unwatch(skops);
		return;
	}
	/* A client learns its server's socket at its first message; one that
	 * has not sent yet learns it here. */
	if (!(state->flags & SOCK_FLAG_PAIRED)) {
		struct pair *pair = bpf_map_lookup_elem(&pairs, &state->key);

		if (!pair || pair->state != PAIR_JOINED)
			return;
		adopt_server(state, pair);
	}
	if (!state->peer_sk || !state->peer_state)
		return; /* the peer is not known (yet) */

	if (own_turned_blocking(sk, state)) {
		if (!(state->flags & SOCK_FLAG_LEAVING)) {
			struct cgroup_counters *c = counters_for(state->slot);

			__sync_fetch_and_or(&state->flags, SOCK_FLAG_LEAVING);
			if (c)
				__sync_fetch_and_add(&c->late_blocking, 1);
			emit_event(state, EVENT_LATE_BLOCKING, 0);
		}
		/* An accepted socket turned blocking: its listener's next
		 * connections stay plain. */
		if (state->flags & SOCK_FLAG_ACCEPTED) {
			__u64 *lflags = listener_flags(state->key.local_ip, state->key.local_port, state->netns_cookie);

			if (lflags && !(*lflags & LISTENER_BLOCKING_CHILDREN)) {
				__sync_fetch_and_or(lflags, LISTENER_BLOCKING_CHILDREN);
				emit_event(state, EVENT_LISTENER_BLOCKING_CHILDREN, 0);
			}
		}
	}

	/* A member that set a reader option (or attached a ULP) since it
	 * joined, seen on its stack packets before its own sk_msg saw it. */
	if (!(state->flags & SOCK_FLAG_LATE_OPTION)) {
		int reason = reader_option(sk);

		if (reason >= 0) {
			if (reason == REASON_ULP)
				learn_ulp(state, 0);
			mark_stack_reader(state, state->slot, reason);
		}
	}

	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return;
	if (read_psock(&((struct sock *)tp)->sk_user_data, &queued, &refs) < 0) {
		/* Our peer removed us (and counted it), our psock is gone. */
		leave(skops, state, &state->key);
		return;
	}
	/* What the peer is: read its flags and psock, then prove by its
	 * cookie that the address still holds it. */
	peer_flags = peer_state_flags(state);
	bpf_probe_read_kernel(&peer_slot, sizeof(peer_slot), &((struct sock_state *)state->peer_state)->slot);
	peer_psock = read_psock(&((struct sock *)state->peer_sk)->sk_user_data, &peer_queued, &peer_refs) == 0;
	peer_unsafe = (peer_flags & SOCK_FLAG_LEAVING) || peer_blocking(state) || peer_reader_option(state);
	asm volatile("" ::: "memory");
	peer_gone = bpf_probe_read_kernel(&cookie, sizeof(cookie), &((struct sock *)state->peer_sk)->__sk_common.skc_cookie.counter) ||
		    (__u64)cookie != state->peer_cookie || !peer_psock;
	peer_in_map = !peer_gone && !(state->flags & SOCK_FLAG_PEER_REMOVED) && (peer_flags & SOCK_FLAG_INSERTED);

	if (!peer_gone && !peer_unsafe && !(state->flags & (SOCK_FLAG_LEAVING | SOCK_FLAG_PEER_REMOVED)))
		return; /* a healthy pair: nothing to settle */
	if (peer_gone && !peer_unsafe && !(state->flags & (SOCK_FLAG_LEAVING | SOCK_FLAG_PEER_REMOVED))) {
		/* The peer left the sockhash because it closed (or shut its
		 * side down): it sends nothing more, so we stay a member until
		 * we close, as any pair does. */
		unsigned char peer_tcp_state = 0;

		bpf_probe_read_kernel(&peer_tcp_state, sizeof(peer_tcp_state), &((struct sock *)state->peer_sk)->__sk_common.skc_state);
		if ((__u64)cookie != state->peer_cookie ||
		    (peer_tcp_state != BPF_TCP_ESTABLISHED && peer_tcp_state != BPF_TCP_CLOSE_WAIT)) {
			unwatch(skops);
			return;
		}
	}

	/* Remove the leaving peer: we are the only socket that redirects to
	 * it, and we have no redirect into it under way. */
	if (peer_in_map && peer_unsafe && peer_queued == 0 &&
	    (refs == 1 || (refs == 2 && !(state->flags & SOCK_FLAG_REDIRECTING)))) {
		if (bpf_map_delete_elem(&sockhash, &state->peer_key) == 0)
			count_left(peer_slot);
		state->flags |= SOCK_FLAG_PEER_REMOVED;
		peer_in_map = 0;
	}

	/* Remove ourselves: nothing of ours unread, and the peer can start no
	 * redirect into us (gone, or one of us is leaving: its sk_msg passes)
	 * and has none under way (its psock holds the map's reference only). */
	if (queued != 0)
		return;
	if (!peer_gone && !(peer_in_map && peer_refs == 1))
		return;
	if (leave(skops, state, &state->key) == 0)
		count_left(state->slot);
}

static __noinline void forget_socket(struct bpf_sock_ops *skops)
{
	struct sock_state *state;

	if (!skops->sk)
		return;
	state = bpf_sk_storage_get(&sock_state, skops->sk, 0, 0);
	if (!state)
		return;
	if (state->flags & SOCK_FLAG_INSERTED) {
		__u64 cookie = bpf_get_socket_cookie(skops);

		bpf_map_delete_elem(&socket_cgroups, &cookie);
	}
	if (state->flags & SOCK_FLAG_ACCEPTED) {
		report_to_listener(state, 1);
		state->flags &= ~SOCK_FLAG_ACCEPTED;
	} else if ((state->flags & (SOCK_FLAG_PAIRED | SOCK_FLAG_EXPLICIT_PEER)) == SOCK_FLAG_PAIRED) {
		report_to_listener(state, 0);
		state->flags &= ~SOCK_FLAG_PAIRED;
	}
	if (state->flags & SOCK_FLAG_PAIR_CLIENT) {
		bpf_map_delete_elem(&pairs, &state->key);
		state->flags &= ~SOCK_FLAG_PAIR_CLIENT;
	}
	if (state->stack_tgid) {
		__u32 tgid = state->stack_tgid;
		__u64 *n = bpf_map_lookup_elem(&stack_procs, &tgid);

		state->stack_tgid = 0;
		if (n && __sync_fetch_and_add(n, -1) <= 1)
			bpf_map_delete_elem(&stack_procs, &tgid);
	}
	if (state->flags & SOCK_FLAG_LISTENER) {
		struct endpoint_key ek = {};

		__u64 *lf, old;

		listener_endpoint(&ek, state->key.netns_cookie, state->key.local_ip, state->key.local_port);
		state->flags &= ~SOCK_FLAG_LISTENER;
		lf = bpf_map_lookup_elem(&listeners, &ek);
		if (lf) {
			old = __sync_fetch_and_add(lf, -LISTENER_REF_ONE);
			/* The last sibling (or an entry user space made). */
			if ((old & LISTENER_REF_MASK) <= LISTENER_REF_ONE)
				bpf_map_delete_elem(&listeners, &ek);
		}
	}
	if (state->flags & SOCK_FLAG_MESH_APP) {
		struct endpoint_key ek = state->app_endpoint;
		__u64 *users;

		state->flags &= ~SOCK_FLAG_MESH_APP;
		users = (state->flags & SOCK_FLAG_ENDPOINT_COUNTED) ? bpf_map_lookup_elem(&mesh_endpoints, &ek) : 0;
		state->flags &= ~SOCK_FLAG_ENDPOINT_COUNTED;
		if (users && (__sync_fetch_and_add(users, -1) & ENDPOINT_COUNT_MASK) <= 1)
			bpf_map_delete_elem(&mesh_endpoints, &ek);
		forget_orig_dst(&ek);
		if (ek.netns_cookie == 0)
			bpf_map_delete_elem(&mesh_clients, &ek);
	}
}

/* Keeps struct fallback_event in the object's BTF for bpf2go (-type). */
const struct fallback_event *unused_fallback_event __attribute__((unused));

SEC("sockops")
int sockbypass_sockops(struct bpf_sock_ops *skops)
{
	int joined;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		stack_process_connect(skops);
		mesh_connect(skops);
		break;
	case BPF_SOCK_OPS_RWND_INIT:
		/* Also called for connecting (full) sockets: only a request
		 * socket is a SYN reaching one of our listeners. */
		if (!skops->is_fullsock)
			offer_pair(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		join_active(skops);
		classify_peer(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		joined = join_passive(skops);
		classify_peer(skops);
		mesh_accept(skops);
		/* An accepted socket inherits its listener's callbacks; one
		 * that did not join has nothing to forget at close. */
		if (!joined && (skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		record_listener(skops);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		settle(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			forget_socket(skops);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
