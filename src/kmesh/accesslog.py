"""The access log: one JSON line per closed connection, off by default.

Fields, with Envoy's access log names where kmesh stands where Envoy would
(the client is "downstream", the endpoint "upstream"): start_time,
duration_ms, downstream_remote_address (the client socket), downstream_local_address
(the VIP it connected to), upstream_host, upstream_cluster, bytes_received
(from the client), bytes_sent (to the client), response_flags ("UF" for
an upstream connection failure, else "-") and kmesh's own ``result``
(closed, reset, failed). A socket whose connect() failed before sending a
SYN has no address or bytes.

The sockops program (when TCP reaches CLOSE) or sock_release (a socket
that never sent a SYN) puts a kmesh_conn_event into the km_events ring
buffer while the log is on (``access_log`` in km_config); a thread here
turns them into lines, to stdout (journald under systemd) or a file. Two
bounds keep a connection storm from flooding the host, both in the kernel,
so that the daemon never reads what it would throw away: a token bucket
(``-access-log-rate`` records a second, a second's worth at once) and the
ring buffer's size; records over either are dropped and counted (km_stats).
Records wake the reader only once 64 KiB are waiting; it also reads every
100 ms, so a line appears at most that late.
"""
from __future__ import annotations

import ctypes
import json
import logging
import sys
import threading
import time

from kmesh.bpf import libbpf, records

log = logging.getLogger("kmesh.accesslog")

DEFAULT_RATE = 1000   # lines per second
POLL_MS = 100
FILLS_PER_SECOND = 10


def rate_limit(rate: int) -> records.KmeshRateLimit:
    """The kernel bucket for ``rate`` records a second (0: no limit)."""
    if rate <= 0:
        return records.KmeshRateLimit()
    per_fill = max(1, rate // FILLS_PER_SECOND)
    return records.KmeshRateLimit(rate, per_fill, 1_000_000_000 * per_fill // rate)


def line(ev: records.KmeshConnEvent, cluster_names: dict[int, str], boot_offset: float) -> dict:
    """The log record of one event (pure: easy to test)."""
    result = records.ConnResult(ev.result) if ev.result in records.ConnResult.__members__.values() else None
    return {
        "start_time": round(boot_offset + ev.opened_ns / 1e9, 6),
        "duration_ms": round((ev.closed_ns - ev.opened_ns) / 1e6, 3),
        "downstream_remote_address": records.addr_text(ev.src) if not records.addr_is_zero(ev.src) else None,
        "downstream_local_address": records.addr_text(ev.vip),
        "upstream_host": records.addr_text(ev.ep),
        "upstream_cluster": cluster_names.get(ev.cluster_id, f"#{ev.cluster_id}"),
        "bytes_received": ev.bytes_to_ep,
        "bytes_sent": ev.bytes_from_ep,
        "response_flags": "UF" if result is records.ConnResult.FAILED else "-",
        "result": result.name.lower() if result is not None else f"#{ev.result}",
    }


class AccessLog:
    def __init__(self, events_fd: int, kconfig, stats: libbpf.PerCpuMap, cluster_names,
                 path: str = "", rate: int = DEFAULT_RATE, track_connections: bool = True):
        self.kconfig = kconfig   # dataplane.kconfig.KernelConfig
        self.stats = stats
        self.cluster_names = cluster_names   # callable -> {id: name}
        self.path = path
        self.track_connections = track_connections
        self.rate = rate
        self.written = 0
        self.enabled = False
        self._out = None
        self._stop = threading.Event()
        self._names: dict[int, str] = {}
        # CLOCK_MONOTONIC (what bpf_ktime_get_ns counts) -> wall clock
        self._boot_offset = time.time() - time.monotonic()
        self._rb = libbpf.RingBuffer(events_fd, self._record)
        self._thread = threading.Thread(target=self._run, name="accesslog", daemon=True)
        self._thread.start()

    def _record(self, data: bytes) -> None:
        ev = records.KmeshConnEvent.from_buffer_copy(data[:ctypes.sizeof(records.KmeshConnEvent)])
        if ev.cluster_id not in self._names:
            self._names = self.cluster_names()
        out = self._out or sys.stdout
        out.write(json.dumps(line(ev, self._names, self._boot_offset), separators=(",", ":")) + "\n")
        self.written += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._rb.poll(POLL_MS) and self._out:
                    self._out.flush()
                elif self._out is None:
                    sys.stdout.flush()
            except OSError as e:
                log.warning("access log reader failed", extra={"kv": {"error": str(e)}})
                time.sleep(1)

    def set(self, on: bool) -> None:
        """Switch the log; also writes km_config's close tracking, which the
        log needs (its records come from tracked sockets)."""
        if on and self.path and self._out is None:
            self._out = open(self.path, "a")   # flushed after every poll, not per line
        self.kconfig.set(track_connections=int(self.track_connections or on), access_log=int(on),
                         access_log_limit=rate_limit(self.rate))
        if on != self.enabled:
            log.info("access log " + ("on" if on else "off"), extra={"kv": {"to": self.path or "stdout"}})
        self.enabled = on

    def dropped(self, stat: records.Stat) -> int:
        return self.stats.sum(ctypes.c_uint32(stat)) or 0

    def status(self) -> dict:
        return {"enabled": self.enabled, "to": self.path or "stdout", "written": self.written,
                "rate_dropped": self.dropped(records.Stat.EVENTS_RATE_LIMITED),
                "ring_buffer_dropped": self.dropped(records.Stat.EVENTS_DROPPED), "rate_limit_per_s": self.rate}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._rb.close()
        if self._out:
            self._out.close()
