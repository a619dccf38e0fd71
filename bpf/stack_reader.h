// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Stack readers (see sockbypass.h, "Pairs"): a socket whose reader needs
 * plain-TCP semantics because it set SO_RCVLOWAT, TCP_INQ or SO_OOBINLINE,
 * or attached a ULP (TCP_ULP "tls": kernel TLS runs the sk_msg verdict on
 * plaintext, which must never be redirected, and its receive side reads
 * only the stack queue).
 *
 * No hook watches setsockopt: a cgroup/setsockopt program would cost every
 * setsockopt of every socket of an enabled cgroup the kernel's hook (~53 ns
 * measured on the development VM, with a program that returns at once), and
 * programs set options on each connection (Go's net package five per end).
 * The options are read from the socket itself (reader_option), where they
 * live and where accepted sockets inherit them from their listener:
 *
 *   - before a socket joins: at listen() (TCP_LISTEN_CB, the listener),
 *     and at ESTABLISHED (the client; an accepted socket, whose options are
 *     its listener's, teaches the listener: LISTENER_STACK_READER). Such a
 *     connection declines the pair handshake and stays plain TCP; each
 *     reason is counted per enabled cgroup.
 *   - after it joined (late): the member's own sk_msg at its next send,
 *     its peer's sk_msg at each message it would redirect to it, and
 *     settle on the stack packets of either end. The member is marked
 *     leaving (its peer's bytes take the stack, which serves the option
 *     from then on) and leaves the sockhash once it has read what was
 *     redirected to it (see "Leaving" in sockbypass.h); counted in
 *     late_stack_options.
 *
 * A ULP can be attached only to an established socket, so only a member
 * (or a plain socket) has one. Kernel TLS cannot be set up on a member
 * (TLS_TX fails with EINVAL until it has left), so a ULP also teaches: the
 * socket's listener (an accepted socket) keeps its later connections plain
 * TCP (LISTENER_STACK_READER), and its process (the client of a pair, seen
 * from its own sendmsg) keeps its later connections plain (stack_procs).
 * A TCP_ULP the kernel refuses (no tls module) attaches nothing and
 * teaches nothing: the application goes on in user space, and its
 * connections are as fast as any other.
 */
#ifndef SOCKBYPASS_STACK_READER_H
#define SOCKBYPASS_STACK_READER_H

#include "sockbypass.h"

#define SOL_SOCKET 1
#define SOL_TCP 6
#define SO_OOBINLINE 10
#define SO_RCVLOWAT 18
#define TCP_INQ 36
#define TCP_ULP 31

enum fallback_reason {
	REASON_RCVLOWAT,
	REASON_TCP_INQ,
	REASON_OOBINLINE,
	REASON_ULP,
};

/* The option each reason names (the detail of EVENT_LATE_STACK_OPTION). */
static __always_inline __u32 reason_optname(int reason)
{
	switch (reason) {
	case REASON_RCVLOWAT:
		return SO_RCVLOWAT;
	case REASON_TCP_INQ:
		return TCP_INQ;
	case REASON_OOBINLINE:
		return SO_OOBINLINE;
	}
	return TCP_ULP;
}

/* Views of the kernel fields that hold the options, relocated against the
 * running kernel's BTF (CO-RE) and read through bpf_rdonly_cast: plain
 * loads, cheap enough for every message. sk_flags is a define for
 * __sk_common.skc_flags; bit SOCK_URGINLINE (2 in enum sock_flags since
 * Linux 2.6) is SO_OOBINLINE. */
#define SOCK_URGINLINE_BIT 2

struct sock_common___opts {
	unsigned long skc_flags;
} __attribute__((preserve_access_index));

struct sock___opts {
	struct sock_common___opts __sk_common;
	int sk_rcvlowat;
} __attribute__((preserve_access_index));

struct inet_connection_sock___opts {
	const void *icsk_ulp_ops;
} __attribute__((preserve_access_index));

struct tcp_ulp_ops___opts {
	char name[16];
} __attribute__((preserve_access_index));

struct tcp_sock___opts {
	__u8 recvmsg_inq : 1;
} __attribute__((preserve_access_index));

/* tcp_inq_set reads tcp_sock.recvmsg_inq, a bitfield: the byte that holds
 * it at the running kernel's offset, shifted as the kernel lays it out. */
static __always_inline int tcp_inq_set(const void *sk)
{
	struct tcp_sock___opts *tp = bpf_rdonly_cast(sk, __builtin_btf_type_id(*(struct tcp_sock___opts *)0, 1));
	__u64 v;

	v = *(__u8 *)((void *)tp + __builtin_preserve_field_info(tp->recvmsg_inq, BPF_FIELD_BYTE_OFFSET));
	v <<= __builtin_preserve_field_info(tp->recvmsg_inq, BPF_FIELD_LSHIFT_U64);
	v >>= __builtin_preserve_field_info(tp->recvmsg_inq, BPF_FIELD_RSHIFT_U64);
	return v != 0;
}

/* ulp_is_mptcp reports whether a ULP is MPTCP's subflow: it carries every
 * TCP subflow of an MPTCP socket (Go listens with MPTCP by default since Go
 * 1.24), the connection falls back to plain TCP with a plain peer, and its
 * reads are TCP's. */
static __always_inline int ulp_is_mptcp(const void *ops)
{
	struct tcp_ulp_ops___opts *u = bpf_rdonly_cast(ops, __builtin_btf_type_id(*(struct tcp_ulp_ops___opts *)0, 1));

	return u->name[0] == 'm' && u->name[1] == 'p' && u->name[2] == 't' && u->name[3] == 'c' && u->name[4] == 'p' &&
	       u->name[5] == 0;
}

/*
 * reader_option returns why the reader of the TCP socket at sk (own or a
 * peer's) needs plain-TCP semantics (a REASON_*), or -1 when nothing says
 * so. Any ULP but MPTCP's subflow counts (kernel TLS is the one that
 * matters; an SMC or espintcp socket is no place to redirect to either).
 * SO_RCVLOWAT counts when above 1 (1 is the default, and what 0
 * sets). A peer that closed may read as anything (its memory is reused):
 * its messages take the stack, as they would anyway.
 */
static __always_inline int reader_option(const void *sk)
{
	struct inet_connection_sock___opts *icsk;
	struct sock___opts *s;

	if (!sk)
		return -1;
	s = bpf_rdonly_cast(sk, __builtin_btf_type_id(*(struct sock___opts *)0, 1));
	icsk = bpf_rdonly_cast(sk, __builtin_btf_type_id(*(struct inet_connection_sock___opts *)0, 1));
	if (icsk->icsk_ulp_ops && !ulp_is_mptcp(icsk->icsk_ulp_ops))
		return REASON_ULP;
	if (s->sk_rcvlowat > 1)
		return REASON_RCVLOWAT;
	if (s->__sk_common.skc_flags & (1UL << SOCK_URGINLINE_BIT))
		return REASON_OOBINLINE;
	if (tcp_inq_set(sk))
		return REASON_TCP_INQ;
	return -1;
}

/* peer_reader_option reports whether the peer of a member set a reader
 * option (see reader_option). */
static __always_inline int peer_reader_option(const struct sock_state *state)
{
	return state->peer_sk && reader_option((const void *)state->peer_sk) >= 0;
}

static __always_inline void count_reason(__u32 slot, int reason)
{
	struct cgroup_counters *c = counters_for(slot);

	if (!c)
		return;
	switch (reason) {
	case REASON_RCVLOWAT:
		__sync_fetch_and_add(&c->fallback_rcvlowat, 1);
		break;
	case REASON_TCP_INQ:
		__sync_fetch_and_add(&c->fallback_tcp_inq, 1);
		break;
	case REASON_OOBINLINE:
		__sync_fetch_and_add(&c->fallback_oobinline, 1);
		break;
	}
}

/*
 * mark_stack_reader records that the socket's reader needs plain-TCP
 * semantics. Before the socket joins a pair this keeps it (and so its
 * connection) off the sockhash; counted by reason, once. A member is marked
 * leaving: its peer stops redirecting to it, and it leaves the sockhash
 * once it has read what was redirected to it (see "Leaving" in
 * sockbypass.h); counted in late_stack_options, once.
 */
static __always_inline void mark_stack_reader(struct sock_state *state, __u32 slot, int reason)
{
	if (state->flags & SOCK_FLAG_INSERTED) {
		struct cgroup_counters *c;

		if (state->flags & SOCK_FLAG_LATE_OPTION)
			return;
		__sync_fetch_and_or(&state->flags, SOCK_FLAG_LEAVING | SOCK_FLAG_LATE_OPTION);
		emit_event(state, EVENT_LATE_STACK_OPTION, reason_optname(reason));
		c = counters_for(slot);
		if (c)
			__sync_fetch_and_add(&c->late_stack_options, 1);
		return;
	}
	if (state->flags & SOCK_FLAG_STACK_READER)
		return;
	state->flags |= SOCK_FLAG_STACK_READER;
	count_reason(slot, reason);
}

/*
 * learn_ulp: a member has a ULP (kernel TLS). An accepted socket (paired,
 * or on probation) teaches its listener; the client end of a pair its
 * process, when in_process says the program runs in the process's own
 * sendmsg (a softirq's current task is anybody). A plain socket teaches
 * nothing: a server's accepted socket from a remote client must not keep
 * its process's own connections, to a local upstream, plain.
 */
static __always_inline void learn_ulp(struct sock_state *state, int in_process)
{
	__u64 *lf;

	if (!(state->flags & (SOCK_FLAG_PROBATION | SOCK_FLAG_PROBATION_CHILD | SOCK_FLAG_ACCEPTED))) {
		/* The client end, joining or joined. */
		if (in_process && (state->flags & (SOCK_FLAG_PAIR_CLIENT | SOCK_FLAG_PAIRED)))
			learn_stack_process();
		return;
	}
	lf = listener_flags(state->key.local_ip, state->key.local_port, state->netns_cookie);
	if (lf && !(*lf & LISTENER_STACK_READER)) {
		__sync_fetch_and_or(lf, LISTENER_STACK_READER);
		emit_event(state, EVENT_LISTENER_ULP, TCP_ULP);
	}
}

#endif /* SOCKBYPASS_STACK_READER_H */
