"""Daemon options, shared by the CLI, the daemon and the admin API."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from kmesh import limits

DEFAULT_CONFIG_FILE = "/etc/kmesh/kmesh.yaml"
DEFAULT_BPF_FS_PATH = "/sys/fs/bpf"
DEFAULT_CGROUP2_PATH = "/mnt/kmesh_cgroup2"
DEFAULT_ADMIN_ADDRESS = "127.0.0.1:15200"
DEFAULT_L7_ADDRESS = "127.0.0.1:15201"
DEFAULT_ADMIN_SOCKET = "/run/kmesh/admin.sock"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:15020"


@dataclass(frozen=True)
class Options:
    enable_kmesh: bool = True
    enable_ads: bool = True
    config_file: str = DEFAULT_CONFIG_FILE
    bpf_fs_path: str = DEFAULT_BPF_FS_PATH
    cgroup2_path: str = DEFAULT_CGROUP2_PATH
    workloads: str = "all"         # all: -cgroup2-path's processes are enrolled; enrolled: only those enrolled
    admin_address: str = DEFAULT_ADMIN_ADDRESS     # reads for anyone; changes from root only; "" turns it off
    admin_socket: str = DEFAULT_ADMIN_SOCKET       # the whole API for root and -admin-group; "" turns it off
    admin_group: str = ""                          # a group whose members may change kmesh (name or gid)
    metrics_address: str = DEFAULT_METRICS_ADDRESS  # /metrics only; "" turns it off
    log_level: str = "info"
    enable_sockmap: bool = False   # same-host acceleration (sockops + sk_msg)
    track_connections: bool = True  # count closes too (closed/active metrics): ~200 ns more per connect
    access_log: bool = False        # a JSON line per closed connection (switchable at runtime)
    access_log_file: str = ""       # "" : stdout (journald under systemd)
    access_log_rate: int = 1000     # lines per second at most
    bpf_stats: bool = False         # count program runs and run time (kernel-wide; ~20-40 ns per run)
    bpf_disable_features: str = ""  # kernel features to do without, "a,b" (kmesh.bpf.features.DISABLEABLE)
    l7_address: str = DEFAULT_L7_ADDRESS   # hand-off listener for routes that need HTTP; "" turns L7 off
    l7_splice_budget: int = 256 * 1024     # bytes per direction ahead of a slow peer; 0: relay in the daemon
    l7_max_waiting_heads: int = limits.L7_PENDING_HEADS.value   # waiting for a request head; past it the oldest closes
    l7_engine: str = "python"              # "native": the C engine carries L7 connections (kmesh.l7.engine)
    # ADS mode
    xds_address: str = ""          # else $XDS_ADDRESS, the bootstrap's ads_config, istiod's default
    xds_ca_file: str = ""          # TLS to the control plane when set
    xds_cert_file: str = ""
    xds_key_file: str = ""
    service_node: str = ""         # node id; else sidecar~IP~POD.NS~NS.svc.cluster.local
    service_cluster: str = ""
    xds_ready_timeout: float = 30.0

    def as_dict(self) -> dict:
        return asdict(self)


def split_address(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"'{addr}' is not HOST:PORT")
    return host.strip("[]"), int(port)
