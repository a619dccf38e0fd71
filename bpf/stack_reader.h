// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Stack readers (see sockbypass.h, "Pairs"): a socket whose reader needs
 * plain-TCP semantics, found by cgroup/setsockopt (cgroup/setsockopt.c).
 * Each reason is counted per enabled cgroup.
 */
#ifndef SOCKBYPASS_STACK_READER_H
#define SOCKBYPASS_STACK_READER_H

#include "sockbypass.h"

enum fallback_reason {
	REASON_RCVLOWAT,
	REASON_TCP_INQ,
	REASON_OOBINLINE,
	/* TCP_ULP: only a member is concerned (a ULP needs an established
	 * socket, which joins at ESTABLISHED or never). */
	REASON_ULP,
};

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
 * connection) off the sockhash. A member is marked leaving: its peer
 * stops redirecting to it, and it leaves the sockhash once it has read
 * what was redirected to it (see "Leaving" in sockbypass.h); counted in
 * late_stack_options.
 */
static __always_inline void mark_stack_reader(struct sock_state *state, __u32 slot, int reason, __u32 optname)
{
	if (state->flags & SOCK_FLAG_INSERTED) {
		struct cgroup_counters *c;

		if (state->flags & SOCK_FLAG_LATE_OPTION)
			return;
		__sync_fetch_and_or(&state->flags, SOCK_FLAG_LEAVING | SOCK_FLAG_LATE_OPTION);
		emit_event(state, EVENT_LATE_STACK_OPTION, optname);
		c = counters_for(slot);
		if (c)
			__sync_fetch_and_add(&c->late_stack_options, 1);
		return;
	}
	if (reason == REASON_ULP || (state->flags & SOCK_FLAG_STACK_READER))
		return;
	state->flags |= SOCK_FLAG_STACK_READER;
	count_reason(slot, reason);
}

#endif /* SOCKBYPASS_STACK_READER_H */
