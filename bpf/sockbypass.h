/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Definitions shared by every sockbypass BPF program: the sockhash key, the
 * per-socket state, the per-cgroup counters and the maps that hold them.
 *
 * Every program declares the same maps; the Go loader creates them once and
 * hands the same map to each program (MapReplacements), so a change here must
 * be mirrored by the Go types that read the maps (internal/dataplane:
 * TestGoMirrorsMatchTheCStructs compares each with this file's BTF, field by
 * field), and a change of any shared map's layout needs a new LayoutVersion
 * (TestLayoutVersionFollowsTheMaps fails until it has one).
 */
#ifndef __SOCKBYPASS_H
#define __SOCKBYPASS_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

/*
 * struct sock_key identifies one TCP socket on the host.
 *
 * Byte order: addresses in network byte order, ports in host byte order.
 * IPv4 addresses (and the IPv4-mapped addresses of dual-stack IPv6 sockets)
 * are stored as IPv4-mapped IPv6 (::ffff:a.b.c.d) with family AF_INET, so a
 * dual-stack client and an IPv4 server pair up. The network namespace
 * cookie makes identical 4-tuples in two namespaces distinct keys: without it
 * two pods that both use 127.0.0.1:8080 would receive each other's bytes.
 */
struct sock_key {
	__u64 netns_cookie;
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u16 local_port;
	__u16 remote_port;
	__u16 family;
	__u16 pad;
};

/*
 * How bytes may travel between two sockets without a reader ever seeing them
 * out of order or with other semantics than plain TCP (see "Pairs" below):
 *
 * - Both ends of a connection join the sockhash at ESTABLISHED, before any
 *   byte moved, or neither does; an end whose reader needs plain-TCP
 *   semantics the redirected queue does not keep (a blocking socket, or
 *   SO_RCVLOWAT, TCP_INQ or SO_OOBINLINE set, read from the socket: see
 *   stack_reader.h) keeps its connection out.
 * - A joined pair redirects every message from the first byte. A sender
 *   that had to pass a message to the stack (back-pressure, or its peer is
 *   gone) redirects again only once the peer has read every byte it sent
 *   through the stack (the peer's copied_seq equals the sender's
 *   write_seq, read from the peer socket: peer_progress): the peer reads
 *   its redirected queue before its stack receive queue, so moving from
 *   the stack to redirect is safe only then; moving back is always safe.
 */

/* An app socket's local endpoint in its network namespace. */
struct endpoint_key {
	__u64 netns_cookie;
	__u32 ip[4];
	__u16 port;
	__u16 pad;
	__u32 pad2;
};

/* Per-socket state, in socket local storage (not cloned to accepted
 * sockets: a listener's options are in `listeners'). */
struct sock_state {
	/* cgroup id of the enabled cgroup whose program handled the socket. */
	__u64 cgroup_id;
	/* The socket's own sockhash key, once inserted. */
	struct sock_key key;
	/* Cookie of the socket's network namespace, and of the namespace its
	 * peer must be in (the owner of the remote address at ESTABLISHED,
	 * for node-scope keys; the socket's own namespace otherwise). */
	__u64 netns_cookie;
	__u64 peer_netns_cookie;
	/* The peer's sockhash key, set when the socket joins: the mirror of
	 * our own key, or with SOCK_FLAG_EXPLICIT_PEER the sidecar's
	 * accepted socket or the app's socket. sk_msg redirects to it. */
	struct sock_key peer_key;
	/* With SOCK_FLAG_EXPLICIT_PEER: the app side's endpoint; the pair
	 * redirects only while no other app socket shares it. */
	struct endpoint_key app_endpoint;
	/* Sidecar mode: the destination the app asked for (intercept mode),
	 * and the tuple its SYN left with after NAT (redirect mode). */
	__u32 orig_dst_ip[4];
	__u16 orig_dst_port;
	__u16 nat_src_port;
	__u16 nat_dst_port;
	__u16 orig_dst_family;
	__u32 nat_src_ip[4];
	__u32 nat_dst_ip[4];
	/* Messages (sk_msg runs) this member sent, redirected or not: at
	 * close, each end tells the server's listener whether its connection
	 * was short-lived (see "Short-lived listeners"). */
	__u32 msgs_sent;
	/* The slot of cgroup_id in cgroup_counters and cgroup_config (see
	 * "Slots"). */
	__u32 slot;
	/* Bytes this socket redirected to its peer. */
	__u64 redirected_sent;
	/* Of those, what the peer had read when this sender last looked
	 * (back-pressure is checked against it first, see peer_progress). */
	__u64 peer_read_seen;
	/* The peer socket (its struct sock's address) and its cookie,
	 * exchanged through `pairs' when the pair joins: the sender reads the
	 * peer's progress from it (peer_progress). The cookie proves the
	 * address still holds that socket (cookies are never reused). */
	__u64 peer_sk;
	__u64 peer_cookie;
	/* The peer's sock_state (its address, exchanged through `pairs' like
	 * peer_sk), and the peer's struct file once it has one (a server end
	 * gets its file at accept()): the sender reads from them whether the
	 * peer is leaving (see "Leaving"). */
	__u64 peer_state;
	__u64 peer_file;
	/* When this end first found the peer's file (bpf_ktime_get_ns): a
	 * server that accept()s without SOCK_NONBLOCK and sets O_NONBLOCK
	 * right after (redis, Python's asyncio) is blocking for a moment;
	 * see ACCEPT_GRACE_NS. */
	__u64 peer_file_at;
	/* When settle first found this server end's own file blocking: it
	 * turned blocking only if it still is ACCEPT_GRACE_NS later (the same
	 * moment between accept() and O_NONBLOCK as peer_file_at). */
	__u64 own_blocking_at;
	/* A listener on a stack port: its process (a key of stack_procs). */
	__u32 stack_tgid;
	__u32 pad;
	/* SOCK_FLAG_* (64 bits: BPF's atomic or has no 32-bit form before
	 * cpu v3, and leaving sets its flag with a full barrier). */
	__u64 flags;
};

/* sock_state.flags */
/* A sock_ops program has decided about the socket (inserted or not). */
#define SOCK_FLAG_HANDLED (1U << 0)
/* The socket is in the sockhash (key is valid). */
#define SOCK_FLAG_INSERTED (1U << 1)
/* The socket's last message was redirected (for redirect_failures). */
#define SOCK_FLAG_REDIRECTING (1U << 2)
/* The socket's reader needs plain-TCP semantics the redirected queue does
 * not keep: it never becomes a redirect target. */
#define SOCK_FLAG_STACK_READER (1U << 3)
/* Bit 4 is unused (it marked the read-progress entries of an earlier
 * layout). */
/* The socket pairs with state->peer_key, never with its mirror. */
#define SOCK_FLAG_EXPLICIT_PEER (1U << 5)
/* Sidecar mode: connect() was sent to the sidecar (orig_dst is set). */
#define SOCK_FLAG_INTERCEPTED (1U << 6)
/* Sidecar mode: the SYN left NAT-redirected (nat_* is set). */
#define SOCK_FLAG_SYN_REDIRECTED (1U << 7)
/* Sidecar mode: an app socket (its connect was seen by sock_ops). */
#define SOCK_FLAG_MESH_APP (1U << 8)
/* Sidecar mode: the app endpoint is shared by several sockets. */
#define SOCK_FLAG_AMBIGUOUS (1U << 9)
/* Both ends of the connection are in the sockhash (the pair is joined):
 * every message is redirected from the first byte. */
#define SOCK_FLAG_PAIRED (1U << 10)
/* The active end of a pair: its key names the pair in `pairs`. */
#define SOCK_FLAG_PAIR_CLIENT (1U << 11)
/* A listening socket recorded in `listeners`. */
#define SOCK_FLAG_LISTENER (1U << 12)
/* A member asked for a stack-reader option after it joined (counted once). */
#define SOCK_FLAG_LATE_OPTION (1U << 13)
/* Decided at ESTABLISHED: the peer is local (loopback, the socket's own
 * address, or a node address), so the stack bytes the socket sends are
 * what acceleration could have taken off the stack (stack_egress_*). */
#define SOCK_FLAG_LOCAL_PEER (1U << 14)
/* Decided at ESTABLISHED: the peer cannot be local; its egress is not
 * counted. */
#define SOCK_FLAG_REMOTE_PEER (1U << 15)
/* A member has passed a message to the stack since it joined (back-pressure,
 * or its peer was gone): from then on each message checks that the peer has
 * read every stack byte first. Until then, the per-message path needs no
 * lookup but the redirect itself (see sk_msg). */
#define SOCK_FLAG_PASSED (1U << 16)
/* Intercept mode, the sidecar's accepted socket: orig_dst_* hold where the
 * app's connect was going (moved here from orig_dsts when the handshake
 * completed), for SO_ORIGINAL_DST. */
#define SOCK_FLAG_ORIG_DST (1U << 17)
/* Sidecar mode: the app socket is counted in mesh_endpoints (its close
 * uncounts it). */
#define SOCK_FLAG_ENDPOINT_COUNTED (1U << 18)
/* Account-only (dry run): the socket would be a member if its cgroup were
 * accelerated (the server once its dry pair joined; the client from its
 * dry join, confirmed by its pair's PAIR_DRY_JOINED). TC counts its bytes
 * as would_redirect_bytes. */
#define SOCK_FLAG_WOULD_PAIR (1U << 19)
/* Joined a pair as the server (accepted) end: at close it reports to its
 * listener whether the connection was short-lived. */
#define SOCK_FLAG_ACCEPTED (1U << 20)
/* A member that stopped being safe as a redirect target (it turned
 * blocking, or asked for a stack-reader option or a ULP after it joined):
 * its peer stops redirecting to it and it leaves the sockhash once its
 * redirected queue is read (see "Leaving"). */
#define SOCK_FLAG_LEAVING (1U << 21)
/* This member removed its peer from the sockhash (see "Leaving"). */
#define SOCK_FLAG_PEER_REMOVED (1U << 22)
/* Made by a stack process (see stack_procs): never joins. */
#define SOCK_FLAG_STACK_PROCESS (1U << 23)
/* Accepted while its listener was on probation (see "Probation"): plain
 * TCP; its first read through the stack tells the listener how its
 * accepted sockets are read. key and netns_cookie name the listener. */
#define SOCK_FLAG_PROBATION (1U << 24)
/* A splice (or another reader that is not recvmsg) read the socket's stack
 * queue: acted on once (see "Probation"). */
#define SOCK_FLAG_SPLICED (1U << 25)
/* Accepted while its listener was on probation, and still so after its
 * probation ended: key and netns_cookie name the listener, which a later
 * splice or TCP_ULP teaches. */
#define SOCK_FLAG_PROBATION_CHILD (1U << 26)

/*
 * Back-pressure: the redirected queue is charged to the kernel's global TCP
 * memory, not to the reader's receive buffer, so a reader that stops
 * reading would let its peer queue without bound. A sender stops
 * redirecting when this many redirected bytes are unread, and its next
 * bytes take the stack, where TCP flow control blocks it as it would
 * without sockbypass; it redirects again once the reader has read every
 * byte (stack bytes included). The sender reads the peer's progress from
 * the peer socket itself (peer_progress): the unread redirected bytes are
 * its psock's msg_tot_len (what FIONREAD reports), the stack bytes it has
 * read its copied_seq. This is the one path that puts stack bytes
 * on a member, and then FIONREAD (which counts the redirected queue only)
 * undercounts until the reader has caught up: so the limit is far above
 * what plain TCP holds in flight (tcp_rmem plus tcp_wmem maxima, about
 * 10 MiB by default), and a live reader (nginx taking a 16 MiB POST, a
 * 32 MiB stream sent before the first read) never reaches it. Measured:
 * 8 MiB hung nginx reverse-proxy POSTs of 16 MiB.
 */
#define REDIRECT_UNREAD_LIMIT (64ULL << 20)

/*
 * Node addresses, written by user space: every non-loopback, non-link-local
 * address of the network namespaces of processes in enabled cgroups (and
 * declared ones), with the namespace that owns it. A connection between
 * two addresses that are each owned by exactly one namespace gets a
 * node-scope key (netns_cookie 0), so its two sockets pair across
 * namespaces (pod to pod on one node). An address seen in more than one
 * namespace is NODE_ADDR_AMBIGUOUS: never paired across namespaces.
 */
#define NODE_ADDR_AMBIGUOUS (1U << 0)

struct node_addr_key {
	__u32 ip[4]; /* network byte order; IPv4 as ::ffff:a.b.c.d */
};

struct node_addr {
	__u64 netns_cookie;
	__u32 flags;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct node_addr_key);
	__type(value, struct node_addr);
} node_addrs SEC(".maps");

/* Minimal view of the kernel's struct tcp_sock; field offsets are
 * relocated against the running kernel's BTF (CO-RE). */
struct tcp_sock {
	__u32 copied_seq;
	__u32 write_seq;
} __attribute__((preserve_access_index));

/*
 * Counters per enabled cgroup (by its slot, see "Slots"), per CPU.
 */
struct cgroup_counters {
	/* Sockets added to the sockhash at ESTABLISHED. */
	__u64 sockets_inserted;
	/* Sockets that could not be added (sockhash full or update refused). */
	__u64 insert_failures;
	/* Sockets left out because data had moved before ESTABLISHED (TFO). */
	__u64 sockets_skipped;
	/* Messages (sendmsg chunks) redirected to the local peer, and bytes. */
	__u64 redirected_msgs;
	__u64 redirected_bytes;
	/* Messages passed to the TCP stack, and bytes (all reasons). */
	__u64 passed_msgs;
	__u64 passed_bytes;
	/* Messages of a redirecting socket whose peer was gone: passed on. */
	__u64 redirect_failures;
	/* TCP packets with payload, and their payload bytes, that the
	 * cgroup's sockets sent through the stack to a local peer, on
	 * whatever device they left by: in an accelerated cgroup, counted
	 * once per socket when it is closed, from its own counters, by the
	 * cgroup's cgroup/sock_release program (user space adds the live
	 * sockets' when it shows figures); in an account-only cgroup, per
	 * packet by its cgroup_skb/egress program. Packets without payload
	 * (handshakes, ACKs, FINs) are not counted, nor retransmissions at
	 * close (the egress program sees those as packets like any other). */
	__u64 stack_egress_packets;
	__u64 stack_egress_bytes;
	/* Of passed_msgs: the peer had earlier stack bytes of ours unread. */
	__u64 passed_unread_msgs;
	/* Sockets whose reader fell back to the stack, by reason. */
	__u64 fallback_rcvlowat;
	__u64 fallback_tcp_inq;
	__u64 fallback_oobinline;
	/* Reads with MSG_WAITALL and MSG_OOB: no longer counted (reads are
	 * not traced since layout 5), kept for the layout and stats --json. */
	__u64 fallback_waitall;
	__u64 fallback_oob_read;
	/* Sockets left out because their peer cannot be local (the remote
	 * address is neither loopback nor the socket's own address nor a
	 * unique node address): they would only pay sk_msg's cost. */
	__u64 sockets_remote;
	/* Of redirected_*: to a peer in another network namespace. */
	__u64 redirected_xns_msgs;
	__u64 redirected_xns_bytes;
	/* Sockets whose addresses are node addresses but ambiguous (seen in
	 * several namespaces): kept namespace-local, never paired across. */
	__u64 sockets_ambiguous;
	/* Sidecar mode: app connects intercepted (sent to the sidecar). */
	__u64 mesh_intercepted;
	/* Sidecar mode: SO_ORIGINAL_DST answered for the sidecar. */
	__u64 mesh_orig_dst_answers;
	/* Sidecar mode: app <-> sidecar connections paired, connections
	 * reaching a sidecar port left unpaired, and connections left
	 * unpaired because their app endpoint was not unique. */
	__u64 mesh_paired;
	__u64 mesh_unpaired;
	__u64 mesh_ambiguous;
	/* Of passed_msgs: the peer had REDIRECT_UNREAD_LIMIT redirected bytes
	 * unread (back-pressure through the stack). */
	__u64 passed_backpressure_msgs;
	/* Sockets left plain because their peer does not join: it is in no
	 * enabled cgroup, or declined. */
	__u64 sockets_unpaired;
	/* Sockets left plain because they (or their listener) block: a
	 * blocking recv on a sockhash member may return EAGAIN. */
	__u64 sockets_blocking;
	/* Pairs given up because the client sent before its server joined. */
	__u64 pairs_abandoned;
	/* Pairs refused because the two ends' sequence numbers do not
	 * cross-match: not one connection. */
	__u64 pairs_mismatched;
	/* Connections left plain because their server port is a stack port. */
	__u64 sockets_stack_port;
	/* Members that asked for semantics the redirected queue does not keep
	 * after they joined (SO_RCVLOWAT, TCP_INQ, SO_OOBINLINE): they leave
	 * the sockhash (see "Leaving"). */
	__u64 late_stack_options;
	/* TCP packets and payload bytes seen leaving the interfaces with TC
	 * accounting (--tc-dev), local or not: the device view. */
	__u64 tc_egress_packets;
	__u64 tc_egress_bytes;
	/* Account-only (dry run): pairs that would have joined (counted at
	 * the server), and the TCP payload bytes their two ends sent
	 * through the stack (seen by TC on accounted interfaces): what
	 * acceleration would take off the stack. */
	__u64 would_pairs;
	__u64 would_redirect_bytes;
	/* Connections to the cgroup's listeners left plain because the
	 * listener's connections are short-lived (see "Short-lived
	 * listeners"), counted by the server's cgroup. */
	__u64 connections_short_lived;
	/* Members that turned blocking after they joined (fcntl, ioctl
	 * FIONBIO, an accepted socket made blocking): they leave the
	 * sockhash (see "Leaving"). */
	__u64 late_blocking;
	/* Members that left the sockhash while open (see "Leaving"), counted
	 * by the cgroup of the socket that left. */
	__u64 members_left;
	/* Connections left plain because their listener was on probation
	 * (see "Probation"), counted by the server's cgroup. */
	__u64 sockets_probation;
	/* Members read with splice (or another reader that is not recvmsg)
	 * with nothing redirected unread: they leave the sockhash (see
	 * "Probation"). */
	__u64 splice_readers;
	/* Members read with splice while redirected bytes were unread: those
	 * bytes reach the application only through recvmsg, so the
	 * connection stalls (see "Probation"). */
	__u64 splice_stalled;
	/* SYNs to the cgroup's listeners offered no pair because `pairs` was
	 * full: those connections stay plain TCP (see "Pairs"). */
	__u64 pairs_full;
	/* Listening sockets not recorded because `listeners` was full: their
	 * connections stay plain TCP. */
	__u64 listeners_full;
	/* Intercept mode: connects left alone (not sent to the sidecar)
	 * because the cgroup had intercept_quota handshakes in flight
	 * already (see orig_dsts). */
	__u64 intercepts_over_quota;
	/* Intercept mode: connects sent to the sidecar whose destination
	 * could not be recorded (orig_dsts full): the sidecar gets no
	 * SO_ORIGINAL_DST for them. */
	__u64 intercepts_unrecorded;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
} sockhash SEC(".maps");

/*
 * Slots. Each enabled cgroup has a slot, 1 to MAX_SLOTS - 1, that user
 * space assigns when it first enables the cgroup (cgroup_slots) and hands
 * to the cgroup's programs as a constant (cgroup_slot): the index of its
 * counters and its settings in two array maps, whose lookups the verifier
 * inlines (a hash lookup by cgroup id cost 100-160 ns, several times per
 * connection). A socket's storage keeps its cgroup's slot for the programs
 * shared by all cgroups (sk_msg, TC). Slot 0 collects what cannot be
 * attributed to an enabled cgroup. A disabled cgroup keeps its slot (its
 * live sockets still count there) until user space needs the slot for
 * another cgroup and the disabled one has no live socket left.
 */
#define MAX_SLOTS 4096

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct cgroup_counters);
} cgroup_counters SEC(".maps");

/* Enabled cgroup id -> its slot. Written and read by user space only. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u64);
	__type(value, __u32);
} cgroup_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} sock_state SEC(".maps");

/* Per enabled cgroup settings, written by user space (slot -> config). */
#define CGROUP_ACCOUNT_ONLY (1U << 0)
/* Pair every connection to the cgroup's listeners, short-lived ones too
 * (see "Short-lived listeners"). */
#define CGROUP_ALL_CONNECTIONS (1U << 1)
/* Pair connections to the cgroup's listeners from the first one: no
 * probation (see "Probation"). */
#define CGROUP_NO_PROBATION (1U << 2)

/* cgroup_config.mesh_mode */
#define MESH_NONE 0
/* Pair app and sidecar sockets under an unmodified iptables REDIRECT. */
#define MESH_REDIRECT 1
/* Intercept connect() (no iptables) and answer SO_ORIGINAL_DST. */
#define MESH_INTERCEPT 2

#define MESH_MAX_EXCLUDE_PORTS 16
#define MESH_MAX_EXCLUDE_CIDRS 8
#define MAX_STACK_PORTS 16

struct cidr {
	__u32 ip[4];	/* network byte order; IPv4 as ::ffff:a.b.c.d */
	__u32 prefix;	/* bits of the 128-bit form (IPv4 /8 is 104) */
};

struct cgroup_config {
	/* CGROUP_* flags. CGROUP_ACCOUNT_ONLY: count the cgroup's traffic but
	 * keep its sockets out of the sockhash (a dry run). */
	__u32 flags;
	/* MESH_* */
	__u32 mesh_mode;
	/* The sidecar's uid: its own connects are never intercepted. */
	__u32 sidecar_uid;
	/* The sidecar's outbound and inbound ports (host byte order). */
	__u16 outbound_port;
	__u16 inbound_port;
	/* Destinations never intercepted (ports in host byte order, 0 unused). */
	__u16 exclude_ports[MESH_MAX_EXCLUDE_PORTS];
	struct cidr exclude_cidrs[MESH_MAX_EXCLUDE_CIDRS];
	__u32 n_exclude_cidrs;
	__u32 pad;
	/* Server ports whose connections stay plain TCP (host byte order, 0
	 * unused): for readers that splice (a Go io.Copy TCP proxy, HAProxy
	 * in splice mode), which cannot read redirected bytes. A connection
	 * is left out when its server port is listed by the cgroup of either
	 * end, and so is every connection a process of the cgroup makes while
	 * it listens on one of its stack ports (a proxy's upstream
	 * connections: see stack_procs). */
	__u16 stack_ports[MAX_STACK_PORTS];
};

/*
 * Stack processes: a process of an enabled cgroup that listens on one of
 * its cgroup's stack ports, or that was seen splicing a TCP socket of an
 * enabled cgroup (STACK_PROC_SPLICER, see "Probation"), is a proxy that
 * splices; the connections it
 * makes (to its upstreams, whose replies it splices too) and those it
 * accepts on its other listeners stay plain TCP while it listens there.
 * Process id (tgid, as the kernel's initial namespace numbers it) -> its
 * stack-port listeners open. sock_ops counts them up at listen() (in the
 * process's context) and down when such a listener closes; LRU bounds what
 * a listener closed without its callback would leave.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} stack_procs SEC(".maps");

/* In a stack_procs value: the process splices (the low bits still count
 * its stack-port listeners; the entry stays when they reach 0). */
#define STACK_PROC_SPLICER (1ULL << 63)

/* stack_port reports whether cfg lists port as a stack-only server port.
 * User space packs the list from the start, so the first 0 ends it (most
 * cgroups list none: one load). */
static __always_inline int stack_port(const struct cgroup_config *cfg, __u16 port)
{
	if (!cfg || port == 0)
		return 0;
#pragma unroll
	for (int i = 0; i < MAX_STACK_PORTS; i++) {
		if (cfg->stack_ports[i] == 0)
			return 0;
		if (cfg->stack_ports[i] == port)
			return 1;
	}
	return 0;
}

/* By slot; a slot's settings are zero (accelerate, no sidecar) until user
 * space writes them. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct cgroup_config);
} cgroup_config SEC(".maps");

/* config_for returns the settings of the cgroup in slot. */
static __always_inline struct cgroup_config *config_for(__u32 slot)
{
	return bpf_map_lookup_elem(&cgroup_config, &slot);
}

/*
 * Socket cookie -> id of the enabled cgroup the socket belongs to, for the
 * sockets in the sockhash: user space joins it with the sockhash to count
 * live accelerated sockets per cgroup. sock_ops deletes an entry when its
 * socket closes; LRU eviction bounds what a detached program leaves behind.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, __u64);
	__type(value, __u64);
} socket_cgroups SEC(".maps");

/*
 * Registry of TC attachments, written by user space only (the programs never
 * read it): what sockbypass attached to which interface, so that disable and
 * uninstall remove exactly that, and bpftool shows it with named fields.
 */
struct tc_device_key {
	/* Inode number of the network namespace (stat -L /proc/PID/ns/net). */
	__u64 netns_ino;
	__u32 ifindex;
	__u32 pad;
};

#define TC_ATTACH_TCX 1
#define TC_ATTACH_CLSACT 2

struct tc_device {
	/* TC_ATTACH_TCX (tcx link) or TC_ATTACH_CLSACT (clsact + cls_bpf). */
	__u32 mode;
	/* 1 when sockbypass added the clsact qdisc (and removes it again). */
	__u32 created_qdisc;
	/* Path of the network namespace, "" for the namespace of the CLI. */
	char netns_path[112];
	char ifname[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct tc_device_key);
	__type(value, struct tc_device);
} tc_devices SEC(".maps");

/* Which enabled cgroup asked for which TC device: a device stays attached
 * while any enabled cgroup uses it. */
struct tc_user_key {
	__u64 cgroup_id;
	struct tc_device_key dev;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tc_user_key);
	__type(value, __u32);
} tc_users SEC(".maps");

/*
 * Sidecar mode, intercept: app endpoint (see struct endpoint_key) -> the
 * destination its connect() asked for, for SO_ORIGINAL_DST. Only while the
 * handshake is in flight: when it completes, sock_ops moves the entry into
 * the storage of the sidecar's accepted socket (SOCK_FLAG_ORIG_DST), where
 * cgroup/getsockopt reads it, and it lives as long as that socket. So live
 * connections, however many one pod has, hold no entry.
 *
 * A plain hash, never an LRU: an evicted entry would leave a sidecar
 * without its app's destination. Each entry names its cgroup's slot (plus
 * one); `intercepts` counts them per slot, and cgroup/connect4 leaves a
 * connect alone (intercepts_over_quota) once its slot holds
 * intercept_quota of them, so one pod's handshakes in flight (SYNs to a
 * sidecar with a full backlog, sockets left connecting) cannot fill the
 * map for the others. Removed by whoever ends the handshake: the sidecar's
 * accept (mesh_accept), the app socket's close (forget_socket), or user
 * space for a disabled cgroup. User space sizes it from the sockhash
 * capacity (at least 65536).
 */
struct orig_dst {
	__u32 ip[4];
	__u16 port;
	__u16 family;
	__u32 slot; /* the slot of the cgroup that recorded it, plus one */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct endpoint_key);
	__type(value, struct orig_dst);
} orig_dsts SEC(".maps");

/* Slot -> how many orig_dsts entries the cgroup in it holds (see
 * orig_dsts). User space resets a slot's count when it disables the cgroup,
 * after removing its entries. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} intercepts SEC(".maps");

/* forget_orig_dst removes the orig_dsts entry of ek, if any, and uncounts
 * it from its slot. */
static __always_inline __attribute__((unused)) void forget_orig_dst(struct endpoint_key *ek)
{
	struct orig_dst *od = bpf_map_lookup_elem(&orig_dsts, ek);
	__u32 slot;
	__u64 *n;

	if (!od)
		return;
	slot = od->slot - 1;
	if (bpf_map_delete_elem(&orig_dsts, ek) != 0)
		return; /* someone else removed (and uncounted) it */
	n = bpf_map_lookup_elem(&intercepts, &slot);
	if (n)
		__sync_fetch_and_add(n, -1);
}

/*
 * Sidecar mode: app endpoints in use (netns, local ip, port) -> how many app
 * sockets use it. A plain hash, never an LRU: an evicted count would make a
 * shared endpoint look unique. An endpoint without an entry (the map was
 * full when its socket connected) is never unique: its sockets stay
 * unpaired. User space sizes it from the sockhash capacity (twice, at least
 * 65536).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct endpoint_key);
	__type(value, __u64);
} mesh_endpoints SEC(".maps");

/* A mesh_endpoints value: bits 0-31 the count of app sockets, bits 32-47
 * the slot (plus one) of the cgroup that counted the first: once that
 * cgroup is removed no program sees its sockets close, and user space
 * removes its entries (Dataplane.ForgetRemovedCgroups). */
#define ENDPOINT_COUNT_MASK 0xffffffffULL
#define ENDPOINT_SLOT_SHIFT 32

/* Sidecar mode, redirect: the tuple of an app's SYN after NAT (as the
 * sidecar's accepted socket will see it) -> the app socket's key. */
struct nat_tuple {
	__u64 netns_cookie;
	__u32 src_ip[4];
	__u32 dst_ip[4];
	__u16 src_port;
	__u16 dst_port;
	__u32 pad;
};

struct mesh_syn {
	struct sock_key app_key;
	__u64 app_cookie;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct nat_tuple);
	__type(value, struct mesh_syn);
} mesh_syns SEC(".maps");

/*
 * Sidecar mode, pod to pod: the pods whose inbound connections a sidecar
 * captures (iptables PREROUTING REDIRECT): pod address -> inbound port.
 * Written by user space for the namespaces of redirect-mode cgroups.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct node_addr_key);
	__type(value, __u32);
} inbound_pods SEC(".maps");

/*
 * Sidecar mode, pod to pod: a connecting socket of a sidecar-mode pod, by
 * its endpoint (a unique node address and port), so the destination pod's
 * sidecar, whose accepted socket sees that endpoint as its remote end after
 * its PREROUTING REDIRECT, can pair with it. Removed when that accepted
 * socket is established (or the connecting socket closes): handshakes in
 * flight only.
 */
struct mesh_client {
	struct sock_key client_key;
	__u64 client_netns;
	__u64 users;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct endpoint_key);
	__type(value, struct mesh_client);
} mesh_clients SEC(".maps");

/*
 * Pairs: both ends of a connection join the sockhash, or neither does.
 *
 * Being in a sockhash changes a socket's receive path even when nothing is
 * redirected to it (FIONREAD counts only the redirected queue, a blocking
 * recv whose wait ends without data returns EAGAIN). So a socket joins only
 * when its peer joins too, and a joined pair redirects every byte from the
 * first one: a member never has bytes that came through the stack.
 *
 * The handshake, keyed by the client's sockhash key:
 * 1. the SYN reaches a listener of an enabled cgroup (sock_ops
 *    RWND_INIT on the request socket): PAIR_OFFERED;
 * 2. the client, at ACTIVE_ESTABLISHED, joins when offered and eligible
 *    (non-blocking, no stack-reader option): PAIR_CLIENT_JOINED; otherwise
 *    PAIR_DECLINED;
 * 3. the server, at PASSIVE_ESTABLISHED, joins when the client did, their
 *    sequence numbers cross-match and its listener is eligible:
 *    PAIR_JOINED; otherwise it removes the client from
 *    the sockhash again (nothing was redirected to it) and the pair stays
 *    plain;
 * 4. a client that sends before step 3 (its peer has not joined yet) turns
 *    PAIR_CLIENT_JOINED into PAIR_ABANDONED with an atomic compare and
 *    exchange and sends through the stack; the server then does not join
 *    and removes the client. Exactly one of the two exchanges wins.
 *
 * An entry lives from the SYN until the server decides (declined pairs are
 * removed then), and for a joined pair until the client's first message
 * (it marks itself paired and removes the entry) or its close: at most one
 * per handshake in flight plus one per silent joined client. A handshake
 * that never completes (a SYN whose SYN-ACK is reset, a port scan, a SYN
 * flood) has no socket to remove its offer: user space reaps offers older
 * than any handshake can last (Dataplane.ReapPairs, run by the daemon at
 * every rescan and by enable and disable). A plain hash, never an LRU:
 * evicting the entry of a joined pair whose client has not yet seen it
 * would leave the server a member and the client out, its bytes reaching a
 * member through the stack. User space sizes it at twice the sockhash
 * capacity (at least 65536); when it is full, a SYN is offered no pair and
 * its connection stays plain TCP (pairs_full).
 */
#define PAIR_OFFERED 1
#define PAIR_CLIENT_JOINED 2
#define PAIR_JOINED 3
#define PAIR_DECLINED 4
#define PAIR_ABANDONED 5
/*
 * The same handshake as a dry run, between sockets of account-only cgroups:
 * nothing joins the sockhash, the states only say that the pair would have
 * formed. A real end never takes a dry offer (and a dry end never a real
 * one), so mixed connections stay plain as before. TC turns PAIR_DRY_CLIENT
 * into PAIR_ABANDONED when the client sends before the server "joined".
 */
#define PAIR_DRY_OFFERED 6
#define PAIR_DRY_CLIENT 7
#define PAIR_DRY_JOINED 8

struct pair {
	__u64 state;
	/* Written by the client when it joins: its snd_nxt and rcv_nxt at
	 * ACTIVE_ESTABLISHED (its ISN + 1 and the server's ISN + 1, before any
	 * data). The server joins only when they cross-match its own rcv_nxt
	 * and snd_nxt: a mirrored key alone is no proof that two sockets are
	 * the ends of one connection (NAT can give another socket the same
	 * key while a handshake is in flight). */
	__u32 client_snd_nxt;
	__u32 client_rcv_nxt;
	/* Each end's socket (struct sock address) and cookie, for its peer's
	 * sock_state (peer_sk, peer_cookie): the client's written with its
	 * sequence numbers, the server's before it marks the pair JOINED. */
	__u64 client_sk;
	__u64 client_cookie;
	__u64 server_sk;
	__u64 server_cookie;
	/* And each end's sock_state (peer_state). */
	__u64 client_state;
	__u64 server_state;
	/* When the SYN was offered (bpf_ktime_get_ns): what user space reaps
	 * by. */
	__u64 offered_ns;
	/* The offer_hints count this offer added to, plus 1; 0 once the
	 * server consumed it (see "Offer hints"). */
	__u64 hint_index;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 131072);
	__type(key, struct sock_key);
	__type(value, struct pair);
} pairs SEC(".maps");

/*
 * Offer hints: both ends of a connection learn cheaply that it was offered
 * no pair. Most connections of an enabled cgroup are never offered one
 * (their listener is short-lived, blocking, unknown, or in no enabled
 * cgroup), and for them looking the client's key up in `pairs` was the
 * costliest step of the connection's sock_ops work: a miss in a table of
 * 2 MiB or more, whose first touch misses the caches and the TLB.
 *
 * offer_hints counts, per slot (a hash of the client's key, see
 * offer_hint_slot) and epoch, the offers not yet consumed: offer_pair adds
 * one when it offers (before the SYN-ACK leaves, so before either end can
 * look), and the server's PASSIVE_ESTABLISHED takes it back when it finds
 * the offer (consume_offer_hint, once per offer: pair.hint_index names
 * the count). Both ends look `pairs` up only when their slot counts an
 * offer in either epoch. A connection that was offered a pair is always
 * counted until its server consumes the offer, so neither end can miss it;
 * a count that is never taken back (a handshake that never completes, an
 * offer overwritten by another for the same key) only costs lookups.
 *
 * Epochs bound that drift: offers count in the current epoch
 * (offer_epoch); user space (Dataplane.ReapPairs) zeroes the other epoch
 * and makes it current once the current one is older than any handshake
 * lasts (PairReapAge), so the epoch it zeroes saw no offer for that long.
 * A late take-back on a zeroed count never goes below 0.
 *
 * The table is small and each slot's two epochs are neighbours (index
 * 2 * slot + epoch, offer_hint_index), so that a client's look costs one
 * cache line of a 16 KiB table. Measured on the development VM: with 8192
 * slots and the epochs 64 KiB apart, the look cost ~95 ns per connection
 * (a cache and TLB miss, as the pairs lookup it replaced), with 512 slots
 * ~10 ns. Fewer slots only mean more connections that share a slot with an
 * offer in flight (or one never taken back) and look `pairs` up for
 * nothing.
 */
#define OFFER_HINT_SLOTS 1024

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * OFFER_HINT_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} offer_hints SEC(".maps");

/* The current epoch of offer_hints (0 or 1), and since when (monotonic
 * seconds); written by user space only. */
struct offer_epoch {
	__u32 current;
	__u32 since;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct offer_epoch);
} offer_epoch SEC(".maps");

/* offer_hint_slot is the slot of a pairs key in each epoch: a mix of all
 * its words. */
static __always_inline __u32 offer_hint_slot(const struct sock_key *k)
{
	__u32 h = (__u32)k->netns_cookie ^ (__u32)(k->netns_cookie >> 32);
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		h = (h ^ k->local_ip[i]) * 0x9e3779b1;
		h = (h ^ k->remote_ip[i]) * 0x85ebca6b;
	}
	h = (h ^ ((__u32)k->local_port << 16 | k->remote_port)) * 0xc2b2ae35;
	return (h ^ (h >> 16)) & (OFFER_HINT_SLOTS - 1);
}

/* offer_hint_index is the index in offer_hints of a slot's count in an
 * epoch: the two epochs of a slot are neighbours. */
static __always_inline __u32 offer_hint_index(__u32 slot, __u32 epoch)
{
	return 2 * slot + (epoch & 1);
}

/* may_be_offered reports whether the connection whose client has key may
 * have been offered a pair: 0 only when its slot counts no offer in
 * either epoch. */
static __always_inline int may_be_offered(const struct sock_key *key)
{
	__u32 slot = offer_hint_slot(key), i0 = offer_hint_index(slot, 0), i1 = offer_hint_index(slot, 1);
	__u64 *a = bpf_map_lookup_elem(&offer_hints, &i0), *b = bpf_map_lookup_elem(&offer_hints, &i1);

	return !a || !b || *(volatile __u64 *)a || *(volatile __u64 *)b;
}

/*
 * Listeners of enabled cgroups: (netns cookie, local address, port) ->
 * LISTENER_* flags (a u64: bits 0-7 flags, the rest below). Written by
 * sock_ops when a socket listens (counting the sockets of a SO_REUSEPORT
 * group, LISTENER_REF_ONE; the last to close removes the entry), and by
 * user space for listeners that existed before `enable` and whose
 * O_NONBLOCK changed after listen() (a server that makes its listener
 * non-blocking after listen(), as redis does): user space writes an entry
 * only when that bit changes, so it seldom races the atomic updates here,
 * and removes entries of listeners that are gone (LISTENER_UNSEEN). A
 * plain hash: when it is full, a new listener is not recorded and its
 * connections stay plain TCP (listeners_full). An accepted socket joins a pair only when its
 * listener is known non-blocking: a blocking recv on a sockhash member may
 * return EAGAIN. The wildcard addresses are ::ffff:0.0.0.0 and ::.
 */
#define LISTENER_NONBLOCK (1U << 0)
/* The listener asked for SO_RCVLOWAT, TCP_INQ or SO_OOBINLINE (its
 * accepted sockets inherit them), or an accepted socket attached kernel
 * TLS: its connections stay plain TCP. Set by sock_ops at listen() and by
 * its first accepted socket that has such an option (stack_reader.h);
 * accepted sockets do not clone the listener's storage. */
#define LISTENER_STACK_READER (1U << 1)
/* An accepted socket of the listener turned blocking after it joined
 * (see "Leaving"): the listener's later connections stay plain TCP
 * (counted in sockets_blocking). */
#define LISTENER_BLOCKING_CHILDREN (1U << 2)
/* The listener's first accepted socket was read with recvmsg, without
 * blocking (see "Probation"): its connections may pair. */
#define LISTENER_PROVEN (1U << 3)
/* Recorded by user space from /proc (a listener that predates `enable`),
 * not by sock_ops. */
#define LISTENER_SCANNED (1U << 4)
/* User space did not find the listener at its last rescan: it removes an
 * entry that a second rescan does not find either (a listener that closed
 * unseen: its cgroup was disabled, or it predates `enable`). sock_ops
 * clears it when a socket listens there again. */
#define LISTENER_UNSEEN (1U << 5)
/* The stack-read tracer saw the listener's first accepted socket read
 * without blocking (set with LISTENER_PROVEN at the end of probation, not
 * by --no-probation): evidence that its server makes accepted sockets
 * non-blocking, so a member found blocking right after accept() gets
 * ACCEPT_GRACE_NS (see own_turned_blocking in sockops.c). */
#define LISTENER_READ_NONBLOCK (1U << 6)
/* Bits 16-31: how many listening sockets sock_ops recorded on the
 * endpoint (SO_REUSEPORT siblings share it); the last to close removes
 * the entry. */
#define LISTENER_REF_ONE (1ULL << 16)
#define LISTENER_REF_MASK (0xffffULL << 16)
/* Bits 32-47: the slot (plus one) of the cgroup whose sock_ops recorded
 * the listener: `disable` removes that cgroup's entries, whose close no
 * program sees any more. */
#define LISTENER_SLOT_SHIFT 32
#define LISTENER_SLOT_MASK (0xffffULL << LISTENER_SLOT_SHIFT)

/*
 * Probation. A member's redirected queue is read by recvmsg alone: splice
 * (a Go io.Copy proxy, HAProxy in splice mode, sendfile from a socket)
 * reads only the stack queue and never sees a redirected byte, and a
 * blocking reader may get EAGAIN. Nothing tells at ESTABLISHED how an
 * accepted socket will be read, and the first request of a connection is
 * often redirected before its server reads at all. So a new listener is
 * on probation: its connections stay plain TCP (sockets_probation) until
 * one of them is read through the stack. The tracer on the kernel's
 * tcp_rcv_space_adjust tracepoint (sockops/stackread.c), which fires on
 * each read of a TCP socket's stack queue, with data, by recvmsg or by
 * splice (splice fires even when nothing is queued), looks at the
 * syscall that reads:
 * - read, readv, recvfrom, recvmsg or recvmmsg on a non-blocking socket
 *   proves the listener (LISTENER_PROVEN); on a blocking one it marks it
 *   LISTENER_BLOCKING_CHILDREN;
 * - anything else (splice, sendfile, io_uring) marks the listener
 *   LISTENER_STACK_READER and its process a splicer (stack_procs), whose
 *   later connections stay plain, outgoing ones too.
 * A member read that way (a program that reads with recvmsg first and
 * splices later, or a client socket of a process not yet known to splice)
 * is marked leaving when nothing redirected to it is unread (its peer
 * stops redirecting, and its later bytes take the stack, where splice
 * reads them: splice_readers); otherwise those bytes reach the program
 * only through recvmsg and the connection stalls (splice_stalled, an
 * event): a known limitation until the kernel can splice from a member.
 */

/*
 * Short-lived listeners. Pairing costs a connection a few microseconds
 * (storage, the pair handshake, two sockhash inserts) and pays back per
 * message; a connection that carries one request and one response (HTTP
 * with Connection: close) only pays. So each end of a pair tells the
 * server's listener at close whether its side was short: at most
 * SHORT_CONN_MSGS messages and under SHORT_CONN_BYTES sent. The server's
 * short side counts a short connection, either end's long side resets the
 * count. After SHORT_STREAK short connections in a row, the listener's new connections are not offered a
 * pair: they stay plain TCP and cost next to nothing
 * (connections_short_lived). One in SHORT_PROBE_EVERY is still paired, so
 * a listener whose connections grow long is noticed; a probe pays the whole
 * pairing (storage, two psocks, two sockhash inserts), which the skipped
 * connections share on average. A cgroup enabled
 * with CGROUP_ALL_CONNECTIONS pairs every connection. The count lives in
 * the listener's flags: bits 8-15 the short streak (capped at
 * SHORT_STREAK_MAX), bits 56-63 a wrapping count of connections not
 * offered; user space keeps them when it rewrites LISTENER_NONBLOCK.
 */
#define LISTENER_SHORT_ONE (1ULL << 8)
#define LISTENER_SHORT_MASK (0xffULL << 8)
#define LISTENER_SKIP_ONE (1ULL << 56)
#define SHORT_STREAK 8
#define SHORT_STREAK_MAX 64
#define SHORT_PROBE_EVERY 64
#define SHORT_CONN_MSGS 4
#define SHORT_CONN_BYTES (64U << 10)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct endpoint_key);
	__type(value, __u64);
} listeners SEC(".maps");

/* listener_endpoint fills ek (zeroed by the caller) with the `listeners'
 * key of a listener on ip and port in the network namespace netns: the one
 * shape the programs and user space all write and read. */
static __always_inline void listener_endpoint(struct endpoint_key *ek, __u64 netns, const __u32 *ip, __u16 port)
{
	ek->netns_cookie = netns;
	__builtin_memcpy(ek->ip, ip, sizeof(ek->ip));
	ek->port = port;
}

/* Minimal views of the kernel's file, socket and sock, relocated against
 * the running kernel's BTF: enough to read a socket's O_NONBLOCK. */
#define O_NONBLOCK 04000

struct file {
	unsigned int f_flags;
} __attribute__((preserve_access_index));

struct socket {
	struct file *file;
} __attribute__((preserve_access_index));

/* And of the user namespace that owns a socket's network namespace, with
 * its uid map (see ns_kuid in cgroup/sidecar.c). */
struct uid_gid_extent {
	__u32 first;
	__u32 lower_first;
	__u32 count;
} __attribute__((preserve_access_index));

struct uid_gid_map {
	__u32 nr_extents;
	struct uid_gid_extent extent[5];
} __attribute__((preserve_access_index));

struct user_namespace {
	struct uid_gid_map uid_map;
} __attribute__((preserve_access_index));

struct net {
	struct user_namespace *user_ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} __attribute__((preserve_access_index)) possible_net_t;

typedef struct {
	__s64 counter;
} __attribute__((preserve_access_index)) atomic64_t;

struct sock_common {
	possible_net_t skc_net;
	atomic64_t skc_cookie;
	unsigned char skc_state;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	struct socket *sk_socket;
	void *sk_user_data;
} __attribute__((preserve_access_index));

typedef struct {
	int counter;
} __attribute__((preserve_access_index)) atomic_t;

typedef struct refcount_struct {
	atomic_t refs;
} __attribute__((preserve_access_index)) refcount_t;

/* A sockhash member's psock (sk_user_data, tagged SK_USER_DATA_PSOCK):
 * msg_tot_len is the length of its redirected queue, unread; refcnt holds
 * one reference per map the socket is in, and one for each sendmsg,
 * recvmsg or redirect into it under way (see "Leaving"). */
struct sk_psock {
	__u32 msg_tot_len;
	refcount_t refcnt;
} __attribute__((preserve_access_index));

#define SK_USER_DATA_PSOCK 4ULL
#define SK_USER_DATA_PTRMASK (~7ULL)

/*
 * peer_progress reads what a sender needs of its peer from the peer socket
 * itself (state->peer_sk, learned when the pair joined): its copied_seq,
 * and its redirected bytes not yet read (*unread). Returns -1 when the
 * address no longer holds the peer (it closed: its cookie is gone) or
 * cannot be read; the caller then takes the stack. The cookie is read last,
 * so the other reads were of the peer. TCP sockets are freed by RCU and
 * their memory stays sockets, and bpf_probe_read_kernel never faults.
 */
static __always_inline int peer_progress(const struct sock_state *state, __u32 *copied_seq, __u64 *unread)
{
	struct sock *sk = (struct sock *)state->peer_sk;
	struct tcp_sock *tp = (struct tcp_sock *)state->peer_sk;
	struct sk_psock *psock;
	__u64 user_data = 0;
	__s64 cookie = 0;
	__u32 queued = 0;

	if (!sk)
		return -1;
	if (bpf_probe_read_kernel(copied_seq, sizeof(*copied_seq), &tp->copied_seq) ||
	    bpf_probe_read_kernel(&user_data, sizeof(user_data), &sk->sk_user_data) ||
	    !(user_data & SK_USER_DATA_PSOCK))
		return -1;
	psock = (struct sk_psock *)(user_data & SK_USER_DATA_PTRMASK);
	if (bpf_probe_read_kernel(&queued, sizeof(queued), &psock->msg_tot_len))
		return -1;
	asm volatile("" ::: "memory");
	if (bpf_probe_read_kernel(&cookie, sizeof(cookie), &sk->__sk_common.skc_cookie.counter) ||
	    (__u64)cookie != state->peer_cookie)
		return -1;
	*unread = queued;
	return 0;
}

/*
 * Leaving. Membership changes a socket's receive path (see the top of this
 * file): it is safe only for a non-blocking reader that reads with recvmsg
 * and set no stack-reader option. A member that stops being one after it
 * joined (made blocking by fcntl or ioctl, as a client that connects with a
 * timeout and then blocks, or a server that makes its accepted sockets
 * blocking; SO_RCVLOWAT, TCP_INQ or SO_OOBINLINE set late) is LEAVING, and
 * its pair dissolves:
 *
 * 1. Nothing more is redirected into it: its peer's sk_msg reads its flags
 *    and its file's O_NONBLOCK before each message (peer_leaving) and
 *    passes, and its own sk_msg passes too.
 * 2. It leaves the sockhash once nothing redirected to it is unread and no
 *    redirect into it is under way: deleting a member discards its
 *    redirected queue, and a redirect decided before step 1 is enqueued
 *    after its sender released its own lock. Only sock_ops may delete, so
 *    both ends of a pair watch their stack packets (HDR_OPT_LEN_CB for each
 *    one sent, PARSE_HDR_OPT_CB for each one received; a member sends
 *    almost none) and settle there (settle in sockops.c):
 *    - an end removes its leaving peer when the peer's queue is empty and
 *      it has no redirect into it under way: its own psock holds only the
 *      map's reference, or one more for a syscall whose last verdict was
 *      not a redirect (verdicts run under the socket lock the callback
 *      holds or waits for);
 *    - an end removes itself when its own queue is empty and its peer can
 *      start no redirect into it (the peer is gone, or one of the two is
 *      leaving, which the peer's sk_msg sees) and has none under way (the
 *      peer's psock holds the map's reference only: a sendmsg takes its
 *      reference before its verdict reads the leaving flag).
 * 3. The end that stays leaves too, once its peer has no psock left: it
 *    would otherwise receive stack bytes as a member.
 *
 * A blocking member whose reader waits before either step could run (a
 * server that makes an accepted socket blocking and reads before its
 * client sent anything) is still exposed to the EAGAIN; so a listener
 * whose accepted sockets turned blocking is marked
 * LISTENER_BLOCKING_CHILDREN and its later connections stay plain.
 */

/*
 * Fallback events: what changes a connection's path after it was
 * accelerated (a member turned blocking or set a stack-reader option, a
 * listener learnt that its accepted sockets turn blocking), one record
 * each, for the daemon to log with the socket's addresses and to report on
 * the pod. They are rare (once per socket at most); when nobody reads, the
 * ring fills and later events are dropped (the counters still count).
 */
enum fallback_event_reason {
	EVENT_LATE_BLOCKING = 1,
	EVENT_LATE_STACK_OPTION = 2,
	EVENT_LISTENER_BLOCKING_CHILDREN = 3,
	/* A member was read with splice and leaves (detail 0), or stalls:
	 * detail is the number of redirected bytes it cannot read. */
	EVENT_SPLICE_READER = 4,
	EVENT_SPLICE_STALLED = 5,
	/* A listener learnt that its accepted sockets are spliced. */
	EVENT_LISTENER_SPLICED = 6,
	/* A listener learnt that its accepted sockets use kernel TLS
	 * (TCP_ULP): detail is the option. */
	EVENT_LISTENER_ULP = 7,
};

struct fallback_event {
	__u64 cgroup_id;
	/* The socket's key (for a listener: its endpoint, remote zero). */
	struct sock_key key;
	__u32 reason;
	/* EVENT_LATE_STACK_OPTION: the option (SOL_SOCKET/SOL_TCP optname). */
	__u32 detail;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* emit_event writes a fallback event about the socket of state. */
static __always_inline void emit_event(const struct sock_state *state, __u32 reason, __u32 detail)
{
	struct fallback_event ev = {
		.cgroup_id = state->cgroup_id,
		.key = state->key,
		.reason = reason,
		.detail = detail,
	};

	bpf_ringbuf_output(&events, &ev, sizeof(ev), 0);
}

/* read_psock reads the psock of a socket whose sk_user_data is at
 * user_data (a kernel address): its unread redirected bytes and its
 * reference count. Returns 0, or -1 when the socket has no psock (it is in
 * no sockhash, or never was). */
static __always_inline int read_psock(const void *user_data, __u32 *queued, __s32 *refs)
{
	struct sk_psock *psock;
	__u64 ud = 0;

	if (bpf_probe_read_kernel(&ud, sizeof(ud), user_data) || !(ud & SK_USER_DATA_PSOCK))
		return -1;
	psock = (struct sk_psock *)(ud & SK_USER_DATA_PTRMASK);
	if (bpf_probe_read_kernel(queued, sizeof(*queued), &psock->msg_tot_len) ||
	    bpf_probe_read_kernel(refs, sizeof(*refs), &psock->refcnt.refs.counter))
		return -1;
	return 0;
}

/* The kinds of __builtin_preserve_field_info (CO-RE: relocated against
 * the running kernel's BTF), as libbpf's enum bpf_field_info_kind. */
#define BPF_FIELD_BYTE_OFFSET 0
#define BPF_FIELD_EXISTS 2
#define BPF_FIELD_LSHIFT_U64 4
#define BPF_FIELD_RSHIFT_U64 5

/* bpf_rdonly_cast (a kfunc, 6.2+) makes an address an untrusted pointer
 * to a kernel type: its loads are single instructions that read 0 where
 * the address does not map, far cheaper per message than a helper call. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

/* A kernel struct whose first 32 bits are a plain int: the view through
 * which bpf_rdonly_cast reads the low half of another socket's
 * sock_state.flags in one load (our own struct is not in the kernel's
 * BTF; the SOCK_FLAG_* bits read this way are all below bit 32). */
struct kref {
	refcount_t refcount;
} __attribute__((preserve_access_index));

/* peer_state_flags returns the low 32 bits of the peer's sock_state flags
 * (0 when unknown). */
static __always_inline __u32 peer_state_flags(const struct sock_state *state)
{
	struct kref *k;

	if (!state->peer_state)
		return 0;
	k = bpf_rdonly_cast((void *)(state->peer_state + __builtin_offsetof(struct sock_state, flags)),
			    __builtin_btf_type_id(*(struct kref *)0, 1));
	return k->refcount.refs.counter;
}

/* A peer found blocking within this time of its file's discovery is not
 * taken for blocking yet: servers that accept() and then set O_NONBLOCK
 * are blocking between the two calls, and a pair must not dissolve for
 * that (measured: redis and nginx suite runs under load lost their pairs).
 * A server that stays blocking is found at its own first send, or once
 * the grace is over. */
#define ACCEPT_GRACE_NS (10ULL * 1000 * 1000)

/* peer_blocking reports whether the peer's file is blocking (0 while it
 * has none: a server end not accepted yet, and during ACCEPT_GRACE_NS
 * after its file was found). The file is looked up once, then its flags
 * are read with one load per message. */
static __always_inline int peer_blocking(struct sock_state *state)
{
	struct file *f;

	if (!state->peer_file) {
		struct socket *so = 0;

		f = 0;
		if (!state->peer_sk ||
		    bpf_probe_read_kernel(&so, sizeof(so), &((struct sock *)state->peer_sk)->sk_socket) || !so ||
		    bpf_probe_read_kernel(&f, sizeof(f), &so->file) || !f)
			return 0;
		state->peer_file = (__u64)(long)f;
		state->peer_file_at = bpf_ktime_get_ns();
	}
	f = bpf_rdonly_cast((void *)state->peer_file, __builtin_btf_type_id(*(struct file *)0, 1));
	if (f->f_flags & O_NONBLOCK)
		return 0;
	return bpf_ktime_get_ns() - state->peer_file_at >= ACCEPT_GRACE_NS;
}

/* own_blocking reports whether the socket of an sk_msg turned blocking
 * (its file lost O_NONBLOCK), with plain loads (see bpf_rdonly_cast). */
static __always_inline int own_blocking(struct bpf_sock *bsk)
{
	struct sock *sk = bpf_rdonly_cast(bsk, __builtin_btf_type_id(*(struct sock *)0, 1));
	struct socket *so = sk->sk_socket;
	struct file *f;

	if (!so)
		return 0;
	f = so->file;
	return f && !(f->f_flags & O_NONBLOCK);
}

/* peer_leaving reports whether the peer is leaving (step 1 of "Leaving"):
 * it says so, or its file turned blocking. A peer that closed may read as
 * leaving (its memory is reused): its messages take the stack, as they
 * would anyway. */
static __always_inline int peer_leaving(struct sock_state *state)
{
	return (peer_state_flags(state) & SOCK_FLAG_LEAVING) || peer_blocking(state);
}

/* adopt_server: a client whose pair is JOINED takes its server's socket,
 * cookie and sock_state from the pair entry, and frees the entry (it has
 * done its job). */
static __always_inline void adopt_server(struct sock_state *state, const struct pair *pair)
{
	state->peer_sk = pair->server_sk;
	state->peer_cookie = pair->server_cookie;
	state->peer_state = pair->server_state;
	state->flags |= SOCK_FLAG_PAIRED;
	state->flags &= ~SOCK_FLAG_PAIR_CLIENT;
	bpf_map_delete_elem(&pairs, &state->key);
}

/* counters_for returns this CPU's counters of the cgroup in slot. */
static __always_inline struct cgroup_counters *counters_for(__u32 slot)
{
	return bpf_map_lookup_elem(&cgroup_counters, &slot);
}

/* set_v4mapped stores an IPv4 address (network order) as ::ffff:a.b.c.d. */
static __always_inline void set_v4mapped(__u32 *dst, __u32 ip4)
{
	dst[0] = 0;
	dst[1] = 0;
	dst[2] = bpf_htonl(0x0000ffff);
	dst[3] = ip4;
}

static __always_inline int is_v4mapped(const __u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0x0000ffff);
}

/*
 * fill_key builds a key from the address fields that sock_ops and sk_msg
 * contexts both have, and ports in host byte order (a context's remote_port
 * holds the port in network order in its upper 16 bits on little endian:
 * bpf_ntohl turns it into host order). Returns 0, or -1 for a family we do
 * not handle. The caller sets netns_cookie.
 */
static __always_inline int fill_key(struct sock_key *key, __u32 family,
				    __u32 local_ip4, __u32 remote_ip4,
				    const __u32 *local_ip6, const __u32 *remote_ip6,
				    __u32 local_port, __u32 remote_port)
{
	key->pad = 0;
	key->local_port = (__u16)local_port;
	key->remote_port = (__u16)remote_port;

	if (family == AF_INET) {
		key->family = AF_INET;
		set_v4mapped(key->local_ip, local_ip4);
		set_v4mapped(key->remote_ip, remote_ip4);
		return 0;
	}
	if (family != AF_INET6)
		return -1;

	key->local_ip[0] = local_ip6[0];
	key->local_ip[1] = local_ip6[1];
	key->local_ip[2] = local_ip6[2];
	key->local_ip[3] = local_ip6[3];
	key->remote_ip[0] = remote_ip6[0];
	key->remote_ip[1] = remote_ip6[1];
	key->remote_ip[2] = remote_ip6[2];
	key->remote_ip[3] = remote_ip6[3];
	key->family = is_v4mapped(key->local_ip) ? AF_INET : AF_INET6;
	return 0;
}

/* family_of gives the key family of a 16-byte address. */
static __always_inline __u16 family_of(const __u32 *ip)
{
	return is_v4mapped(ip) ? AF_INET : AF_INET6;
}

static __always_inline int is_loopback(const struct sock_key *key, const __u32 *ip)
{
	if (key->family == AF_INET)
		return (bpf_ntohl(ip[3]) >> 24) == 127;
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1);
}

static __always_inline int same_ip(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/*
 * peer_local reports whether the peer of a socket with this key is local,
 * for the egress accounting (what acceleration could have taken off the
 * stack): either end on loopback (a loopback socket only reaches its own
 * namespace), the socket's own address, or a node address.
 */
static __always_inline int peer_local(const struct sock_key *key)
{
	struct node_addr_key rk = {};

	if (is_loopback(key, key->remote_ip) || is_loopback(key, key->local_ip) || same_ip(key->local_ip, key->remote_ip))
		return 1;
	__builtin_memcpy(rk.ip, key->remote_ip, sizeof(rk.ip));
	return bpf_map_lookup_elem(&node_addrs, &rk) != 0;
}

/*
 * classified_peer is the accounting programs' rule (egress.c, release.c)
 * for a socket sock_ops classified: 1 when the cgroup cgroup_id counts its
 * stack bytes (a local peer, and the cgroup whose program classified it:
 * with nested enabled cgroups, the innermost one), 0 when it does not, -1
 * when the socket is not classified (established before its cgroup was
 * enabled: the caller applies peer_local to its addresses).
 */
static __always_inline __attribute__((unused)) int classified_peer(const struct sock_state *state, __u64 cgroup_id)
{
	if (!state || !(state->flags & (SOCK_FLAG_LOCAL_PEER | SOCK_FLAG_REMOTE_PEER)))
		return -1;
	return (state->flags & SOCK_FLAG_LOCAL_PEER) && state->cgroup_id == cgroup_id;
}

/* Scopes a socket key can have. */
enum key_scope {
	/* The peer cannot be local: leave the socket out. */
	SCOPE_REMOTE = 0,
	/* Pair in the socket's own network namespace only. */
	SCOPE_NETNS = 1,
	/* Both addresses are unique node addresses: pair across namespaces. */
	SCOPE_NODE = 2,
	/* A node address seen in several namespaces: namespace-local only. */
	SCOPE_AMBIGUOUS = 3,
};

/*
 * key_scope decides how a socket with this key (netns_cookie not yet set)
 * pairs, and the namespace its peer must be in. Both ends of a connection
 * see the same address pair, so they decide the same scope.
 */
static __always_inline int key_scope(const struct sock_key *key, __u64 own_netns, __u64 *peer_netns)
{
	struct node_addr_key lk = {}, rk = {};
	struct node_addr *la, *ra;

	*peer_netns = own_netns;
	if (is_loopback(key, key->remote_ip))
		return SCOPE_NETNS;

	__builtin_memcpy(lk.ip, key->local_ip, sizeof(lk.ip));
	__builtin_memcpy(rk.ip, key->remote_ip, sizeof(rk.ip));
	la = bpf_map_lookup_elem(&node_addrs, &lk);
	ra = bpf_map_lookup_elem(&node_addrs, &rk);
	if (la && ra) {
		if ((la->flags | ra->flags) & NODE_ADDR_AMBIGUOUS)
			return SCOPE_AMBIGUOUS;
		/* Our own address must be ours, or the table is stale. */
		if (la->netns_cookie == own_netns) {
			*peer_netns = ra->netns_cookie;
			return SCOPE_NODE;
		}
	}
	if (same_ip(key->local_ip, key->remote_ip))
		return SCOPE_NETNS;
	if ((la && (la->flags & NODE_ADDR_AMBIGUOUS)) || (ra && (ra->flags & NODE_ADDR_AMBIGUOUS)))
		return SCOPE_AMBIGUOUS;
	return SCOPE_REMOTE;
}

/*
 * sock_nonblocking reports whether the socket's file has O_NONBLOCK: 1 yes,
 * 0 no, -1 when the socket has no file (not accepted yet).
 */
static __always_inline int sock_nonblocking(struct bpf_sock *sk)
{
	struct tcp_sock *tp;
	struct socket *so;
	struct file *f;

	if (!sk)
		return -1;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return -1;
	so = ((struct sock *)tp)->sk_socket;
	if (!so)
		return -1;
	f = so->file;
	if (!f)
		return -1;
	return (f->f_flags & O_NONBLOCK) ? 1 : 0;
}

/* listener_flags returns the flags of the listener of ip and port in the
 * network namespace netns (exact address, then the IPv4 and IPv6
 * wildcards), or NULL when it is not known. */
static __noinline __attribute__((unused)) __u64 *listener_flags(const __u32 *ip, __u16 port, __u64 netns)
{
	struct endpoint_key ek = {};
	__u64 *flags;

	listener_endpoint(&ek, netns, ip, port);
	flags = bpf_map_lookup_elem(&listeners, &ek);
	if (!flags) {
		set_v4mapped(ek.ip, 0);
		flags = bpf_map_lookup_elem(&listeners, &ek);
	}
	if (!flags) {
		__builtin_memset(ek.ip, 0, sizeof(ek.ip));
		flags = bpf_map_lookup_elem(&listeners, &ek);
	}
	return flags;
}

/* learn_stack_process records the current process as one whose sockets
 * are read through the stack (it splices, or uses kernel TLS: see
 * stack_procs and "Probation"): its later connections stay plain. */
static __always_inline __attribute__((unused)) void learn_stack_process(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 v = STACK_PROC_SPLICER, *n;

	n = bpf_map_lookup_elem(&stack_procs, &tgid);
	if (!n) {
		if (!bpf_map_update_elem(&stack_procs, &tgid, &v, BPF_NOEXIST))
			return;
		n = bpf_map_lookup_elem(&stack_procs, &tgid);
		if (!n)
			return;
	}
	if (!(*n & STACK_PROC_SPLICER))
		__sync_fetch_and_or(n, STACK_PROC_SPLICER);
}

#endif /* __SOCKBYPASS_H */
