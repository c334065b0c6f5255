// SPDX-License-Identifier: GPL-2.0
/*
 * BPF_PROG_TEST_RUN harness for the connect4 decision logic.
 *
 * cgroup/connect4 and connect6 programs cannot be run with BPF_PROG_TEST_RUN, so this
 * syscall program runs the very same decision (decision.h) on a
 * (VIP, port) handed in through its context and hands back the decision.
 * tests/unit/test_bpf_lb.py fills this object's maps and runs it.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "decision.h"

char LICENSE[] SEC("license") = "GPL";

struct lb_test_ctx {
	struct kmesh_addr dst; /* in: destination */
	__u32 result;          /* out: enum kmesh_decision */
	__u32 lb_policy;       /* out: of the chosen cluster */
	struct kmesh_addr ep;  /* out: chosen endpoint */
};

SEC("syscall")
int lb_decide(struct lb_test_ctx *ctx)
{
	const struct kmesh_endpoint *ep = 0;
	struct kmesh_cluster *c = 0;
	__u32 cluster_id = 0, taken = 0;

	const struct kmesh_addr *to = 0;

	ctx->result = kmesh_decide(&ctx->dst, &c, &ep, &cluster_id, &taken, &to);
	if (ctx->result == KMESH_REDIRECT && c && ep) {
		ctx->lb_policy = c->lb_policy;
		ctx->ep = ep->addr;
	}
	return 0;
}
