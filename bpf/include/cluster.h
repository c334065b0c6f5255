/* SPDX-License-Identifier: GPL-2.0 */
/* Cluster load balancing: choose one endpoint of a cluster record. */
#ifndef __KMESH_CLUSTER_H__
#define __KMESH_CLUSTER_H__

#include "kmesh_maps.h"
#include "endpoint.h"
#include "policy.h"

/* Draws of the LB's own choice before walking the endpoints for one that
 * outlier detection has not ejected. */
#define KMESH_PICK_TRIES 4

/* Index masks for arrays whose length is a power of two: a value already
 * below the length is unchanged, and the verifier sees the bound. */
#define KMESH_INDEX_MASK(len) ((len) - 1)

/* Bound an index for the verifier. clang knows the index is in range and
 * would drop a plain mask; barrier_var() hides the value so the mask stays. */
static __always_inline __u32 kmesh_bound(__u32 idx, __u32 mask)
{
	barrier_var(idx);
	return idx & mask;
}
_Static_assert((KMESH_LB_SLOTS & (KMESH_LB_SLOTS - 1)) == 0, "slots: power of two");
_Static_assert((KMESH_MAX_ENDPOINTS & (KMESH_MAX_ENDPOINTS - 1)) == 0, "endpoints: power of two");

static __always_inline const struct kmesh_endpoint *
cluster_slot_endpoint(const struct kmesh_cluster *c, __u32 pos)
{
	__u32 n = c->slot_count;
	__u32 idx;

	if (n == 0 || n > KMESH_LB_SLOTS)
		return 0;
	/* pos % n < n <= KMESH_LB_SLOTS already; the mask only proves it to
	 * the verifier. */
	idx = c->slots[kmesh_bound(pos % n, KMESH_INDEX_MASK(KMESH_LB_SLOTS))];
	if (idx >= c->endpoint_count)
		return 0;
	return &c->endpoints[kmesh_bound(idx, KMESH_INDEX_MASK(KMESH_MAX_ENDPOINTS))];
}

/* ROUND_ROBIN: one cursor per cluster shared by all CPUs, so consecutive
 * connections take consecutive slots whichever CPU runs them. The slot table
 * interleaves endpoints by weight (smooth WRR). */
static __always_inline const struct kmesh_endpoint *
cluster_pick_round_robin(struct kmesh_cluster *c)
{
	return cluster_slot_endpoint(c, kmesh_fetch_add(&c->rr_cursor, 1));
}

/* RANDOM: a uniform slot is an endpoint drawn in proportion to its weight. */
static __always_inline const struct kmesh_endpoint *
cluster_pick_random(const struct kmesh_cluster *c)
{
	return cluster_slot_endpoint(c, bpf_get_prandom_u32());
}

/* LEAST_REQUEST: fewest active connections relative to weight, i.e. the
 * smallest (active + 1) / weight, compared without division. The scan starts
 * at a rotating offset so ties are spread instead of piling on endpoint 0.
 * With outlier detection, ejected endpoints are left out (a failing endpoint
 * has the fewest connections, so drawing again would find it again); when
 * all are ejected, the best of all of them (Envoy's panic routing).
 *
 * The scan is most of what the verifier walks in a connect program, so it
 * is a global function: verified once on its own, not again for every path
 * that reaches it (a global function takes and returns scalars only: the
 * cluster's id in, the endpoint's index out, -1 for none). */
__noinline int kmesh_least_request_index(__u32 cluster_id)
{
	struct kmesh_cluster *c = bpf_map_lookup_elem(&km_cluster, &cluster_id);
	__u64 best_load = 0, best_weight = 1, any_load = 0, any_weight = 1;
	int best = -1, any = -1;
	bool skip_ejected;
	__u32 n, start;

	if (!c)
		return -1;
	n = c->endpoint_count;
	if (n == 0 || n > KMESH_MAX_ENDPOINTS)
		return -1;
	skip_ejected = c->policy.outlier_failures != 0;
	start = kmesh_fetch_add(&c->rr_cursor, 1);
	for (__u32 i = 0; i < KMESH_MAX_ENDPOINTS; i++) {
		const struct kmesh_endpoint *ep;
		__u64 load, weight;
		__u32 idx;

		if (i >= n)
			break;
		idx = kmesh_bound((start + i) % n, KMESH_INDEX_MASK(KMESH_MAX_ENDPOINTS));
		ep = &c->endpoints[idx];
		weight = ep->weight ? ep->weight : 1;
		load = endpoint_active(ep) + 1;
		if (any < 0 || load * any_weight < any_load * weight) {
			any = idx;
			any_load = load;
			any_weight = weight;
		}
		if (skip_ejected && endpoint_ejected(cluster_id, ep))
			continue;
		if (best < 0 || load * best_weight < best_load * weight) {
			best = idx;
			best_load = load;
			best_weight = weight;
		}
	}
	return best >= 0 ? best : any;
}

static __always_inline const struct kmesh_endpoint *
cluster_pick_least_request(struct kmesh_cluster *c, __u32 cluster_id)
{
	int idx = kmesh_least_request_index(cluster_id);

	if (idx < 0)
		return 0;
	/* It looked the cluster up again: a record replaced in between may
	 * be shorter. Then this one's own draw will do. */
	if ((__u32)idx >= c->endpoint_count)
		return cluster_slot_endpoint(c, bpf_get_prandom_u32());
	return &c->endpoints[kmesh_bound(idx, KMESH_INDEX_MASK(KMESH_MAX_ENDPOINTS))];
}

/* Any endpoint outlier detection has not ejected, from a random start. */
static __always_inline const struct kmesh_endpoint *
cluster_pick_unejected(struct kmesh_cluster *c, __u32 cluster_id)
{
	__u32 n = c->endpoint_count;
	__u32 start = bpf_get_prandom_u32();

	if (n == 0 || n > KMESH_MAX_ENDPOINTS)
		return 0;
	for (__u32 i = 0; i < KMESH_MAX_ENDPOINTS; i++) {
		const struct kmesh_endpoint *ep;

		if (i >= n)
			break;
		ep = &c->endpoints[kmesh_bound((start + i) % n, KMESH_INDEX_MASK(KMESH_MAX_ENDPOINTS))];
		if (!endpoint_ejected(cluster_id, ep))
			return ep;
	}
	return 0;
}

static __always_inline const struct kmesh_endpoint *
cluster_pick_by_slot(struct kmesh_cluster *c)
{
	return c->lb_policy == KMESH_LB_RANDOM ? cluster_pick_random(c) : cluster_pick_round_robin(c);
}

/* The endpoint for a new connection. With outlier detection, an ejected
 * endpoint is passed over: the LB draws again, then any endpoint not
 * ejected will do; when all are ejected the first choice stands (Envoy's
 * panic routing: trying beats refusing). */
static __always_inline const struct kmesh_endpoint *
cluster_pick_endpoint(struct kmesh_cluster *c, __u32 cluster_id)
{
	const struct kmesh_endpoint *first, *ep;

	if (c->endpoint_count == 0 || c->slot_count == 0)
		return 0;
	if (c->lb_policy == KMESH_LB_LEAST_REQUEST)
		return cluster_pick_least_request(c, cluster_id);
	first = ep = cluster_pick_by_slot(c);
	if (!ep || !c->policy.outlier_failures)
		return ep;
	for (int i = 0; i < KMESH_PICK_TRIES; i++) {
		if (!endpoint_ejected(cluster_id, ep))
			return ep;
		ep = cluster_pick_by_slot(c);
		if (!ep)
			return first;
	}
	ep = cluster_pick_unejected(c, cluster_id);
	return ep ? ep : first;
}

#endif /* __KMESH_CLUSTER_H__ */
