/* SPDX-License-Identifier: GPL-2.0 */
/* Active-connection accounting per endpoint (LEAST_REQUEST). */
#ifndef __KMESH_ENDPOINT_H__
#define __KMESH_ENDPOINT_H__

#include "kmesh_maps.h"

static __always_inline __u64 endpoint_active(const struct kmesh_endpoint *ep)
{
	struct kmesh_addr key = { .ip = ep->ip, .port = ep->port };
	struct kmesh_ep_stats *st = bpf_map_lookup_elem(&km_ep_active, &key);

	return st ? st->active : 0;
}

static __always_inline void endpoint_active_add(const struct kmesh_addr *key, __s64 delta)
{
	struct kmesh_ep_stats *st = bpf_map_lookup_elem(&km_ep_active, key);

	if (!st) {
		struct kmesh_ep_stats zero = {};

		if (delta < 0)
			return; /* never went up: nothing to take back */
		/* BPF_NOEXIST: a concurrent connect may have created it. */
		bpf_map_update_elem(&km_ep_active, key, &zero, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&km_ep_active, key);
		if (!st)
			return; /* map full: the endpoint is simply not counted */
	}
	__sync_fetch_and_add(&st->active, delta);
}

/* Remember the endpoint of a tracked socket and count it as active. If this
 * socket was already counted (a second connect() on it), move the count. */
static __always_inline void endpoint_track(struct bpf_sock *sk, const struct kmesh_endpoint *ep)
{
	struct kmesh_addr key = { .ip = ep->ip, .port = ep->port };
	struct kmesh_addr *prev;

	prev = bpf_sk_storage_get(&km_sock_ep, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!prev)
		return;
	if (prev->ip || prev->port)
		endpoint_active_add(prev, -1);
	*prev = key;
	endpoint_active_add(&key, 1);
}

static __always_inline void endpoint_untrack(struct bpf_sock *sk)
{
	struct kmesh_addr *prev = bpf_sk_storage_get(&km_sock_ep, sk, 0, 0);

	if (!prev || !(prev->ip || prev->port))
		return;
	endpoint_active_add(prev, -1);
	prev->ip = 0;
	prev->port = 0;
}

#endif /* __KMESH_ENDPOINT_H__ */
