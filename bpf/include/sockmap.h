/* SPDX-License-Identifier: GPL-2.0 */
/* Same-host acceleration: which sockets are enrolled in km_sock_hash, and
 * the key of a socket's peer. The rules (docs/sockmap.md):
 *
 *   - TCP, either family (an AF_INET6 socket connected to an IPv4 address
 *     too: its addresses are mapped, as its peer's key has them);
 *   - the remote end is on this host (127.0.0.0/8 or an address in
 *     km_local_ip), so its socket can be enrolled too;
 *   - no upper-layer protocol (kTLS, MPTCP) on the socket;
 *   - the socket is non-blocking. A socket in a sockhash reads through
 *     tcp_bpf_recvmsg(), which on this kernel returns EAGAIN instead of
 *     restarting when a signal interrupts a *blocking* read: an application
 *     would see an error plain TCP never gives it. Non-blocking sockets
 *     expect EAGAIN. A connecting socket is checked directly; an accepted one
 *     has no file yet when it is established, so its listener's mode at
 *     listen() stands for it (event-loop servers listen non-blocking).
 *
 * Which messages are redirected: request/response gains most (each message
 * skips TCP/IP twice). Streaming small writes loses on this kernel (every
 * write becomes a separate message and wake-up on the peer, where TCP
 * batches), so a direction that sends more than KMESH_SOCKMAP_TURN_BYTES in
 * messages under KMESH_SOCKMAP_SMALL_MSG without hearing back goes back to
 * plain TCP for good. (Large messages stay: a socket in a sockhash sends
 * them through TCP much slower than a plain one, and handing them over is
 * about as fast as TCP.) Going from redirect to TCP keeps the byte order:
 * the receiver reads what was handed over before what arrives by TCP
 * (tcp_bpf_recvmsg() drains its queue first); the other way round would not,
 * so a direction never comes back.
 */
#ifndef __KMESH_SOCKMAP_H__
#define __KMESH_SOCKMAP_H__

#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#include "addr.h"
#include "compat.h"
#include "sockmap_maps.h"

#define KMESH_O_NONBLOCK 04000 /* asm-generic (x86, arm64) */
#define KMESH_LOOPBACK_NET 127

static __always_inline bool sockmap_enabled(void)
{
	__u32 zero = 0;
	struct kmesh_sockmap_cfg *cfg = bpf_map_lookup_elem(&km_sockmap_cfg, &zero);

	return cfg && cfg->redirect;
}

static __always_inline bool ip_is_local(const __u32 ip6[4])
{
	struct kmesh_addr key = { .ip6 = { ip6[0], ip6[1], ip6[2], ip6[3] } };

	if (addr_is_v4(&key) && (bpf_ntohl(ip6[3]) >> 24) == KMESH_LOOPBACK_NET)
		return true;
	if (!ip6[0] && !ip6[1] && !ip6[2] && ip6[3] == bpf_htonl(1)) /* ::1 */
		return true;
	return bpf_map_lookup_elem(&km_local_ip, &key) != 0;
}

static __always_inline bool sock_has_ulp(struct sock *sk)
{
	return BPF_CORE_READ((struct inet_connection_sock *)sk, icsk_ulp_ops) != 0;
}

/* The socket's file is in non-blocking mode (false when it has no file). */
static __always_inline bool sock_nonblocking(struct sock *sk)
{
	struct file *f = BPF_CORE_READ(sk, sk_socket, file);

	if (!f)
		return false;
	return BPF_CORE_READ(f, f_flags) & KMESH_O_NONBLOCK;
}

static __always_inline void listener_remember(struct bpf_sock_ops *skops, struct sock *sk)
{
	struct kmesh_listen_flags val = { .flags = sock_nonblocking(sk) ? KMESH_LISTEN_NONBLOCK : 0 };
	struct kmesh_addr key;

	sock_local_addr(skops, &key);

	bpf_map_update_elem(&km_listen_flags, &key, &val, BPF_ANY);
}

/* An accepted socket's stand-in for non-blocking: its listener's mode,
 * bound to the address or to the wildcard. */
static __always_inline bool listener_nonblocking(struct bpf_sock_ops *skops)
{
	struct kmesh_listen_flags *f;
	struct kmesh_addr key;

	sock_local_addr(skops, &key);
	f = bpf_map_lookup_elem(&km_listen_flags, &key);
	if (!f) {
		addr_to_wildcard(&key);
		f = bpf_map_lookup_elem(&km_listen_flags, &key);
	}
	return f && (f->flags & KMESH_LISTEN_NONBLOCK);
}

static __always_inline struct kmesh_sock_key sock_key_of(struct bpf_sock_ops *skops)
{
	struct kmesh_sock_key key = {
		.local_port = (__u16)skops->local_port,
		.remote_port = (__u16)bpf_ntohl(skops->remote_port),
	};

	kmesh_ip6_of(key.local_ip6, skops, local_ip4, local_ip6);
	kmesh_ip6_of(key.remote_ip6, skops, remote_ip4, remote_ip6);
	return key;
}

/* The key the peer socket was enrolled under. */
static __always_inline struct kmesh_sock_key peer_key_of(struct sk_msg_md *msg)
{
	struct kmesh_sock_key key = {
		.local_port = (__u16)bpf_ntohl(msg->remote_port),
		.remote_port = (__u16)msg->local_port,
	};

	kmesh_ip6_of(key.local_ip6, msg, remote_ip4, remote_ip6);
	kmesh_ip6_of(key.remote_ip6, msg, local_ip4, local_ip6);
	return key;
}

/* -1, 0 or 1: a total order of (address, port) ends, the same seen from
 * either end. */
static __always_inline int end_cmp(const __u32 *a, __u16 aport, const __u32 *b, __u16 bport)
{
	for (int i = 0; i < 4; i++) {
		if (a[i] != b[i])
			return a[i] < b[i] ? -1 : 1;
	}
	return aport < bport ? -1 : aport > bport;
}

/* Account a message of ``size`` bytes; false once this direction sends
 * through plain TCP. */
static __always_inline bool turn_redirect(struct sk_msg_md *msg)
{
	__u16 lport = (__u16)msg->local_port, rport = (__u16)bpf_ntohl(msg->remote_port);
	struct kmesh_sock_key key = {};
	__u32 lip[4], rip[4];
	bool local_first;
	__u32 me;

	/* Values, not context fields, from here on (kmesh_ip6_of). */
	kmesh_ip6_of(lip, msg, local_ip4, local_ip6);
	kmesh_ip6_of(rip, msg, remote_ip4, remote_ip6);
	local_first = end_cmp(lip, lport, rip, rport) < 0;
	me = local_first ? KMESH_DIR_A : KMESH_DIR_B;
	for (int i = 0; i < 4; i++) {
		key.local_ip6[i] = local_first ? lip[i] : rip[i];
		key.remote_ip6[i] = local_first ? rip[i] : lip[i];
	}
	key.local_port = local_first ? lport : rport;
	key.remote_port = local_first ? rport : lport;
	struct kmesh_sock_turn *t = bpf_map_lookup_elem(&km_sock_turn, &key);

	if (!t) {
		struct kmesh_sock_turn fresh = { .last_sender = me };

		bpf_map_update_elem(&km_sock_turn, &key, &fresh, BPF_NOEXIST);
		return true;
	}
	if (t->plain & me)
		return false;
	if (t->last_sender != me) {
		t->last_sender = me;
		t->turn_bytes = 0;
	}
	if (msg->size >= KMESH_SOCKMAP_SMALL_MSG)
		return true;
	t->turn_bytes += msg->size;
	if (t->turn_bytes > KMESH_SOCKMAP_TURN_BYTES) {
		kmesh_or(&t->plain, me);
		return false;
	}
	return true;
}

static __always_inline bool sockmap_eligible(struct bpf_sock_ops *skops, struct sock *sk, bool active)
{
	__u32 remote[4];

	if (skops->family != KMESH_AF_INET && skops->family != KMESH_AF_INET6)
		return false;
	kmesh_ip6_of(remote, skops, remote_ip4, remote_ip6);
	if (!ip_is_local(remote))
		return false;
	if (sock_has_ulp(sk))
		return false;
	return active ? sock_nonblocking(sk) : listener_nonblocking(skops);
}

#endif /* __KMESH_SOCKMAP_H__ */
