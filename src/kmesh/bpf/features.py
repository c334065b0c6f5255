"""What the running kernel's BPF offers, and what kmesh turns on because of it.

``probe()`` gathers raw facts (I/O: the kernel's BTF, one tiny program load,
the kernel config file); ``decide()`` turns them into features (pure, so the
decisions are unit-tested with the facts recorded on each kernel of the
matrix, tests/fixtures/kernels/). The facts are read the way libbpf reads
them when it loads kmesh's objects (BTF enum values for
``bpf_core_enum_value_exists``; what the verifier takes, by loading a few
instructions that do what the objects do), so what the daemon reports is what
the loaded programs do.

The L4 core needs Linux 5.10 with BTF; every feature newer than that is
probed and, where missing, switched off with one log line, a field in
``/status`` and a row in the README's kernel table (docs/kernels.md).
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import asdict, dataclass, field

from kmesh.bpf import libbpf

# Enum values in the kernel's BTF that kmesh asks about: name -> enum type.
# Present iff the kernel has the helper / hook / link type.
ENUM_VALUES = {
    "BPF_FUNC_set_retval": "bpf_func_id",
    "BPF_FUNC_skc_to_tcp_sock": "bpf_func_id",
    "BPF_FUNC_ringbuf_query": "bpf_func_id",
    "BPF_CGROUP_INET_SOCK_RELEASE": "bpf_attach_type",
    "BPF_LINK_TYPE_CGROUP": "bpf_link_type",
    "BPF_LINK_TYPE_SOCKMAP": "bpf_link_type",
    "BPF_MAP_TYPE_RINGBUF": "bpf_map_type",
}


@dataclass(frozen=True)
class KernelProbe:
    """Raw facts about one kernel (JSON-able; recorded per kernel)."""

    release: str
    btf: bool                          # /sys/kernel/btf/vmlinux
    enum_values: tuple[str, ...] = ()  # those of ENUM_VALUES the BTF has
    atomic_fetch: bool = False         # the verifier takes BPF_ATOMIC | BPF_FETCH
    sk_skb_splice: bool = False        # ... and an sk_skb verdict doing what kmesh_splice does
    kconfig: str | None = None         # the kernel config libbpf reads, if any

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelProbe":
        return cls(release=d["release"], btf=d["btf"], enum_values=tuple(d.get("enum_values", ())),
                   atomic_fetch=d.get("atomic_fetch", False), sk_skb_splice=d.get("sk_skb_splice", False),
                   kconfig=d.get("kconfig"))


@dataclass(frozen=True)
class Feature:
    name: str
    on: bool
    since: str        # the mainline kernel that brought it
    needs: str        # what the probe looks for
    off_effect: str   # what kmesh does instead when it is off

    def as_dict(self) -> dict:
        return {"on": self.on, "since": self.since, "needs": self.needs,
                **({} if self.on else {"instead": self.off_effect})}


# What the L4 core cannot do without (start refuses, naming them).
REQUIRED = (
    ("BTF", "5.4", lambda p: p.btf),
    ("cgroup bpf_link (BPF_LINK_TYPE_CGROUP)", "5.7", lambda p: "BPF_LINK_TYPE_CGROUP" in p.enum_values),
    ("ring buffer (BPF_MAP_TYPE_RINGBUF)", "5.8", lambda p: "BPF_MAP_TYPE_RINGBUF" in p.enum_values),
    ("cgroup/sock_release (BPF_CGROUP_INET_SOCK_RELEASE)", "5.9",
     lambda p: "BPF_CGROUP_INET_SOCK_RELEASE" in p.enum_values),
    ("bpf_skc_to_tcp_sock", "5.9", lambda p: "BPF_FUNC_skc_to_tcp_sock" in p.enum_values),
)

# name, since, needs, test, what happens without it.
OPTIONAL = (
    ("atomic_fetch", "5.12", "BPF atomics that return a value (BPF_FETCH)", lambda p: p.atomic_fetch,
     "the legacy objects (build/bpf/legacy/) are loaded: round robin, max_connections and outlier counts "
     "are exact while connects to one cluster run one CPU at a time, best effort when they race"),
    ("econnrefused", "5.18", "helper bpf_set_retval", lambda p: "BPF_FUNC_set_retval" in p.enum_values,
     "a connect refused by max_connections or a rate limit fails with EPERM instead of ECONNREFUSED"),
    ("l7_splice", "5.10", "an sk_skb verdict with bpf_skb_adjust_room and bpf_probe_read_kernel",
     lambda p: p.sk_skb_splice,
     "the splice verdict is not loaded: routed L7 connections are relayed by the daemon "
     "(as -l7-splice-budget=0)"),
    ("sockmap_link", "6.10", "BPF_LINK_TYPE_SOCKMAP", lambda p: "BPF_LINK_TYPE_SOCKMAP" in p.enum_values,
     "the splice verdict and sk_msg are attached to their maps with bpf_prog_attach (no pinned link; "
     "a restart attaches the new program over the old one)"),
    ("connect_timeout_subsecond", "any", "the kernel config (/boot/config-$(uname -r) or /proc/config.gz)",
     lambda p: p.kconfig is not None,
     "CONFIG_HZ is unknown: a connect_timeout under 1 s takes effect at the first SYN retransmission (1 s)"),
)


@dataclass(frozen=True)
class Features:
    release: str
    missing: tuple[str, ...]           # REQUIRED items the kernel lacks
    features: tuple[Feature, ...] = field(default=())

    def on(self, name: str) -> bool:
        return next(f.on for f in self.features if f.name == name)

    @property
    def flavour(self) -> str:
        """Which build of the objects this kernel loads."""
        return "current" if self.on("atomic_fetch") else "legacy"

    def off(self) -> list[Feature]:
        return [f for f in self.features if not f.on]

    def as_dict(self) -> dict:
        return {"release": self.release, "objects": self.flavour,
                "features": {f.name: f.as_dict() for f in self.features}}


def decide(p: KernelProbe) -> Features:
    missing = tuple(f"{name} (Linux {since})" for name, since, test in REQUIRED if not test(p))
    feats = tuple(Feature(name, bool(test(p)), since, needs, effect)
                  for name, since, needs, test, effect in OPTIONAL)
    return Features(p.release, missing, feats)


ALL_FEATURES = tuple(name for name, *_ in OPTIONAL)
# Those a newer kernel can be told to do without (-bpf-disable-features): the
# others are decided inside the objects from the kernel's BTF.
DISABLEABLE = ("atomic_fetch", "l7_splice", "sockmap_link", "connect_timeout_subsecond")


# --- probing (I/O) -------------------------------------------------------------

_BTF_KIND_ENUM = 6


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


def _btf_enum_values() -> tuple[str, ...]:
    btf = libbpf.btf__load_vmlinux_btf()
    if not btf:
        return ()
    try:
        found = []
        for enum_name in sorted(set(ENUM_VALUES.values())):
            tid = libbpf.btf__find_by_name_kind(btf, enum_name.encode(), _BTF_KIND_ENUM)
            if tid <= 0:
                continue
            t = ctypes.cast(libbpf.btf__type_by_id(btf, tid), ctypes.POINTER(_BtfType)).contents
            members = ctypes.cast(ctypes.addressof(t) + ctypes.sizeof(_BtfType),
                                  ctypes.POINTER(_BtfEnum * (t.info & 0xFFFF))).contents
            names = {libbpf.btf__name_by_offset(btf, m.name_off).decode() for m in members}
            found += [v for v, e in ENUM_VALUES.items() if e == enum_name and v in names]
        return tuple(sorted(found))
    finally:
        libbpf.btf__free(btf)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return bytes([code, (src << 4) | dst]) + off.to_bytes(2, "little", signed=True) + \
        imm.to_bytes(4, "little", signed=True)


def _loads(prog_type: int, prog: bytes, what: str) -> bool:
    """Whether the verifier takes ``prog`` (raises where only root may ask)."""
    buf = ctypes.create_string_buffer(prog, len(prog))
    fd = libbpf.bpf_prog_load(prog_type, b"kmesh_probe", b"GPL", buf, len(prog) // 8, None)
    if fd >= 0:
        os.close(fd)
        return True
    if -fd in (errno.EPERM, errno.EACCES):
        raise libbpf.BpfError(-fd, f"probe {what}: permission denied (kmesh-daemon needs root)")
    return False


_SOCKET_FILTER, _SK_SKB = 1, 14
_FUNC_SKB_ADJUST_ROOM, _FUNC_PROBE_READ_KERNEL = 50, 113


def _probe_atomic_fetch() -> bool:
    """`r1 = atomic_fetch_add(*(u64 *)(r10 - 8), r1)` in a socket filter:
    refused ("BPF_STX uses reserved fields") before 5.12."""
    return _loads(_SOCKET_FILTER,
                  _insn(0x7A, dst=10, off=-8, imm=0)            # *(u64 *)(r10 - 8) = 0
                  + _insn(0xB7, dst=1, imm=1)                    # r1 = 1
                  + _insn(0xDB, dst=10, src=1, off=-8, imm=1)    # BPF_STX|BPF_ATOMIC|BPF_DW, BPF_ADD|BPF_FETCH
                  + _insn(0xB7, dst=0, imm=0)                    # r0 = 0
                  + _insn(0x95), "BPF atomics")                  # exit


def _probe_sk_skb_splice() -> bool:
    """What kmesh_splice does beyond a plain verdict (bpf/include/splice.h):
    read the kernel's sk_buff at an offset from the context, and pull bytes
    off the front with bpf_skb_adjust_room. A kernel built without sockmap's
    stream parser, or one whose verifier refuses either, relays instead."""
    return _loads(_SK_SKB,
                  _insn(0xBF, dst=6, src=1)                      # r6 = ctx
                  + _insn(0xBF, dst=1, src=10)                   # r1 = fp
                  + _insn(0x07, dst=1, imm=-8)                   # r1 += -8
                  + _insn(0xB7, dst=2, imm=4)                    # r2 = 4
                  + _insn(0xBF, dst=3, src=6)                    # r3 = ctx
                  + _insn(0x07, dst=3, imm=40)                   # r3 += 40 (in skb->cb)
                  + _insn(0x85, imm=_FUNC_PROBE_READ_KERNEL)     # call bpf_probe_read_kernel
                  + _insn(0xBF, dst=1, src=6)                    # r1 = ctx
                  + _insn(0xB7, dst=2, imm=-1)                   # r2 = -1 (one byte off the front)
                  + _insn(0xB7, dst=3, imm=0)                    # r3 = BPF_ADJ_ROOM_NET
                  + _insn(0xB7, dst=4, imm=0)                    # r4 = 0
                  + _insn(0x85, imm=_FUNC_SKB_ADJUST_ROOM)       # call bpf_skb_adjust_room
                  + _insn(0xB7, dst=0, imm=0)                    # r0 = SK_DROP
                  + _insn(0x95), "sk_skb verdict")               # exit


def kernel_config_path(release: str) -> str | None:
    """The kernel config libbpf reads for __kconfig externs, where it looks."""
    for path in (f"/boot/config-{release}", "/proc/config.gz"):
        if os.path.exists(path):
            return path
    return None


def probe() -> KernelProbe:
    release = os.uname().release
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    return KernelProbe(release=release, btf=btf, enum_values=_btf_enum_values() if btf else (),
                       atomic_fetch=_probe_atomic_fetch(), sk_skb_splice=_probe_sk_skb_splice(),
                       kconfig=kernel_config_path(release))


def parse_disabled(spec: str) -> frozenset[str]:
    """``-bpf-disable-features`` "a,b": features to treat as missing (to run a
    newer kernel the way an older one runs, e.g. in tests)."""
    names = frozenset(x.strip() for x in spec.split(",") if x.strip())
    unknown = sorted(names - set(DISABLEABLE))
    if unknown:
        raise ValueError(f"cannot switch off kernel feature {', '.join(unknown)}: choose from {', '.join(DISABLEABLE)}")
    return names


def without(f: Features, disabled: frozenset[str]) -> Features:
    """``f`` with ``disabled`` features off (they stay named in /status)."""
    feats = tuple(Feature(x.name, x.on and x.name not in disabled, x.since, x.needs,
                          x.off_effect + (" [switched off by -bpf-disable-features]" if x.name in disabled else ""))
                  for x in f.features)
    return Features(f.release, f.missing, feats)
