"""Daemon options, shared by the CLI, the daemon and the admin API."""
from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_CONFIG_FILE = "/etc/kmesh/kmesh.yaml"
DEFAULT_BPF_FS_PATH = "/sys/fs/bpf"
DEFAULT_CGROUP2_PATH = "/mnt/kmesh_cgroup2"
DEFAULT_ADMIN_ADDRESS = "127.0.0.1:15200"


@dataclass(frozen=True)
class Options:
    enable_kmesh: bool = True
    enable_ads: bool = True
    config_file: str = DEFAULT_CONFIG_FILE
    bpf_fs_path: str = DEFAULT_BPF_FS_PATH
    cgroup2_path: str = DEFAULT_CGROUP2_PATH
    admin_address: str = DEFAULT_ADMIN_ADDRESS
    log_level: str = "info"

    def as_dict(self) -> dict:
        return asdict(self)


def split_address(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"'{addr}' is not HOST:PORT")
    return host.strip("[]"), int(port)
