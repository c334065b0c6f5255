"""Enrolled and bypassed workloads (docs/workloads.md).

A workload is named by its cgroup (a path under the cgroup2 mount, a systemd
unit, or a process in it) or by its network namespace (a path such as
/run/netns/NAME, or a process in it). What was said of each is kept in the
pinned km_workloads map, keyed by the cgroup id or the namespace inode, with
the path it was named by: connect4 reads it on every connect to a VIP, a
restarted or upgraded daemon reads it to open the namespaces' hand-off
listeners again, and kmeshctl writes it directly while no daemon runs.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kmesh.bpf import libbpf, loader, mapnames, records

Kind = records.WorkloadKind
Mode = records.WorkloadMode
SELECTORS = ("cgroup", "unit", "pid", "netns")


@dataclass(frozen=True)
class Workload:
    kind: Kind
    id: int        # cgroup id (its directory's inode) or namespace inode
    path: str      # what it was named by
    mode: Mode = Mode.ENROLLED
    scope: bool = False   # enrolled by the daemon's -workloads=all

    def as_dict(self) -> dict:
        return {"kind": self.kind.name.lower(), "id": self.id, "path": self.path,
                "mode": self.mode.name.lower(), **({"scope": True} if self.scope else {})}

    def key(self) -> records.KmeshWorkloadKey:
        return records.KmeshWorkloadKey(int(self.kind), 0, self.id)


class WorkloadStore:
    """km_workloads, read and written whole records at a time. ``changed``
    runs after each write: it bumps km_config.workloads_gen, which makes
    connect4 drop the verdicts it remembered (km_workload_cache)."""

    def __init__(self, m: libbpf.Map, changed: Callable[[], None]):
        self.map = m
        self.changed = changed

    def all(self) -> list[Workload]:
        out = []
        for k, v in self.map.items():
            try:
                kind, mode = Kind(k.kind), Mode(v.mode)
            except ValueError:
                continue   # not ours to read (cannot be written by this version)
            out.append(Workload(kind, int(k.id), v.path.decode(errors="replace"), mode,
                                bool(v.flags & records.WORKLOAD_SCOPE)))
        return sorted(out, key=lambda w: (w.kind, w.path, w.id))

    def get(self, kind: Kind, ident: int) -> Workload | None:
        v = self.map.lookup(records.KmeshWorkloadKey(int(kind), 0, ident))
        if v is None:
            return None
        return Workload(kind, ident, v.path.decode(errors="replace"), Mode(v.mode),
                        bool(v.flags & records.WORKLOAD_SCOPE))

    def named(self, kind: Kind, path: str) -> Workload | None:
        """The record ``path`` names: the workload there now, else the one
        recorded under that path (gone since)."""
        try:
            now = self.get(kind, os.stat(path).st_ino)
        except OSError:
            now = None
        return now or next((w for w in self.all() if w.kind == kind and w.path == path), None)

    def put(self, w: Workload) -> None:
        check_path(w.path)
        self.map.update(w.key(), records.KmeshWorkload(int(w.mode), records.WORKLOAD_SCOPE if w.scope else 0,
                                                       w.path.encode()))
        self.changed()

    def remove(self, w: Workload) -> None:
        self.map.delete(w.key())
        self.changed()


def next_gen(record: records.KmeshConfig) -> int:
    return (record.workloads_gen + 1) & 0xFFFFFFFF


def check_path(path: str) -> None:
    """A path km_workloads can hold (ValueError naming the limit)."""
    if "\0" in path or len(path.encode()) >= records.KMESH_WORKLOAD_PATH_MAX:
        raise ValueError(f"workload path {path!r} is longer than "
                         f"{records.KMESH_WORKLOAD_PATH_MAX - 1} bytes (or holds a NUL)")


# -- naming a workload ---------------------------------------------------------
def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> str:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or
    /sys/fs/cgroup/unified on a hybrid host)."""
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return fields[4]
    raise ValueError("no cgroup2 file system is mounted: workloads cannot be named by cgroup")


def cgroup_path_of_pid(pid: int, root: str, proc: str = "/proc") -> str:
    """The cgroup2 directory of process ``pid`` (its "0::" line)."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ValueError(f"pid {pid}: no such process") from None
    for line in lines:
        if line.startswith("0::"):
            return os.path.normpath(root + "/" + line[3:].lstrip("/"))
    raise ValueError(f"pid {pid} is in no cgroup2 cgroup")


def cgroup_path_of_unit(unit: str, root: str) -> str:
    """The cgroup2 directory of a systemd unit (it must be running)."""
    try:
        got = subprocess.run(["systemctl", "show", "--property=ControlGroup", "--value", "--", unit],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"unit {unit}: systemctl failed ({e}); name its cgroup instead") from None
    cg = got.stdout.strip()
    if got.returncode != 0 or not cg:
        raise ValueError(f"unit {unit}: systemd knows no cgroup for it (is it running?)"
                         + (f": {got.stderr.strip()}" if got.stderr.strip() else ""))
    return os.path.normpath(root + "/" + cg.lstrip("/"))


def own_netns_inode(proc: str = "/proc") -> int:
    return os.stat(f"{proc}/self/ns/net").st_ino


def name(selector: dict[str, str], cgroup_root: str | None = None) -> tuple[Kind, str]:
    """(kind, path) of the workload one selector names: ``cgroup`` (a path,
    absolute or under the cgroup2 mount), ``unit`` (a systemd unit),
    ``netns`` (a namespace path) or ``pid``: the namespace of a process that
    has one of its own (a pod, a container), else its cgroup (a host
    service). ValueError says what is wrong."""
    given = {k: v for k, v in selector.items() if v not in (None, "")}
    if len(given) != 1 or next(iter(given)) not in SELECTORS:
        raise ValueError("name the workload by exactly one of cgroup=PATH, unit=NAME, pid=N or netns=PATH"
                         + (f" (got {', '.join(sorted(given))})" if given else ""))
    (how, what), = given.items()
    what = str(what)
    if how == "netns":
        return Kind.NETNS, what
    if how == "pid":
        if not what.isdigit():
            raise ValueError(f"pid {what!r} is not a process id")
        try:
            if os.stat(f"/proc/{what}/ns/net").st_ino != own_netns_inode():
                return Kind.NETNS, f"/proc/{what}/ns/net"
        except FileNotFoundError:
            raise ValueError(f"pid {what}: no such process") from None
        except OSError as e:
            raise ValueError(f"pid {what}: its network namespace: {e.strerror}") from None
        return Kind.CGROUP, cgroup_path_of_pid(int(what), cgroup_root or cgroup2_root())
    root = cgroup_root or cgroup2_root()
    if how == "unit":
        return Kind.CGROUP, cgroup_path_of_unit(what, root)
    path = what if what.startswith(root + "/") or what == root else os.path.normpath(root + "/" + what.lstrip("/"))
    return Kind.CGROUP, path


def identify(kind: Kind, path: str) -> int:
    """The id the programs know the workload at ``path`` by. ValueError when
    the path is not a cgroup2 directory / a network namespace."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"{kind.name.lower()} {path}: {e.strerror}") from None
    if kind == Kind.CGROUP:
        if not os.path.exists(os.path.join(path, "cgroup.procs")):
            raise ValueError(f"cgroup {path} is not a cgroup2 directory")
    else:
        if not _is_netns(path):
            raise ValueError(f"netns {path} is not a network namespace")
    return st.st_ino


def _is_netns(path: str) -> bool:
    """A network namespace file (/proc/PID/ns/net, a bind mount of one):
    ioctl(NS_GET_NSTYPE) answers CLONE_NEWNET."""
    NS_GET_NSTYPE, CLONE_NEWNET = 0xB703, 0x40000000
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def still_there(w: Workload) -> bool:
    """Whether ``w.path`` still names that cgroup or namespace (not gone,
    not another one made at the same path since)."""
    try:
        return os.stat(w.path).st_ino == w.id
    except OSError:
        return False


# -- pins of an earlier daemon -------------------------------------------------
def carried_over(old_map_dir: Path) -> list[Workload]:
    """What an older layout's pinned km_workloads holds: layout 7 knew only
    namespaces (inode -> path), enrolled; later ones have this record."""
    pin = old_map_dir / mapnames.WORKLOADS
    if not pin.exists():
        return []
    fd = libbpf.obj_get(str(pin))
    try:
        sizes = libbpf.map_sizes(fd)
        if sizes == (ctypes.sizeof(records.KmeshWorkloadKey), ctypes.sizeof(records.KmeshWorkload)):
            return WorkloadStore(libbpf.Map(mapnames.WORKLOADS, fd, records.KmeshWorkloadKey,
                                            records.KmeshWorkload), lambda: None).all()
        if sizes == (4, records.KMESH_WORKLOAD_PATH_MAX):
            class V7(ctypes.Structure):
                _fields_ = [("path", ctypes.c_char * records.KMESH_WORKLOAD_PATH_MAX)]
            m = libbpf.Map(mapnames.WORKLOADS, fd, ctypes.c_uint32, V7)
            return [Workload(Kind.NETNS, int(k.value), v.path.decode(errors="replace")) for k, v in m.items()]
        return []
    finally:
        os.close(fd)


@contextmanager
def pinned_store(bpf_fs_path: str):
    """km_workloads as pinned, for kmeshctl while no daemon runs: holds the
    daemon's pin lock for the block (a daemon starting meanwhile waits for
    nothing: it fails to lock and says so). ValueError when there is nothing
    pinned to write or it is of another layout."""
    root = Path(bpf_fs_path) / loader.PIN_DIR
    pin = root / "map" / mapnames.WORKLOADS
    if not pin.exists():
        raise ValueError(f"no kmesh pins under {root}: start kmesh-daemon (it keeps what it finds enrolled there)")
    lock = loader.lock_pins(root)   # LoaderError: a daemon holds them
    try:
        with loader.pinned_map(root / "map" / mapnames.META, mapnames.META) as meta:
            got = meta.lookup(ctypes.c_uint32(0))
        if got is None or got.layout_version != records.KMESH_LAYOUT_VERSION:
            raise ValueError(f"the maps pinned under {root} are of another kmesh version: start kmesh-daemon "
                             "(it migrates them) and enroll through it")
        with loader.pinned_map(pin, mapnames.WORKLOADS) as m, \
                loader.pinned_map(root / "map" / mapnames.CONFIG, mapnames.CONFIG) as cfg:
            def changed() -> None:
                rec = cfg.lookup(ctypes.c_uint32(0)) or records.KmeshConfig()
                rec.workloads_gen = next_gen(rec)
                cfg.update(ctypes.c_uint32(0), rec)
            yield WorkloadStore(m, changed)
    finally:
        os.close(lock)
