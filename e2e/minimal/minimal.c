// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * The minimal redirector: the least a sockmap accelerator can do, as the
 * yardstick of the per-message cost benchmark (BenchmarkPerMessageCost).
 * sock_ops inserts every established IPv4 socket of its cgroup into a
 * sockhash under its 4-tuple; sk_msg redirects each message to the socket
 * with the mirrored tuple. No pairing rules, no accounting, no back-pressure:
 * not safe for applications (see the README's transparency rules), only a
 * lower bound on cost. Never used outside benchmarks.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2

struct tuple {
	__u32 local_ip;
	__u32 remote_ip;
	__u32 local_port;  /* host byte order */
	__u32 remote_port; /* host byte order */
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple);
	__type(value, __u64);
} minimal_sockhash SEC(".maps");

SEC("sockops")
int minimal_sockops(struct bpf_sock_ops *skops)
{
	struct tuple t = {};

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family != AF_INET)
		return 1;
	t.local_ip = skops->local_ip4;
	t.remote_ip = skops->remote_ip4;
	t.local_port = skops->local_port;
	t.remote_port = bpf_ntohl(skops->remote_port);
	bpf_sock_hash_update(skops, &minimal_sockhash, &t, BPF_ANY);
	return 1;
}

SEC("sk_msg")
int minimal_skmsg(struct sk_msg_md *msg)
{
	struct tuple peer = {};

	if (msg->family != AF_INET)
		return SK_PASS;
	peer.local_ip = msg->remote_ip4;
	peer.remote_ip = msg->local_ip4;
	peer.local_port = bpf_ntohl(msg->remote_port);
	peer.remote_port = msg->local_port;
	bpf_msg_redirect_hash(msg, &minimal_sockhash, &peer, BPF_F_INGRESS);
	return SK_PASS;
}

/*
 * The empty hooks: the floor under any design that attaches, as sockbypass
 * does to an accelerated cgroup, a sock_ops and a cgroup/sock_release
 * program. They return at once; what a connection of their cgroup still
 * pays is the kernel calling them. (sockbypass attaches no
 * cgroup/setsockopt program: the kernel's hook alone cost every setsockopt
 * ~53 ns; see bpf/stack_reader.h.)
 */
SEC("sockops")
int empty_sockops(struct bpf_sock_ops *skops)
{
	return 1;
}

SEC("cgroup/sock_release")
int empty_release(struct bpf_sock *sk)
{
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
