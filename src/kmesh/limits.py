"""The limits that keep a misbehaving peer from exhausting the daemon, and
how often each one bit (``kmesh_limit_hits_total{limit=...}``).

One table: the admin API, the L7 hand-off and the xDS client take their
numbers from here, the README's Security section lists them, and /metrics
counts every one (zero until it bites).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    name: str
    value: int
    what: str


ADMIN_BODY = Limit("admin_body_bytes", 16 * 1024 * 1024, "bytes in one admin request body (a config POST)")
ADMIN_HEAD = Limit("admin_head_bytes", 64 * 1024, "bytes in one admin request line and headers")
ADMIN_CONCURRENT = Limit("admin_concurrent_requests", 16, "admin requests served at once; more are answered 503")
ADMIN_IDLE = Limit("admin_idle_seconds", 10, "seconds an admin connection may stay silent mid-request")
L7_PENDING_HEADS = Limit("l7_pending_heads", 4096, "hand-off connections waiting for their request head; "
                                                   "the oldest waiting one is closed for a new one")
L7_HEAD_SECONDS = Limit("l7_head_seconds", 30, "seconds a hand-off connection may take to send its request head")
XDS_MESSAGE = Limit("xds_message_bytes", 256 * 1024 * 1024, "bytes in one xDS message; a bigger one ends the stream "
                    "(the bootstrap's envoy_grpc.max_receive_message_length sets it)")
OPEN_FILES = Limit("open_files", 0, "file descriptors: the hard RLIMIT_NOFILE (the daemon raises its soft limit to "
                                    "it); near it the hand-off refuses new connections")

ALL = (ADMIN_BODY, ADMIN_HEAD, ADMIN_CONCURRENT, ADMIN_IDLE, L7_PENDING_HEADS, L7_HEAD_SECONDS, XDS_MESSAGE,
       OPEN_FILES)

_hits = dict.fromkeys((x.name for x in ALL), 0)
_lock = threading.Lock()


def hit(limit: Limit) -> None:
    """Count one time ``limit`` bit."""
    with _lock:
        _hits[limit.name] += 1


def hits() -> dict[str, int]:
    with _lock:
        return dict(_hits)
