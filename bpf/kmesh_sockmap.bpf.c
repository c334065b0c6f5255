// SPDX-License-Identifier: GPL-2.0
/*
 * Same-host acceleration (optional, -enable-sockmap):
 *   sockops  attached to the governed cgroup: enrolls both ends of a
 *            same-host TCP connection in km_sock_hash when established
 *            (rules in include/sockmap.h);
 *   sk_msg   attached to km_sock_hash: hands each message a socket sends
 *            straight to its peer's receive queue, skipping TCP/IP twice.
 *            A peer that is not enrolled gets the message through TCP.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "sockmap.h"

#define SOCKOPS_DONE 1 /* sockops return value: ignored by these callbacks */

char LICENSE[] SEC("license") = "GPL";

SEC("sockops")
int kmesh_sockops(struct bpf_sock_ops *skops)
{
	struct kmesh_sock_key key;
	struct sock *sk;
	bool active;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		break;
	default:
		return SOCKOPS_DONE;
	}
	{
		/* A BTF pointer to the kernel socket: its fields (file, ULP) can be
		 * read, which the bpf_sock view does not allow. */
		struct bpf_sock *bsk = skops->sk;
		struct tcp_sock *tp;

		if (!bsk)
			return SOCKOPS_DONE;
		tp = bpf_skc_to_tcp_sock(bsk);
		if (!tp)
			return SOCKOPS_DONE;
		sk = (struct sock *)tp;
	}
	if (skops->op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
		listener_remember(skops, sk);
		return SOCKOPS_DONE;
	}
	active = skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
	if (!sockmap_enabled() || !sockmap_eligible(skops, sk, active))
		return SOCKOPS_DONE;
	key = sock_key_of(skops);
	/* Failure (map full) only means this connection is not accelerated. */
	bpf_sock_hash_update(skops, &km_sock_hash, &key, BPF_NOEXIST);
	return SOCKOPS_DONE;
}

SEC("sk_msg")
int kmesh_sk_msg(struct sk_msg_md *msg)
{
	struct kmesh_sock_key peer;

	if (!sockmap_enabled() || !turn_redirect(msg))
		return SK_PASS;
	peer = peer_key_of(msg);
	/* A redirect that finds no peer returns SK_DROP and redirects nothing;
	 * the message then goes through TCP like any other. */
	bpf_msg_redirect_hash(msg, &km_sock_hash, &peer, BPF_F_INGRESS);
	return SK_PASS;
}
