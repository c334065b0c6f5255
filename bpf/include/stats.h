/* SPDX-License-Identifier: GPL-2.0 */
/* Counters for /metrics: bumped on the hot path in per-CPU maps, summed by
 * the daemon when scraped. A full map only means a counter is missing. */
#ifndef __KMESH_STATS_H__
#define __KMESH_STATS_H__

#include "kmesh_maps.h"

static __always_inline struct kmesh_config *kmesh_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&km_config, &zero);
}

static __always_inline bool track_connections(void)
{
	struct kmesh_config *cfg = kmesh_config();

	return cfg && cfg->track_connections;
}

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&km_stats, &idx);

	if (v)
		*v += 1; /* per CPU: no other writer */
}

/* The counters under ``key`` in km_stats_listener or km_stats_endpoint,
 * created at zero on first use; NULL when the map is full. */
static __always_inline struct kmesh_conn_counters *conn_counters(void *map, const void *key)
{
	struct kmesh_conn_counters zero = {};

	return map_lookup_or_init(map, key, &zero);
}

static __always_inline struct kmesh_conn_counters *ep_counters(__u32 cluster_id, const struct kmesh_addr *ep)
{
	struct kmesh_ep_key key = { .cluster_id = cluster_id, .ep = *ep };

	return conn_counters(&km_stats_endpoint, &key);
}

/* A connect redirected from ``vip`` to ``ep`` of the cluster. Only connect4
 * writes ``opened``, in process context: a plain per-CPU add is enough. */
static __always_inline void stat_opened(const struct kmesh_addr *vip, __u32 cluster_id, const struct kmesh_addr *ep)
{
	struct kmesh_conn_counters *c = conn_counters(&km_stats_listener, vip);

	if (c)
		c->opened += 1;
	c = ep_counters(cluster_id, ep);
	if (c)
		c->opened += 1;
}

/* What the end of a connection adds. The close path also runs in softirq
 * (a reset arriving) and can interrupt a program on the same CPU, hence
 * atomic adds even in per-CPU values. */
static __always_inline void counters_closed(struct kmesh_conn_counters *c, __u32 result, __u64 to_ep, __u64 from_ep)
{
	if (!c)
		return;
	__sync_fetch_and_add(&c->closed, 1);
	if (result == KMESH_CONN_FAILED)
		__sync_fetch_and_add(&c->failed, 1);
	if (to_ep)
		__sync_fetch_and_add(&c->bytes_to_ep, to_ep);
	if (from_ep)
		__sync_fetch_and_add(&c->bytes_from_ep, from_ep);
}

#endif /* __KMESH_STATS_H__ */
