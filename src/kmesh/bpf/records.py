"""ctypes mirrors of ``bpf/include/kmesh_records.h``.

The C header is the source of truth. These classes repeat its layout so that
the daemon can build records without a compiler at run time; two checks keep
them from drifting: ``tests/unit/test_records_btf.py`` compares every struct
and enum here with the BTF clang emitted for the object, and the loader refuses
to start when a map's key or value size differs from these classes.
"""
from __future__ import annotations

import ctypes
import enum
import hashlib
import socket
import struct
from typing import NamedTuple, Sequence

# enum kmesh_limits
KMESH_MAX_LISTENERS = 16384
KMESH_PORTS = 65536
KMESH_MAX_CLUSTERS = 16384
KMESH_MAX_ENDPOINTS = 128
KMESH_LB_SLOTS = 256
KMESH_MAX_WEIGHTED_CLUSTERS = 32
KMESH_MAX_TRACKED_ENDPOINTS = 65536
KMESH_MAX_SOCKMAP_SOCKETS = 65536
KMESH_MAX_ENDPOINT_STATS = 65536
KMESH_MAX_TRACKED_SOCKETS = 65536
KMESH_EVENTS_BYTES = 1048576
KMESH_EVENTS_WAKEUP_BYTES = 65536
KMESH_MAX_LOCAL_ADDRS = 1024
KMESH_MAX_LISTENERS_TRACKED = 16384
KMESH_SOCKMAP_TURN_BYTES = 131072
KMESH_SOCKMAP_SMALL_MSG = 16384
KMESH_MAX_POLICY_CLUSTERS = 16384
KMESH_MAX_HANDOFFS = 65536
KMESH_MAX_WORKLOADS = 4096
KMESH_WORKLOAD_PATH_MAX = 128
KMESH_MAX_CGROUP_DEPTH = 16
KMESH_WORKLOAD_CACHE = 16384
LISTENER_L7 = 1   # enum kmesh_listener_flag
# enum kmesh_cluster_view: the bit of a cluster id that names its record for
# IPv6 clients (kmesh_records.h).
CLUSTER_V6 = 0x40000000
KMESH_MAX_OUTLIER_ENDPOINTS = 65536
KMESH_MAX_SPLICED_SOCKETS = 65536

LIMITS = {
    "KMESH_MAX_LISTENERS": KMESH_MAX_LISTENERS,
    "KMESH_PORTS": KMESH_PORTS,
    "KMESH_MAX_CLUSTERS": KMESH_MAX_CLUSTERS,
    "KMESH_MAX_ENDPOINTS": KMESH_MAX_ENDPOINTS,
    "KMESH_LB_SLOTS": KMESH_LB_SLOTS,
    "KMESH_MAX_WEIGHTED_CLUSTERS": KMESH_MAX_WEIGHTED_CLUSTERS,
    "KMESH_MAX_TRACKED_ENDPOINTS": KMESH_MAX_TRACKED_ENDPOINTS,
    "KMESH_MAX_SOCKMAP_SOCKETS": KMESH_MAX_SOCKMAP_SOCKETS,
    "KMESH_MAX_ENDPOINT_STATS": KMESH_MAX_ENDPOINT_STATS,
    "KMESH_MAX_TRACKED_SOCKETS": KMESH_MAX_TRACKED_SOCKETS,
    "KMESH_EVENTS_BYTES": KMESH_EVENTS_BYTES,
    "KMESH_EVENTS_WAKEUP_BYTES": KMESH_EVENTS_WAKEUP_BYTES,
    "KMESH_MAX_LOCAL_ADDRS": KMESH_MAX_LOCAL_ADDRS,
    "KMESH_MAX_LISTENERS_TRACKED": KMESH_MAX_LISTENERS_TRACKED,
    "KMESH_SOCKMAP_TURN_BYTES": KMESH_SOCKMAP_TURN_BYTES,
    "KMESH_SOCKMAP_SMALL_MSG": KMESH_SOCKMAP_SMALL_MSG,
    "KMESH_MAX_POLICY_CLUSTERS": KMESH_MAX_POLICY_CLUSTERS,
    "KMESH_MAX_HANDOFFS": KMESH_MAX_HANDOFFS,
    "KMESH_MAX_WORKLOADS": KMESH_MAX_WORKLOADS,
    "KMESH_WORKLOAD_PATH_MAX": KMESH_WORKLOAD_PATH_MAX,
    "KMESH_MAX_CGROUP_DEPTH": KMESH_MAX_CGROUP_DEPTH,
    "KMESH_WORKLOAD_CACHE": KMESH_WORKLOAD_CACHE,
    "KMESH_MAX_OUTLIER_ENDPOINTS": KMESH_MAX_OUTLIER_ENDPOINTS,
    "KMESH_MAX_SPLICED_SOCKETS": KMESH_MAX_SPLICED_SOCKETS,
}


# enum kmesh_layout: see kmesh_records.h
KMESH_LAYOUT_VERSION = 9


class LbPolicy(enum.IntEnum):
    """enum kmesh_lb_policy; names match Envoy's Cluster.LbPolicy."""

    ROUND_ROBIN = 0
    RANDOM = 1
    LEAST_REQUEST = 2


Ip6 = ctypes.c_uint32 * 4


class KmeshAddr(ctypes.Structure):
    """struct kmesh_addr: either family, IPv4 mapped (::ffff:a.b.c.d)."""

    _fields_ = [("ip6", Ip6), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class KmeshHandoffKey(ctypes.Structure):
    """struct kmesh_handoff_key: km_orig_dst's key."""

    _fields_ = [("netns", ctypes.c_uint32), ("addr", KmeshAddr)]


class WorkloadKind(enum.IntEnum):
    """enum kmesh_workload_kind."""

    CGROUP = 1
    NETNS = 2


class WorkloadMode(enum.IntEnum):
    """enum kmesh_workload_mode."""

    ENROLLED = 1
    BYPASS = 2


WORKLOAD_SCOPE = 1   # enum kmesh_workload_flag


class KmeshWorkloadKey(ctypes.Structure):
    """struct kmesh_workload_key: km_workloads' key."""

    _fields_ = [("kind", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("id", ctypes.c_uint64)]


class KmeshWorkloadCacheKey(ctypes.Structure):
    """struct kmesh_workload_cache_key: km_workload_cache's key (only the programs use it)."""

    _fields_ = [("cgroup", ctypes.c_uint64), ("netns_cookie", ctypes.c_uint64)]


class KmeshWorkloadVerdict(ctypes.Structure):
    """struct kmesh_workload_verdict: km_workload_cache's value."""

    _fields_ = [("gen", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class KmeshWorkload(ctypes.Structure):
    """struct kmesh_workload: km_workloads' value."""

    _fields_ = [("mode", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("path", ctypes.c_char * KMESH_WORKLOAD_PATH_MAX)]


class KmeshWeightedCluster(ctypes.Structure):
    _fields_ = [("cluster_id", ctypes.c_uint32), ("cum_weight", ctypes.c_uint32)]


class KmeshRateLimit(ctypes.Structure):
    _fields_ = [("max_tokens", ctypes.c_uint32), ("tokens_per_fill", ctypes.c_uint32),
                ("fill_interval_ns", ctypes.c_uint64)]


class KmeshListener(ctypes.Structure):
    _fields_ = [
        ("cluster_count", ctypes.c_uint32),
        ("total_weight", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("rate_limit", KmeshRateLimit),
        ("clusters", KmeshWeightedCluster * KMESH_MAX_WEIGHTED_CLUSTERS),
    ]


class KmeshBucket(ctypes.Structure):
    _fields_ = [("lock", ctypes.c_uint32), ("tokens", ctypes.c_uint32), ("last_fill_ns", ctypes.c_uint64)]


class KmeshEndpoint(ctypes.Structure):
    _fields_ = [("addr", KmeshAddr), ("weight", ctypes.c_uint32)]


class KmeshClusterPolicy(ctypes.Structure):
    _fields_ = [("max_connections", ctypes.c_uint32), ("connect_timeout_ms", ctypes.c_uint32),
                ("outlier_failures", ctypes.c_uint32), ("outlier_base_ms", ctypes.c_uint32),
                ("outlier_max_ms", ctypes.c_uint32), ("outlier_max_percent", ctypes.c_uint32)]


class KmeshCluster(ctypes.Structure):
    _fields_ = [
        ("lb_policy", ctypes.c_uint32),
        ("endpoint_count", ctypes.c_uint32),
        ("slot_count", ctypes.c_uint32),
        ("rr_cursor", ctypes.c_uint32),
        ("policy", KmeshClusterPolicy),
        ("endpoints", KmeshEndpoint * KMESH_MAX_ENDPOINTS),
        ("slots", ctypes.c_uint8 * KMESH_LB_SLOTS),
    ]


class KmeshEpStats(ctypes.Structure):
    _fields_ = [("active", ctypes.c_uint64)]


class KmeshSockKey(ctypes.Structure):
    _fields_ = [("local_ip6", Ip6), ("remote_ip6", Ip6),
                ("local_port", ctypes.c_uint16), ("remote_port", ctypes.c_uint16)]


class KmeshSockmapCfg(ctypes.Structure):
    _fields_ = [("redirect", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class KmeshListenFlags(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class KmeshSockTurn(ctypes.Structure):
    _fields_ = [("last_sender", ctypes.c_uint32), ("plain", ctypes.c_uint32), ("turn_bytes", ctypes.c_uint64)]




class KmeshConfig(ctypes.Structure):
    _fields_ = [("track_connections", ctypes.c_uint32), ("access_log", ctypes.c_uint32),
                ("access_log_limit", KmeshRateLimit), ("l7_handoff", KmeshAddr),
                ("daemon_netns", ctypes.c_uint32), ("workloads_gen", ctypes.c_uint32),
                ("daemon_cgroup", ctypes.c_uint64)]


class KmeshSockState(ctypes.Structure):
    _fields_ = [("ep", KmeshAddr), ("cluster_id", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("vip", KmeshAddr), ("opened_ns", ctypes.c_uint64), ("connect_timeout_ms", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32)]


class KmeshConnEvent(ctypes.Structure):
    _fields_ = [("opened_ns", ctypes.c_uint64), ("closed_ns", ctypes.c_uint64),
                ("bytes_to_ep", ctypes.c_uint64), ("bytes_from_ep", ctypes.c_uint64),
                ("src", KmeshAddr), ("vip", KmeshAddr), ("ep", KmeshAddr),
                ("cluster_id", ctypes.c_uint32), ("result", ctypes.c_uint32)]


class ConnResult(enum.IntEnum):
    """enum kmesh_conn_result: how a tracked connection ended."""

    CLOSED = 0
    FAILED = 1
    RESET = 2


class KmeshEpKey(ctypes.Structure):
    _fields_ = [("cluster_id", ctypes.c_uint32), ("ep", KmeshAddr)]


class KmeshConnCounters(ctypes.Structure):
    _fields_ = [("opened", ctypes.c_uint64), ("closed", ctypes.c_uint64), ("failed", ctypes.c_uint64),
                ("bytes_to_ep", ctypes.c_uint64), ("bytes_from_ep", ctypes.c_uint64),
                ("rate_limited", ctypes.c_uint64)]


class KmeshClusterState(ctypes.Structure):
    _fields_ = [("active", ctypes.c_int64)]


class KmeshOutlier(ctypes.Structure):
    _fields_ = [("failures", ctypes.c_uint32), ("ejections", ctypes.c_uint32), ("ejected_until_ns", ctypes.c_uint64)]


class KmeshClusterCounters(ctypes.Structure):
    _fields_ = [("overflow", ctypes.c_uint64), ("ejections", ctypes.c_uint64)]


class Stat(enum.IntEnum):
    """enum kmesh_stat: index of km_stats."""

    NO_LISTENER = 0
    NO_CLUSTER = 1
    NO_ENDPOINT = 2
    REDIRECTS = 3
    EVENTS_DROPPED = 4
    EVENTS_RATE_LIMITED = 5
    L7_HANDOFFS = 6
    UNGOVERNED = 7
    L7_NO_NETNS = 8


KMESH_STAT_MAX = 9


class KmeshSpliceDir(ctypes.Structure):
    _fields_ = [("peer", ctypes.c_uint64), ("redirected", ctypes.c_uint64), ("passed", ctypes.c_uint64),
                ("budget", ctypes.c_uint32), ("mode", ctypes.c_uint32), ("next_seq", ctypes.c_uint32),
                ("seq_known", ctypes.c_uint32), ("repeated", ctypes.c_uint64)]


class SpliceMode(enum.IntEnum):
    """enum kmesh_splice_mode."""

    REDIRECT = 0
    PASS = 1


class KmeshMeta(ctypes.Structure):
    _fields_ = [("layout_version", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


ClusterId = ctypes.c_uint32

# Name in C -> ctypes class, for the BTF cross-check.
STRUCTS = {
    "kmesh_addr": KmeshAddr,
    "kmesh_handoff_key": KmeshHandoffKey,
    "kmesh_workload_key": KmeshWorkloadKey,
    "kmesh_workload": KmeshWorkload,
    "kmesh_workload_cache_key": KmeshWorkloadCacheKey,
    "kmesh_workload_verdict": KmeshWorkloadVerdict,
    "kmesh_weighted_cluster": KmeshWeightedCluster,
    "kmesh_listener": KmeshListener,
    "kmesh_endpoint": KmeshEndpoint,
    "kmesh_cluster": KmeshCluster,
    "kmesh_ep_stats": KmeshEpStats,
    "kmesh_meta": KmeshMeta,
    "kmesh_sock_key": KmeshSockKey,
    "kmesh_sockmap_cfg": KmeshSockmapCfg,
    "kmesh_listen_flags": KmeshListenFlags,
    "kmesh_sock_turn": KmeshSockTurn,
    "kmesh_sock_state": KmeshSockState,
    "kmesh_config": KmeshConfig,
    "kmesh_conn_event": KmeshConnEvent,
    "kmesh_ep_key": KmeshEpKey,
    "kmesh_conn_counters": KmeshConnCounters,
    "kmesh_rate_limit": KmeshRateLimit,
    "kmesh_cluster_policy": KmeshClusterPolicy,
    "kmesh_bucket": KmeshBucket,
    "kmesh_cluster_state": KmeshClusterState,
    "kmesh_outlier": KmeshOutlier,
    "kmesh_cluster_counters": KmeshClusterCounters,
    "kmesh_splice_dir": KmeshSpliceDir,
}
ENUMS = {"kmesh_limits": LIMITS, "kmesh_lb_policy": {f"KMESH_LB_{p.name}": int(p) for p in LbPolicy},
         "kmesh_layout": {"KMESH_LAYOUT_VERSION": KMESH_LAYOUT_VERSION},
         "kmesh_listen_flag": {"KMESH_LISTEN_NONBLOCK": 1},
         "kmesh_dir": {"KMESH_DIR_A": 1, "KMESH_DIR_B": 2},
         "kmesh_sock_flag": {"KMESH_SOCK_COUNTED": 1, "KMESH_SOCK_WATCHED": 2, "KMESH_SOCK_CLUSTER_COUNTED": 4,
                             "KMESH_SOCK_USER_TIMEOUT": 8, "KMESH_SOCK_OUTLIER": 16, "KMESH_SOCK_L7": 32},
         "kmesh_listener_flag": {"KMESH_LISTENER_L7": LISTENER_L7},
         "kmesh_cluster_view": {"KMESH_CLUSTER_V6": CLUSTER_V6},
         "kmesh_workload_kind": {f"KMESH_WORKLOAD_{k.name}": int(k) for k in WorkloadKind},
         "kmesh_workload_mode": {f"KMESH_WORKLOAD_{m.name}": int(m) for m in WorkloadMode},
         "kmesh_workload_flag": {"KMESH_WORKLOAD_SCOPE": WORKLOAD_SCOPE},
         "kmesh_workload_verdict_flag": {"KMESH_VERDICT_GOVERNED": 1, "KMESH_VERDICT_L7_HERE": 2},
         "kmesh_splice_mode": {f"KMESH_SPLICE_{m.name}": int(m) for m in SpliceMode},
         "kmesh_conn_result": {f"KMESH_CONN_{r.name}": int(r) for r in ConnResult},
         "kmesh_stat": {**{f"KMESH_STAT_{s.name}": int(s) for s in Stat}, "KMESH_STAT_MAX": KMESH_STAT_MAX}}


# --- encoding -----------------------------------------------------------------
# IPs and ports are stored in network byte order: a field's memory bytes are
# the address as it goes on the wire. Addresses are 16 bytes, IPv4 mapped.

_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def ip_bytes(ip: str) -> bytes:
    """The 16 bytes of a dotted IPv4 (mapped) or an IPv6 address (text);
    ValueError for anything else."""
    if ":" not in ip:
        try:
            return _V4_MAPPED + socket.inet_pton(socket.AF_INET, ip)   # dotted only (inet_aton takes "1.2")
        except OSError:
            raise ValueError(f"{ip!r} is not an IP address") from None
    try:
        raw = socket.inet_pton(socket.AF_INET6, ip)
    except OSError:
        raise ValueError(f"{ip!r} is not an IP address") from None
    return raw


def ip_text(raw: bytes) -> str:
    """An address's text: dotted for IPv4 (mapped), compressed IPv6 else."""
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def is_ipv6(ip: str) -> bool:
    """An address of the IPv6 family (an IPv4-mapped one counts as IPv4)."""
    return ip_bytes(ip)[:12] != _V4_MAPPED


def _ip_field(ip: str) -> Ip6:
    return Ip6.from_buffer_copy(ip_bytes(ip))


def ipv4_field(ip: str) -> int:
    """A dotted IPv4 address as the native engine's u32 (network order)."""
    return struct.unpack("=I", socket.inet_pton(socket.AF_INET, ip))[0]


def ipv4_of(field: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", field))


def _port_field(port: int) -> int:
    return struct.unpack("=H", struct.pack("!H", port))[0]


def ip_of(field) -> str:
    return ip_text(bytes(field))


def port_key(port: int) -> int:
    """km_listener_ports' key: the port as the hooks see it (network order
    in the low 16 bits)."""
    return _port_field(port)


def port_of(field: int) -> int:
    return struct.unpack("!H", struct.pack("=H", field))[0]


def handoff_key(netns: int, ip: str, port: int) -> KmeshHandoffKey:
    return KmeshHandoffKey(netns, addr_key(ip, port))


def addr_key(ip: str, port: int) -> KmeshAddr:
    return KmeshAddr(_ip_field(ip), _port_field(port), 0)


def host_port(ip: str, port: int) -> str:
    """"ip:port", the IPv6 address in brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def smooth_wrr_slots(weights: Sequence[int], max_slots: int = KMESH_LB_SLOTS) -> list[int]:
    """Endpoint indexes in smooth weighted round-robin order (as nginx does).

    Weights are first divided by their gcd; if the sum still exceeds
    ``max_slots`` they are scaled down proportionally (each endpoint keeps at
    least one slot), so the schedule is exact up to that rounding.
    """
    if not weights:
        return []
    if len(weights) <= max_slots and min(weights) == max(weights):
        return list(range(len(weights)))  # equal weights: plain rotation
    from math import gcd
    from functools import reduce

    g = reduce(gcd, weights) or 1
    w = [x // g for x in weights]
    total = sum(w)
    if total > max_slots:
        # Largest-remainder scaling, at least one slot each.
        budget = max_slots - len(w)
        raw = [x * budget / total for x in w]
        w = [1 + int(r) for r in raw]
        rest = max_slots - sum(w)
        for i in sorted(range(len(w)), key=lambda i: raw[i] - int(raw[i]), reverse=True)[:rest]:
            w[i] += 1
        total = sum(w)
    current = [0] * len(w)
    order = []
    for _ in range(total):
        for i, x in enumerate(w):
            current[i] += x
        best = max(range(len(w)), key=lambda i: current[i])
        current[best] -= total
        order.append(best)
    return order


class ClusterPolicy(NamedTuple):
    """struct kmesh_cluster_policy as content (config/policies.py fills it);
    0 turns each policy off."""

    max_connections: int = 0
    connect_timeout_ms: int = 0
    outlier_failures: int = 0
    outlier_base_ms: int = 0
    outlier_max_ms: int = 0
    outlier_max_percent: int = 0


class RateLimit(NamedTuple):
    """A listener's struct kmesh_rate_limit as content; max_tokens 0: none."""

    max_tokens: int = 0
    tokens_per_fill: int = 0
    fill_interval_ms: int = 0


NO_POLICY = ClusterPolicy()
NO_RATE_LIMIT = RateLimit()
_NS_PER_MS = 1_000_000


def cluster_record(lb_policy: LbPolicy, endpoints: Sequence[tuple[str, int, int]],
                   policy: ClusterPolicy = NO_POLICY) -> KmeshCluster:
    """endpoints: (ip, port, weight) in config order."""
    if len(endpoints) > KMESH_MAX_ENDPOINTS:
        raise ValueError(f"{len(endpoints)} endpoints exceed the limit of {KMESH_MAX_ENDPOINTS}")
    rec = KmeshCluster()
    rec.lb_policy = int(lb_policy)
    rec.policy = KmeshClusterPolicy(*policy)
    rec.endpoint_count = len(endpoints)
    for i, (ip, port, weight) in enumerate(endpoints):
        rec.endpoints[i] = KmeshEndpoint(addr_key(ip, port), weight)
    slots = smooth_wrr_slots([w for _, _, w in endpoints])
    rec.slot_count = len(slots)
    for i, s in enumerate(slots):
        rec.slots[i] = s
    return rec


def listener_record(clusters: Sequence[tuple[int, int]], rate_limit: RateLimit = NO_RATE_LIMIT,
                    flags: int = 0) -> KmeshListener:
    """clusters: (cluster_id, weight); zero-weight entries are left out.
    flags: LISTENER_L7 for routes that need the HTTP request."""
    live = [(cid, w) for cid, w in clusters if w > 0]
    if len(live) > KMESH_MAX_WEIGHTED_CLUSTERS:
        raise ValueError(f"{len(live)} weighted clusters exceed the limit of {KMESH_MAX_WEIGHTED_CLUSTERS}")
    rec = KmeshListener()
    total = 0
    for i, (cid, w) in enumerate(live):
        total += w
        rec.clusters[i] = KmeshWeightedCluster(cid, total)
    rec.cluster_count = len(live)
    rec.total_weight = total
    rec.flags = flags
    rec.rate_limit = KmeshRateLimit(rate_limit.max_tokens, rate_limit.tokens_per_fill,
                                    rate_limit.fill_interval_ms * _NS_PER_MS)
    return rec


# --- fingerprints ---------------------------------------------------------------
# The daemon remembers what each map entry holds by a short fingerprint of
# the record's *content*, not by a copy (10 000 clusters x 1.8 KB). Content is
# what a record is made from: for a cluster (lb policy, endpoints, traffic
# policy), for a listener its live (cluster id, weight) pairs and its rate
# limit. Everything else in a record
# (slot table, cumulative weights) follows from it, and runtime fields (the
# round-robin cursor) are not content. A record read back from a pinned map
# gives the same fingerprint as the model it was written from, which is what
# lets a restarted daemon see that nothing needs writing.

ClusterSpec = tuple  # (LbPolicy, ((ip, port, weight), ...), ClusterPolicy)
ListenerSpec = tuple  # (((cluster_id, weight), ...) with weights > 0, RateLimit, flags)


def _fingerprint(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _policy_text(policy: tuple, none: tuple) -> str:
    """A policy in a fingerprint: nothing when off, so that records without
    one fingerprint as before policies existed."""
    return "" if policy == none else "/" + ",".join(map(str, policy))


def cluster_fingerprint(spec: ClusterSpec) -> bytes:
    lb, endpoints, policy = spec
    return _fingerprint(f"{int(lb)}/" + ",".join(f"{ip_bytes(ip).hex()}:{port}:{w}" for ip, port, w in endpoints)
                        + _policy_text(policy, NO_POLICY))


def listener_fingerprint(spec: ListenerSpec) -> bytes:
    clusters, rate_limit, flags = spec
    return _fingerprint(",".join(f"{cid}:{w}" for cid, w in clusters) + _policy_text(rate_limit, NO_RATE_LIMIT)
                        + (f"/f{flags}" if flags else ""))


def policy_of(rec: KmeshCluster) -> ClusterPolicy:
    return ClusterPolicy(*(getattr(rec.policy, f) for f, _ in KmeshClusterPolicy._fields_))


def cluster_spec_of(rec: KmeshCluster) -> ClusterSpec:
    return (rec.lb_policy, tuple((ip_of(e.addr.ip6), port_of(e.addr.port), e.weight)
                                 for e in rec.endpoints[: min(rec.endpoint_count, KMESH_MAX_ENDPOINTS)]),
            policy_of(rec))


def listener_spec_of(rec: KmeshListener) -> ListenerSpec:
    out, prev = [], 0
    for wc in rec.clusters[: min(rec.cluster_count, KMESH_MAX_WEIGHTED_CLUSTERS)]:
        out.append((wc.cluster_id, wc.cum_weight - prev))
        prev = wc.cum_weight
    rl = rec.rate_limit
    return tuple(out), RateLimit(rl.max_tokens, rl.tokens_per_fill, rl.fill_interval_ns // _NS_PER_MS), rec.flags


def addr_text(key: KmeshAddr) -> str:
    return host_port(ip_of(key.ip6), port_of(key.port))


def addr_is_zero(key: KmeshAddr) -> bool:
    return not any(key.ip6)


def decode_listener(rec: KmeshListener) -> dict:
    clusters, rate_limit, flags = listener_spec_of(rec)
    out = {"total_weight": rec.total_weight,
           "clusters": [{"cluster_id": cid, "weight": w} for cid, w in clusters]}
    if flags & LISTENER_L7:
        out["l7"] = True
    if rate_limit != NO_RATE_LIMIT:
        out["rate_limit"] = rate_limit._asdict()
    return out


def decode_cluster(rec: KmeshCluster) -> dict:
    return {
        "lb_policy": LbPolicy(rec.lb_policy).name if rec.lb_policy in iter(LbPolicy) else rec.lb_policy,
        "endpoints": [
            {"address": addr_text(e.addr), "weight": e.weight}
            for e in rec.endpoints[: rec.endpoint_count]
        ],
        "slot_count": rec.slot_count,
        "rr_cursor": rec.rr_cursor,
        **({"policy": {k: v for k, v in policy_of(rec)._asdict().items() if v}} if rec.policy.max_connections
           or rec.policy.connect_timeout_ms or rec.policy.outlier_failures else {}),
    }
