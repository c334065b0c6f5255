"""Thin ctypes binding of the system libbpf (``libbpf.so.1``).

Why not pylibbpf: pylibbpf (0.0.6/0.0.7) loads objects and does map CRUD, but
its ``BpfProgram.attach()`` calls ``bpf_program__attach()`` without a target,
so cgroup programs cannot be attached; it exposes no program fds, no links, no
pinning or pinned-map reuse and no batch operations. kmesh needs all of those,
so it binds exactly the libbpf calls it uses, here, and nothing more.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from typing import Iterator

log = logging.getLogger("kmesh.libbpf")

_c = ctypes
_vp = _c.c_void_p


class BpfError(OSError):
    """A libbpf or bpf(2) call failed; ``errno`` and ``strerror`` say why."""


def _load_libbpf() -> ctypes.CDLL:
    for name in ("libbpf.so.1", ctypes.util.find_library("bpf")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    raise BpfError(errno.ENOENT, "libbpf.so.1 not found: install libbpf1 (Debian) or libbpf (openEuler)")


_lib = _load_libbpf()
_libc = ctypes.CDLL(None, use_errno=True)


def _fn(name: str, restype, *argtypes):
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


# Objects, maps, programs (libbpf.h).
bpf_object__open_file = _fn("bpf_object__open_file", _vp, _c.c_char_p, _vp)
bpf_object__load = _fn("bpf_object__load", _c.c_int, _vp)
bpf_object__close = _fn("bpf_object__close", None, _vp)
bpf_object__next_map = _fn("bpf_object__next_map", _vp, _vp, _vp)
bpf_object__next_program = _fn("bpf_object__next_program", _vp, _vp, _vp)
bpf_map__name = _fn("bpf_map__name", _c.c_char_p, _vp)
bpf_map__fd = _fn("bpf_map__fd", _c.c_int, _vp)
bpf_map__key_size = _fn("bpf_map__key_size", _c.c_uint32, _vp)
bpf_map__value_size = _fn("bpf_map__value_size", _c.c_uint32, _vp)
bpf_map__type = _fn("bpf_map__type", _c.c_int, _vp)
bpf_map__max_entries = _fn("bpf_map__max_entries", _c.c_uint32, _vp)
bpf_map__map_flags = _fn("bpf_map__map_flags", _c.c_uint32, _vp)
bpf_map__max_entries = _fn("bpf_map__max_entries", _c.c_uint32, _vp)
bpf_map__set_pin_path = _fn("bpf_map__set_pin_path", _c.c_int, _vp, _c.c_char_p)
bpf_program__name = _fn("bpf_program__name", _c.c_char_p, _vp)
bpf_program__fd = _fn("bpf_program__fd", _c.c_int, _vp)
bpf_program__set_autoload = _fn("bpf_program__set_autoload", _c.c_int, _vp, _c.c_bool)
bpf_program__expected_attach_type = _fn("bpf_program__expected_attach_type", _c.c_int, _vp)
# Kernel BTF (btf.h), for the feature probe.
btf__load_vmlinux_btf = _fn("btf__load_vmlinux_btf", _vp)
btf__free = _fn("btf__free", None, _vp)
btf__find_by_name_kind = _fn("btf__find_by_name_kind", _c.c_int32, _vp, _c.c_char_p, _c.c_uint32)
btf__type_by_id = _fn("btf__type_by_id", _vp, _vp, _c.c_uint32)
btf__name_by_offset = _fn("btf__name_by_offset", _c.c_char_p, _vp, _c.c_uint32)
# Low-level bpf(2) wrappers (bpf.h).
bpf_prog_load = _fn("bpf_prog_load", _c.c_int, _c.c_int, _c.c_char_p, _c.c_char_p, _vp, _c.c_size_t, _vp)
bpf_obj_pin = _fn("bpf_obj_pin", _c.c_int, _c.c_int, _c.c_char_p)
bpf_obj_get = _fn("bpf_obj_get", _c.c_int, _c.c_char_p)
bpf_obj_get_info_by_fd = _fn("bpf_obj_get_info_by_fd", _c.c_int, _c.c_int, _vp, _c.POINTER(_c.c_uint32))
bpf_link_create = _fn("bpf_link_create", _c.c_int, _c.c_int, _c.c_int, _c.c_int, _vp)
bpf_link_update = _fn("bpf_link_update", _c.c_int, _c.c_int, _c.c_int, _vp)
bpf_link_detach = _fn("bpf_link_detach", _c.c_int, _c.c_int)
bpf_prog_attach = _fn("bpf_prog_attach", _c.c_int, _c.c_int, _c.c_int, _c.c_int, _c.c_uint)
bpf_prog_detach2 = _fn("bpf_prog_detach2", _c.c_int, _c.c_int, _c.c_int, _c.c_int)
bpf_prog_query = _fn("bpf_prog_query", _c.c_int, _c.c_int, _c.c_int, _c.c_uint32, _c.POINTER(_c.c_uint32),
                     _c.POINTER(_c.c_uint32), _c.POINTER(_c.c_uint32))
bpf_prog_get_fd_by_id = _fn("bpf_prog_get_fd_by_id", _c.c_int, _c.c_uint32)
bpf_map_update_elem = _fn("bpf_map_update_elem", _c.c_int, _c.c_int, _vp, _vp, _c.c_uint64)
bpf_map_lookup_elem = _fn("bpf_map_lookup_elem", _c.c_int, _c.c_int, _vp, _vp)
libbpf_num_possible_cpus = _fn("libbpf_num_possible_cpus", _c.c_int)
RingBufferSampleFn = _c.CFUNCTYPE(_c.c_int, _vp, _vp, _c.c_size_t)
ring_buffer__new = _fn("ring_buffer__new", _vp, _c.c_int, RingBufferSampleFn, _vp, _vp)
ring_buffer__poll = _fn("ring_buffer__poll", _c.c_int, _vp, _c.c_int)
ring_buffer__consume = _fn("ring_buffer__consume", _c.c_int, _vp)
ring_buffer__free = _fn("ring_buffer__free", None, _vp)
bpf_map_delete_elem = _fn("bpf_map_delete_elem", _c.c_int, _c.c_int, _vp)
bpf_map_get_next_key = _fn("bpf_map_get_next_key", _c.c_int, _c.c_int, _vp, _vp)
bpf_map_update_batch = _fn("bpf_map_update_batch", _c.c_int, _c.c_int, _vp, _vp, _c.POINTER(_c.c_uint32), _vp)
bpf_map_delete_batch = _fn("bpf_map_delete_batch", _c.c_int, _c.c_int, _vp, _c.POINTER(_c.c_uint32), _vp)
bpf_enable_stats = _fn("bpf_enable_stats", _c.c_int, _c.c_int)
bpf_prog_test_run_opts = _fn("bpf_prog_test_run_opts", _c.c_int, _c.c_int, _vp)

# Map update flags (uapi bpf.h).
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# libbpf's log goes through our logger; verifier output arrives at DEBUG/WARN.
_PRINT_FN = _c.CFUNCTYPE(_c.c_int, _c.c_int, _c.c_char_p, _vp)
_libc.vsnprintf.argtypes = [_c.c_char_p, _c.c_size_t, _c.c_char_p, _vp]
_libc.vsnprintf.restype = _c.c_int
_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
_last_log: list[str] = []


@_PRINT_FN
def _print_cb(level: int, fmt: bytes, args) -> int:
    buf = _c.create_string_buffer(8192)
    n = _libc.vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip()
    if text:
        _last_log.append(text)
        del _last_log[:-200]
        log.log(_LEVELS.get(level, logging.DEBUG), "%s", text)
    return n


_lib.libbpf_set_print.restype = _vp
_lib.libbpf_set_print.argtypes = [_PRINT_FN]
_lib.libbpf_set_print(_print_cb)


def recent_libbpf_log(lines: int = 30) -> str:
    """The tail of what libbpf printed (verifier log included) for errors."""
    return "\n".join(_last_log[-lines:])


def _check(rc: int, what: str) -> int:
    # libbpf >= 1.0 returns -errno from every call (and sets errno too).
    if rc < 0:
        raise BpfError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


class _BatchOpts(_c.Structure):
    _fields_ = [("sz", _c.c_size_t), ("elem_flags", _c.c_uint64), ("flags", _c.c_uint64)]


class _LinkCgroup(_c.Structure):
    _fields_ = [("cgroup_id", _c.c_uint64), ("attach_type", _c.c_uint32)]


class _LinkSockmap(_c.Structure):
    _fields_ = [("map_id", _c.c_uint32), ("attach_type", _c.c_uint32)]


class _LinkTarget(_c.Union):
    _fields_ = [("cgroup", _LinkCgroup), ("sockmap", _LinkSockmap), ("_rest", _c.c_uint8 * 72)]


class _LinkInfo(_c.Structure):
    """struct bpf_link_info: the cgroup and sockmap variants of its union."""

    _anonymous_ = ("target",)
    _fields_ = [
        ("type", _c.c_uint32),
        ("id", _c.c_uint32),
        ("prog_id", _c.c_uint32),
        ("_pad", _c.c_uint32),
        ("target", _LinkTarget),
    ]

    @property
    def cgroup_id(self) -> int:
        return self.cgroup.cgroup_id


class _MapInfo(_c.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [("type", _c.c_uint32), ("id", _c.c_uint32), ("key_size", _c.c_uint32),
                ("value_size", _c.c_uint32), ("max_entries", _c.c_uint32), ("map_flags", _c.c_uint32),
                ("_rest", _c.c_uint8 * 128)]


class ProgInfo(_c.Structure):
    """struct bpf_prog_info (linux/bpf.h); the daemon reads the run
    statistics (tests/unit/test_libbpf_layout.py checks the offsets)."""

    _fields_ = [("type", _c.c_uint32), ("id", _c.c_uint32), ("tag", _c.c_uint8 * 8),
                ("jited_prog_len", _c.c_uint32), ("xlated_prog_len", _c.c_uint32),
                ("jited_prog_insns", _c.c_uint64), ("xlated_prog_insns", _c.c_uint64),
                ("load_time", _c.c_uint64), ("created_by_uid", _c.c_uint32), ("nr_map_ids", _c.c_uint32),
                ("map_ids", _c.c_uint64), ("name", _c.c_char * 16), ("ifindex", _c.c_uint32),
                ("gpl_compatible", _c.c_uint32), ("netns_dev", _c.c_uint64), ("netns_ino", _c.c_uint64),
                ("nr_jited_ksyms", _c.c_uint32), ("nr_jited_func_lens", _c.c_uint32),
                ("jited_ksyms", _c.c_uint64), ("jited_func_lens", _c.c_uint64),
                ("btf_id", _c.c_uint32), ("func_info_rec_size", _c.c_uint32), ("func_info", _c.c_uint64),
                ("nr_func_info", _c.c_uint32), ("nr_line_info", _c.c_uint32), ("line_info", _c.c_uint64),
                ("jited_line_info", _c.c_uint64), ("nr_jited_line_info", _c.c_uint32),
                ("line_info_rec_size", _c.c_uint32), ("jited_line_info_rec_size", _c.c_uint32),
                ("nr_prog_tags", _c.c_uint32), ("prog_tags", _c.c_uint64),
                ("run_time_ns", _c.c_uint64), ("run_cnt", _c.c_uint64), ("recursion_misses", _c.c_uint64),
                ("verified_insns", _c.c_uint32), ("attach_btf_obj_id", _c.c_uint32),
                ("attach_btf_id", _c.c_uint32), ("_pad", _c.c_uint32)]


class _TestRunOpts(_c.Structure):
    """struct bpf_test_run_opts (libbpf >= 0.7)."""

    _fields_ = [
        ("sz", _c.c_size_t),
        ("data_in", _vp), ("data_out", _vp), ("data_size_in", _c.c_uint32), ("data_size_out", _c.c_uint32),
        ("ctx_in", _vp), ("ctx_out", _vp), ("ctx_size_in", _c.c_uint32), ("ctx_size_out", _c.c_uint32),
        ("retval", _c.c_uint32), ("repeat", _c.c_int), ("duration", _c.c_uint32), ("flags", _c.c_uint32),
        ("cpu", _c.c_uint32), ("batch_size", _c.c_uint32),
    ]


def prog_test_run_syscall(prog_fd: int, ctx: _c.Structure) -> int:
    """Run a SEC("syscall") program once on ``ctx`` (updated in place);
    returns the program's return value."""
    opts = _TestRunOpts(sz=_c.sizeof(_TestRunOpts), ctx_in=_c.addressof(ctx), ctx_size_in=_c.sizeof(ctx))
    _check(bpf_prog_test_run_opts(prog_fd, _c.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval


class Map:
    """A BPF map by fd, with typed CRUD. Keys and values are ctypes objects."""

    def __init__(self, name: str, fd: int, key_type, value_type, owns_fd: bool = False):
        self.name = name
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self._owns_fd = owns_fd

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        _check(bpf_map_update_elem(self.fd, _c.byref(key), _c.byref(value), flags), f"update {self.name}")

    def lookup(self, key):
        value = self.value_type()
        rc = bpf_map_lookup_elem(self.fd, _c.byref(key), _c.byref(value))
        if rc < 0:
            if rc == -errno.ENOENT:
                return None
            _check(rc, f"lookup {self.name}")
        return value

    def delete(self, key) -> bool:
        rc = bpf_map_delete_elem(self.fd, _c.byref(key))
        if rc < 0:
            if rc == -errno.ENOENT:
                return False
            _check(rc, f"delete {self.name}")
        return True

    def keys(self) -> Iterator:
        prev = None
        while True:
            nxt = self.key_type()
            rc = bpf_map_get_next_key(self.fd, _c.byref(prev) if prev is not None else None, _c.byref(nxt))
            if rc < 0:
                if rc == -errno.ENOENT:
                    return
                _check(rc, f"iterate {self.name}")
            yield nxt
            prev = nxt

    def items(self) -> Iterator:
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def update_batch(self, pairs: list, flags: int = BPF_ANY) -> None:
        """Write many records in one syscall (~5x faster than one by one)."""
        if not pairs:
            return
        n = len(pairs)
        keys = (self.key_type * n)(*[k for k, _ in pairs])
        values = (self.value_type * n)(*[v for _, v in pairs])
        count = _c.c_uint32(n)
        opts = _BatchOpts(_c.sizeof(_BatchOpts), flags, 0)
        _check(bpf_map_update_batch(self.fd, keys, values, _c.byref(count), _c.byref(opts)),
               f"batch update {self.name}")

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PerCpuMap(Map):
    """A per-CPU map: a lookup gives one value per possible CPU (each
    padded to 8 bytes, as the kernel copies them); ``sum`` adds them up
    field by field."""

    def __init__(self, name: str, fd: int, key_type, value_type, owns_fd: bool = False):
        super().__init__(name, fd, key_type, value_type, owns_fd)
        self.ncpus = _check(libbpf_num_possible_cpus(), "number of possible CPUs")
        self.elem_type = value_type
        if _c.sizeof(value_type) % 8:
            raise ValueError(f"{name}: per-CPU values must be a multiple of 8 bytes")
        self.value_type = value_type * self.ncpus

    def sum(self, key):
        """The per-CPU values of ``key`` added up, as one elem_type (None if absent)."""
        values = self.lookup(key)
        if values is None:
            return None
        if issubclass(self.elem_type, _c.Structure):
            total = self.elem_type()
            for name, *_ in self.elem_type._fields_:
                setattr(total, name, sum(getattr(v, name) for v in values))
            return total
        return sum(values)


class RingBuffer:
    """Records of a BPF_MAP_TYPE_RINGBUF map, handed to ``on_record(bytes)``
    by ``poll()`` (call it from one thread)."""

    def __init__(self, map_fd: int, on_record):
        def sample(_ctx, data, size):
            on_record(_c.string_at(data, size))
            return 0

        self._cb = RingBufferSampleFn(sample)   # keep a reference: libbpf calls it
        self._rb = ring_buffer__new(map_fd, self._cb, None, None)
        if not self._rb:
            err = _c.get_errno() or errno.EINVAL
            raise BpfError(err, f"ring buffer: {os.strerror(err)}")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for a wake-up, then read what is there
        (records submitted without a wake-up too)."""
        rc = ring_buffer__poll(self._rb, timeout_ms)
        if rc < 0 and rc != -errno.EINTR:
            _check(rc, "ring buffer poll")
        got = ring_buffer__consume(self._rb)
        if got < 0:
            _check(got, "ring buffer consume")
        return max(rc, 0) + got

    def close(self) -> None:
        if self._rb:
            ring_buffer__free(self._rb)
            self._rb = None


class _OpenOpts(_c.Structure):
    """The head of struct bpf_object_open_opts (libbpf.h) up to kconfig."""

    _fields_ = [("sz", _c.c_size_t), ("object_name", _c.c_char_p), ("relaxed_maps", _c.c_bool),
                ("pin_root_path", _c.c_char_p), ("_stub", _c.c_uint32), ("kconfig", _c.c_char_p)]


class BpfObject:
    """An opened (and later loaded) BPF ELF object.

    ``kconfig``: "CONFIG_X=y" lines libbpf uses instead of the system's kernel
    config file (an empty string: none, so weak __kconfig externs are 0)."""

    def __init__(self, path: str, kconfig: str | None = None):
        self.path = path
        opts = None
        if kconfig is not None:
            self._kconfig = kconfig.encode()   # libbpf copies it at open
            opts = _OpenOpts(sz=_c.sizeof(_OpenOpts), kconfig=self._kconfig)
        self._obj = bpf_object__open_file(path.encode(), _c.byref(opts) if opts is not None else None)
        if not self._obj:
            err = _c.get_errno() or errno.EINVAL
            raise BpfError(err, f"open BPF object {path}: {os.strerror(err)}")

    def _iter(self, nxt, name_fn):
        cur = None
        while True:
            cur = nxt(self._obj, cur)
            if not cur:
                return
            yield name_fn(cur).decode(), cur

    def maps(self) -> dict[str, int]:
        """Map name -> libbpf ``struct bpf_map *`` handle."""
        return {n: h for n, h in self._iter(bpf_object__next_map, bpf_map__name) if not n.startswith(".")}

    def programs(self) -> dict[str, int]:
        return dict(self._iter(bpf_object__next_program, bpf_program__name))

    def skip_program(self, name: str) -> None:
        """Do not load ``name`` (before load): its kernel lacks what it needs."""
        _check(bpf_program__set_autoload(self.programs()[name], False), f"autoload off {name}")

    def load(self) -> None:
        rc = bpf_object__load(self._obj)
        if rc < 0:
            raise BpfError(-rc, f"load BPF object {self.path}: {os.strerror(-rc)}\n{recent_libbpf_log()}")

    def close(self) -> None:
        if self._obj:
            bpf_object__close(self._obj)
            self._obj = None


def pin(fd: int, path: str) -> None:
    _check(bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_get(path: str) -> int:
    """Open a pinned object; raises FileNotFoundError when nothing is pinned."""
    fd = bpf_obj_get(path.encode())
    if fd < 0:
        err = -fd
        if err == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "nothing pinned", path)
        raise BpfError(err, f"open pinned {path}: {os.strerror(err)}")
    return fd


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(bpf_link_create(prog_fd, target_fd, attach_type, None), "create bpf_link")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Atomically replace the program behind an existing link."""
    _check(bpf_link_update(link_fd, prog_fd, None), "update bpf_link")


def link_detach(link_fd: int) -> None:
    _check(bpf_link_detach(link_fd), "detach bpf_link")


def prog_info(prog_fd: int) -> ProgInfo:
    """The program's info; the array pointers stay 0, so none are filled."""
    info = ProgInfo()
    size = _c.c_uint32(_c.sizeof(info))
    _check(bpf_obj_get_info_by_fd(prog_fd, _c.byref(info), _c.byref(size)), "bpf_prog info")
    return info


def link_info(link_fd: int) -> _LinkInfo:
    info = _LinkInfo()
    size = _c.c_uint32(_c.sizeof(info))
    _check(bpf_obj_get_info_by_fd(link_fd, _c.byref(info), _c.byref(size)), "bpf_link info")
    return info


def _map_info(map_fd: int) -> _MapInfo:
    info = _MapInfo()
    size = _c.c_uint32(_c.sizeof(info))
    _check(bpf_obj_get_info_by_fd(map_fd, _c.byref(info), _c.byref(size)), "bpf_map info")
    return info


def map_id(map_fd: int) -> int:
    return _map_info(map_fd).id


def map_sizes(map_fd: int) -> tuple[int, int]:
    """(key size, value size) of the map."""
    info = _map_info(map_fd)
    return info.key_size, info.value_size


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    """Legacy attach; used where libbpf 1.1 has no link type (sk_msg on a sockmap)."""
    _check(bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "bpf_prog_attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(bpf_prog_detach2(prog_fd, target_fd, attach_type), "bpf_prog_detach")


# The cgroup attach types of kmesh's programs (uapi bpf.h).
CGROUP_ATTACH_TYPES = {"cgroup_sock_ops": 3, "cgroup_inet4_connect": 10, "cgroup_inet6_connect": 11,
                       "cgroup_inet_sock_release": 34}


def cgroup_programs(path: str) -> list[str]:
    """Names of the programs attached to the cgroup at ``path`` itself, for
    each of kmesh's attach types. BPF_PROG_QUERY with the fields every kernel
    knows (bpftool 7.1 also asks for per-program flags, which kernels before
    6.0 refuse, and then shows nothing)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    names = []
    try:
        for attach_type in CGROUP_ATTACH_TYPES.values():
            ids, cnt, flags = (_c.c_uint32 * 64)(), _c.c_uint32(64), _c.c_uint32()
            _check(bpf_prog_query(fd, attach_type, 0, _c.byref(flags), ids, _c.byref(cnt)), "bpf_prog_query")
            for prog_id in ids[:cnt.value]:
                prog_fd = bpf_prog_get_fd_by_id(prog_id)
                if prog_fd < 0:
                    continue   # detached meanwhile
                try:
                    names.append(prog_info(prog_fd).name.decode())
                finally:
                    os.close(prog_fd)
    finally:
        os.close(fd)
    return names


def enable_stats() -> int:
    """Turn on run_time_ns/run_cnt accounting while the returned fd is open."""
    return _check(bpf_enable_stats(0), "enable BPF stats")  # BPF_STATS_RUN_TIME
