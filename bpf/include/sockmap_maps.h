/* SPDX-License-Identifier: GPL-2.0 */
/* Maps of the same-host acceleration (kmesh_sockmap.bpf.c), declared once.
 * Pinned beside the core maps under <bpf-fs-path>/bpf_kmesh/map/. */
#ifndef __KMESH_SOCKMAP_MAPS_H__
#define __KMESH_SOCKMAP_MAPS_H__

#include "kmesh_records.h"

/* Both ends of every accelerated connection. The kernel removes a socket
 * when it closes. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, KMESH_MAX_SOCKMAP_SOCKETS);
	__type(key, struct kmesh_sock_key);
	__type(value, __u64);
} km_sock_hash SEC(".maps");

/* The host's own addresses besides 127.0.0.0/8 and ::1 (port 0), kept by
 * the daemon: a connection to one of them has its other end on this host. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_LOCAL_ADDRS);
	__type(key, struct kmesh_addr);
	__type(value, __u32); /* unused (1) */
} km_local_ip SEC(".maps");

/* Listening sockets by (ip, port), from listen(): see sockmap.h. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KMESH_MAX_LISTENERS_TRACKED);
	__type(key, struct kmesh_addr);
	__type(value, struct kmesh_listen_flags);
} km_listen_flags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kmesh_sockmap_cfg);
} km_sockmap_cfg SEC(".maps");

/* Per accelerated connection, the sending pattern (sockmap.h). LRU: an entry
 * outlives its connection until evicted; losing one only restarts a count. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KMESH_MAX_SOCKMAP_SOCKETS);
	__type(key, struct kmesh_sock_key);
	__type(value, struct kmesh_sock_turn);
} km_sock_turn SEC(".maps");

#endif /* __KMESH_SOCKMAP_MAPS_H__ */
