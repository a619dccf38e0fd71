// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * Sidecar mode (service mesh): the programs that let the app <-> sidecar hop
 * of a pod be accelerated.
 *
 * Redirect mode (an unmodified istio-init iptables REDIRECT): the app's
 * socket names the service address while the sidecar's accepted socket names
 * 127.0.0.1:15001, so their 4-tuples do not mirror. cgroup_skb/egress sees
 * the app's SYN after NAT: the exact tuple the sidecar's socket will have.
 * sock_ops pairs the two sockets through it (mesh_syns), so the pairing is
 * the kernel's own NAT decision, never a guess; an app endpoint shared by
 * several sockets is left unpaired.
 *
 * Intercept mode (no iptables): cgroup/connect4 sends the app's connects to
 * the sidecar's outbound port and remembers where they were going;
 * cgroup/getsockopt answers SO_ORIGINAL_DST for the sidecar as netfilter
 * would. The two loopback sockets then mirror each other and pair as usual.
 */
#include "sockbypass.h"

#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ENOENT 2

/* Set by the loader: the enabled cgroup this instance is attached to. */
volatile const __u64 enabled_cgroup_id = 0;
/* And its slot (see "Slots" in sockbypass.h). */
volatile const __u32 cgroup_slot = 0;
/* Set by the loader: how many handshakes in flight (orig_dsts entries) the
 * cgroup may hold before its connects are left alone. */
volatile const __u64 intercept_quota = 0;

static __always_inline int excluded(const struct cgroup_config *cfg, const __u32 *ip, __u16 port)
{
	for (int i = 0; i < MESH_MAX_EXCLUDE_PORTS; i++) {
		if (cfg->exclude_ports[i] == port && port != 0)
			return 1;
	}
	for (int i = 0; i < MESH_MAX_EXCLUDE_CIDRS; i++) {
		if (i >= cfg->n_exclude_cidrs)
			break;
		const struct cidr *c = &cfg->exclude_cidrs[i];
		int match = 1;
		for (int w = 0; w < 4; w++) {
			__u32 bits = c->prefix > (__u32)w * 32 ? c->prefix - w * 32 : 0;
			if (bits == 0)
				break;
			__u32 mask = bits >= 32 ? 0xffffffff : ~(0xffffffffU >> bits);
			if ((bpf_ntohl(ip[w]) & mask) != (bpf_ntohl(c->ip[w]) & mask)) {
				match = 0;
				break;
			}
		}
		if (match)
			return 1;
	}
	return 0;
}

/*
 * ns_kuid maps uid, as the user namespace that owns the socket's network
 * namespace sees it, to the kernel uid that bpf_get_current_uid_gid()
 * reports (the initial namespace's view), the way iptables' --uid-owner
 * reads its uid in the rule's network namespace: a sidecar running as 1337
 * in a pod with its own user namespace (uid_map "0 100000 65536") is kernel
 * uid 101337. Returns (u32)-1 when the namespace does not map uid, and uid
 * itself when the socket's namespace cannot be read.
 */
static __always_inline __u32 ns_kuid(struct bpf_sock *sk, __u32 uid)
{
	struct user_namespace *ns;
	struct tcp_sock *tp;
	struct net *net;
	__u32 n;

	if (!sk)
		return uid;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return uid;
	net = ((struct sock *)tp)->__sk_common.skc_net.net;
	if (!net)
		return uid;
	ns = net->user_ns;
	if (!ns)
		return uid;
	n = ns->uid_map.nr_extents;
	/* More than 5 extents live in a sorted array elsewhere: not read
	 * here (container runtimes write one). */
	if (n > 5)
		return uid;
	for (int i = 0; i < 5; i++) {
		if (i >= n)
			break;
		__u32 first = ns->uid_map.extent[i].first;
		__u32 count = ns->uid_map.extent[i].count;

		if (uid >= first && uid - first < count)
			return ns->uid_map.extent[i].lower_first + (uid - first);
	}
	return (__u32)-1;
}

/*
 * intercept decides whether a connect to ip:port (16-byte form, IPv4 as
 * ::ffff:a.b.c.d) goes to the sidecar instead, and if so remembers the
 * destination in the socket's state and returns the sidecar's outbound
 * port; 0 leaves the connect untouched (fail open).
 */
static __always_inline __u16 intercept(struct bpf_sock_addr *ctx, const __u32 *ip, __u16 port)
{
	struct cgroup_config *cfg;
	struct sock_state *state;
	struct cgroup_counters *c;
	__u32 slot = cgroup_slot;
	__u64 *in_flight;
	int mapped = is_v4mapped(ip);

	if (ctx->type != SOCK_STREAM || !ctx->sk)
		return 0;
	cfg = config_for(cgroup_slot);
	if (!cfg || cfg->mesh_mode != MESH_INTERCEPT || cfg->outbound_port == 0)
		return 0;
	/* The sidecar's own connects go where they asked: its uid is
	 * read in the user namespace of the pod's network namespace. */
	if ((__u32)bpf_get_current_uid_gid() == ns_kuid(ctx->sk, cfg->sidecar_uid))
		return 0;
	/* Loopback stays local, as istio-init's "-d 127.0.0.1/32 -j RETURN":
	 * 127.0.0.0/8 (also v4-mapped) and ::1. */
	if (mapped ? (bpf_ntohl(ip[3]) >> 24) == 127 :
		     (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1)))
		return 0;
	if (excluded(cfg, ip, port))
		return 0;
	/* Fail open: a cgroup with intercept_quota handshakes in flight has
	 * its next connects go where they asked, so it cannot fill orig_dsts
	 * for the other pods. */
	in_flight = bpf_map_lookup_elem(&intercepts, &slot);
	if (!in_flight || *in_flight >= intercept_quota) {
		c = counters_for(cgroup_slot);
		if (c)
			__sync_fetch_and_add(&c->intercepts_over_quota, 1);
		return 0;
	}

	state = bpf_sk_storage_get(&sock_state, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state)
		return 0;
	__builtin_memcpy(state->orig_dst_ip, ip, 16);
	state->orig_dst_port = port;
	state->orig_dst_family = mapped ? AF_INET : AF_INET6;
	state->flags |= SOCK_FLAG_INTERCEPTED;
	c = counters_for(cgroup_slot);
	if (c)
		__sync_fetch_and_add(&c->mesh_intercepted, 1);
	return cfg->outbound_port;
}

SEC("cgroup/connect4")
int sockbypass_connect4(struct bpf_sock_addr *ctx)
{
	__u32 ip[4];
	__u16 to;

	set_v4mapped(ip, ctx->user_ip4);
	to = intercept(ctx, ip, bpf_ntohs((__u16)ctx->user_port));
	if (to) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(to);
	}
	return 1;
}

SEC("cgroup/connect6")
int sockbypass_connect6(struct bpf_sock_addr *ctx)
{
	__u32 ip[4];
	__u16 to;

	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	to = intercept(ctx, ip, bpf_ntohs((__u16)ctx->user_port));
	if (!to)
		return 1;
	if (is_v4mapped(ip)) {
		ctx->user_ip6[3] = bpf_htonl(0x7f000001); /* ::ffff:127.0.0.1 */
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1); /* ::1 */
	}
	ctx->user_port = bpf_htons(to);
	return 1;
}

SEC("cgroup/getsockopt")
int sockbypass_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct endpoint_key ek = {};
	struct orig_dst *od, found = {};
	struct sock_state *state;
	struct cgroup_counters *c;
	__u8 *optval = ctx->optval, *end = ctx->optval_end;

	int v6 = ctx->level == SOL_IPV6;

	if ((ctx->level != SOL_IP && !v6) || ctx->optname != SO_ORIGINAL_DST)
		return 1;
	if (ctx->retval == 0 || !sk)
		return 1; /* netfilter answered (iptables mode): keep it */

	/* The sidecar's accepted socket took its app's destination over when
	 * the handshake completed (mesh_accept in sockops.c). */
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (state && (state->flags & SOCK_FLAG_ORIG_DST)) {
		__builtin_memcpy(found.ip, state->orig_dst_ip, sizeof(found.ip));
		found.port = state->orig_dst_port;
		found.family = state->orig_dst_family;
		od = &found;
		goto answer;
	}
	/* Else its remote end is the app's socket, whose handshake sock_ops
	 * did not see complete. */
	ek.netns_cookie = bpf_get_netns_cookie(ctx);
	if (sk->family == AF_INET) {
		set_v4mapped(ek.ip, sk->dst_ip4);
	} else if (sk->family == AF_INET6) {
		ek.ip[0] = sk->dst_ip6[0];
		ek.ip[1] = sk->dst_ip6[1];
		ek.ip[2] = sk->dst_ip6[2];
		ek.ip[3] = sk->dst_ip6[3];
	} else {
		return 1;
	}
	ek.port = bpf_ntohs(sk->dst_port);
	od = bpf_map_lookup_elem(&orig_dsts, &ek);
	if (!od) {
		/* An app bound to its pod's address (a unique node address
		 * owned by this namespace) registered a node-scope endpoint
		 * (netns 0, see endpoint_of in sockops.c). */
		struct node_addr_key nk = {};
		struct node_addr *na;

		__builtin_memcpy(nk.ip, ek.ip, sizeof(nk.ip));
		na = bpf_map_lookup_elem(&node_addrs, &nk);
		if (na && !(na->flags & NODE_ADDR_AMBIGUOUS) && na->netns_cookie == ek.netns_cookie) {
			ek.netns_cookie = 0;
			od = bpf_map_lookup_elem(&orig_dsts, &ek);
		}
	}
answer:
	if (!od || (od->family == AF_INET6) != v6)
		return 1;
	if (v6) {
		/* struct sockaddr_in6 */
		if (optval + 28 > end)
			return 1;
		optval[0] = AF_INET6;
		optval[1] = 0;
		optval[2] = od->port >> 8;
		optval[3] = od->port & 0xff;
		__builtin_memset(optval + 4, 0, 4);
		__builtin_memcpy(optval + 8, od->ip, 16);
		__builtin_memset(optval + 24, 0, 4);
		*(volatile __s32 *)&ctx->optlen = 28;
	} else {
		/* struct sockaddr_in */
		if (optval + 16 > end)
			return 1;
		optval[0] = AF_INET;
		optval[1] = 0;
		optval[2] = od->port >> 8;
		optval[3] = od->port & 0xff;
		__builtin_memcpy(optval + 4, &od->ip[3], 4);
		__builtin_memset(optval + 8, 0, 8);
		/* Two 32-bit stores: the context allows no wider access. */
		*(volatile __s32 *)&ctx->optlen = 16;
	}
	*(volatile __s32 *)&ctx->retval = 0;
	c = counters_for(cgroup_slot);
	if (c)
		__sync_fetch_and_add(&c->mesh_orig_dst_answers, 1);
	return 1;
}

SEC("cgroup_skb/egress")
int sockbypass_mesh_egress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct sock_state *state;
	struct cgroup_config *cfg;
	struct nat_tuple t = {};
	struct mesh_syn syn = {};
	__u8 tcph[14];
	__u32 saddr[4], daddr[4], ihl;
	__u16 sport, dport;

	if (!sk || (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6)))
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_TCP)
		return 1;
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state || !(state->flags & SOCK_FLAG_MESH_APP) ||
	    (state->flags & SOCK_FLAG_SYN_REDIRECTED))
		return 1;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 iph[20];
		__u32 s4, d4;

		if (bpf_skb_load_bytes(skb, 0, iph, sizeof(iph)) < 0 || iph[9] != IPPROTO_TCP)
			return 1;
		ihl = (iph[0] & 0x0f) * 4;
		__builtin_memcpy(&s4, iph + 12, 4);
		__builtin_memcpy(&d4, iph + 16, 4);
		set_v4mapped(saddr, s4);
		set_v4mapped(daddr, d4);
	} else {
		__u8 ip6h[40];

		/* Next header TCP directly; extension headers: not ours. */
		if (bpf_skb_load_bytes(skb, 0, ip6h, sizeof(ip6h)) < 0 || ip6h[6] != IPPROTO_TCP)
			return 1;
		ihl = 40;
		__builtin_memcpy(saddr, ip6h + 8, 16);
		__builtin_memcpy(daddr, ip6h + 24, 16);
	}
	if (bpf_skb_load_bytes(skb, ihl, tcph, sizeof(tcph)) < 0)
		return 1;
	/* A SYN without ACK: the app's connection request. */
	if (!(tcph[13] & 0x02) || (tcph[13] & 0x10))
		return 1;
	cfg = config_for(state->slot);
	if (!cfg || cfg->mesh_mode != MESH_REDIRECT)
		return 1;

	sport = ((__u16)tcph[0] << 8) | tcph[1];
	dport = ((__u16)tcph[2] << 8) | tcph[3];
	if (dport != cfg->outbound_port && dport != cfg->inbound_port)
		return 1;
	/* Sent to where the socket connected: not redirected. */
	if (same_ip(daddr, state->key.remote_ip) && dport == state->key.remote_port)
		return 1;

	__builtin_memcpy(state->nat_src_ip, saddr, sizeof(saddr));
	__builtin_memcpy(state->nat_dst_ip, daddr, sizeof(daddr));
	state->nat_src_port = sport;
	state->nat_dst_port = dport;
	state->flags |= SOCK_FLAG_SYN_REDIRECTED;

	t.netns_cookie = state->netns_cookie;
	__builtin_memcpy(t.src_ip, state->nat_src_ip, sizeof(t.src_ip));
	__builtin_memcpy(t.dst_ip, state->nat_dst_ip, sizeof(t.dst_ip));
	t.src_port = sport;
	t.dst_port = dport;
	syn.app_key = state->key;
	syn.app_cookie = bpf_get_socket_cookie(skb);
	bpf_map_update_elem(&mesh_syns, &t, &syn, BPF_ANY);
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
