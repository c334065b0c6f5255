/* SPDX-License-Identifier: GPL-2.0 */
/* Active-connection accounting per endpoint (LEAST_REQUEST). */
#ifndef __KMESH_ENDPOINT_H__
#define __KMESH_ENDPOINT_H__

#include "kmesh_maps.h"
#include "stats.h"

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

/* Remember where a redirected socket went (for the counters at close and,
 * with ``counted``, LEAST_REQUEST's active count). A second connect() on
 * the same socket moves what the first one recorded. */
static __always_inline void endpoint_track(__u64 cookie, __u32 cluster_id, const struct kmesh_endpoint *ep,
					   bool counted, __u32 vip_ip, __u16 vip_port)
{
	struct kmesh_addr key = { .ip = ep->ip, .port = ep->port };
	struct kmesh_sock_state fresh = { .ep = key, .cluster_id = cluster_id,
					  .flags = counted ? KMESH_SOCK_COUNTED : 0,
					  .vip = { .ip = vip_ip, .port = vip_port } };
	struct kmesh_sock_state *st;
	struct kmesh_ep_counters *c = ep_counters(cluster_id, &key);

	if (c)
		c->opened += 1;
	if (!counted && !track_connections())
		return;
	st = bpf_map_lookup_elem(&km_sock_ep, &cookie);
	if (st) {
		if (st->flags & KMESH_SOCK_COUNTED)
			endpoint_active_add(&st->ep, -1);
		c = ep_counters(st->cluster_id, &st->ep);
		if (c)
			c->closed += 1; /* that connect never became a connection */
	}
	fresh.opened_ns = bpf_ktime_get_ns();
	/* Map full: this socket is not tracked (and, for LEAST_REQUEST, not
	 * counted, so nothing is taken back for it either). */
	if (bpf_map_update_elem(&km_sock_ep, &cookie, &fresh, BPF_ANY) == 0 && counted)
		endpoint_active_add(&key, 1);
}

/* An access log record for a closing socket, when the log is on. A full
 * ring buffer drops the record and counts it. */
static __always_inline void conn_event(const struct kmesh_sock_state *st)
{
	struct kmesh_config *cfg = kmesh_config();
	struct kmesh_conn_event *ev;

	if (!cfg || !cfg->access_log)
		return;
	ev = bpf_ringbuf_reserve(&km_events, sizeof(*ev), 0);
	if (!ev) {
		stat_inc(KMESH_STAT_EVENTS_DROPPED);
		return;
	}
	ev->opened_ns = st->opened_ns;
	ev->closed_ns = bpf_ktime_get_ns();
	ev->vip = st->vip;
	ev->ep = st->ep;
	ev->cluster_id = st->cluster_id;
	ev->reserved = 0;
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline void endpoint_untrack(__u64 cookie)
{
	struct kmesh_sock_state *st = bpf_map_lookup_elem(&km_sock_ep, &cookie);
	struct kmesh_ep_counters *c;

	if (!st)
		return;
	conn_event(st);
	if (st->flags & KMESH_SOCK_COUNTED)
		endpoint_active_add(&st->ep, -1);
	c = ep_counters(st->cluster_id, &st->ep);
	if (c)
		c->closed += 1;
	bpf_map_delete_elem(&km_sock_ep, &cookie);
}

#endif /* __KMESH_ENDPOINT_H__ */
