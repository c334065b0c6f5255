// SPDX-License-Identifier: GPL-2.0
/*
 * BPF_PROG_TEST_RUN harness for the connect4 decision logic.
 *
 * cgroup/connect4 programs cannot be run with BPF_PROG_TEST_RUN, so this
 * syscall program runs the very same helpers (listener.h, cluster.h) on a
 * (VIP, port) handed in through its context and hands back the decision.
 * tests/unit/test_bpf_lb.py fills this object's maps and runs it.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "kmesh_maps.h"
#include "listener.h"
#include "cluster.h"

char LICENSE[] SEC("license") = "GPL";

enum lb_test_result {
	LB_TEST_NO_LISTENER = 1,
	LB_TEST_NO_CLUSTER = 2,
	LB_TEST_NO_ENDPOINT = 3,
	LB_TEST_REDIRECT = 4,
};

struct lb_test_ctx {
	__u32 ip;   /* in: destination, network byte order */
	__u16 port; /* in */
	__u16 pad;
	__u32 result;     /* out: enum lb_test_result */
	__u32 cluster_id; /* out */
	__u32 ep_ip;      /* out: chosen endpoint */
	__u16 ep_port;    /* out */
	__u16 pad2;
};

SEC("syscall")
int lb_decide(struct lb_test_ctx *ctx)
{
	const struct kmesh_endpoint *ep;
	struct kmesh_listener *l;
	struct kmesh_cluster *c;
	__u32 cluster_id;

	l = listener_lookup(ctx->ip, ctx->port);
	if (!l) {
		ctx->result = LB_TEST_NO_LISTENER;
		return 0;
	}
	if (listener_pick_cluster(l, &cluster_id)) {
		ctx->result = LB_TEST_NO_CLUSTER;
		return 0;
	}
	ctx->cluster_id = cluster_id;
	c = bpf_map_lookup_elem(&km_cluster, &cluster_id);
	if (!c) {
		ctx->result = LB_TEST_NO_CLUSTER;
		return 0;
	}
	ep = cluster_pick_endpoint(c);
	if (!ep) {
		ctx->result = LB_TEST_NO_ENDPOINT;
		return 0;
	}
	ctx->result = LB_TEST_REDIRECT;
	ctx->ep_ip = ep->ip;
	ctx->ep_port = ep->port;
	return 0;
}
