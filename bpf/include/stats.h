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

static __always_inline void stat_listener_redirect(__u32 ip, __u16 port)
{
	struct kmesh_addr key = { .ip = ip, .port = port };
	__u64 one = 1, *v = bpf_map_lookup_elem(&km_stats_listener, &key);

	if (v)
		*v += 1;
	else
		bpf_map_update_elem(&km_stats_listener, &key, &one, BPF_NOEXIST);
}

static __always_inline struct kmesh_ep_counters *ep_counters(__u32 cluster_id, const struct kmesh_addr *ep)
{
	struct kmesh_ep_key key = { .cluster_id = cluster_id, .ep = *ep };
	struct kmesh_ep_counters *c = bpf_map_lookup_elem(&km_stats_endpoint, &key);

	if (!c) {
		struct kmesh_ep_counters zero = {};

		bpf_map_update_elem(&km_stats_endpoint, &key, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&km_stats_endpoint, &key);
	}
	return c;
}

#endif /* __KMESH_STATS_H__ */
