/* SPDX-License-Identifier: GPL-2.0 */
/* Per-socket tracking of redirected connections: LEAST_REQUEST active
 * counts, and the end of each connection (counters, access log record). */
#ifndef __KMESH_ENDPOINT_H__
#define __KMESH_ENDPOINT_H__

#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "addr.h"
#include "kmesh_maps.h"
#include "policy.h"
#include "stats.h"
#include "workload.h"

#define KMESH_SOL_TCP 6           /* IPPROTO_TCP, as a setsockopt level */
#define KMESH_TCP_USER_TIMEOUT 18 /* uapi linux/tcp.h */
#define KMESH_MS_PER_S 1000

/* The kernel's HZ, from its config (/proc/config.gz); 0 when unknown. */
extern unsigned int CONFIG_HZ __kconfig __weak;

static __always_inline __u64 endpoint_active(const struct kmesh_endpoint *ep)
{
	struct kmesh_ep_stats *st = bpf_map_lookup_elem(&km_ep_active, &ep->addr);

	return st ? st->active : 0;
}

static __always_inline void endpoint_active_add(const struct kmesh_addr *key, __s64 delta)
{
	struct kmesh_ep_stats zero = {};
	struct kmesh_ep_stats *st;

	/* Taking back what never went up finds nothing to take it from. */
	st = delta < 0 ? bpf_map_lookup_elem(&km_ep_active, key) : map_lookup_or_init(&km_ep_active, key, &zero);
	if (!st)
		return; /* map full: the endpoint is simply not counted */
	/* Never below zero (the count is unsigned: it would look busiest). A
	 * release racing on two CPUs can try that where atomics cannot claim
	 * the release once (compat.h, legacy flavour). */
	if (delta < 0 && !KMESH_READ_ONCE(st->active))
		return;
	__sync_fetch_and_add(&st->active, delta);
}

/* How a tracked connection ended: for its counters and its access log
 * record. */
struct kmesh_conn_end {
	struct kmesh_addr src;
	__u64 bytes_to_ep;
	__u64 bytes_from_ep;
	__u32 result; /* enum kmesh_conn_result */
};

/* Give back what a socket holds while open (its LEAST_REQUEST count, its
 * max_connections slot), once: release and the CLOSE state callback can run
 * at the same time on two CPUs (a reset arriving while the application
 * closes). */
static __always_inline void release_counted(struct kmesh_sock_state *st)
{
	__u32 held = kmesh_fetch_and(&st->flags, ~(KMESH_SOCK_COUNTED | KMESH_SOCK_CLUSTER_COUNTED));

	if (held & KMESH_SOCK_COUNTED)
		endpoint_active_add(&st->ep, -1);
	if (held & KMESH_SOCK_CLUSTER_COUNTED)
		cluster_release(st->cluster_id);
}

/* An access log record for a closing socket, when the log is on. Over the
 * log's rate, or with the ring buffer full, the record is dropped and
 * counted. */
static __always_inline void conn_event(const struct kmesh_sock_state *st, const struct kmesh_conn_end *end)
{
	static const struct kmesh_addr bucket = KMESH_ACCESS_LOG_BUCKET;
	struct kmesh_config *cfg = kmesh_config();
	struct kmesh_conn_event *ev;
	__u64 wakeup;

	if (!cfg || !cfg->access_log)
		return;
	if (cfg->access_log_limit.max_tokens && !rate_limit_admit(&bucket, &cfg->access_log_limit)) {
		stat_inc(KMESH_STAT_EVENTS_RATE_LIMITED);
		return;
	}
	ev = bpf_ringbuf_reserve(&km_events, sizeof(*ev), 0);
	if (!ev) {
		stat_inc(KMESH_STAT_EVENTS_DROPPED);
		return;
	}
	ev->opened_ns = st->opened_ns;
	ev->closed_ns = bpf_ktime_get_ns();
	ev->bytes_to_ep = end->bytes_to_ep;
	ev->bytes_from_ep = end->bytes_from_ep;
	ev->src = end->src;
	ev->vip = st->vip;
	ev->ep = st->ep;
	ev->cluster_id = st->cluster_id;
	ev->result = end->result;
	wakeup = bpf_ringbuf_query(&km_events, BPF_RB_AVAIL_DATA) >= KMESH_EVENTS_WAKEUP_BYTES ?
		 BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(ev, wakeup);
}

/* Everything the end of a tracked connection updates, except removing its
 * entry. */
static __always_inline void conn_account(struct kmesh_sock_state *st, const struct kmesh_conn_end *end)
{
	conn_event(st, end);
	release_counted(st);
	counters_closed(ep_counters(st->cluster_id, &st->ep), end->result, end->bytes_to_ep, end->bytes_from_ep);
	counters_closed(conn_counters(&km_stats_listener, &st->vip), end->result, end->bytes_to_ep,
			end->bytes_from_ep);
}

/* What a socket to this cluster must be tracked for, whatever
 * track_connections says: KMESH_SOCK_* flags it starts with. */
static __always_inline __u32 sock_flags_for(const struct kmesh_cluster *c, __u32 taken)
{
	__u32 flags = 0;

	if (c->lb_policy == KMESH_LB_LEAST_REQUEST)
		flags |= KMESH_SOCK_COUNTED;
	if (taken & KMESH_DECIDE_SLOT)
		flags |= KMESH_SOCK_CLUSTER_COUNTED;
	if (c->policy.outlier_failures)
		flags |= KMESH_SOCK_OUTLIER;
	return flags;
}

/* Remember where a redirected socket went: for the counters at close, for
 * what it holds while open (KMESH_SOCK_COUNTED, _CLUSTER_COUNTED) and for
 * the policies sockops applies (connect timeout, outlier detection). A
 * second connect() on the same socket ends what the first one recorded. */
static __always_inline void endpoint_track(__u64 cookie, __u32 cluster_id, const struct kmesh_cluster *c,
					   const struct kmesh_endpoint *ep, __u32 taken, const struct kmesh_addr *vip)
{
	struct kmesh_sock_state fresh = { .ep = ep->addr, .cluster_id = cluster_id,
					  .flags = sock_flags_for(c, taken),
					  .vip = *vip,
					  .connect_timeout_ms = c->policy.connect_timeout_ms };
	struct kmesh_sock_state *st;

	stat_opened(&fresh.vip, cluster_id, &fresh.ep);
	if (!fresh.flags && !fresh.connect_timeout_ms && !track_connections())
		return;
	st = bpf_map_lookup_elem(&km_sock_ep, &cookie);
	if (st) {
		struct kmesh_conn_end end = { .result = KMESH_CONN_FAILED };

		conn_account(st, &end); /* that connect never became a connection */
	}
	fresh.opened_ns = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&km_sock_ep, &cookie, &fresh, BPF_ANY)) {
		/* Map full: this socket is not tracked, so it cannot hold a
		 * slot (nothing would give it back), nor be counted. */
		if (taken & KMESH_DECIDE_SLOT)
			cluster_release(cluster_id);
		return;
	}
	if (fresh.flags & KMESH_SOCK_COUNTED)
		endpoint_active_add(&fresh.ep, 1);
}

/* Send a connect to an L7 listener to the daemon's hand-off listener at
 * ``to``, tracked (whatever track_connections says) so that sockops can
 * publish its original destination once its source port is known. */
static __always_inline void handoff_track(__u64 cookie, const struct kmesh_addr *to, const struct kmesh_addr *vip)
{
	struct kmesh_sock_state fresh = { .ep = *to, .flags = KMESH_SOCK_L7, .vip = *vip };
	struct kmesh_sock_state *st = bpf_map_lookup_elem(&km_sock_ep, &cookie);

	stat_opened(&fresh.vip, 0, to);
	if (st) {
		struct kmesh_conn_end end = { .result = KMESH_CONN_FAILED };

		conn_account(st, &end);
	}
	fresh.opened_ns = bpf_ktime_get_ns();
	bpf_map_update_elem(&km_sock_ep, &cookie, &fresh, BPF_ANY);
}

/* The application released the socket (sock_release runs before TCP's
 * close). A watched socket is counted when TCP reaches CLOSE, with its
 * bytes: here only its LEAST_REQUEST count goes. One that never sent a SYN
 * (connect() failed before it) ends here. */
static __always_inline void endpoint_release(__u64 cookie)
{
	struct kmesh_sock_state *st = bpf_map_lookup_elem(&km_sock_ep, &cookie);
	struct kmesh_conn_end end = { .result = KMESH_CONN_FAILED };

	if (!st)
		return;
	if (st->flags & KMESH_SOCK_WATCHED) {
		/* (The element is preallocated: if the CLOSE callback deleted
		 * it this instant and another socket took it, this clears that
		 * socket's flag. A race of microseconds, costing one count.) */
		release_counted(st);
		return;
	}
	conn_account(st, &end);
	bpf_map_delete_elem(&km_sock_ep, &cookie);
}

/* icsk_user_timeout of the socket (ms): 0 when unset; non-zero return when
 * it cannot be read. */
static __always_inline int user_timeout_of(struct bpf_sock_ops *skops, int *ms)
{
	struct bpf_sock *bsk = skops->sk;
	struct tcp_sock *tp;

	if (!bsk)
		return -1;
	tp = bpf_skc_to_tcp_sock(bsk);
	if (!tp)
		return -1;
	*ms = (int)tp->inet_conn.icsk_user_timeout;
	return 0;
}

static __always_inline struct kmesh_sock_state *sock_state(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);

	return bpf_map_lookup_elem(&km_sock_ep, &cookie);
}

/* sockops, when a tracked socket sends its SYN: ask for its state changes,
 * so that its close is seen with its bytes and whether it ever connected;
 * and bound the connect by the cluster's connect_timeout (TCP_USER_TIMEOUT,
 * which also covers the SYN retransmissions), unless the application set a
 * user timeout of its own. */
static __always_inline void conn_watch(struct bpf_sock_ops *skops)
{
	struct kmesh_sock_state *st = sock_state(skops);
	int current = 0;

	if (!st)
		return;
	if (bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG) == 0)
		kmesh_or(&st->flags, KMESH_SOCK_WATCHED);
	if (st->flags & KMESH_SOCK_L7) {
		/* The source address is known from here on; the daemon finds
		 * the entry by its accepted socket's peer. */
		struct kmesh_handoff_key src = { .netns = sock_netns(skops->sk) };

		sock_local_addr(skops, &src.addr);

		bpf_map_update_elem(&km_orig_dst, &src, &st->vip, BPF_ANY);
	}
	if (!st->connect_timeout_ms)
		return;
	/* The application's own TCP_USER_TIMEOUT, read from the socket:
	 * bpf_getsockopt() has TCP options other than congestion only from
	 * 6.0, and a failed read must not be taken for "none set". */
	if (user_timeout_of(skops, &current) || current)
		return;
	current = st->connect_timeout_ms;
	if (bpf_setsockopt(skops, KMESH_SOL_TCP, KMESH_TCP_USER_TIMEOUT, &current, sizeof(current)) == 0)
		kmesh_or(&st->flags, KMESH_SOCK_USER_TIMEOUT);
}

/* sockops TIMEOUT_INIT (the SYN's first retransmission timeout, 1 s by
 * default): a connect_timeout under a second needs an earlier first
 * retransmission, or the timeout could only be noticed at 1 s. Returns the
 * timeout in jiffies, or -1 for the default. */
static __always_inline int conn_syn_rto(struct bpf_sock_ops *skops)
{
	struct kmesh_sock_state *st;
	__u32 hz = CONFIG_HZ, ms, jiffies;

	/* Only a connecting socket has a SYN to time; accepted ones (request
	 * sockets) need no lookup. */
	if (!hz || skops->state != BPF_TCP_SYN_SENT)
		return -1;
	st = sock_state(skops);
	if (!st || !st->connect_timeout_ms || st->connect_timeout_ms >= KMESH_MS_PER_S)
		return -1;
	ms = st->connect_timeout_ms;
	jiffies = ms * hz / KMESH_MS_PER_S;
	return jiffies ? jiffies : 1;
}

/* sockops ACTIVE_ESTABLISHED of a tracked socket: the connect succeeded. */
static __always_inline void conn_established(struct bpf_sock_ops *skops)
{
	struct kmesh_sock_state *st = sock_state(skops);
	int off = 0;

	if (!st)
		return;
	if (st->flags & KMESH_SOCK_USER_TIMEOUT)
		bpf_setsockopt(skops, KMESH_SOL_TCP, KMESH_TCP_USER_TIMEOUT, &off, sizeof(off));
	if (st->flags & KMESH_SOCK_OUTLIER)
		outlier_success(st->cluster_id, &st->ep);
}

/* The state a socket left for CLOSE tells how its connection ended. */
static __always_inline __u32 close_result(__u32 old_state)
{
	if (old_state == BPF_TCP_SYN_SENT)
		return KMESH_CONN_FAILED;
	/* Leaving these for CLOSE skips this end's FIN handshake: a reset
	 * (sent or received) or an abort. */
	if (old_state == BPF_TCP_ESTABLISHED || old_state == BPF_TCP_CLOSE_WAIT || old_state == BPF_TCP_FIN_WAIT1)
		return KMESH_CONN_RESET;
	return KMESH_CONN_CLOSED;
}

/* Payload bytes each way, from the client socket's own counters.
 * bytes_received counts the peer's FIN as a byte once it arrived (tcp_fin
 * sets SOCK_DONE); bytes_sent counts data only, retransmits included. */
static __always_inline void conn_bytes(struct bpf_sock_ops *skops, struct kmesh_conn_end *end)
{
	struct bpf_sock *bsk = skops->sk;
	struct tcp_sock *tp;

	if (!bsk)
		return;
	tp = bpf_skc_to_tcp_sock(bsk);
	if (!tp)
		return;
	end->bytes_to_ep = tp->bytes_sent - tp->bytes_retrans;
	end->bytes_from_ep = tp->bytes_received;
	if (end->bytes_from_ep && (tp->inet_conn.icsk_inet.sk.__sk_common.skc_flags & (1UL << SOCK_DONE)))
		end->bytes_from_ep -= 1;
}

/* sockops, STATE_CB to CLOSE of a watched socket: count its end. */
static __always_inline void conn_closed(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct kmesh_sock_state *st = bpf_map_lookup_elem(&km_sock_ep, &cookie);
	struct kmesh_conn_end end = { .result = close_result(skops->args[0]) };

	if (!st)
		return;
	sock_local_addr(skops, &end.src);
	conn_bytes(skops, &end);
	if (end.result == KMESH_CONN_FAILED && (st->flags & KMESH_SOCK_OUTLIER))
		outlier_failure(st->cluster_id, &st->ep);
	conn_account(st, &end);
	bpf_map_delete_elem(&km_sock_ep, &cookie);
}

#endif /* __KMESH_ENDPOINT_H__ */
