/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The native engine's own route decisions (l7route.c): a route table the
 * Python side compiled for one L7 listener (kmesh.l7.fastpath writes it),
 * applied to a request head without leaving C. It decides only what it can
 * decide exactly as the Python side would (a forward through a route that
 * only picks a cluster, on a request head in the plain form); anything else
 * (a route or virtual host it cannot evaluate before the match, a local
 * answer, an unusual head) is left to the Python side, which decides it
 * with the whole of Envoy's semantics.
 *
 * The table, in native byte order (u8/u16/u32; str: u32 length + bytes):
 *   u32 magic KR_MAGIC, u32 flags (KR_F_*), u32 n_clusters, u32 n_hosts,
 *   u32 n_vhosts, i32 default vhost (-1: none)
 *   cluster:  u8 lb (KR_LB_*), u32 connect_timeout_ms, u32 n_eps,
 *             n_eps × (u32 ip as the maps hold it, u32 port, u32 weight)
 *   host:     u8 kind (KR_H_*), str domain (lowercase, '*' removed), u32 vhost
 *             (exact first in byte order, then suffixes and prefixes longest first)
 *   vhost:    u8 python (every request: the Python side), u32 n_routes, routes
 *   route:    u8 path kind (KR_P_*; KR_P_PYTHON ends the route), u8 ignore_case,
 *             str path, u32 n_conds, conds, u8 action (KR_A_*),
 *             KR_A_FORWARD: u32 timeout_ms (0: none), u32 n, n × (u32 cluster, u32 weight)
 *   cond:     u8 kind (KR_C_*), u8 ignore_case, u8 present, u8 invert,
 *             u8 missing_as_empty, str name (lowercase), str value
 */
#ifndef KMESH_L7ROUTE_H
#define KMESH_L7ROUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "l7engine.h"

#define KR_MAGIC 0x4b525431u /* "KRT1" */
#define KR_MAX_HEADERS 64     /* a head with more: the Python side */

enum { KR_F_IGNORE_PORT = 1, KR_F_IGNORE_PATH_PARAMS = 2 };
enum { KR_LB_ROUND_ROBIN = 0, KR_LB_RANDOM = 1 };
enum { KR_H_EXACT = 0, KR_H_SUFFIX = 1, KR_H_PREFIX = 2 };
enum { KR_P_PREFIX = 0, KR_P_EXACT = 1, KR_P_SEPARATED = 2, KR_P_PYTHON = 3 };
enum { KR_C_EXACT = 0, KR_C_PREFIX = 1, KR_C_SUFFIX = 2, KR_C_CONTAINS = 3, KR_C_ANY = 4, KR_C_PRESENCE = 5 };
enum { KR_A_PYTHON = 0, KR_A_FORWARD = 1 };

struct kr_table;

/* The table in [p, p+n), or NULL when it is malformed. */
struct kr_table *kr_table_new(const char *p, size_t n);
void kr_table_free(struct kr_table *t);

/* A forward for the request head [head, head+n) filled into *d (kind
 * KL7_FORWARD): true. False: the Python side decides. *rng: the caller's
 * random state (xorshift64*). The head goes up as received, but for a
 * request that closes its connection (Connection: close, no other option):
 * without its Connection lines, written into scratch (cap bytes; NULL:
 * as received), so that the upstream connection can serve later clients. */
bool kr_decide(struct kr_table *t, const char *head, size_t n, uint64_t *rng, char *scratch, size_t cap,
	       struct kl7_decision *d);

#endif
