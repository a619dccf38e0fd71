// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * cgroup/setsockopt sees SO_RCVLOWAT, TCP_INQ and SO_OOBINLINE. Set before
 * a socket joins a pair (on it, or on its listener), they keep its
 * connection plain TCP; set after, the member leaves the sockhash with its
 * pair (stack_reader.h). So does a member that asks for a ULP (TCP_ULP
 * "tls": kernel TLS runs the sk_msg verdict on plaintext, which must never
 * be redirected, and its receive side reads only the stack queue).
 *
 * Kernel TLS cannot be set up on a member (TLS_TX fails with EINVAL until
 * it has left, and no program allowed here can remove it at once), so a
 * ULP also teaches: the socket's listener (an accepted socket) keeps its
 * later connections plain TCP (LISTENER_STACK_READER), or its process (the
 * client of a pair) keeps its later connections plain (stack_procs). With probation
 * a TLS listener's first connection is plain and sets TCP_ULP, and only
 * connections accepted between its first read and its TCP_ULP pair (they
 * then lose kernel TLS: OpenSSL goes on in user space).
 */
#include "sockbypass.h"
#include "stack_reader.h"

#define SOL_SOCKET 1
#define SOL_TCP 6
#define SO_OOBINLINE 10
#define SO_RCVLOWAT 18
#define TCP_INQ 36
#define TCP_ULP 31
#define IPPROTO_TCP 6

/* Set by the loader for the instance of an enabled cgroup. */
volatile const __u64 enabled_cgroup_id = 0;
/* And its slot (see "Slots" in sockbypass.h). */
volatile const __u32 cgroup_slot = 0;

/* learn_ulp: the socket asks for a ULP (kernel TLS). An accepted socket
 * (on probation, or paired) teaches its listener, the client end of a pair
 * its process; see the top of this file. (A plain socket tells nothing:
 * a server's accepted socket from a remote client must not keep its
 * process's own connections, to a local upstream, plain.) */
static __always_inline void learn_ulp(struct sock_state *state)
{
	__u64 *lf;

	if (!(state->flags & (SOCK_FLAG_PROBATION | SOCK_FLAG_PROBATION_CHILD | SOCK_FLAG_ACCEPTED))) {
		/* The client end, joining or joined. */
		if (state->flags & (SOCK_FLAG_PAIR_CLIENT | SOCK_FLAG_PAIRED))
			learn_stack_process();
		return;
	}
	lf = listener_flags(state->key.local_ip, state->key.local_port, state->netns_cookie);
	if (lf && !(*lf & LISTENER_STACK_READER)) {
		__sync_fetch_and_or(lf, LISTENER_STACK_READER);
		emit_event(state, EVENT_LISTENER_ULP, TCP_ULP);
	}
}

SEC("cgroup/setsockopt")
int sockbypass_setsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock_state *state;
	int reason;

	/* The option is never changed: optlen 0 tells the kernel to use the
	 * application's own buffer (otherwise it hands the handler a kernel
	 * copy, which costs an allocation and a copy, and which 7.2's
	 * fortified memcpy flags in kernel TLS's setsockopt). */
	ctx->optlen = 0;
	if (!sk)
		return 1;
	if (ctx->level == SOL_SOCKET && ctx->optname == SO_RCVLOWAT)
		reason = REASON_RCVLOWAT;
	else if (ctx->level == SOL_SOCKET && ctx->optname == SO_OOBINLINE)
		reason = REASON_OOBINLINE;
	else if (ctx->level == SOL_TCP && ctx->optname == TCP_INQ)
		reason = REASON_TCP_INQ;
	else if (ctx->level == SOL_TCP && ctx->optname == TCP_ULP)
		reason = REASON_ULP;
	else
		return 1;
	if (sk->protocol != IPPROTO_TCP)
		return 1;

	state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state)
		return 1;
	if (reason == REASON_ULP)
		learn_ulp(state);
	mark_stack_reader(state, state->cgroup_id ? state->slot : cgroup_slot, reason, ctx->optname);
	/* A listener already recorded: its accepted sockets inherit the
	 * option (they do not clone its storage; see LISTENER_STACK_READER). */
	if (state->flags & SOCK_FLAG_LISTENER) {
		struct endpoint_key ek = {};
		__u64 *flags;

		listener_endpoint(&ek, state->key.netns_cookie, state->key.local_ip, state->key.local_port);
		flags = bpf_map_lookup_elem(&listeners, &ek);
		if (flags)
			__sync_fetch_and_or(flags, LISTENER_STACK_READER);
	}
	return 1; /* never refuse or change the option */
}

char _license[] SEC("license") = "Dual BSD/GPL";
