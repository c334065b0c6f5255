"""The service manager's file descriptor store (systemd's ``FDSTORE=1`` and
``sd_listen_fds``), which keeps spliced L7 connections open while the
daemon restarts.

A spliced connection's bytes move in the kernel, but its two daemon-side
sockets are the daemon's: closing them at exit would end the connection.
So a stopping daemon hands them to the service manager, each under its own
name (``kmesh-l7.<client cookie>.<upstream cookie>.c|u``; a keep-alive
connection between two requests: ``kmesh-ka.<cookie>_<netns>_<VIP>_<peer>``), and the next
daemon gets them back at start (``LISTEN_FDS``/``LISTEN_FDNAMES``), takes
them out of the store and watches them again. Without a store (no
``NOTIFY_SOCKET``, or ``FileDescriptorStoreMax=0``) they close at exit.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("kmesh.l7")

SD_LISTEN_FDS_START = 3
PREFIX = "kmesh-l7."


def pair_name(client_cookie: int, upstream_cookie: int, side: str) -> str:
    return f"{PREFIX}{client_cookie}.{upstream_cookie}.{side}"


def parse_name(name: str) -> tuple[int, int, str] | None:
    """(client cookie, upstream cookie, "c" or "u") of one of our names."""
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX):].split(".")
    if len(parts) != 3 or parts[2] not in ("c", "u") or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1]), parts[2]


KEEPALIVE_PREFIX = "kmesh-ka."


def keepalive_name(cookie: int, netns: int, vip: tuple[str, int], peer: tuple[str, int]) -> str:
    """An idle keep-alive connection's name: enough to serve its next request."""
    return f"{KEEPALIVE_PREFIX}{cookie}_{netns}_{vip[0]}_{vip[1]}_{peer[0]}_{peer[1]}"


def parse_keepalive_name(name: str) -> tuple[int, int, tuple[str, int], tuple[str, int]] | None:
    """(cookie, netns inode, VIP, peer) of a keep-alive name."""
    if not name.startswith(KEEPALIVE_PREFIX):
        return None
    parts = name[len(KEEPALIVE_PREFIX):].split("_")
    if len(parts) != 6 or not all(parts[i].isdigit() for i in (0, 1, 3, 5)):
        return None
    return int(parts[0]), int(parts[1]), (parts[2], int(parts[3])), (parts[4], int(parts[5]))


def received(environ=os.environ) -> dict[str, int]:
    """Descriptors the service manager passed to this process (sd_listen_fds
    with unset_environment): name -> fd. Empty when they were meant for
    another process (LISTEN_PID)."""
    try:
        pid, count = int(environ.get("LISTEN_PID", "0")), int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return {}
    out = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out[names[i] if i < len(names) and names[i] else f"unknown-{fd}"] = fd
    return out


def _notify(message: str, fds: list[int] = ()) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        if fds:
            socket.send_fds(s, [message.encode()], list(fds))
        else:
            s.send(message.encode())
    return True


def store(named: list[tuple[str, int]]) -> int:
    """Hand each (name, fd) to the service manager; how many went."""
    done = 0
    for name, fd in named:
        try:
            if not _notify(f"FDSTORE=1\nFDNAME={name}", [fd]):
                return done
        except OSError as e:
            log.warning("could not keep a connection in the service manager's fd store",
                        extra={"kv": {"name": name, "error": str(e)}})
            return done
        done += 1
    return done


def remove(names) -> None:
    """Take descriptors out of the store (this process holds them now)."""
    for name in names:
        try:
            _notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        except OSError as e:
            log.warning("could not remove a connection from the fd store", extra={"kv": {"name": name,
                                                                                          "error": str(e)}})
