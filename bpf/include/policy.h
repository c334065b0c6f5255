/* SPDX-License-Identifier: GPL-2.0 */
/* Traffic policies at connect time (docs/policies.md): a listener's local
 * rate limit, a cluster's max_connections, and outlier ejection of
 * endpoints whose connects keep failing. Their state lives in maps of its
 * own (km_rate_limit, km_cluster_state, km_outlier), so replacing a listener
 * or cluster record never resets it. */
#ifndef __KMESH_POLICY_H__
#define __KMESH_POLICY_H__

#include "compat.h"
#include "kmesh_maps.h"
#include "stats.h"

#define KMESH_NS_PER_MS 1000000ULL
/* The access log's bucket in km_rate_limit: port 0 is no listener's. */
#define KMESH_ACCESS_LOG_BUCKET { .port = 0 }
#define KMESH_PERCENT 100

/* Envoy's network local_ratelimit: a bucket of max_tokens, refilled by
 * tokens_per_fill at every whole fill_interval, one token per connection.
 * The bucket is shared by all CPUs, hence the lock. */
static __always_inline bool rate_limit_admit(const struct kmesh_addr *key, const struct kmesh_rate_limit *rl)
{
	__u64 now = bpf_ktime_get_ns();
	struct kmesh_bucket fresh = { .tokens = rl->max_tokens, .last_fill_ns = now };
	struct kmesh_bucket *b = map_lookup_or_init(&km_rate_limit, key, &fresh);
	bool ok;

	if (!b)
		return true; /* map full: this listener is not limited */
	bpf_spin_lock(&b->lock);
	if (rl->fill_interval_ns && now - b->last_fill_ns >= rl->fill_interval_ns) {
		__u64 fills = (now - b->last_fill_ns) / rl->fill_interval_ns;
		__u64 tokens = b->tokens + fills * rl->tokens_per_fill;

		b->tokens = tokens > rl->max_tokens ? rl->max_tokens : tokens;
		b->last_fill_ns += fills * rl->fill_interval_ns;
	}
	if (b->tokens > rl->max_tokens) /* the limit was lowered */
		b->tokens = rl->max_tokens;
	ok = b->tokens > 0;
	if (ok)
		b->tokens--;
	bpf_spin_unlock(&b->lock);
	return ok;
}

/* What a redirect took that the socket must give back when it closes. */
enum kmesh_decide_flag {
	KMESH_DECIDE_SLOT = 1, /* a slot of the cluster's max_connections */
};

enum kmesh_admit {
	KMESH_ADMIT_COUNTED = 0,   /* took a slot: give it back at close */
	KMESH_ADMIT_UNCOUNTED = 1, /* no room to count (map full): let it through */
	KMESH_ADMIT_REFUSED = 2,
};

/* Take one of the cluster's max_connections slots, or refuse. Add first,
 * then check: two CPUs racing for the last slot cannot both get it. */
static __always_inline enum kmesh_admit cluster_admit(__u32 cluster_id, __u32 max)
{
	struct kmesh_cluster_state zero = {};
	__u32 key = cluster_id & ~KMESH_CLUSTER_V6; /* both families' records */
	struct kmesh_cluster_state *st = map_lookup_or_init(&km_cluster_state, &key, &zero);

	if (!st)
		return KMESH_ADMIT_UNCOUNTED;
	if (kmesh_add_fetch(&st->active, 1) <= max)
		return KMESH_ADMIT_COUNTED;
	__sync_fetch_and_add(&st->active, -1);
	return KMESH_ADMIT_REFUSED;
}

static __always_inline void cluster_release(__u32 cluster_id)
{
	__u32 key = cluster_id & ~KMESH_CLUSTER_V6;
	struct kmesh_cluster_state *st = bpf_map_lookup_elem(&km_cluster_state, &key);

	if (st)
		__sync_fetch_and_add(&st->active, -1);
}

static __always_inline void stat_cluster(__u32 cluster_id, bool overflow)
{
	struct kmesh_cluster_counters zero = {};
	__u32 key = cluster_id & ~KMESH_CLUSTER_V6; /* one cluster, both families */
	struct kmesh_cluster_counters *c = map_lookup_or_init(&km_stats_cluster, &key, &zero);

	if (!c)
		return;
	/* Overflow is counted in connect4, ejections in sockops (maybe in
	 * softirq on the same CPU): atomic even per CPU. */
	__sync_fetch_and_add(overflow ? &c->overflow : &c->ejections, 1);
}

/* A connect a policy refused: the listener's rate limit (counted per VIP,
 * like opened) or the cluster's max_connections. */
static __always_inline void stat_refused(bool rate_limited, const struct kmesh_addr *vip, __u32 cluster_id)
{
	struct kmesh_conn_counters *c;

	if (!rate_limited) {
		stat_cluster(cluster_id, true);
		return;
	}
	c = conn_counters(&km_stats_listener, vip);
	if (c)
		c->rate_limited += 1;
}

static __always_inline struct kmesh_outlier *outlier_of(__u32 cluster_id, const struct kmesh_addr *ep)
{
	struct kmesh_ep_key key = { .cluster_id = cluster_id, .ep = *ep };

	return bpf_map_lookup_elem(&km_outlier, &key);
}

static __always_inline bool outlier_ejected_at(const struct kmesh_outlier *o, __u64 now)
{
	return o && o->ejected_until_ns > now;
}

/* Whether the LB must skip this endpoint now. Only endpoints that failed
 * have an entry, so a healthy cluster pays one missed lookup. */
static __always_inline bool endpoint_ejected(__u32 cluster_id, const struct kmesh_endpoint *ep)
{
	return outlier_ejected_at(outlier_of(cluster_id, &ep->addr), bpf_ktime_get_ns());
}

/* Ejecting one more endpoint keeps the cluster within max_ejection_percent
 * (Envoy ejects at least one regardless). Counted over the record's
 * endpoints when a failure would eject, which is rare. */
static __always_inline bool outlier_room(const struct kmesh_cluster *c, __u32 cluster_id, __u64 now)
{
	__u32 n = c->endpoint_count, ejected = 0, allowed;

	if (n > KMESH_MAX_ENDPOINTS)
		return false;
	for (__u32 i = 0; i < KMESH_MAX_ENDPOINTS; i++) {
		if (i >= n)
			break;
		if (outlier_ejected_at(outlier_of(cluster_id, &c->endpoints[i].addr), now))
			ejected++;
	}
	allowed = n * c->policy.outlier_max_percent / KMESH_PERCENT;
	if (allowed < 1)
		allowed = 1;
	return ejected < allowed;
}

/* A connect to ``ep`` of the cluster failed: count it, and eject the
 * endpoint after outlier_failures in a row, for base x (times ejected),
 * at most outlier_max. */
static __always_inline void outlier_failure(__u32 cluster_id, const struct kmesh_addr *ep)
{
	struct kmesh_cluster *c = bpf_map_lookup_elem(&km_cluster, &cluster_id);
	struct kmesh_ep_key key = { .cluster_id = cluster_id, .ep = *ep };
	struct kmesh_outlier zero = {}, *o;
	__u64 now, ms;
	__u32 times;

	if (!c || !c->policy.outlier_failures)
		return;
	o = map_lookup_or_init(&km_outlier, &key, &zero);
	if (!o)
		return;
	if (kmesh_add_fetch(&o->failures, 1) < c->policy.outlier_failures)
		return;
	now = bpf_ktime_get_ns();
	if (outlier_ejected_at(o, now) || !outlier_room(c, cluster_id, now))
		return;
	times = kmesh_add_fetch(&o->ejections, 1);
	ms = (__u64)c->policy.outlier_base_ms * times;
	if (ms > c->policy.outlier_max_ms)
		ms = c->policy.outlier_max_ms;
	o->ejected_until_ns = now + ms * KMESH_NS_PER_MS;
	o->failures = 0;
	stat_cluster(cluster_id, false);
}

/* A connect to the endpoint succeeded: its failures no longer run in a row,
 * and its next ejection starts again from the base time. */
static __always_inline void outlier_success(__u32 cluster_id, const struct kmesh_addr *ep)
{
	struct kmesh_outlier *o = outlier_of(cluster_id, ep);

	if (o && (o->failures || o->ejections)) {
		o->failures = 0;
		o->ejections = 0;
	}
}

#endif /* __KMESH_POLICY_H__ */
