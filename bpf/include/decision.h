/* SPDX-License-Identifier: GPL-2.0 */
/* The whole connect-time decision: VIP -> listener -> cluster -> endpoint.
 * Shared by kmesh_connect4 and the BPF_PROG_TEST_RUN harness, so the tests
 * exercise exactly the code the hook runs. */
#ifndef __KMESH_DECISION_H__
#define __KMESH_DECISION_H__

#include "kmesh_maps.h"
#include "listener.h"
#include "cluster.h"
#include "stats.h"

/* Where L7 connections go, or NULL when nowhere. */
static __always_inline const struct kmesh_addr *handoff_address(void)
{
	struct kmesh_config *cfg = kmesh_config();

	return cfg && cfg->l7_handoff.port ? &cfg->l7_handoff : 0;
}

enum kmesh_decision {
	KMESH_NO_LISTENER = 1, /* not a VIP: leave the connect alone */
	KMESH_NO_CLUSTER = 2,  /* listener points at no live cluster */
	KMESH_NO_ENDPOINT = 3, /* cluster has no endpoint */
	KMESH_REDIRECT = 4,    /* *ep is where the connect goes */
	KMESH_RATE_LIMITED = 5, /* the listener's local rate limit: refuse the connect */
	KMESH_OVERFLOW = 6,     /* the cluster's max_connections: refuse the connect */
	KMESH_HANDOFF = 7,      /* an L7 listener: the daemon's hand-off listener takes it */
};

/* The decision for a connect that found listener ``l`` (under ``*lkey``).
 * ``*taken``: KMESH_DECIDE_* of a redirect; ``*handoff``: where an L7
 * listener's connection goes (KMESH_HANDOFF), when ``l7_here`` (a hand-off
 * listener serves the client's namespace). Policies are checked in Envoy's
 * order: the listener's rate limit, then the cluster's circuit breaker,
 * then the endpoint choice (which skips ejected endpoints). */
static __always_inline enum kmesh_decision
kmesh_decide_at(struct kmesh_listener *l, const struct kmesh_addr *lkey, int l7_here,
		struct kmesh_cluster **cluster, const struct kmesh_endpoint **ep,
		__u32 *cluster_id, __u32 *taken, const struct kmesh_addr **handoff)
{
	struct kmesh_cluster *c;
	__u32 max;

	*taken = 0;
	if (l->rate_limit.max_tokens && !rate_limit_admit(lkey, &l->rate_limit))
		return KMESH_RATE_LIMITED;
	/* Without a hand-off listener (the daemon runs without L7, or not in
	 * the client's namespace), the listener's catch-all clusters take the
	 * connection, as at L4. */
	if ((l->flags & KMESH_LISTENER_L7) && (*handoff = handoff_address())) {
		if (l7_here)
			return KMESH_HANDOFF;
		stat_inc(KMESH_STAT_L7_NO_NETNS);
	}
	if (listener_pick_cluster(l, cluster_id))
		return KMESH_NO_CLUSTER;
	c = bpf_map_lookup_elem(&km_cluster, cluster_id);
	if (!c && (*cluster_id & KMESH_CLUSTER_V6)) {
		/* An IPv6 listener names the cluster's IPv6 view, which only
		 * a cluster with IPv6 endpoints has: else its one record. */
		*cluster_id &= ~KMESH_CLUSTER_V6;
		c = bpf_map_lookup_elem(&km_cluster, cluster_id);
	}
	*cluster = c;
	if (!c)
		return KMESH_NO_CLUSTER;
	max = c->policy.max_connections;
	if (max) {
		switch (cluster_admit(*cluster_id, max)) {
		case KMESH_ADMIT_REFUSED:
			return KMESH_OVERFLOW;
		case KMESH_ADMIT_COUNTED:
			*taken = KMESH_DECIDE_SLOT;
			break;
		default:
			break;
		}
	}
	*ep = cluster_pick_endpoint(c, *cluster_id);
	if (!*ep) {
		if (*taken & KMESH_DECIDE_SLOT)
			cluster_release(*cluster_id);
		*taken = 0;
		return KMESH_NO_ENDPOINT;
	}
	return KMESH_REDIRECT;
}

/* The whole decision for a connect to ``dst`` from a governed workload in
 * the daemon's namespace (the BPF_PROG_TEST_RUN harness). */
static __always_inline enum kmesh_decision
kmesh_decide(const struct kmesh_addr *dst, struct kmesh_cluster **cluster, const struct kmesh_endpoint **ep,
	     __u32 *cluster_id, __u32 *taken, const struct kmesh_addr **handoff)
{
	struct kmesh_addr lkey = *dst;
	struct kmesh_listener *l = listener_lookup(&lkey);

	*taken = 0;
	if (!l)
		return KMESH_NO_LISTENER;
	return kmesh_decide_at(l, &lkey, 1, cluster, ep, cluster_id, taken, handoff);
}

#endif /* __KMESH_DECISION_H__ */
