"""Load kmesh's BPF object, pin its maps, attach its programs through pinned
bpf_links, and take over what an earlier daemon pinned.

Pin layout under ``<bpf-fs-path>/bpf_kmesh/``::

    map/<map name>      every map (libbpf reuses a compatible pin on load)
    link/<program>      the bpf_link holding each program on the cgroup
    staging/<map name>  new maps while the pins of another layout are migrated

A restarted daemon finds the links and swaps its freshly loaded programs in
with BPF_LINK_UPDATE: the hook is never empty, so no connection goes by
ungoverned.

Upgrades: ``map/km_meta`` holds the layout version of the pinned maps. A
daemon of the same version reuses them. One of another version (or pins
without km_meta, from before it existed) is migrated: the new object's maps
are pinned under ``staging/`` and filled with the config while the old
programs keep serving from the old maps; ``attach()`` then swaps the new
programs into the pinned links (each swap is atomic), and ``finish()`` moves
the new maps' pins into ``map/``. Interrupted at any point, the next start
simply migrates again.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kmesh.bpf import features as kfeatures, libbpf, mapnames, records

log = logging.getLogger("kmesh.loader")

OBJECT_NAME = "kmesh_sock.bpf.o"
SOCKMAP_OBJECT_NAME = "kmesh_sockmap.bpf.o"
PIN_DIR = "bpf_kmesh"

# Maps whose records the daemon reads or writes: name -> (key, value) ctypes.
MAP_TYPES = {
    mapnames.LISTENER: (records.KmeshAddr, records.KmeshListener),
    mapnames.LISTENER_PORTS: (ctypes.c_uint32, ctypes.c_uint32),
    mapnames.CLUSTER: (records.ClusterId, records.KmeshCluster),
    mapnames.EP_ACTIVE: (records.KmeshAddr, records.KmeshEpStats),
    mapnames.META: (ctypes.c_uint32, records.KmeshMeta),
    mapnames.CONFIG: (ctypes.c_uint32, records.KmeshConfig),
    mapnames.STATS: (ctypes.c_uint32, ctypes.c_uint64),
    mapnames.STATS_LISTENER: (records.KmeshAddr, records.KmeshConnCounters),
    mapnames.STATS_ENDPOINT: (records.KmeshEpKey, records.KmeshConnCounters),
    mapnames.STATS_CLUSTER: (ctypes.c_uint32, records.KmeshClusterCounters),
    mapnames.RATE_LIMIT: (records.KmeshAddr, records.KmeshBucket),
    mapnames.CLUSTER_STATE: (ctypes.c_uint32, records.KmeshClusterState),
    mapnames.OUTLIER: (records.KmeshEpKey, records.KmeshOutlier),
    mapnames.ORIG_DST: (records.KmeshHandoffKey, records.KmeshAddr),
    mapnames.WORKLOADS: (records.KmeshWorkloadKey, records.KmeshWorkload),
    mapnames.SPLICE: (ctypes.c_uint64, ctypes.c_uint64),
    mapnames.SPLICE_DIR: (ctypes.c_uint64, records.KmeshSpliceDir),
    mapnames.SPLICE_RELAYED: (ctypes.c_uint64, ctypes.c_uint64),
}
PERCPU_MAPS = {mapnames.STATS, mapnames.STATS_LISTENER, mapnames.STATS_ENDPOINT, mapnames.STATS_CLUSTER}
POLICY_STATE_MAPS = (mapnames.RATE_LIMIT, mapnames.CLUSTER_STATE, mapnames.STATS_CLUSTER, mapnames.OUTLIER)
SOCKMAP_MAP_TYPES = {
    mapnames.SOCK_HASH: (records.KmeshSockKey, ctypes.c_uint64),
    mapnames.LOCAL_IP: (records.KmeshAddr, ctypes.c_uint32),
    mapnames.SOCKMAP_CFG: (ctypes.c_uint32, records.KmeshSockmapCfg),
}
# The objects' __kconfig externs (bpf/include/endpoint.h), each as 0: what
# they read where the kernel's config cannot be found.
NO_KCONFIG = "CONFIG_HZ=0\n"
# Programs of the core object in attach order (the splice verdict first: a
# hand-off must never find its map without it), of the sockmap object, and
# what each attaches to: the governed cgroup, or a map of its object.
CORE_PROGRAMS = ("kmesh_splice", "kmesh_sock_release", "kmesh_conn_ops", "kmesh_connect4", "kmesh_connect6")
SOCKMAP_PROGRAMS = ("kmesh_sockops", "kmesh_sk_msg")
PROGRAM_TARGETS = {"kmesh_sk_msg": mapnames.SOCK_HASH, "kmesh_splice": mapnames.SPLICE}
CGROUP_PROGRAMS = tuple(p for p in CORE_PROGRAMS if p not in PROGRAM_TARGETS)


@contextmanager
def pinned_map(pin: Path, name: str):
    """A pinned map of MAP_TYPES/SOCKMAP_MAP_TYPES, opened for the block."""
    fd = libbpf.obj_get(str(pin))
    try:
        yield libbpf.Map(name, fd, *{**MAP_TYPES, **SOCKMAP_MAP_TYPES}[name])
    finally:
        os.close(fd)


def detach_pinned_link(pin: Path) -> None:
    """Detach the bpf_link pinned at ``pin`` and remove the pin."""
    fd = libbpf.obj_get(str(pin))
    try:
        libbpf.link_detach(fd)
    finally:
        os.close(fd)
    pin.unlink(missing_ok=True)


def default_object_dir() -> str:
    """Where the compiled objects are: $KMESH_BPF_DIR, the source tree's
    build/ (development), or the installed location."""
    env = os.environ.get("KMESH_BPF_DIR")
    if env:
        return env
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "build" / "bpf"
        if (cand / OBJECT_NAME).exists():
            return str(cand)
    return "/usr/lib/kmesh/bpf"


class LoaderError(RuntimeError):
    pass


def lock_pins(pin_root: Path) -> int:
    """Hold an exclusive lock on the pin directory for this process's life.

    Two daemons on the same pins would undo each other's updates; the lock
    goes away with the process, so a crashed daemon never blocks a restart.
    """
    pin_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(pin_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LoaderError(f"another kmesh-daemon is using {pin_root}: stop it first "
                              "(or give this one another -bpf-fs-path)") from None
        raise
    return fd


@dataclass
class AttachResult:
    program: str
    action: str  # "attached" or "replaced"


class Dataplane:
    """The loaded object with its pinned maps and cgroup links."""

    def __init__(self, bpf_fs_path: str, cgroup_path: str, object_dir: str | None = None, sockmap: bool = False,
                 features: kfeatures.Features | None = None):
        # What the kernel offers decides which objects and programs load
        # (bpf/include/compat.h); probed here unless the caller did.
        self.features = features or kfeatures.decide(kfeatures.probe())
        if self.features.missing:
            raise LoaderError(f"kernel {self.features.release} cannot run kmesh: it lacks "
                              f"{', '.join(self.features.missing)}; kmesh needs Linux 5.10 or newer with BTF "
                              "(CONFIG_DEBUG_INFO_BTF)")
        self.pin_root = Path(bpf_fs_path) / PIN_DIR
        self.map_dir = self.pin_root / "map"
        self.link_dir = self.pin_root / "link"
        self.staging_dir = self.pin_root / "staging"
        self.cgroup_path = cgroup_path
        self.object_dir = Path(object_dir or default_object_dir())
        if self.features.flavour == "legacy":
            self.object_dir = self.object_dir / "legacy"
        self.object_path = str(self.object_dir / OBJECT_NAME)
        self.sockmap = sockmap
        self._objs: list[libbpf.BpfObject] = []
        self._lock_fd = -1
        self.maps: dict[str, libbpf.Map] = {}
        self.prog_fds: dict[str, int] = {}
        self.map_fds: dict[str, int] = {}
        self._attach_types: dict[str, int] = {}
        self._map_attached: set[str] = set()    # attached with bpf_prog_attach (no link to pin)
        self.took_over = False
        self.pinned_layout: int | None = None   # of the maps found pinned; None: none were
        self.migrating = False                   # pins of another layout: new maps in staging/

    def _read_pinned_layout(self) -> int | None:
        if not self.map_dir.is_dir() or not any(self.map_dir.iterdir()):
            return None
        pin = self.map_dir / mapnames.META
        if not pin.exists():
            return 0   # pinned before km_meta existed
        try:
            with pinned_map(pin, mapnames.META) as meta:
                got = meta.lookup(ctypes.c_uint32(0))
        except OSError:
            return 0
        return int(got.layout_version) if got is not None else 0

    # -- load -------------------------------------------------------------
    def load(self) -> None:
        if not os.path.exists(self.object_path):
            raise LoaderError(f"BPF object {self.object_path} not found: run ./build.sh -b "
                              "(or set KMESH_BPF_DIR to the directory holding it)")
        self._lock_fd = lock_pins(self.pin_root)
        self.map_dir.mkdir(parents=True, exist_ok=True)
        self.link_dir.mkdir(parents=True, exist_ok=True)
        self.pinned_layout = self._read_pinned_layout()
        self.took_over = self.pinned_layout is not None
        self.migrating = self.took_over and self.pinned_layout != records.KMESH_LAYOUT_VERSION
        pin_dir = self.map_dir
        if self.migrating:
            # Left by an interrupted migration: never live (links only ever
            # point at maps under map/ once finish() ran), so start afresh.
            shutil.rmtree(self.staging_dir, ignore_errors=True)
            self.staging_dir.mkdir()
            pin_dir = self.staging_dir
            log.warning("pinned maps have another record layout: migrating", extra={"kv": {
                "pinned_layout": self.pinned_layout, "layout": records.KMESH_LAYOUT_VERSION}})
        self._load_object(self.object_path, MAP_TYPES, pin_dir)
        self.maps[mapnames.META].update(ctypes.c_uint32(0), records.KmeshMeta(records.KMESH_LAYOUT_VERSION, 0))
        if self.sockmap:
            self._load_object(str(self.object_dir / SOCKMAP_OBJECT_NAME), SOCKMAP_MAP_TYPES, pin_dir)
        log.info("BPF objects loaded", extra={"kv": {"object": self.object_path, "takeover": self.took_over,
                                                     "sockmap": self.sockmap}})

    def _load_object(self, path: str, map_types: dict, pin_dir: Path) -> None:
        if not os.path.exists(path):
            raise LoaderError(f"BPF object {path} not found: run ./build.sh -b "
                              "(or set KMESH_BPF_DIR to the directory holding it)")
        # Without the kernel's config, every __kconfig extern as 0 (libbpf
        # reads the system's file if any is left unset, and fails without
        # one): the programs then do without (features.py).
        kconfig = None if self.features.on("connect_timeout_subsecond") else NO_KCONFIG
        obj = libbpf.BpfObject(path, kconfig=kconfig)
        if "kmesh_splice" in obj.programs() and not self.features.on("l7_splice"):
            obj.skip_program("kmesh_splice")
        # libbpf's own maps (".kconfig", ".rodata": named "<obj>.<section>")
        # belong to this load only: never pinned or shared.
        handles = {name: h for name, h in obj.maps().items() if "." not in name}
        for name, (ktype, vtype) in map_types.items():
            h = handles.get(name)
            if h is None:
                obj.close()
                raise LoaderError(f"{path} has no map {name}: object and daemon versions differ")
            ks, vs = libbpf.bpf_map__key_size(h), libbpf.bpf_map__value_size(h)
            if (ks, vs) != (ctypes.sizeof(ktype), ctypes.sizeof(vtype)):
                obj.close()
                raise LoaderError(f"map {name}: object has key/value {ks}/{vs} bytes, daemon expects "
                                  f"{ctypes.sizeof(ktype)}/{ctypes.sizeof(vtype)}: rebuild with ./build.sh -b")
        for name, h in handles.items():
            libbpf._check(libbpf.bpf_map__set_pin_path(h, str(pin_dir / name).encode()), f"pin path {name}")
        try:
            obj.load()
        except libbpf.BpfError as e:
            obj.close()
            hint = ""
            if "reuse" in libbpf.recent_libbpf_log():
                hint = (f"\nA map pinned under {self.map_dir} has a different layout (another kmesh version?): "
                        "stop that daemon, or remove the stale pins with `kmesh-daemon cleanup`.")
            raise LoaderError(f"{e}{hint}") from None
        self._objs.append(obj)
        for name, h in handles.items():   # every map, typed or not (km_events: a ring buffer)
            self.map_fds[name] = libbpf.bpf_map__fd(h)
        for name, (ktype, vtype) in map_types.items():
            cls = libbpf.PerCpuMap if name in PERCPU_MAPS else libbpf.Map
            self.maps[name] = cls(name, libbpf.bpf_map__fd(handles[name]), ktype, vtype)
        for name, h in obj.programs().items():
            if libbpf.bpf_program__fd(h) < 0:
                continue   # not loaded (autoload off)
            self.prog_fds[name] = libbpf.bpf_program__fd(h)
            self._attach_types[name] = libbpf.bpf_program__expected_attach_type(h)

    # -- attach -----------------------------------------------------------
    def attach(self) -> list[AttachResult]:
        programs = CORE_PROGRAMS + (SOCKMAP_PROGRAMS if self.sockmap else ())
        cg_fd = os.open(self.cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            cg_id = os.fstat(cg_fd).st_ino
            out = []
            for name in programs:
                if name not in self.prog_fds:
                    continue   # not loaded on this kernel
                target = PROGRAM_TARGETS.get(name)
                if target is None:
                    out.append(self._attach_one(name, cg_fd, ("cgroup", cg_id)))
                elif self.features.on("sockmap_link"):
                    fd = self.maps[target].fd
                    out.append(self._attach_one(name, fd, ("map", libbpf.map_id(fd))))
                else:
                    out.append(self._attach_to_map(name, self.maps[target].fd))
            return out
        finally:
            os.close(cg_fd)

    def _attach_one(self, name: str, target_fd: int, target: tuple[str, int]) -> AttachResult:
        """Attach through a pinned link, or swap the program inside the link
        an earlier daemon pinned for the same target."""
        pin = str(self.link_dir / name)
        prog_fd = self.prog_fds[name]
        if os.path.exists(pin):
            link_fd = libbpf.obj_get(pin)
            try:
                info = libbpf.link_info(link_fd)
                pinned = ("cgroup", info.cgroup_id) if target[0] == "cgroup" else ("map", info.sockmap.map_id)
                if pinned == target:
                    libbpf.link_update(link_fd, prog_fd)
                    log.info("program replaced in pinned link", extra={"kv": {"program": name}})
                    return AttachResult(name, "replaced")
                # Pinned for another cgroup (or map): that configuration is gone.
                libbpf.link_detach(link_fd)
                os.unlink(pin)
            finally:
                os.close(link_fd)
        link_fd = libbpf.link_create(prog_fd, target_fd, self._attach_types[name])
        try:
            libbpf.pin(link_fd, pin)
        finally:
            os.close(link_fd)
        log.info("program attached", extra={"kv": {"program": name, target[0]: target[1]}})
        return AttachResult(name, "attached")

    def _attach_to_map(self, name: str, map_fd: int) -> AttachResult:
        """Before 6.10 (no sockmap bpf_link): attach to the pinned map itself.
        The map holds the program; attaching again replaces it, which is how
        a restarted daemon takes over."""
        pin = self.link_dir / name
        if pin.exists():   # a link from a newer kernel's daemon: cannot be (kernels don't shrink)
            detach_pinned_link(pin)
        libbpf.prog_attach(self.prog_fds[name], map_fd, self._attach_types[name])
        self._map_attached.add(name)
        log.info("program attached to its map", extra={"kv": {"program": name, "map": PROGRAM_TARGETS[name]}})
        return AttachResult(name, "attached")

    def load_sockmap(self) -> list[AttachResult]:
        """Turn same-host acceleration on in a running dataplane."""
        if not self.sockmap:
            self._load_object(str(self.object_dir / SOCKMAP_OBJECT_NAME), SOCKMAP_MAP_TYPES,
                              self.staging_dir if self.migrating else self.map_dir)
            self.sockmap = True
        return self.attach()

    def finish(self) -> None:
        """After attach(): a migration's new maps become the pinned ones."""
        if not self.migrating:
            return
        for pin in self.map_dir.iterdir():
            pin.unlink()
        for pin in self.staging_dir.iterdir():
            os.rename(pin, self.map_dir / pin.name)
        self.staging_dir.rmdir()
        self.migrating = False
        log.info("pinned maps migrated", extra={"kv": {"from_layout": self.pinned_layout,
                                                       "layout": records.KMESH_LAYOUT_VERSION}})

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """name -> (runs, run time in ns) of the loaded programs: counted only
        while BPF stats are on (bpf_enable_stats or kernel.bpf_stats_enabled)."""
        out = {}
        for name, fd in self.prog_fds.items():
            info = libbpf.prog_info(fd)
            out[name] = (info.run_cnt, info.run_time_ns)
        return out

    def attached(self) -> dict[str, bool]:
        return {name: (self.link_dir / name).exists() or name in self._map_attached
                for name in CORE_PROGRAMS + SOCKMAP_PROGRAMS}

    # -- teardown ---------------------------------------------------------
    def close(self) -> None:
        """Drop this process's handles; pins (and so the data path) stay."""
        for obj in self._objs:
            obj.close()
        self._objs.clear()
        self.maps.clear()
        self.prog_fds.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def in_use(bpf_fs_path: str) -> bool:
    """True while a running daemon holds the pins under ``bpf_fs_path``."""
    root = Path(bpf_fs_path) / PIN_DIR
    if not root.is_dir():
        return False
    try:
        os.close(lock_pins(root))
        return False
    except LoaderError:
        return True
