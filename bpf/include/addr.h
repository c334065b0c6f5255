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

/* One u32 field of a program's context, read with a load of its own:
 * clang would otherwise form a pointer into the context (the array of an
 * IPv6 address, or the field a branch picked) and load through it, and the
 * verifier refuses any context pointer but the original one. */
#define KMESH_CTX_U32(ctx, field)                                                         \
	({                                                                               \
		__u32 v_;                                                                \
		asm volatile("%0 = *(u32 *)(%1 + %2)"                                   \
			     : "=r"(v_)                                                  \
			     : "r"(ctx), "i"(__builtin_offsetof(typeof(*(ctx)), field)));  \
		v_;                                                                      \
	})

/* The 16-byte form of a context's address, by the context's family: its
 * IPv4 field mapped, or the four words of its IPv6 field (sockops, sk_msg). */
#define kmesh_ip6_of(out, ctx, ip4, ip6)                                   \
	do {                                                                \
		if (KMESH_CTX_U32(ctx, family) == KMESH_AF_INET6) {         \
			(out)[0] = KMESH_CTX_U32(ctx, ip6[0]);              \
			(out)[1] = KMESH_CTX_U32(ctx, ip6[1]);              \
			(out)[2] = KMESH_CTX_U32(ctx, ip6[2]);              \
			(out)[3] = KMESH_CTX_U32(ctx, ip6[3]);              \
		} else {                                                    \
			(out)[0] = 0;                                       \
			(out)[1] = 0;                                       \
			(out)[2] = bpf_htonl(0xffff);                       \
			(out)[3] = KMESH_CTX_U32(ctx, ip4);                 \
		}                                                           \
	} while (0)

/* A sockops socket's own address. An AF_INET6 socket connected to an IPv4
 * address has it mapped in local_ip6 already. */
static __always_inline void sock_local_addr(const struct bpf_sock_ops *skops, struct kmesh_addr *a)
{
	kmesh_ip6_of(a->ip6, skops, local_ip4, local_ip6);
	a->port = bpf_htons((__u16)skops->local_port);
	a->pad = 0;
}

#endif /* __KMESH_ADDR_H__ */
