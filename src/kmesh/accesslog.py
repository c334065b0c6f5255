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
turns them into lines, to stdout (journald under systemd) or a file. Two bounds keep a
connection storm from flooding the host: the ring buffer's size (records
that find it full are dropped and counted in the kernel) and a rate limit
here (records over it are dropped and counted).
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


def line(ev: records.KmeshConnEvent, cluster_names: dict[int, str], boot_offset: float) -> dict:
    """The log record of one event (pure: easy to test)."""
    result = records.ConnResult(ev.result) if ev.result in records.ConnResult.__members__.values() else None
    return {
        "start_time": round(boot_offset + ev.opened_ns / 1e9, 6),
        "duration_ms": round((ev.closed_ns - ev.opened_ns) / 1e6, 3),
        "downstream_remote_address": records.addr_text(ev.src) if ev.src.ip else None,
        "downstream_local_address": records.addr_text(ev.vip),
        "upstream_host": records.addr_text(ev.ep),
        "upstream_cluster": cluster_names.get(ev.cluster_id, f"#{ev.cluster_id}"),
        "bytes_received": ev.bytes_to_ep,
        "bytes_sent": ev.bytes_from_ep,
        "response_flags": "UF" if result is records.ConnResult.FAILED else "-",
        "result": result.name.lower() if result is not None else f"#{ev.result}",
    }


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst or rate, clock
        self.tokens, self.last = self.burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class AccessLog:
    def __init__(self, events_fd: int, config_map: libbpf.Map, cluster_names, path: str = "",
                 rate: float = DEFAULT_RATE, track_connections: bool = True):
        self.config_map = config_map
        self.cluster_names = cluster_names   # callable -> {id: name}
        self.path = path
        self.track_connections = track_connections
        self.bucket = TokenBucket(rate)
        self.written = 0
        self.rate_dropped = 0
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
        if not self.bucket.take():
            self.rate_dropped += 1
            return
        ev = records.KmeshConnEvent.from_buffer_copy(data[:ctypes.sizeof(records.KmeshConnEvent)])
        if ev.cluster_id not in self._names:
            self._names = self.cluster_names()
        out = self._out or sys.stdout
        out.write(json.dumps(line(ev, self._names, self._boot_offset), separators=(",", ":")) + "\n")
        self.written += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._rb.poll(200) and self._out:
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
            self._out = open(self.path, "a", buffering=1)
        self.config_map.update(ctypes.c_uint32(0),
                               records.KmeshConfig(int(self.track_connections or on), int(on)))
        if on != self.enabled:
            log.info("access log " + ("on" if on else "off"), extra={"kv": {"to": self.path or "stdout"}})
        self.enabled = on

    def status(self) -> dict:
        return {"enabled": self.enabled, "to": self.path or "stdout", "written": self.written,
                "rate_dropped": self.rate_dropped, "rate_limit_per_s": self.bucket.rate}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._rb.close()
        if self._out:
            self._out.close()
