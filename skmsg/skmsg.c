// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * sk_msg program on the sockhash: redirects each message of a joined pair
 * (see "Pairs" in sockbypass.h) into the receive queue of its peer (the
 * socket with the mirrored key: in the same network namespace, or for
 * node-scope keys in the namespace that owned the peer's address when the
 * connection was established), from the first byte on. A message takes the
 * stack only when the peer is gone, or under back-pressure (the peer has
 * REDIRECT_UNREAD_LIMIT redirected bytes unread), or when either end is
 * leaving (see "Leaving" in sockbypass.h), turned blocking or set a reader
 * option (see stack_reader.h). It never drops.
 */
#include "sockbypass.h"
#include "stack_reader.h"

SEC("sk_msg")
int sockbypass_skmsg(struct sk_msg_md *msg)
{
	struct sock_state *state;
	struct cgroup_counters *c;
	struct tcp_sock *tp;
	__u64 size = msg->size;
	__u32 slot = 0;
	__u64 unread = 0;
	__u32 copied_seq = 0;
	int reason;

	if (!msg->sk)
		return SK_PASS;
	/* After shutdown(SHUT_WR) (or a reset) plain TCP refuses to send: the
	 * stack says so (EPIPE), and no byte reaches the peer after our FIN. */
	if (msg->sk->state != BPF_TCP_ESTABLISHED && msg->sk->state != BPF_TCP_CLOSE_WAIT)
		return SK_PASS;

	state = bpf_sk_storage_get(&sock_state, msg->sk, 0, 0);
	if (state)
		slot = state->slot;
	c = counters_for(slot);
	if (!state || !(state->flags & SOCK_FLAG_INSERTED))
		goto pass;
	state->msgs_sent++; /* under the socket lock */

	/* A client learns here that its server joined too. Until then its
	 * bytes cannot be redirected: it gives the pair up (exactly one of
	 * this exchange and the server's succeeds) and sends through the
	 * stack; the server then stays out and removes us. */
	if (!(state->flags & SOCK_FLAG_PAIRED)) {
		struct pair *pair = bpf_map_lookup_elem(&pairs, &state->key);
		__u64 old;

		if (!pair)
			goto pass;
		old = pair->state;
		if (old == PAIR_CLIENT_JOINED) {
			old = __sync_val_compare_and_swap(&pair->state, PAIR_CLIENT_JOINED, PAIR_ABANDONED);
			if (old == PAIR_CLIENT_JOINED) {
				if (c)
					__sync_fetch_and_add(&c->pairs_abandoned, 1);
				goto pass;
			}
		}
		if (old != PAIR_JOINED)
			goto pass;
		adopt_server(state, pair);
	}

	if (state->flags & SOCK_FLAG_EXPLICIT_PEER) {
		/* Sidecar mode: the app's peer is the sidecar, and the
		 * sidecar's is the app, whatever their addresses say; but
		 * only while the app's endpoint is unique. */
		__u64 *users = bpf_map_lookup_elem(&mesh_endpoints, &state->app_endpoint);

		if (!users || (*users & ENDPOINT_COUNT_MASK) != 1) {
			if (c)
				__sync_fetch_and_add(&c->mesh_ambiguous, 1);
			goto pass;
		}
	}

	/* A pair that dissolves (see "Leaving" in sockbypass.h): this end
	 * turned blocking, or either end is leaving. Its messages take the
	 * stack, where sock_ops sees them and settles the pair. */
	if (state->flags & (SOCK_FLAG_LEAVING | SOCK_FLAG_PEER_REMOVED))
		goto pass;
	if (own_blocking(msg->sk)) {
		__sync_fetch_and_or(&state->flags, SOCK_FLAG_LEAVING);
		if (c)
			__sync_fetch_and_add(&c->late_blocking, 1);
		emit_event(state, EVENT_LATE_BLOCKING, 0);
		goto pass;
	}
	/* This end's reader set an option only plain TCP serves, or it
	 * attached a ULP (kernel TLS), since it joined (see stack_reader.h):
	 * it leaves, and a ULP teaches its listener or process. */
	reason = reader_option(msg->sk);
	if (reason >= 0) {
		if (reason == REASON_ULP && !(state->flags & SOCK_FLAG_LATE_OPTION))
			learn_ulp(state, 1);
		mark_stack_reader(state, slot, reason);
		goto pass;
	}
	/* The peer is leaving, or its reader set such an option: what it
	 * reads from now on must come through the stack. */
	if (peer_leaving(state) || peer_reader_option(state))
		goto pass;

	/* The fast path. A pair is one connection, proven at the handshake
	 * (sequence numbers cross-matched), joined before any byte moved; the
	 * surviving end holds the 4-tuple, so no other socket can take the
	 * peer's key while we live. Until this socket passes a message, the
	 * peer holds no stack bytes of ours and stays a redirect target until
	 * it closes (then it leaves the sockhash and the redirect fails). So
	 * only back-pressure needs the peer's progress, and only when the
	 * progress we last saw puts us near the limit. */
	if ((state->flags & (SOCK_FLAG_PAIRED | SOCK_FLAG_PASSED)) == SOCK_FLAG_PAIRED &&
	    state->redirected_sent - state->peer_read_seen + size <= REDIRECT_UNREAD_LIMIT)
		goto redirect;

	/* The slow path: read the peer's progress from the peer itself. Is
	 * it still the socket we paired with, and has it read every byte we
	 * sent through the stack (its copied_seq has reached our write_seq)? */
	if (peer_progress(state, &copied_seq, &unread) < 0)
		goto pass;
	tp = bpf_skc_to_tcp_sock(msg->sk);
	if (!tp)
		goto pass;
	if (tp->write_seq != copied_seq) {
		if (c)
			__sync_fetch_and_add(&c->passed_unread_msgs, 1);
		goto pass;
	}

	/* Back-pressure: too much redirected and still unread. */
	state->peer_read_seen = state->redirected_sent - unread;
	if (unread + size > REDIRECT_UNREAD_LIMIT) {
		if (c)
			__sync_fetch_and_add(&c->passed_backpressure_msgs, 1);
		goto pass;
	}

redirect:
	if (bpf_msg_redirect_hash(msg, &sockhash, &state->peer_key, BPF_F_INGRESS) == SK_PASS) {
		state->flags |= SOCK_FLAG_REDIRECTING;
		state->redirected_sent += size;
		if (c) {
			__sync_fetch_and_add(&c->redirected_msgs, 1);
			__sync_fetch_and_add(&c->redirected_bytes, size);
			if (state->peer_netns_cookie != state->netns_cookie) {
				__sync_fetch_and_add(&c->redirected_xns_msgs, 1);
				__sync_fetch_and_add(&c->redirected_xns_bytes, size);
			}
		}
		return SK_PASS;
	}
	/* The peer is not in the sockhash any more: it is closing. */
	if ((state->flags & SOCK_FLAG_REDIRECTING) && c)
		__sync_fetch_and_add(&c->redirect_failures, 1);
pass:
	if (state) {
		state->flags &= ~SOCK_FLAG_REDIRECTING;
		if (state->flags & SOCK_FLAG_PAIRED)
			state->flags |= SOCK_FLAG_PASSED;
	}
	if (c) {
		__sync_fetch_and_add(&c->passed_msgs, 1);
		__sync_fetch_and_add(&c->passed_bytes, size);
	}
	return SK_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
