"""The native L7 engine (src/native/l7engine.c), through ctypes.

The engine is a thread of the daemon with its own epoll set: it accepts on
the hand-off listeners, reads request heads, and carries requests and
responses for the connections it keeps; the Python side decides each head
(``decide``, called in the engine's thread) and takes back the connections
the engine hands off (``take``, in the event loop's thread, when the
eventfd ``ready`` is readable). docs/l7.md, "native engine", has the split.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kmesh.bpf.records import ipv4_of

log = logging.getLogger("kmesh.l7")

LIBRARY = "libkmesh_l7.so"
ABI = 3
MAX_EPS = 8

# enum kl7_kind, kl7_body, kl7_reason, kl7_fixed (l7engine.h)
HANDOFF, ANSWER, FORWARD, CLOSE = 0, 1, 2, 3
BODY_NONE, BODY_LENGTH, BODY_CHUNKED = 0, 1, 2
R_DECIDE, R_CONNECT_FAILED, R_PARK = 0, 1, 2
A_RESET, A_TIMEOUT, A_BAD, A_TOO_LARGE = 0, 1, 2, 3


class EngineError(RuntimeError):
    pass


class Request(ctypes.Structure):
    _fields_ = [("head", ctypes.c_void_p), ("head_len", ctypes.c_uint32), ("vip_ip", ctypes.c_uint32),
                ("peer_ip", ctypes.c_uint32), ("vip_port", ctypes.c_uint16), ("peer_port", ctypes.c_uint16),
                ("netns", ctypes.c_uint64), ("first", ctypes.c_uint32), ("gen", ctypes.c_uint32),
                ("want_table", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Ep(ctypes.Structure):
    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class Decision(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("keep", ctypes.c_int32), ("req_keep", ctypes.c_int32),
                ("status", ctypes.c_int32), ("data", ctypes.c_void_p), ("data_len", ctypes.c_uint32),
                ("n_eps", ctypes.c_uint32), ("eps", Ep * MAX_EPS), ("timeout_ms", ctypes.c_uint32),
                ("connect_timeout_ms", ctypes.c_uint32), ("body", ctypes.c_int32), ("head_request", ctypes.c_int32),
                ("body_len", ctypes.c_uint64), ("table_given", ctypes.c_int32), ("table_gen", ctypes.c_uint32),
                ("table", ctypes.c_void_p), ("table_len", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Handed(ctypes.Structure):   # struct kl7_handoff
    _fields_ = [("fd", ctypes.c_int32), ("reason", ctypes.c_int32), ("vip_ip", ctypes.c_uint32),
                ("peer_ip", ctypes.c_uint32), ("vip_port", ctypes.c_uint16), ("peer_port", ctypes.c_uint16),
                ("buf_len", ctypes.c_uint32), ("first", ctypes.c_uint32), ("netns", ctypes.c_uint64),
                ("buf", ctypes.c_void_p)]


_COUNTERS = ("accepted", "handed_off", "routed", "answers", "bad_requests", "no_destination",
             "connect_failures", "upstream_failures", "timeouts", "head_timeouts", "refused", "evicted",
             "per_request", "active", "waiting", "upstreams", "decided", "tables", "pooled", "replayed", "spares",
             "spliced")


class Stats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in _COUNTERS] + [("status", ctypes.c_uint64 * 600)]


DECIDE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Request), ctypes.POINTER(Decision))


class Config(ctypes.Structure):
    _fields_ = [("orig_dst_fd", ctypes.c_int), ("head_limit", ctypes.c_uint32), ("head_timeout_ms", ctypes.c_uint32),
                ("idle_timeout_ms", ctypes.c_uint32), ("max_waiting", ctypes.c_uint32),
                ("fd_ceiling", ctypes.c_int32), ("drain_ms", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("decide", DECIDE), ("handoff_eventfd", ctypes.c_int), ("pad2", ctypes.c_int),
                ("fixed", (ctypes.c_char_p * 2) * 4), ("fixed_len", (ctypes.c_uint32 * 2) * 4)]


_SIZES = (Request, Decision, Handed, Stats, Config)   # kl7_sizeof(0..4)


def library_dir() -> Path:
    """$KMESH_NATIVE_DIR, the source tree's build/native (development), or
    the installed location."""
    env = os.environ.get("KMESH_NATIVE_DIR")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        cand = parent / "build" / "native"
        if (cand / LIBRARY).exists():
            return cand
    return Path("/usr/lib/kmesh/native")


_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """The engine's library, its ABI checked against these structs."""
    global _lib
    if _lib is not None:
        return _lib
    path = library_dir() / LIBRARY
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise EngineError(f"the native L7 engine {path} cannot be loaded ({e}): build it with ./build.sh -b, "
                          "or set KMESH_NATIVE_DIR") from None
    lib.kl7_abi.restype = ctypes.c_int
    lib.kl7_sizeof.restype = ctypes.c_uint32
    lib.kl7_sizeof.argtypes = [ctypes.c_int]
    lib.kl7_new.restype = ctypes.c_void_p
    lib.kl7_new.argtypes = [ctypes.POINTER(Config)]
    lib.kl7_add_listener.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int]
    lib.kl7_remove_listener.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.kl7_run.argtypes = [ctypes.c_void_p]
    lib.kl7_run.restype = None
    lib.kl7_stop.argtypes = [ctypes.c_void_p]
    lib.kl7_stop.restype = None
    lib.kl7_take.argtypes = [ctypes.c_void_p, ctypes.POINTER(Handed), ctypes.c_int]
    lib.kl7_free_buf.argtypes = [ctypes.c_void_p]
    lib.kl7_free_buf.restype = None
    lib.kl7_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(Stats)]
    lib.kl7_stats.restype = None
    lib.kl7_free.argtypes = [ctypes.c_void_p]
    lib.kl7_free.restype = None
    lib.kl7_invalidate.argtypes = [ctypes.c_void_p]
    lib.kl7_invalidate.restype = None
    lib.kl7_test_decide.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
                                    ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(Decision), ctypes.c_void_p,
                                    ctypes.c_size_t]
    lib.kl7_test_decide.restype = ctypes.c_int
    lib.kl7_test_decide_many.argtypes = lib.kl7_test_decide.argtypes[:6]
    lib.kl7_test_decide_many.restype = ctypes.c_int
    sizes = [lib.kl7_sizeof(i) for i in range(len(_SIZES))]
    want = [ctypes.sizeof(s) for s in _SIZES]
    if lib.kl7_abi() != ABI or sizes != want:
        raise EngineError(f"{path} is another build of the engine (ABI {lib.kl7_abi()}, struct sizes {sizes}, "
                          f"this kmesh expects {ABI}, {want}): rebuild with ./build.sh -b")
    _lib = lib
    return lib


@dataclass(frozen=True)
class Handoff:
    """A connection the engine gave back."""
    fd: int
    reason: int
    vip: tuple[str, int]
    peer: tuple[str, int]
    netns: int
    first: bool      # nothing read: its first head is still in the socket
    buffered: bytes  # what was read of it and not carried


class Engine:
    """One native engine: configure, start, feed listeners, take hand-offs, stop."""

    def __init__(self, orig_dst_fd: int, decide: Callable[[Request, Decision], None], *, head_limit: int,
                 head_timeout: float, idle_timeout: float, max_waiting: int, fd_ceiling: int, drain: float,
                 fixed: dict[tuple[int, bool], bytes]):
        self._lib = load()
        self.ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)   # readable: hand-offs to take

        def call(req, out) -> int:
            try:
                decide(req.contents, out.contents)
                return 0
            except Exception:   # noqa: BLE001 - the engine hands the connection to the Python path
                log.exception("native L7 decision failed")
                return 1
        self._decide = DECIDE(call)   # kept: the engine calls it for its whole life
        cfg = Config(orig_dst_fd=orig_dst_fd, head_limit=head_limit, head_timeout_ms=int(head_timeout * 1000),
                     idle_timeout_ms=int(idle_timeout * 1000), max_waiting=max_waiting, fd_ceiling=fd_ceiling,
                     drain_ms=int(drain * 1000), decide=self._decide, handoff_eventfd=self.ready)
        for (which, keep), data in fixed.items():
            cfg.fixed[which][int(keep)] = data
            cfg.fixed_len[which][int(keep)] = len(data)
        self._e = self._lib.kl7_new(ctypes.byref(cfg))
        if not self._e:
            os.close(self.ready)
            raise EngineError("the native L7 engine could not start (out of memory or descriptors)")
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """The engine's loop in a thread of this process (a Python thread:
        the decide callback then runs on that thread's own interpreter
        state, not on one made and dropped per call)."""
        self._thread = threading.Thread(target=self._lib.kl7_run, args=(self._e,), name="kmesh-l7", daemon=True)
        self._thread.start()

    def add_listener(self, fd: int, netns: int, nsfd: int = -1) -> None:
        if self._lib.kl7_add_listener(self._e, fd, netns, nsfd) < 0:
            raise EngineError(f"the native L7 engine cannot serve listener fd {fd} (at most 1024 listeners)")

    def remove_listener(self, fd: int) -> None:
        self._lib.kl7_remove_listener(self._e, fd)

    def take(self) -> Iterator[Handoff]:
        """The connections handed back since the last call."""
        try:
            os.eventfd_read(self.ready)
        except BlockingIOError:
            pass
        batch = (Handed * 64)()
        while True:
            n = self._lib.kl7_take(self._e, batch, len(batch))
            for h in batch[:n]:
                buffered = ctypes.string_at(h.buf, h.buf_len) if h.buf_len else b""
                if h.buf:
                    self._lib.kl7_free_buf(h.buf)
                yield Handoff(h.fd, h.reason, (ipv4_of(h.vip_ip), h.vip_port), (ipv4_of(h.peer_ip), h.peer_port),
                              h.netns, bool(h.first), buffered)
            if n < len(batch):
                return

    def invalidate(self) -> None:
        """The config changed: the engine asks again for each VIP's route table."""
        if self._e:
            self._lib.kl7_invalidate(self._e)

    def stats(self) -> dict:
        s = Stats()
        self._lib.kl7_stats(self._e, ctypes.byref(s))
        out = {n: getattr(s, n) for n in _COUNTERS}
        out["answered"] = {str(i): v for i, v in enumerate(s.status) if v}
        return out

    def stop(self) -> None:
        """Idle connections come back as R_PARK hand-offs; returns once the
        engine's thread has ended (exchanges in flight had ``drain``)."""
        if self._thread is not None:
            self._lib.kl7_stop(self._e)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """After stop(): what the engine still holds is closed."""
        if self._e:
            self.stop()
            self._lib.kl7_free(self._e)
            self._e = None
            os.close(self.ready)


def test_decide(table: bytes, head: bytes, rng: int = 1) -> tuple[Decision, bytes | None] | None:
    """What the engine decides itself for ``head`` with ``table``
    (l7route.c): the decision and the head it sends up when not the one
    received; None when it leaves the head to the Python side. Raises on a
    table the engine refuses. For tests."""
    lib = load()
    state = ctypes.c_uint64(rng)
    d = Decision()
    out = ctypes.create_string_buffer(len(head) + 1)
    got = lib.kl7_test_decide(table, len(table), head, len(head), ctypes.byref(state), ctypes.byref(d), out,
                              len(out))
    if got < 0:
        raise EngineError("the engine refuses this route table")
    if not got:
        return None
    up = ctypes.string_at(d.data, d.data_len) if d.data else None
    d.data = None
    return d, up
