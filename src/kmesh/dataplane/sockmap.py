"""Same-host acceleration (sockops + sk_msg over km_sock_hash), from the
daemon's side: the switch the programs read, the host's addresses they need,
and turning it off without breaking connections that use it.

Turning off never unpins a sockhash that still holds sockets: tearing one
down drops the messages already handed to a peer and not yet read. Off means
the programs stop enrolling and stop redirecting (``redirect = 0``: messages
go through TCP, after the ones already delivered, so nothing is reordered);
the sockops link is detached at once, and the sk_msg link and the maps go
once the last enrolled connection has closed.
"""
from __future__ import annotations

import ctypes
import logging
import socket
import time
from pathlib import Path

from kmesh.bpf import libbpf, loader, mapnames, records

log = logging.getLogger("kmesh.sockmap")

_ZERO = ctypes.c_uint32(0)
_MAPS = tuple(loader.SOCKMAP_MAP_TYPES) + (mapnames.LISTEN_FLAGS, mapnames.SOCK_TURN)


def host_addresses() -> set[str]:
    """The host's addresses of both families outside 127.0.0.0/8 and ::1
    (the programs treat those as local themselves), canonical text."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        addrs = {a.get_attr("IFA_ADDRESS") for fam in (socket.AF_INET, socket.AF_INET6)
                 for a in ipr.get_addr(family=fam)}
    out = set()
    for a in filter(None, addrs):
        text = records.ip_text(records.ip_bytes(a))
        if not text.startswith("127.") and text != "::1":
            out.add(text)
    return out


def _ip_key(ip: str) -> records.KmeshAddr:
    return records.addr_key(ip, 0)


class Sockmap:
    """The running feature: maps of a loaded kmesh_sockmap object."""

    def __init__(self, maps: dict[str, libbpf.Map]):
        self.hash = maps[mapnames.SOCK_HASH]
        self.local_ip = maps[mapnames.LOCAL_IP]
        self.cfg = maps[mapnames.SOCKMAP_CFG]
        self._local: set[str] | None = None

    def set_redirect(self, on: bool) -> None:
        self.cfg.update(_ZERO, records.KmeshSockmapCfg(int(on), 0))

    def sync_local_addresses(self) -> bool:
        """Keep km_local_ip equal to the host's addresses; True if it changed."""
        want = host_addresses()
        if want == self._local:
            return False
        have = {records.ip_of(k.ip6) for k in self.local_ip.keys()}
        for ip in have - want:
            self.local_ip.delete(_ip_key(ip))
        for ip in want - have:
            self.local_ip.update(_ip_key(ip), ctypes.c_uint32(1))
        self._local = want
        return True

    def sockets(self) -> int:
        return sum(1 for _ in self.hash.keys())


def pinned_sockets(map_dir: Path) -> int | None:
    """Sockets in a pinned km_sock_hash; None when none is pinned."""
    pin = map_dir / mapnames.SOCK_HASH
    if not pin.exists():
        return None
    with loader.pinned_map(pin, mapnames.SOCK_HASH) as m:
        return sum(1 for _ in m.keys())


QUIESCE_SECONDS = 1.0


def quiesce_pinned(pin_root: Path) -> None:
    """Before everything is removed (cleanup): stop handing messages over,
    and give the peers a moment to read what was already handed to them
    (removing the sockhash drops what is still unread)."""
    if turn_off_pinned(pin_root) == "draining":
        time.sleep(QUIESCE_SECONDS)


def turn_off_pinned(pin_root: Path) -> str:
    """The feature is off but an earlier daemon left it pinned: stop
    enrolling and redirecting now, remove it once no socket uses it.
    Returns "none" (nothing pinned), "draining" or "removed"."""
    map_dir, link_dir = pin_root / "map", pin_root / "link"
    cfg_pin = map_dir / mapnames.SOCKMAP_CFG
    if not cfg_pin.exists():
        return "none"
    with loader.pinned_map(cfg_pin, mapnames.SOCKMAP_CFG) as cfg:
        cfg.update(_ZERO, records.KmeshSockmapCfg(0, 0))
    _detach_if_pinned(link_dir / "kmesh_sockops")
    left = pinned_sockets(map_dir) or 0
    if left:
        return "draining"
    _detach_if_pinned(link_dir / "kmesh_sk_msg")
    for name in _MAPS:
        (map_dir / name).unlink(missing_ok=True)
    log.info("same-host acceleration removed (it is off and no connection uses it)")
    return "removed"


def _detach_if_pinned(pin: Path) -> None:
    if pin.exists():
        loader.detach_pinned_link(pin)
