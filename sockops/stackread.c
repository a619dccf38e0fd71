// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * The stack-read tracer: one program for the node, on the kernel's
 * tcp_rcv_space_adjust tracepoint, which fires each time a TCP socket's
 * stack receive queue is read with data by recvmsg, and on every splice
 * from a TCP socket (even with nothing queued). For the sockets of enabled
 * cgroups it tells how they are read, which nothing at ESTABLISHED can
 * (see "Probation" in sockbypass.h): it ends a listener's probation, and
 * learns the processes that splice. Other sockets cost one storage lookup.
 */
#include "sockbypass.h"
#include "stack_reader.h"

/* The syscall the current task is in, from its saved registers; the two
 * layouts are told apart by CO-RE (the suffix after ___ is ignored when
 * matching the kernel's struct pt_regs). */
struct pt_regs___x86 {
	long orig_ax;
} __attribute__((preserve_access_index));

struct pt_regs___arm64 {
	int syscallno;
} __attribute__((preserve_access_index));

/* recv_syscall reports whether the current task reads with the recvmsg
 * family (read, readv, recvfrom, recvmsg, recvmmsg), the one reader that
 * sees a member's redirected queue. Anything else (splice, sendfile,
 * io_uring, a syscall it cannot tell) is not. */
static __always_inline int recv_syscall(void)
{
	void *regs = (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
	long nr = -1;

	if (!regs)
		return 0;
	if (__builtin_preserve_field_info(((struct pt_regs___x86 *)0)->orig_ax, BPF_FIELD_EXISTS)) {
		if (bpf_probe_read_kernel(&nr, sizeof(nr), &((struct pt_regs___x86 *)regs)->orig_ax))
			return 0;
		/* x86_64: read, readv, recvfrom, recvmsg, recvmmsg */
		return nr == 0 || nr == 19 || nr == 45 || nr == 47 || nr == 299;
	}
	if (__builtin_preserve_field_info(((struct pt_regs___arm64 *)0)->syscallno, BPF_FIELD_EXISTS)) {
		int n = -1;

		if (bpf_probe_read_kernel(&n, sizeof(n), &((struct pt_regs___arm64 *)regs)->syscallno))
			return 0;
		/* arm64 (asm-generic numbers) */
		return n == 63 || n == 65 || n == 207 || n == 212 || n == 243;
	}
	return 0;
}

/* end_probation: the first read of an accepted socket whose listener was
 * on probation, by recvmsg: the listener is proven, or found to have
 * blocking children. */
static __noinline void end_probation(struct sock_state *state, struct sock *sk)
{
	__u64 *lf;

	__sync_fetch_and_and(&state->flags, ~(__u64)SOCK_FLAG_PROBATION);
	lf = listener_flags(state->key.local_ip, state->key.local_port, state->netns_cookie);
	if (!lf)
		return;
	if (own_blocking((struct bpf_sock *)sk)) {
		if (!(*lf & LISTENER_BLOCKING_CHILDREN)) {
			__sync_fetch_and_or(lf, LISTENER_BLOCKING_CHILDREN);
			emit_event(state, EVENT_LISTENER_BLOCKING_CHILDREN, 0);
		}
		return;
	}
	if ((*lf & (LISTENER_PROVEN | LISTENER_READ_NONBLOCK)) != (LISTENER_PROVEN | LISTENER_READ_NONBLOCK))
		__sync_fetch_and_or(lf, LISTENER_PROVEN | LISTENER_READ_NONBLOCK);
}

/* spliced: a socket of an enabled cgroup was read by something other than
 * recvmsg (once per socket). */
static __noinline void spliced(struct sock_state *state, struct sock *sk)
{
	struct cgroup_counters *c;
	__u64 old = __sync_fetch_and_or(&state->flags, SOCK_FLAG_SPLICED);
	__u32 queued = 0;
	__s32 refs = 0;

	if (old & SOCK_FLAG_SPLICED)
		return;
	learn_stack_process();
	/* An accepted socket: its listener's later connections stay plain. */
	if (old & (SOCK_FLAG_PROBATION | SOCK_FLAG_PROBATION_CHILD | SOCK_FLAG_ACCEPTED)) {
		__u64 *lf = listener_flags(state->key.local_ip, state->key.local_port, state->netns_cookie);

		if (old & SOCK_FLAG_PROBATION)
			__sync_fetch_and_and(&state->flags, ~(__u64)SOCK_FLAG_PROBATION);
		if (lf && !(*lf & LISTENER_STACK_READER)) {
			__sync_fetch_and_or(lf, LISTENER_STACK_READER);
			emit_event(state, EVENT_LISTENER_SPLICED, 0);
		}
	}
	if (!(old & SOCK_FLAG_INSERTED))
		return;
	c = counters_for(state->slot);
	if (read_psock(&sk->sk_user_data, &queued, &refs) < 0)
		return; /* no longer a member */
	if (queued) {
		/* Leaving now would let the peer's next bytes overtake these. */
		if (c)
			__sync_fetch_and_add(&c->splice_stalled, 1);
		emit_event(state, EVENT_SPLICE_STALLED, queued);
		return;
	}
	if (old & SOCK_FLAG_LEAVING)
		return;
	__sync_fetch_and_or(&state->flags, SOCK_FLAG_LEAVING);
	if (c)
		__sync_fetch_and_add(&c->splice_readers, 1);
	emit_event(state, EVENT_SPLICE_READER, 0);
}

SEC("tp_btf/tcp_rcv_space_adjust")
int sockbypass_stack_read(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	struct sock_state *state;
	__u64 flags;

	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state)
		return 0;
	flags = state->flags;
	if (!(flags & (SOCK_FLAG_HANDLED | SOCK_FLAG_PROBATION)) || (flags & SOCK_FLAG_SPLICED))
		return 0;
	/* An accepted socket left plain by its listener's probation that
	 * attached kernel TLS: no sk_msg runs for it, so its reads teach the
	 * listener (see stack_reader.h; once). */
	if ((flags & SOCK_FLAG_PROBATION_CHILD) && !(flags & SOCK_FLAG_STACK_READER) &&
	    reader_option(sk) == REASON_ULP) {
		__sync_fetch_and_or(&state->flags, SOCK_FLAG_STACK_READER);
		learn_ulp(state, 0);
	}
	if (recv_syscall()) {
		if (flags & SOCK_FLAG_PROBATION)
			end_probation(state, sk);
		return 0;
	}
	spliced(state, sk);
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
