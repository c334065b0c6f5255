/* SPDX-License-Identifier: GPL-2.0 */
/* The whole connect-time decision: VIP -> listener -> cluster -> endpoint.
 * Shared by kmesh_connect4 and the BPF_PROG_TEST_RUN harness, so the tests
 * exercise exactly the code the hook runs. */
#ifndef __KMESH_DECISION_H__
#define __KMESH_DECISION_H__

#include "kmesh_maps.h"
#include "listener.h"
#include "cluster.h"

enum kmesh_decision {
	KMESH_NO_LISTENER = 1, /* not a VIP: leave the connect alone */
	KMESH_NO_CLUSTER = 2,  /* listener points at no live cluster */
	KMESH_NO_ENDPOINT = 3, /* cluster has no endpoint */
	KMESH_REDIRECT = 4,    /* *ep is where the connect goes */
};

static __always_inline enum kmesh_decision
kmesh_decide(__u32 ip, __u16 port, struct kmesh_cluster **cluster, const struct kmesh_endpoint **ep,
	     __u32 *cluster_id)
{
	struct kmesh_listener *l;

	l = listener_lookup(ip, port);
	if (!l)
		return KMESH_NO_LISTENER;
	if (listener_pick_cluster(l, cluster_id))
		return KMESH_NO_CLUSTER;
	*cluster = bpf_map_lookup_elem(&km_cluster, cluster_id);
	if (!*cluster)
		return KMESH_NO_CLUSTER;
	*ep = cluster_pick_endpoint(*cluster);
	if (!*ep)
		return KMESH_NO_ENDPOINT;
	return KMESH_REDIRECT;
}

#endif /* __KMESH_DECISION_H__ */
