"""Workloads enrolled by network namespace, kept in the pinned km_workloads
map (namespace inode -> the path it was enrolled by) so that a restarted or
upgraded daemon opens their hand-off listeners again."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from kmesh.bpf import libbpf, loader, records


class WorkloadStore:
    def __init__(self, m: libbpf.Map):
        self.map = m

    def all(self) -> dict[int, str]:
        return {int(k.value): v.path.decode(errors="replace") for k, v in self.map.items()}

    def add(self, inode: int, path: str) -> None:
        self.map.update(ctypes.c_uint32(inode), records.KmeshWorkload(path.encode()))

    def remove(self, inode: int) -> None:
        self.map.delete(ctypes.c_uint32(inode))


def check_path(path: str) -> None:
    """A path km_workloads can hold (ValueError naming the limit)."""
    if "\0" in path or len(path.encode()) >= records.KMESH_WORKLOAD_PATH_MAX:
        raise ValueError(f"network namespace path {path!r} is longer than "
                         f"{records.KMESH_WORKLOAD_PATH_MAX - 1} bytes (or holds a NUL)")


def carried_over(old_map_dir: Path) -> dict[int, str]:
    """What an older layout's pinned km_workloads holds, if it has one of the
    same record size (an upgrade keeps the enrolled workloads)."""
    pin = old_map_dir / "km_workloads"
    if not pin.exists():
        return {}
    fd = libbpf.obj_get(str(pin))
    try:
        if libbpf.map_sizes(fd) != (4, ctypes.sizeof(records.KmeshWorkload)):
            return {}
    finally:
        os.close(fd)
    with loader.pinned_map(pin, "km_workloads") as m:
        return WorkloadStore(m).all()
