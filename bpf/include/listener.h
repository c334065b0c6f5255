/* SPDX-License-Identifier: GPL-2.0 */
/* Listener lookup and weighted-cluster choice. */
#ifndef __KMESH_LISTENER_H__
#define __KMESH_LISTENER_H__

#include "kmesh_maps.h"
#include "addr.h"

/* Exact address first, then the wildcard of its family (0.0.0.0:port or
 * [::]:port), as Envoy prefers the most specific listener address. ``*key``:
 * the destination in, the key that matched out. */
static __always_inline struct kmesh_listener *
listener_lookup(struct kmesh_addr *key)
{
	__u32 port = key->port;
	struct kmesh_listener *l;
	__u32 *any;

	any = bpf_map_lookup_elem(&km_listener_ports, &port);
	if (!any || !*any)
		return 0;
	l = bpf_map_lookup_elem(&km_listener, key);
	if (l)
		return l;
	addr_to_wildcard(key);
	return bpf_map_lookup_elem(&km_listener, key);
}

/* Envoy picks among weighted clusters at random in proportion to weight. */
static __always_inline int
listener_pick_cluster(const struct kmesh_listener *l, __u32 *cluster_id)
{
	__u32 n = l->cluster_count;
	__u32 total = l->total_weight;
	__u32 r;

	if (n == 0 || total == 0)
		return -1;
	if (n == 1) {
		*cluster_id = l->clusters[0].cluster_id;
		return 0;
	}
	r = bpf_get_prandom_u32() % total;
	for (int i = 0; i < KMESH_MAX_WEIGHTED_CLUSTERS; i++) {
		if (i >= n)
			break;
		if (r < l->clusters[i].cum_weight) {
			*cluster_id = l->clusters[i].cluster_id;
			return 0;
		}
	}
	return -1;
}

#endif /* __KMESH_LISTENER_H__ */
