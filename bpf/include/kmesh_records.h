/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Map record layouts shared by the BPF programs and the daemon.
 *
 * This header is the single source of truth: the daemon's ctypes records in
 * src/kmesh/bpf/records.py are checked against the BTF that clang emits for
 * these structs (tests/unit/test_records_btf.py, and at load time by value
 * size). Every record is a flat, fixed-size struct; addresses and ports are
 * stored in network byte order, as the hooks see them in bpf_sock_addr.
 * An address is 16 bytes for both families: IPv4 in its IPv4-mapped form
 * (::ffff:a.b.c.d), which is also how a dual-stack socket names it, so an
 * IPv4 VIP has one key whichever family's hook looks it up.
 */
#ifndef __KMESH_RECORDS_H__
#define __KMESH_RECORDS_H__

/* Limits. Enums (not #defines) so that they land in BTF and the daemon can
 * read them from the object instead of repeating the numbers. */
enum kmesh_limits {
	KMESH_MAX_LISTENERS = 16384,
	/* TCP ports (km_listener_ports). */
	KMESH_PORTS = 65536,
	KMESH_MAX_CLUSTERS = 16384,
	/* Endpoints stored inline in one cluster record. */
	KMESH_MAX_ENDPOINTS = 128,
	/* Smooth weighted round-robin schedule length (see cluster.h). */
	KMESH_LB_SLOTS = 256,
	/* Weighted clusters of one tcp_proxy / route. */
	KMESH_MAX_WEIGHTED_CLUSTERS = 32,
	/* Distinct backends whose active connections are counted. */
	KMESH_MAX_TRACKED_ENDPOINTS = 65536,
	/* Same-host sockets accelerated at once (two per connection). */
	KMESH_MAX_SOCKMAP_SOCKETS = 65536,
	/* Connections handed to the L7 listener whose original destination the
	 * daemon has not read yet. */
	KMESH_MAX_HANDOFFS = 65536,
	/* Workloads enrolled by network namespace, and the longest path one
	 * can be enrolled by. */
	KMESH_MAX_WORKLOADS = 4096,
	KMESH_WORKLOAD_PATH_MAX = 128,
	/* cgroup levels searched for an enrollment, root included: systemd
	 * services sit at 2, Kubernetes containers at 4 or 5. */
	KMESH_MAX_CGROUP_DEPTH = 16,
	/* (cgroup, namespace) pairs whose verdict is remembered. */
	KMESH_WORKLOAD_CACHE = 16384,
	/* Clusters with policies that keep state, endpoints with outlier state. */
	KMESH_MAX_POLICY_CLUSTERS = 16384,
	KMESH_MAX_OUTLIER_ENDPOINTS = 65536,
	/* Access log ring buffer (bytes, a power of two). */
	KMESH_EVENTS_BYTES = 1048576,
	/* Records wake the daemon only once this much is waiting (it also
	 * reads every 100 ms): a wake-up per record would cost more than the
	 * record. */
	KMESH_EVENTS_WAKEUP_BYTES = 65536,
	/* Redirected sockets open at once whose close is counted. */
	KMESH_MAX_TRACKED_SOCKETS = 65536,
	/* (cluster, endpoint) pairs with counters. */
	KMESH_MAX_ENDPOINT_STATS = 65536,
	/* Local addresses (either family) and listening sockets remembered. */
	KMESH_MAX_LOCAL_ADDRS = 1024,
	KMESH_MAX_LISTENERS_TRACKED = 16384,
	/* Bytes one end may send in small messages without hearing back
	 * before its direction of the connection goes back to plain TCP:
	 * streaming small writes, where handing each message over costs more
	 * than TCP's batching (docs/sockmap.md). */
	KMESH_SOCKMAP_TURN_BYTES = 131072,
	/* A message this large or larger is handed over at about TCP's speed
	 * or better, and does not count toward the turn. */
	KMESH_SOCKMAP_SMALL_MSG = 16384,
	/* Daemon-side sockets of L7 connections spliced in the kernel (two
	 * per connection). */
	KMESH_MAX_SPLICED_SOCKETS = 65536,
};

/* The version of everything the daemon keeps in pinned maps: these records
 * and the map definitions in kmesh_maps.h. Bump it with any change to
 * either; tests/unit/test_records_layout.py fails until you do. A daemon
 * that finds pins of another version migrates them (new maps, filled, then
 * swapped in under the pinned links) instead of reusing them. */
enum kmesh_layout {
	KMESH_LAYOUT_VERSION = 9,
};

/* Key of km_workloads: a workload, named by its cgroup (the cgroup id, which
 * is the inode of its cgroup2 directory) or by its network namespace (the
 * namespace's inode). */
struct kmesh_workload_key {
	__u32 kind; /* enum kmesh_workload_kind */
	__u32 pad;
	__u64 id;
};

enum kmesh_workload_kind {
	KMESH_WORKLOAD_CGROUP = 1,
	KMESH_WORKLOAD_NETNS = 2,
};

/* Value of km_workloads: what was said of the workload, and the path it was
 * named by (for the daemon: to open a namespace's hand-off listener again,
 * to notice that a cgroup or namespace is gone). */
struct kmesh_workload {
	__u32 mode;  /* enum kmesh_workload_mode */
	__u32 flags; /* enum kmesh_workload_flag */
	char path[KMESH_WORKLOAD_PATH_MAX]; /* NUL-terminated */
};

enum kmesh_workload_mode {
	KMESH_WORKLOAD_ENROLLED = 1, /* governed */
	KMESH_WORKLOAD_BYPASS = 2,   /* never governed, even inside an enrolled one */
};

/* Key of km_workload_cache: where a connect comes from. Neither id is ever
 * reused (a cgroup id is 64-bit and counts up; a namespace cookie too). */
struct kmesh_workload_cache_key {
	__u64 cgroup;       /* the task's own cgroup */
	__u64 netns_cookie; /* bpf_get_netns_cookie() of the socket */
};

/* Value of km_workload_cache: what workload_governed() found for it. */
struct kmesh_workload_verdict {
	__u32 gen;   /* km_config.workloads_gen it was found under */
	__u32 flags; /* enum kmesh_workload_verdict_flag */
};

enum kmesh_workload_verdict_flag {
	KMESH_VERDICT_GOVERNED = 1,
	KMESH_VERDICT_L7_HERE = 2,
};

enum kmesh_workload_flag {
	/* Enrolled by the daemon's -workloads=all (its -cgroup2-path), not by
	 * a user: a daemon started with -workloads=enrolled removes it. */
	KMESH_WORKLOAD_SCOPE = 1,
};

/* Value of km_meta (one entry): what the pinned maps hold. */
struct kmesh_meta {
	__u32 layout_version;
	__u32 reserved;
};

enum kmesh_lb_policy {
	KMESH_LB_ROUND_ROBIN = 0,
	KMESH_LB_RANDOM = 1,
	KMESH_LB_LEAST_REQUEST = 2,
};

/* A socket address of either family: listener key, endpoint key of the
 * active-connection counters, and what a tracked socket remembers. IPv4 is
 * stored mapped: ip6 = { 0, 0, htonl(0xffff), ipv4 }. */
struct kmesh_addr {
	__u32 ip6[4]; /* network byte order */
	__u16 port;   /* network byte order */
	__u16 pad;
};

/* Key of km_orig_dst: a client socket's own address within its network
 * namespace, named by the namespace's inode (/proc/PID/ns/net): two pods
 * can both connect from 127.0.0.1:40000. */
struct kmesh_handoff_key {
	__u32 netns;
	struct kmesh_addr addr;
};

struct kmesh_weighted_cluster {
	__u32 cluster_id;
	/* Running sum of weights up to and including this entry. */
	__u32 cum_weight;
};

/* A listener's local rate limit on new connections (Envoy's network
 * local_ratelimit token bucket); max_tokens 0: none. The bucket itself is in
 * km_rate_limit, so that replacing the listener record keeps it. */
struct kmesh_rate_limit {
	__u32 max_tokens;
	__u32 tokens_per_fill;
	__u64 fill_interval_ns;
};

/* Value of km_listener: where a connection to (ip, port) goes. A single
 * cluster is one entry with weight 1. */
struct kmesh_listener {
	__u32 cluster_count;
	__u32 total_weight;
	__u32 flags; /* KMESH_LISTENER_* */
	__u32 reserved;
	struct kmesh_rate_limit rate_limit;
	struct kmesh_weighted_cluster clusters[KMESH_MAX_WEIGHTED_CLUSTERS];
};

enum kmesh_listener_flag {
	/* Its routes need the HTTP request (host, path, headers): connections
	 * go to the daemon's hand-off listener (km_config.l7_handoff), which
	 * reads the request head and picks the route (docs/l7.md). */
	KMESH_LISTENER_L7 = 1,
};

/* Value of km_rate_limit, keyed by the listener's key: the token bucket. */
struct kmesh_bucket {
	struct bpf_spin_lock lock;
	__u32 tokens;
	__u64 last_fill_ns; /* start of the fill interval the tokens are for */
};

struct kmesh_endpoint {
	struct kmesh_addr addr;
	__u32 weight;
};

/* A cluster's traffic policies (Envoy's circuit_breakers, connect_timeout and
 * outlier_detection, as kmesh enforces them at L4); 0 turns each off. */
struct kmesh_cluster_policy {
	__u32 max_connections;     /* open connections to the cluster, at most */
	__u32 connect_timeout_ms;  /* a connect not established by then fails (ETIMEDOUT) */
	__u32 outlier_failures;    /* consecutive connect failures that eject an endpoint */
	__u32 outlier_base_ms;     /* ejection time, times the endpoint's ejection count ... */
	__u32 outlier_max_ms;      /* ... up to this */
	__u32 outlier_max_percent; /* of the cluster's endpoints ejected at once (at least one) */
};

/* A cluster whose endpoints have addresses of both families (or IPv6 only)
 * has two records: its IPv4 addresses under its id, and what an IPv6 client
 * connects to (their IPv6 addresses, else IPv4 ones, mapped) under the id
 * with this bit, which IPv6 listeners point at. A connect hook cannot change
 * a socket's family, and an AF_INET socket has no way to an IPv6 endpoint.
 * The two records share the cluster's max_connections. */
enum kmesh_cluster_view {
	KMESH_CLUSTER_V6 = 0x40000000,
};

/* Value of km_cluster, keyed by a cluster id the daemon allocates. The whole
 * cluster, endpoints included, is one record, so replacing it is one atomic
 * map update: a connect sees the old cluster or the new one, never a mix. */
struct kmesh_cluster {
	__u32 lb_policy;      /* enum kmesh_lb_policy */
	__u32 endpoint_count; /* <= KMESH_MAX_ENDPOINTS */
	__u32 slot_count;     /* <= KMESH_LB_SLOTS; 0 when endpoint_count == 0 */
	__u32 rr_cursor;      /* shared round-robin position, bumped atomically */
	struct kmesh_cluster_policy policy;
	struct kmesh_endpoint endpoints[KMESH_MAX_ENDPOINTS];
	/* Endpoint indexes in smooth weighted round-robin order, computed by
	 * the daemon: ROUND_ROBIN walks it, RANDOM samples it. */
	__u8 slots[KMESH_LB_SLOTS];
};

/* Key of km_sock_hash: one TCP socket, by its own view of the connection.
 * Ports in host byte order, addresses in network byte order. The peer of a
 * socket is found under the reversed tuple. */
struct kmesh_sock_key {
	__u32 local_ip6[4];  /* either family, IPv4 mapped (as kmesh_addr) */
	__u32 remote_ip6[4];
	__u16 local_port;
	__u16 remote_port;
};

/* Value of km_sockmap_cfg (one entry), written by the daemon. */
struct kmesh_sockmap_cfg {
	/* 0: existing entries pass through TCP and no new ones are added (the
	 * feature being turned off while connections still use it). */
	__u32 redirect;
	__u32 reserved;
};

/* Value of km_sock_turn, keyed by a connection (its two ends in a fixed
 * order): who sent last, how much in this turn, and which directions went
 * back to plain TCP (KMESH_DIR_* bits). */
struct kmesh_sock_turn {
	__u32 last_sender; /* KMESH_DIR_A or KMESH_DIR_B */
	__u32 plain;       /* directions no longer redirected */
	__u64 turn_bytes;  /* sent by last_sender in small messages since the other end last sent */
};

enum kmesh_dir {
	KMESH_DIR_A = 1, /* from the lower (ip, port) end */
	KMESH_DIR_B = 2,
};

/* Value of km_listen_flags: what a listening socket looked like when
 * listen() was called on it (KMESH_LISTEN_*). */
struct kmesh_listen_flags {
	__u32 flags;
	__u32 reserved;
};

enum kmesh_listen_flag {
	KMESH_LISTEN_NONBLOCK = 1,
};

/* What is remembered of a tracked socket (km_sock_ep, by socket cookie):
 * where it went, for the counters at close and for LEAST_REQUEST. */
struct kmesh_sock_state {
	struct kmesh_addr ep;
	__u32 cluster_id;
	__u32 flags;     /* KMESH_SOCK_* */
	struct kmesh_addr vip; /* what the application connected to */
	__u64 opened_ns; /* bpf_ktime_get_ns() at connect */
	__u32 connect_timeout_ms; /* the cluster's, when the connect began */
	__u32 reserved;
};

/* How a tracked connection ended (kmesh_conn_event.result). */
enum kmesh_conn_result {
	KMESH_CONN_CLOSED = 0, /* closed in an orderly way */
	/* never established: refused, unreachable, timed out, or connect()
	 * failed before a SYN was sent */
	KMESH_CONN_FAILED = 1,
	KMESH_CONN_RESET = 2,  /* established, then ended without a FIN from this end */
};

/* One record of km_events (ring buffer) per closed tracked connection,
 * while the access log is on: the daemon turns them into log lines. Bytes
 * are payload only, as the client socket counted them. */
struct kmesh_conn_event {
	__u64 opened_ns;
	__u64 closed_ns;
	__u64 bytes_to_ep;   /* the client sent (tcp_sock bytes_sent less retransmits) */
	__u64 bytes_from_ep; /* the client received */
	struct kmesh_addr src; /* the client socket's own address */
	struct kmesh_addr vip;
	struct kmesh_addr ep;
	__u32 cluster_id;
	__u32 result; /* enum kmesh_conn_result */
};

enum kmesh_sock_flag {
	KMESH_SOCK_COUNTED = 1, /* in km_ep_active (LEAST_REQUEST) */
	/* its SYN went out and sockops watches its state: the close is
	 * counted when TCP reaches CLOSE, with its bytes and result */
	KMESH_SOCK_WATCHED = 2,
	KMESH_SOCK_CLUSTER_COUNTED = 4, /* holds a slot of its cluster's max_connections */
	KMESH_SOCK_USER_TIMEOUT = 8,    /* kmesh set TCP_USER_TIMEOUT for the connect: undo once established */
	KMESH_SOCK_OUTLIER = 16,        /* its cluster detects outliers: a success resets the endpoint's count */
	KMESH_SOCK_L7 = 32,             /* handed off to the daemon: publish its original destination */
};

/* Value of km_cluster_state, by cluster id: what max_connections counts. */
struct kmesh_cluster_state {
	__s64 active; /* connections holding a slot */
};

/* Value of km_outlier, by (cluster id, endpoint): outlier detection. */
struct kmesh_outlier {
	__u32 failures;       /* consecutive connect failures */
	__u32 ejections;      /* times ejected, for the ejection time; reset by a success */
	__u64 ejected_until_ns; /* 0: not ejected */
};

/* Value of km_stats_cluster (per CPU): what a cluster's policies did. */
struct kmesh_cluster_counters {
	__u64 overflow;  /* connects refused by max_connections */
	__u64 ejections; /* endpoints ejected by outlier detection */
};

/* Value of km_config (one entry), written by the daemon. */
struct kmesh_config {
	/* Remember every redirected socket so that its close is counted:
	 * closed/active metrics. LEAST_REQUEST clusters are tracked regardless. */
	__u32 track_connections;
	/* Send a kmesh_conn_event per closed tracked connection ... */
	__u32 access_log;
	/* ... at most this many (a bucket in km_rate_limit under
	 * KMESH_ACCESS_LOG_BUCKET): a storm of connections is cut short in the
	 * kernel, not after the daemon has read it. max_tokens 0: no limit. */
	struct kmesh_rate_limit access_log_limit;
	/* Where connections to an L7 listener go (0.0.0.0:0: nowhere; they are
	 * then left alone). */
	struct kmesh_addr l7_handoff;
	/* The daemon's own network namespace (inode), where l7_handoff
	 * listens for clients that are not in an enrolled namespace. */
	__u32 daemon_netns;
	/* Bumped after every change to km_workloads (and daemon_netns): a
	 * km_workload_cache entry of another generation is recomputed. */
	__u32 workloads_gen;
	/* The daemon's own cgroup: its sockets (upstream L7 connections, which
	 * may be opened inside an enrolled namespace) are never governed. */
	__u64 daemon_cgroup;
};

/* Key of km_stats_endpoint: one endpoint of one cluster. */
struct kmesh_ep_key {
	__u32 cluster_id;
	struct kmesh_addr ep;
};

/* Value of km_stats_endpoint and km_stats_listener (per CPU; the daemon
 * sums). closed, failed and the bytes are counted for tracked sockets
 * (km_config.track_connections); failed connections are closed ones too. */
struct kmesh_conn_counters {
	__u64 opened; /* connects redirected */
	__u64 closed;
	__u64 failed; /* of the closed, never established */
	__u64 bytes_to_ep;
	__u64 bytes_from_ep;
	__u64 rate_limited; /* listener: connects refused by its local rate limit */
};

/* Index of km_stats (per CPU): what connect4 decided (their sum is every
 * TCP connect seen, so that is not counted apart). */
enum kmesh_stat {
	KMESH_STAT_NO_LISTENER = 0, /* not a VIP: left alone */
	KMESH_STAT_NO_CLUSTER = 1,  /* VIP whose clusters are gone: left alone */
	KMESH_STAT_NO_ENDPOINT = 2, /* VIP whose cluster has no endpoint: left alone */
	KMESH_STAT_REDIRECTS = 3,
	KMESH_STAT_EVENTS_DROPPED = 4, /* access log records the ring buffer had no room for */
	KMESH_STAT_EVENTS_RATE_LIMITED = 5, /* access log records over its rate limit */
	KMESH_STAT_L7_HANDOFFS = 6, /* connects to an L7 listener sent to the daemon's hand-off listener */
	KMESH_STAT_UNGOVERNED = 7, /* connects to a VIP by a workload not enrolled (or bypassed): left alone */
	/* connects to an L7 listener from a namespace without a hand-off
	 * listener (its cgroup is enrolled, its namespace is not): routed at
	 * L4, by the listener's catch-all clusters */
	KMESH_STAT_L7_NO_NETNS = 8,
	KMESH_STAT_MAX = 9,
};

/* Value of km_splice_dir, by the socket cookie of one daemon-side socket of
 * a spliced L7 connection: where its incoming bytes go (docs/l7.md). Only
 * the verdict writes it once the pair is spliced; the daemon reads it. */
struct kmesh_splice_dir {
	__u64 peer;       /* socket cookie of the other daemon-side socket */
	__u64 redirected; /* bytes handed to the peer's send side by the verdict */
	__u64 passed;     /* bytes left to the daemon (the peer fell behind) */
	/* Redirected bytes that may wait for room in the peer's send buffer
	 * (kernel memory nothing else bounds); past it, bytes go to the daemon,
	 * which relays them with ordinary TCP backpressure. */
	__u32 budget;
	__u32 mode;       /* enum kmesh_splice_mode */
	/* TCP sequence number after the last byte the verdict saw, to drop a
	 * repeat: the kernel hands the verdict whole skbs, also one whose head
	 * overlaps bytes already delivered (a retransmission after the
	 * receiver dropped for memory), so the overlap would go out twice. */
	__u32 next_seq;
	__u32 seq_known;  /* next_seq is set */
	__u64 repeated;   /* bytes dropped as repeats */
};

enum kmesh_splice_mode {
	KMESH_SPLICE_REDIRECT = 0, /* bytes go to the peer in the kernel */
	/* bytes go to the daemon until it has relayed every byte so passed
	 * (km_splice_relayed == passed): then the kernel takes over again */
	KMESH_SPLICE_PASS = 1,
};

/* Value of km_ep_active: connections currently open to one endpoint. */
struct kmesh_ep_stats {
	__u64 active;
};

#endif /* __KMESH_RECORDS_H__ */
