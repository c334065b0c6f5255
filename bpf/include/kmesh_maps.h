/* SPDX-License-Identifier: GPL-2.0 */
/* Every map kmesh uses, declared once. The daemon pins them under
 * <bpf-fs-path>/bpf_kmesh/map/<name>. */
#ifndef __KMESH_MAPS_H__
#define __KMESH_MAPS_H__

#include "kmesh_records.h"

/* Listener and cluster records are replaced whole by the daemon.
 * BPF_F_NO_PREALLOC makes a replaced element wait an RCU grace period before
 * it is freed, so a connect that already looked it up keeps reading a
 * consistent record (a preallocated hash map would recycle it at once). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_LISTENERS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct kmesh_addr);
	__type(value, struct kmesh_listener);
} km_listener SEC(".maps");

/* The ports some listener is on (by its port in network byte order; 1: at
 * least one): a connect to any other port, which is most connects that are
 * not to a service, is left alone after one array lookup instead of two
 * hash lookups of a 20-byte address. The daemon sets a port before it
 * writes the port's first listener and clears it after deleting its last
 * (src/kmesh/dataplane/maps.py). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KMESH_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} km_listener_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_CLUSTERS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct kmesh_cluster);
} km_cluster SEC(".maps");

/* Active connections per endpoint, for LEAST_REQUEST. Keyed by address, not
 * by cluster record, so the counts survive config updates. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_TRACKED_ENDPOINTS);
	__type(key, struct kmesh_addr);
	__type(value, struct kmesh_ep_stats);
} km_ep_active SEC(".maps");

/* Where a tracked socket was sent, by socket cookie, until it is released.
 * Preallocated (no BPF_F_NO_PREALLOC): an insert takes a free element
 * instead of allocating, which keeps tracking cheap enough to leave on. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_TRACKED_SOCKETS);
	__type(key, __u64);
	__type(value, struct kmesh_sock_state);
} km_sock_ep SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kmesh_config);
} km_config SEC(".maps");

/* Connection records for the access log (only while it is on). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, KMESH_EVENTS_BYTES);
} km_events SEC(".maps");

/* Counters, per CPU so that the hot path never shares a cache line; the
 * daemon sums them for /metrics. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KMESH_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} km_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, KMESH_MAX_LISTENERS);
	__type(key, struct kmesh_addr);
	__type(value, struct kmesh_conn_counters);
} km_stats_listener SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, KMESH_MAX_ENDPOINT_STATS);
	__type(key, struct kmesh_ep_key);
	__type(value, struct kmesh_conn_counters);
} km_stats_endpoint SEC(".maps");

/* A handed-off connection's original destination (the VIP the application
 * connected to), by the client socket's own address and network namespace
 * as the daemon sees them (the peer of the socket it accepts on its
 * hand-off listener in that namespace). LRU: entries the daemon never
 * reads (it was down) make room by themselves. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KMESH_MAX_HANDOFFS);
	__type(key, struct kmesh_handoff_key);
	__type(value, struct kmesh_addr);
} km_orig_dst SEC(".maps");

/* Enrolled and bypassed workloads, by cgroup and by network namespace
 * (include/workload.h): connect4 governs a connection only when its
 * workload is enrolled. Written by the daemon (and by kmeshctl while the
 * daemon is down); pinned, so enrollment outlives a restart. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_WORKLOADS);
	__type(key, struct kmesh_workload_key);
	__type(value, struct kmesh_workload);
} km_workloads SEC(".maps");

/* The verdict of workload_governed() per (cgroup, namespace), so that a
 * connect pays one lookup instead of the cgroup walk. LRU: a pair that
 * stopped connecting makes room by itself. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KMESH_WORKLOAD_CACHE);
	__type(key, struct kmesh_workload_cache_key);
	__type(value, struct kmesh_workload_verdict);
} km_workload_cache SEC(".maps");

/* L7 splicing (include/splice.h): the daemon-side sockets of spliced
 * connections by socket cookie, the verdict's state per socket, and what
 * the daemon relayed of the bytes the verdict left to it (written only by
 * the daemon, so that neither side overwrites the other's counters). The
 * kernel removes a socket from km_splice when it closes; the daemon deletes
 * the other two entries. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, KMESH_MAX_SPLICED_SOCKETS);
	__type(key, __u64);
	__type(value, __u64);
} km_splice SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_SPLICED_SOCKETS);
	__type(key, __u64);
	__type(value, struct kmesh_splice_dir);
} km_splice_dir SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_SPLICED_SOCKETS);
	__type(key, __u64);
	__type(value, __u64);
} km_splice_relayed SEC(".maps");

/* Traffic policy state, kept apart from the records the daemon replaces. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_LISTENERS);
	__type(key, struct kmesh_addr);
	__type(value, struct kmesh_bucket);
} km_rate_limit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_POLICY_CLUSTERS);
	__type(key, __u32);
	__type(value, struct kmesh_cluster_state);
} km_cluster_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_OUTLIER_ENDPOINTS);
	__type(key, struct kmesh_ep_key);
	__type(value, struct kmesh_outlier);
} km_outlier SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, KMESH_MAX_POLICY_CLUSTERS);
	__type(key, __u32);
	__type(value, struct kmesh_cluster_counters);
} km_stats_cluster SEC(".maps");

/* The layout version of the maps pinned beside it; the programs never read
 * it: it is for the daemon that finds these pins after a restart or an
 * upgrade. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kmesh_meta);
} km_meta SEC(".maps");

/* The value under ``key``, created from ``*init`` when missing (another CPU
 * may create it first: BPF_NOEXIST keeps theirs). NULL when the map is full. */
static __always_inline void *map_lookup_or_init(void *map, const void *key, const void *init)
{
	void *v = bpf_map_lookup_elem(map, key);

	if (v)
		return v;
	bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}

#endif /* __KMESH_MAPS_H__ */
