"""Every BPF map's name, once on the Python side. The C side declares each
map once (bpf/include/*.h, bpf/*.bpf.c); tests/unit/test_mapnames.py checks
that the two name the same maps."""
from __future__ import annotations

# Routing: written by the daemon, read by connect4.
LISTENER = "km_listener"
LISTENER_PORTS = "km_listener_ports"
CLUSTER = "km_cluster"
EP_ACTIVE = "km_ep_active"
META = "km_meta"
CONFIG = "km_config"
# Counters (per CPU) and the connection event ring.
STATS = "km_stats"
STATS_LISTENER = "km_stats_listener"
STATS_ENDPOINT = "km_stats_endpoint"
STATS_CLUSTER = "km_stats_cluster"
EVENTS = "km_events"
# Traffic policies' state.
RATE_LIMIT = "km_rate_limit"
CLUSTER_STATE = "km_cluster_state"
OUTLIER = "km_outlier"
SOCK_EP = "km_sock_ep"
# The L7 hand-off and its splice.
ORIG_DST = "km_orig_dst"
SPLICE = "km_splice"
SPLICE_DIR = "km_splice_dir"
SPLICE_RELAYED = "km_splice_relayed"
# Enrolled workloads.
WORKLOADS = "km_workloads"
WORKLOAD_CACHE = "km_workload_cache"
# Same-host acceleration (the sockmap object).
SOCK_HASH = "km_sock_hash"
LOCAL_IP = "km_local_ip"
SOCKMAP_CFG = "km_sockmap_cfg"
LISTEN_FLAGS = "km_listen_flags"
SOCK_TURN = "km_sock_turn"

ALL = frozenset(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str))
