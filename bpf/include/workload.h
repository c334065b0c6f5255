/* SPDX-License-Identifier: GPL-2.0 */
/* Which connections are governed: those of enrolled workloads (km_workloads,
 * by cgroup or by network namespace), less the bypassed ones and the
 * daemon's own. docs/workloads.md has the rule. */
#ifndef __KMESH_WORKLOAD_H__
#define __KMESH_WORKLOAD_H__

#include <bpf/bpf_core_read.h>

#include "kmesh_maps.h"
#include "stats.h"

/* The inode of a socket's network namespace (0 if unknown), read through
 * BTF: bpf_get_netns_cookie() only serves sockops from 5.15, and a cookie is
 * not something the daemon can learn of a namespace before 5.14. */
static __always_inline __u32 sock_netns(struct bpf_sock *bsk)
{
	struct tcp_sock *tp;
	struct net *net;

	if (!bsk)
		return 0;
	tp = bpf_skc_to_tcp_sock(bsk);
	if (!tp)
		return 0;
	net = BPF_CORE_READ(tp, inet_conn.icsk_inet.sk.__sk_common.skc_net.net);
	return net ? BPF_CORE_READ(net, ns.inum) : 0;
}

static __always_inline struct kmesh_workload *workload_lookup(__u32 kind, __u64 id)
{
	struct kmesh_workload_key key = { .kind = kind, .id = id };

	return bpf_map_lookup_elem(&km_workloads, &key);
}

/* The rule (docs/workloads.md), for the task connecting ``sk``: a bypass
 * of its network namespace wins; otherwise the deepest of its cgroups that
 * is named in km_workloads decides; otherwise its namespace's enrollment
 * does. Returns KMESH_VERDICT_* flags. */
static __always_inline __u32 workload_verdict(struct bpf_sock *sk, __u64 leaf, const struct kmesh_config *cfg)
{
	struct kmesh_workload *w;
	__u32 netns, mode = 0, l7 = 0;

	netns = sock_netns(sk);
	w = workload_lookup(KMESH_WORKLOAD_NETNS, netns);
	if (w) {
		if (w->mode == KMESH_WORKLOAD_BYPASS)
			return 0;
		mode = w->mode;
	}
	if (netns == cfg->daemon_netns || mode == KMESH_WORKLOAD_ENROLLED)
		l7 = KMESH_VERDICT_L7_HERE;
	/* From the root down: bpf_get_current_ancestor_cgroup_id() counts
	 * levels from the root, and the leaf's level is not known. */
	for (int level = 0; level < KMESH_MAX_CGROUP_DEPTH; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		if (!id)
			break;
		w = workload_lookup(KMESH_WORKLOAD_CGROUP, id);
		if (w)
			mode = w->mode;
		if (id == leaf)
			break;
	}
	return mode == KMESH_WORKLOAD_ENROLLED ? KMESH_VERDICT_GOVERNED | l7 : 0;
}

/* Whether the connect ``ctx`` is governed (never the daemon's own), from
 * km_workload_cache when it holds this generation's verdict for the task's
 * cgroup and the socket's namespace. ``*l7_here``: a hand-off listener
 * serves the socket's namespace (the daemon's own, or an enrolled one). */
static __always_inline int workload_governed(struct bpf_sock_addr *ctx, int *l7_here)
{
	struct kmesh_config *cfg = kmesh_config();
	struct kmesh_workload_cache_key key = {};
	struct kmesh_workload_verdict *hit, v = {};

	*l7_here = 0;
	key.cgroup = bpf_get_current_cgroup_id();
	if (!cfg || key.cgroup == cfg->daemon_cgroup)
		return 0;
	/* The generation first: a change the daemon makes after this read
	 * leaves what is computed below under the old one. */
	v.gen = cfg->workloads_gen;
	key.netns_cookie = bpf_get_netns_cookie(ctx);
	hit = bpf_map_lookup_elem(&km_workload_cache, &key);
	if (hit && hit->gen == v.gen) {
		v.flags = hit->flags;
	} else {
		v.flags = workload_verdict(ctx->sk, key.cgroup, cfg);
		bpf_map_update_elem(&km_workload_cache, &key, &v, BPF_ANY);
	}
	*l7_here = !!(v.flags & KMESH_VERDICT_L7_HERE);
	return !!(v.flags & KMESH_VERDICT_GOVERNED);
}

#endif /* __KMESH_WORKLOAD_H__ */
