/* SPDX-License-Identifier: GPL-2.0 */
/* L7 splicing: once the daemon has routed an L7 connection, it puts its two
 * sockets (the accepted client side and the connected upstream side) in
 * km_splice, and the verdict moves each one's incoming bytes to the other's
 * send side inside the kernel.
 *
 * The kernel gives such a redirect no backpressure: a redirected skb is
 * queued on the peer's psock and its bytes are acknowledged to the sender
 * at once, so a peer that does not read lets the queue grow without bound.
 * The verdict therefore keeps a budget per direction: while more than
 * `budget` redirected bytes wait outside the peer's send buffer, it passes
 * bytes to the daemon instead. Passed bytes stay charged to the receiving
 * socket and are not acknowledged as read, so TCP's own window closes on
 * the sender; the daemon relays them after the queued ones (order is kept:
 * once passing, a direction passes until the daemon has relayed all of it).
 */
#ifndef __KMESH_SPLICE_H__
#define __KMESH_SPLICE_H__

#include "kmesh_maps.h"

/* Payload bytes the socket has taken into its send side so far: sent once
 * (retransmits are counted in both terms) plus not yet sent. The daemon
 * computes the same from TCP_INFO (tcpi_bytes_sent - tcpi_bytes_retrans +
 * tcpi_notsent_bytes). Read without the peer's lock: a stale value only
 * moves the moment a direction starts passing. */
static __always_inline __u64 splice_taken(const struct tcp_sock *tp)
{
	return tp->bytes_sent - tp->bytes_retrans + (__u32)(tp->write_seq - tp->snd_nxt);
}

/* Bytes handed to the peer that its send buffer has not taken yet. */
static __always_inline __s64 splice_queued(const struct kmesh_splice_dir *dir, __u64 relayed)
{
	struct bpf_sock *peer = bpf_map_lookup_elem(&km_splice, &dir->peer);
	struct tcp_sock *tp;
	__s64 queued = 0;

	if (!peer)
		return 0; /* the peer closed: the redirect fails and says so */
	tp = bpf_skc_to_tcp_sock(peer);
	if (tp)
		queued = (__s64)(dir->redirected + relayed - splice_taken(tp));
	bpf_sk_release(peer);
	return queued;
}

/* Whether `len` more bytes may be redirected now. */
static __always_inline bool splice_admit(struct kmesh_splice_dir *dir, const __u64 *key, __u32 len)
{
	__u64 relayed = 0;

	if (dir->passed) {
		const __u64 *r = bpf_map_lookup_elem(&km_splice_relayed, key);

		relayed = r ? *r : 0;
		/* Bytes still with the daemon must reach the peer first. */
		if (dir->mode == KMESH_SPLICE_PASS && relayed != dir->passed)
			return false;
	}
	/* Everything ever handed to the peer fits in the budget, so whatever of
	 * it still waits does too: no need to look at the peer. This is every
	 * skb of a request/response connection under the budget. */
	if (dir->redirected + relayed + len <= dir->budget)
		return true;
	return splice_queued(dir, relayed) + len <= dir->budget;
}

/* The TCP sequence number of the skb's first byte (TCP_SKB_CB(skb)->seq:
 * the first bytes of skb->cb, which the sockmap code leaves to TCP). An
 * sk_skb program's context is the kernel's sk_buff, so the field is read at
 * its CO-RE offset from there (bpf_cast_to_kern_ctx would say the same from
 * 6.2 on; this way the verdict loads on older kernels too). */
static __always_inline __u32 splice_skb_seq(struct __sk_buff *skb)
{
	__u32 seq = 0;

	bpf_probe_read_kernel(&seq, sizeof(seq), (void *)skb + bpf_core_field_offset(struct sk_buff, cb));
	return seq;
}

/* The sk_skb flavour of bpf_skb_adjust_room() pulls bytes off the front of
 * the skb, at most SPLICE_TRIM_STEP at a time. Whole steps first, then the
 * rest: a loop whose only branch is its counter, which every verifier since
 * 5.10 walks in a few thousand instructions (one that re-tests the bytes
 * left each round exceeds 6.1's budget). */
#define SPLICE_TRIM_STEP 4095
#define SPLICE_TRIM_STEPS 64 /* 255 KiB: more than any skb TCP builds here */

static __always_inline bool splice_trim_front(struct __sk_buff *skb, __u32 bytes)
{
	__u32 steps = bytes / SPLICE_TRIM_STEP, rest = bytes % SPLICE_TRIM_STEP;

	if (steps > SPLICE_TRIM_STEPS)
		return false;
	for (__u32 i = 0; i < SPLICE_TRIM_STEPS; i++) {
		if (i >= steps)
			break;
		if (bpf_skb_adjust_room(skb, -SPLICE_TRIM_STEP, BPF_ADJ_ROOM_NET, 0))
			return false;
	}
	return !rest || !bpf_skb_adjust_room(skb, -(__s32)rest, BPF_ADJ_ROOM_NET, 0);
}

/* Drop bytes of this skb the verdict has seen already. Returns false when
 * nothing new is left (the caller drops the skb). */
static __always_inline bool splice_skip_repeat(struct __sk_buff *skb, struct kmesh_splice_dir *dir)
{
	__u32 seq = splice_skb_seq(skb), len = skb->len, end = seq + len;
	__s32 seen = (__s32)(dir->next_seq - seq);

	if (dir->seq_known && seen > 0) {
		if ((__u32)seen >= len) {
			dir->repeated += len;
			return false;
		}
		/* An overlap longer than the trim loop reaches (TCP builds no such
		 * skb here) drops the skb, new bytes included: the connection then
		 * fails as it would on a broken pipe. */
		if (!splice_trim_front(skb, seen))
			return false;
		dir->repeated += seen;
	}
	if (!dir->seq_known || (__s32)(end - dir->next_seq) > 0)
		dir->next_seq = end;
	dir->seq_known = 1;
	return true;
}

#endif /* __KMESH_SPLICE_H__ */
