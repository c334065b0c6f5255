// SPDX-License-Identifier: GPL-2.0
/*
 * kmesh L4 data path, attached to the governed cgroup:
 *   cgroup/connect4      rewrites a TCP connect of an enrolled workload
 *                        to a service VIP into a connect to the endpoint
 *                        its cluster chooses;
 *   cgroup/connect6      the same for an AF_INET6 socket: IPv6 VIPs, and
 *                        IPv4 VIPs in their mapped form (::ffff:a.b.c.d);
 *   cgroup/sock_release  gives back a LEAST_REQUEST socket's active count
 *                        (and ends the tracking of a socket that never
 *                        sent a SYN);
 *   sockops              watches tracked sockets from their SYN to CLOSE:
 *                        closed/failed counters, bytes, access log records,
 *                        connect timeout, outlier detection;
 *   sk_skb verdict       splices the two daemon-side sockets of a routed L7
 *                        connection (km_splice).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "compat.h"
#include "kmesh_maps.h"
#include "decision.h"
#include "endpoint.h"
#include "workload.h"
#include "splice.h"

#define SOCK_ALLOW 1   /* cgroup sock_addr verdict: let the syscall go on */
#define SOCK_DENY 0    /* ... fail it, with the errno set by bpf_set_retval() */
#define KMESH_ECONNREFUSED 111
#define SOCKOPS_DONE 1 /* sockops return value: ignored by these callbacks */

char LICENSE[] SEC("license") = "GPL";

/* Point the connect at ``to``. connect4 can only go to an IPv4 address;
 * connect6 writes all of it: an IPv4 address in its mapped form, which the
 * kernel then connects over IPv4 (unless the socket is IPV6_V6ONLY: it
 * fails with ENETUNREACH, as it would connecting there itself). ``v6`` is
 * a constant at each call, so each program touches only the fields its
 * hook allows. */
static __always_inline void connect_rewrite(struct bpf_sock_addr *ctx, int v6, const struct kmesh_addr *to)
{
	if (v6) {
		ctx->user_ip6[0] = to->ip6[0];
		ctx->user_ip6[1] = to->ip6[1];
		ctx->user_ip6[2] = to->ip6[2];
		ctx->user_ip6[3] = to->ip6[3];
	} else {
		ctx->user_ip4 = to->ip6[3];
	}
	ctx->user_port = to->port;
}

/* The whole connect hook, for a TCP connect to ``dst``. */
static __always_inline int kmesh_connect(struct bpf_sock_addr *ctx, int v6, const struct kmesh_addr *dst)
{
	const struct kmesh_endpoint *ep = 0;
	const struct kmesh_addr *to = 0;
	struct kmesh_cluster *c = 0;
	__u32 cluster_id = 0, taken = 0;
	struct kmesh_listener *l;
	struct kmesh_addr lkey = *dst;
	enum kmesh_decision d;
	int l7_here;

	/* A connect to anything but a VIP costs one lookup (two with the
	 * wildcard); only a VIP's asks whose workload connects. */
	l = listener_lookup(&lkey);
	if (!l) {
		stat_inc(KMESH_STAT_NO_LISTENER);
		return SOCK_ALLOW;
	}
	if (!workload_governed(ctx, &l7_here)) {
		stat_inc(KMESH_STAT_UNGOVERNED);
		return SOCK_ALLOW;
	}
	/* Anything short of a redirect leaves the connect as the app asked:
	 * without an endpoint it fails as it would without kmesh. */
	d = kmesh_decide_at(l, &lkey, l7_here, &c, &ep, &cluster_id, &taken, &to);
	switch (d) {
	case KMESH_REDIRECT:
		break;
	case KMESH_HANDOFF:
		if (!v6 && !addr_is_v4(to))
			return SOCK_ALLOW; /* the daemon refuses such a hand-off address */
		stat_inc(KMESH_STAT_L7_HANDOFFS);
		handoff_track(bpf_get_socket_cookie(ctx), to, dst);
		connect_rewrite(ctx, v6, to);
		return SOCK_ALLOW;
	case KMESH_RATE_LIMITED:
	case KMESH_OVERFLOW:
		/* A policy refuses the connection: connect() fails at once
		 * with ECONNREFUSED, as if the service had refused it. */
		stat_refused(d == KMESH_RATE_LIMITED, dst, cluster_id);
		if (kmesh_has_set_retval()) /* else EPERM (compat.h) */
			bpf_set_retval(-KMESH_ECONNREFUSED);
		return SOCK_DENY;
	default:
		stat_inc(d == KMESH_NO_CLUSTER ? KMESH_STAT_NO_CLUSTER : KMESH_STAT_NO_ENDPOINT);
		return SOCK_ALLOW;
	}
	/* IPv4 listeners point at records of IPv4 endpoints only (the daemon
	 * writes them so); this only guards against a record of the other
	 * family. */
	if (!v6 && !addr_is_v4(&ep->addr)) {
		if (taken & KMESH_DECIDE_SLOT)
			cluster_release(cluster_id);
		stat_inc(KMESH_STAT_NO_ENDPOINT);
		return SOCK_ALLOW;
	}
	stat_inc(KMESH_STAT_REDIRECTS);
	endpoint_track(bpf_get_socket_cookie(ctx), cluster_id, c, ep, taken, dst);
	connect_rewrite(ctx, v6, &ep->addr);
	return SOCK_ALLOW;
}

SEC("cgroup/connect4")
int kmesh_connect4(struct bpf_sock_addr *ctx)
{
	struct kmesh_addr dst;

	/* L4 governance is TCP only; UDP and raw sockets are left alone. */
	if (ctx->type != SOCK_STREAM)
		return SOCK_ALLOW;
	addr_set_v4(&dst, ctx->user_ip4, (__u16)ctx->user_port);
	return kmesh_connect(ctx, 0, &dst);
}

/* An AF_INET6 socket: an IPv6 destination, or an IPv4 one in its mapped
 * form (::ffff:a.b.c.d), which is the same key as connect4's. */
SEC("cgroup/connect6")
int kmesh_connect6(struct bpf_sock_addr *ctx)
{
	struct kmesh_addr dst = { .port = (__u16)ctx->user_port };

	if (ctx->type != SOCK_STREAM)
		return SOCK_ALLOW;
	dst.ip6[0] = ctx->user_ip6[0];
	dst.ip6[1] = ctx->user_ip6[1];
	dst.ip6[2] = ctx->user_ip6[2];
	dst.ip6[3] = ctx->user_ip6[3];
	return kmesh_connect(ctx, 1, &dst);
}

SEC("cgroup/sock_release")
int kmesh_sock_release(struct bpf_sock *sk)
{
	if (sk->type == SOCK_STREAM)
		endpoint_release(bpf_get_socket_cookie(sk));
	return SOCK_ALLOW;
}

SEC("sockops")
int kmesh_conn_ops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TIMEOUT_INIT:
		skops->reply = conn_syn_rto(skops);
		break;
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		conn_watch(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		conn_established(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			conn_closed(skops);
		break;
	}
	return SOCKOPS_DONE;
}

/* The stream verdict of km_splice (include/splice.h): each daemon-side
 * socket's incoming bytes go to its peer's send side, within the budget. */
SEC("sk_skb/stream_verdict")
int kmesh_splice(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct kmesh_splice_dir *dir;

	/* An empty skb is the FIN: redirected, it would put EPIPE on the peer.
	 * The daemon passes the half-close on once the bytes before it have
	 * left. */
	if (!skb->len)
		return SK_DROP;
	dir = bpf_map_lookup_elem(&km_splice_dir, &cookie);
	if (!dir)
		return SK_PASS; /* not paired (yet): the daemon reads it */
	if (!splice_skip_repeat(skb, dir))
		return SK_DROP;
	if (!splice_admit(dir, &cookie, skb->len)) {
		dir->mode = KMESH_SPLICE_PASS;
		dir->passed += skb->len;
		return SK_PASS;
	}
	dir->mode = KMESH_SPLICE_REDIRECT;
	dir->redirected += skb->len;
	return bpf_sk_redirect_hash(skb, &km_splice, &dir->peer, 0);
}
