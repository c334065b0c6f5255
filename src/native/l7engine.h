/* SPDX-License-Identifier: Apache-2.0 */
/*
 * kmesh's native L7 engine: the hand-off listener's I/O in one thread of the
 * daemon (docs/l7.md, "native engine"). The daemon's Python side compiles
 * and decides; this side accepts, reads request heads, connects, carries
 * requests and responses, and keeps connections alive between requests.
 *
 * These structs are the engine's ABI with kmesh.l7.engine (ctypes): the
 * Python side checks their sizes against kl7_abi() at load.
 */
#ifndef KMESH_L7ENGINE_H
#define KMESH_L7ENGINE_H

#include <stdint.h>

#define KL7_ABI 3
#define KL7_MAX_EPS 8

/* What the decide callback answers for one request head. */
enum kl7_kind {
	KL7_HANDOFF = 0, /* the daemon's Python side takes the connection */
	KL7_ANSWER = 1,  /* write data (a whole response); keep: the connection goes on */
	KL7_FORWARD = 2, /* to the first endpoint that connects, head = data (or as received) */
	KL7_CLOSE = 3,   /* close without an answer */
};

enum kl7_body { KL7_BODY_NONE = 0, KL7_BODY_LENGTH = 1, KL7_BODY_CHUNKED = 2 };

/* Why a connection comes back to Python (kl7_handoff.reason). */
enum kl7_reason {
	KL7_R_DECIDE = 0,         /* the decide callback said so */
	KL7_R_CONNECT_FAILED = 1, /* no endpoint of the forward connected: the request is in buf */
	KL7_R_PARK = 2,           /* the engine stops: an idle connection for the next daemon */
};

struct kl7_ep {
	uint32_t ip;   /* network order */
	uint16_t port; /* host order */
	uint16_t pad;
};

struct kl7_request {
	const char *head;
	uint32_t head_len;
	uint32_t vip_ip; /* network order */
	uint32_t peer_ip;
	uint16_t vip_port;
	uint16_t peer_port;
	uint64_t netns;     /* inode of the listener's namespace */
	uint32_t first;     /* the connection's first request (its head only peeked) */
	uint32_t gen;       /* want_table: the config generation a table must be of */
	uint32_t want_table; /* the engine has no table of this generation for the VIP */
	uint32_t pad;
};

struct kl7_decision {
	int32_t kind;
	int32_t keep;      /* ANSWER, and a FORWARD's own answers: the connection goes on after it */
	int32_t req_keep;  /* FORWARD: the request lets the connection go on after the response */
	int32_t status;    /* ANSWER: its status (counted) */
	const char *data;  /* ANSWER: the response; FORWARD: the upstream head, NULL: as received */
	uint32_t data_len;
	uint32_t n_eps;
	struct kl7_ep eps[KL7_MAX_EPS]; /* FORWARD: the LB's order; eps past the first: on connect failure */
	uint32_t timeout_ms;            /* FORWARD: the response head's deadline, 0: none */
	uint32_t connect_timeout_ms;
	int32_t body;                   /* enum kl7_body */
	int32_t head_request;           /* a HEAD request: its response has no body */
	uint64_t body_len;
	/* With want_table: the VIP's route table (l7route.h; table_len 0: the
	 * Python side decides every request to it) for generation table_gen. */
	int32_t table_given;
	uint32_t table_gen;
	const char *table;
	uint32_t table_len;
	uint32_t pad;
};

struct kl7_handoff {
	int32_t fd;
	int32_t reason;
	uint32_t vip_ip;
	uint32_t peer_ip;
	uint16_t vip_port;
	uint16_t peer_port;
	uint32_t buf_len;
	uint32_t first; /* nothing was read: the first head is still in the socket */
	uint64_t netns;
	char *buf; /* what was read and not yet carried (free with kl7_free_buf) */
};

/* Counters: the engine's own (kmesh.l7 adds them to /l7). */
struct kl7_stats {
	uint64_t accepted, handed_off, routed, answers, bad_requests, no_destination;
	uint64_t connect_failures, upstream_failures, timeouts, head_timeouts, refused, evicted;
	uint64_t per_request; /* connections that went on after a request */
	uint64_t active, waiting, upstreams;
	uint64_t decided; /* request heads the engine decided itself (l7route.c) */
	uint64_t tables;  /* route tables it took */
	uint64_t pooled;  /* exchanges over an upstream connection another client left */
	uint64_t replayed; /* requests sent again after a reused upstream connection failed */
	uint64_t spares;  /* idle upstream connections no client holds, now */
	uint64_t spliced; /* response body bytes moved upstream -> client by splice(2), not copied */
	uint64_t status[600]; /* answers and responses by status */
};

/* Fixed answers for a forward's failures, keep and close variants. */
enum kl7_fixed {
	KL7_A_RESET = 0,   /* 503: the upstream closed before a response */
	KL7_A_TIMEOUT = 1, /* 504: no response head within the route's timeout */
	KL7_A_BAD = 2,     /* 400: a head the engine cannot read */
	KL7_A_TOO_LARGE = 3, /* 431 */
	KL7_A_N = 4,
};

typedef int (*kl7_decide_fn)(const struct kl7_request *req, struct kl7_decision *out);

struct kl7_config {
	int orig_dst_fd;        /* km_orig_dst */
	uint32_t head_limit;    /* bytes: a longer head gets 431 */
	uint32_t head_timeout_ms;
	uint32_t idle_timeout_ms;
	uint32_t max_waiting;   /* connections waiting for a head; past it the oldest is closed */
	int32_t fd_ceiling;     /* an accepted fd at or above it is refused (RST) */
	uint32_t drain_ms;      /* at stop: exchanges in flight may finish within it */
	uint32_t pad;
	kl7_decide_fn decide;
	int handoff_eventfd;    /* written when a connection comes back to Python */
	int pad2;
	const char *fixed[KL7_A_N][2]; /* [kind][keep] */
	uint32_t fixed_len[KL7_A_N][2];
};

#endif
