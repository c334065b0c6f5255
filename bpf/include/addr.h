/* SPDX-License-Identifier: GPL-2.0 */
/* Socket addresses of both families in one form (struct kmesh_addr):
 * 16 bytes, IPv4 mapped (::ffff:a.b.c.d). */
#ifndef __KMESH_ADDR_H__
#define __KMESH_ADDR_H__

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "kmesh_records.h"

#define KMESH_AF_INET 2
#define KMESH_AF_INET6 10

static __always_inline void addr_set_v4(struct kmesh_addr *a, __u32 ip4, __u16 port)
{
	a->ip6[0] = 0;
	a->ip6[1] = 0;
	a->ip6[2] = bpf_htonl(0xffff);
	a->ip6[3] = ip4;
	a->port = port;
	a->pad = 0;
}

static __always_inline bool addr_is_v4(const struct kmesh_addr *a)
{
	return a->ip6[0] == 0 && a->ip6[1] == 0 && a->ip6[2] == bpf_htonl(0xffff);
}

/* The wildcard of a's family: ::ffff:0.0.0.0 (Envoy's 0.0.0.0) for IPv4,
 * :: for IPv6. An IPv6 connect never falls back to the IPv4 wildcard, as a
 * listener on 0.0.0.0 takes no IPv6 connection. */
static __always_inline void addr_to_wildcard(struct kmesh_addr *a)
{
	if (!addr_is_v4(a)) {
		a->ip6[0] = 0;
		a->ip6[1] = 0;
		a->ip6[2] = 0;
	}
	a->ip6[3] = 0;
}

/* A sockops socket's own address. An AF_INET6 socket connected to an IPv4
 * address has it mapped in local_ip6 already. Each branch loads its own
 * fields (barrier_var): clang would otherwise load the last word through a
 * pointer chosen by the branch, and the verifier refuses an offset context
 * pointer. */
static __always_inline void sock_local_addr(const struct bpf_sock_ops *skops, struct kmesh_addr *a)
{
	__u32 w0 = 0, w1 = 0, w2, w3;

	if (skops->family == KMESH_AF_INET6) {
		w0 = skops->local_ip6[0];
		w1 = skops->local_ip6[1];
		w2 = skops->local_ip6[2];
		w3 = skops->local_ip6[3];
		barrier_var(w3);
	} else {
		w2 = bpf_htonl(0xffff);
		w3 = skops->local_ip4;
		barrier_var(w3);
	}
	a->ip6[0] = w0;
	a->ip6[1] = w1;
	a->ip6[2] = w2;
	a->ip6[3] = w3;
	a->port = bpf_htons((__u16)skops->local_port);
	a->pad = 0;
}

#endif /* __KMESH_ADDR_H__ */
