// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * Stack readers and read progress (see sockbypass.h, "Pairs"):
 * - cgroup/setsockopt sees SO_RCVLOWAT, TCP_INQ and SO_OOBINLINE. Set before
 *   a socket joins a pair (on it, or on its listener), they keep its
 *   connection plain TCP; set after, they are counted.
 * - tp_btf/sock_recv_length publishes each member's copied_seq and the
 *   redirected bytes it has read, for the sender's ordering and
 *   back-pressure checks, and counts MSG_WAITALL and MSG_OOB reads.
 * Each reason is counted per enabled cgroup (stack_reader.h). The
 * setsockopt program is attached per cgroup: cgroup/setsockopt.c.
 */
#include "sockbypass.h"
#include "stack_reader.h"

#define MSG_OOB 0x01
#define MSG_PEEK 0x02
#define MSG_WAITALL 0x100

SEC("tp_btf/sock_recv_length")
int sockbypass_recv_length(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	int ret = (int)ctx[1];
	int flags = (int)ctx[2];
	struct sock_state *state;
	struct tcp_sock *tp;
	struct receiver *target, value;
	__u32 seq;

	/* Runs for every recvmsg of the node: most return at once. A read
	 * that consumed nothing (EAGAIN, an error) changes nothing a sender
	 * needs, unless it asked for a flag we count. */
	if (!sk || (ret <= 0 && !(flags & (MSG_WAITALL | MSG_OOB))))
		return 0;
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state || !(state->flags & SOCK_FLAG_INSERTED) ||
	    (state->flags & SOCK_FLAG_STACK_READER))
		return 0;

	/* Members only (see mark_stack_reader): counted, still published. */
	if (flags & MSG_WAITALL)
		mark_stack_reader(state, state->cgroup_id, REASON_WAITALL);
	if (flags & MSG_OOB)
		mark_stack_reader(state, state->cgroup_id, REASON_OOB_READ);

	/* MSG_PEEK consumes nothing. */
	if (ret <= 0 || (flags & MSG_PEEK))
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	seq = tp->copied_seq;

	/* What this read returned beyond the stack bytes it consumed came
	 * from the redirected queue. */
	__u32 from_stack = seq - state->last_copied_seq;

	if ((__u32)ret > from_stack)
		state->redirected_read += (__u32)ret - from_stack;
	state->last_copied_seq = seq;

	/* Publish when stack bytes were consumed (a sender that passed one
	 * waits for them), and every READ_PUBLISH_STEP redirected bytes
	 * (back-pressure); most reads of a pair touch no map. */
	if (state->published_seq == seq && state->redirected_read - state->published_read < READ_PUBLISH_STEP)
		return 0;

	target = bpf_map_lookup_elem(&receivers, &state->key);
	if (target && (state->flags & SOCK_FLAG_PUBLISHED) && target->netns_cookie == state->netns_cookie) {
		*(volatile __u64 *)&target->redirected_read = state->redirected_read;
		state->published_read = state->redirected_read;
		if ((state->flags & SOCK_FLAG_PUBLISHED) && state->published_seq == seq)
			return 0;
		*(volatile __u64 *)&target->eligible_seq = RECEIVER_ELIGIBLE | seq;
	} else {
		value.netns_cookie = state->netns_cookie;
		value.eligible_seq = RECEIVER_ELIGIBLE | seq;
		value.redirected_read = state->redirected_read;
		state->published_read = state->redirected_read;
		if (bpf_map_update_elem(&receivers, &state->key, &value, BPF_ANY) != 0)
			return 0;
	}
	state->published_seq = seq;
	state->flags |= SOCK_FLAG_PUBLISHED;
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
