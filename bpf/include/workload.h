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

/* Whether the task connecting ``sk`` is governed. A bypass of its network
 * namespace wins; otherwise the deepest of its cgroups that is named in
 * km_workloads decides; otherwise its namespace's enrollment does.
 * ``*l7_here``: a hand-off listener serves the socket's namespace (the
 * daemon's own, or an enrolled one). */
static __always_inline int workload_governed(struct bpf_sock *sk, int *l7_here)
{
	struct kmesh_config *cfg = kmesh_config();
	__u64 leaf = bpf_get_current_cgroup_id();
	struct kmesh_workload *w;
	__u32 netns, mode = 0;

	*l7_here = 0;
	if (!cfg || leaf == cfg->daemon_cgroup)
		return 0;
	netns = sock_netns(sk);
	w = workload_lookup(KMESH_WORKLOAD_NETNS, netns);
	if (w) {
		if (w->mode == KMESH_WORKLOAD_BYPASS)
			return 0;
		mode = w->mode;
	}
	*l7_here = netns == cfg->daemon_netns || mode == KMESH_WORKLOAD_ENROLLED;
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
	return mode == KMESH_WORKLOAD_ENROLLED;
}

#endif /* __KMESH_WORKLOAD_H__ */
