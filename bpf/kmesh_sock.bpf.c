// SPDX-License-Identifier: GPL-2.0
/*
 * kmesh L4 data path, attached to the governed cgroup:
 *   cgroup/connect4      rewrites a TCP connect of an enrolled workload
 *                        to a service VIP into a connect to the endpoint
 *                        its cluster chooses;
 *   cgroup/connect6      the same for an AF_INET6 socket connecting to a
 *                        VIP's IPv4-mapped address (::ffff:a.b.c.d);
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

/* A dual-stack (AF_INET6) socket reaches an IPv4 address as ::ffff:a.b.c.d:
 * the IPv4 address in the last word, behind this prefix. */
static __always_inline int ip6_is_v4_mapped(const struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == bpf_htonl(0xffff);
}

/* The destination a connect goes to instead: the IPv4 address itself for
 * connect4, its mapped form's last word for connect6 (the prefix stays).
 * ``v6`` is a constant at each call, so each program touches only the
 * fields its hook allows. */
static __always_inline void connect_rewrite(struct bpf_sock_addr *ctx, int v6, __u32 ip, __u16 port)
{
	if (v6)
		ctx->user_ip6[3] = ip;
	else
		ctx->user_ip4 = ip;
	ctx->user_port = port;
}

/* The whole connect hook, for a TCP connect to the IPv4 address ip:port. */
static __always_inline int kmesh_connect(struct bpf_sock_addr *ctx, int v6, __u32 ip, __u16 port)
{
	const struct kmesh_endpoint *ep = 0;
	const struct kmesh_addr *to = 0;
	struct kmesh_cluster *c = 0;
	__u32 cluster_id = 0, taken = 0;
	struct kmesh_listener *l;
	struct kmesh_addr lkey;
	enum kmesh_decision d;
	int l7_here;

	/* A connect to anything but a VIP costs one lookup (two with the
	 * wildcard); only a VIP's asks whose workload connects. */
	l = listener_lookup(ip, port, &lkey);
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
		stat_inc(KMESH_STAT_L7_HANDOFFS);
		handoff_track(bpf_get_socket_cookie(ctx), to, ip, port);
		connect_rewrite(ctx, v6, to->ip, to->port);
		return SOCK_ALLOW;
	case KMESH_RATE_LIMITED:
	case KMESH_OVERFLOW:
		/* A policy refuses the connection: connect() fails at once
		 * with ECONNREFUSED, as if the service had refused it. */
		stat_refused(d == KMESH_RATE_LIMITED, ip, port, cluster_id);
		if (kmesh_has_set_retval()) /* else EPERM (compat.h) */
			bpf_set_retval(-KMESH_ECONNREFUSED);
		return SOCK_DENY;
	default:
		stat_inc(d == KMESH_NO_CLUSTER ? KMESH_STAT_NO_CLUSTER : KMESH_STAT_NO_ENDPOINT);
		return SOCK_ALLOW;
	}
	stat_inc(KMESH_STAT_REDIRECTS);
	endpoint_track(bpf_get_socket_cookie(ctx), cluster_id, c, ep, taken, ip, port);
	connect_rewrite(ctx, v6, ep->ip, ep->port);
	return SOCK_ALLOW;
}

SEC("cgroup/connect4")
int kmesh_connect4(struct bpf_sock_addr *ctx)
{
	/* L4 governance is TCP only; UDP and raw sockets are left alone. */
	if (ctx->type != SOCK_STREAM)
		return SOCK_ALLOW;
	return kmesh_connect(ctx, 0, ctx->user_ip4, (__u16)ctx->user_port);
}

/* An AF_INET6 socket: a connect to an IPv4 address in its mapped form is
 * governed as connect4 governs it (the kernel then connects over IPv4, so
 * sockops sees its IPv4 addresses); other IPv6 destinations are left alone. */
SEC("cgroup/connect6")
int kmesh_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || !ip6_is_v4_mapped(ctx))
		return SOCK_ALLOW;
	return kmesh_connect(ctx, 1, ctx->user_ip6[3], (__u16)ctx->user_port);
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
