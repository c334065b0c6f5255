"""Who is on the other end of an admin connection, as the kernel says.

A Unix socket peer: SO_PEERCRED (uid, gid) and SO_PEERGROUPS (supplementary
groups), taken when it connected. A loopback TCP peer: the owner of the
client's socket (sk_uid, the uid that created it), looked up with
sock_diag by the connection's 4-tuple. Nothing the client sends (a header,
a token) counts.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; inet_diag_sockid:
# sport, dport (big endian), src[16], dst[16], if, cookie[2].
_REQ = struct.Struct("=BBBBI")
_SOCKID = struct.Struct(">HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires,
# rqueue, wqueue, uid, inode.
_UID_OFFSET = 4 + 48 + 12


@dataclass(frozen=True)
class Peer:
    uid: int
    gids: frozenset[int]
    via: str          # "unix" or "tcp"

    def may_change(self, group: int | None) -> bool:
        """Root, or a member of the configured admin group."""
        return self.uid == 0 or (group is not None and group in self.gids)


def unix_peer(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("=iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    gids = {gid}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        gids.update(struct.unpack(f"={len(raw) // 4}I", raw))
    except OSError:
        pass   # more than 256 groups, or an old kernel: the primary group only
    return Peer(uid, frozenset(gids), "unix")


def tcp_peer(client: tuple, server: tuple) -> Peer | None:
    """The owner of the TCP socket ``client`` -> ``server`` in this network
    namespace, or None when there is none (it closed)."""
    uid = tcp_owner(client, server)
    return None if uid is None else Peer(uid, frozenset(), "tcp")


def tcp_owner(client: tuple, server: tuple) -> int | None:
    """sock_diag's answer; /proc/net/tcp's when the kernel has no inet_diag
    (a kernel built without it, or the module not loadable here)."""
    try:
        uid = _diag_owner(client, server)
    except OSError:
        uid = None
    return uid if uid is not None else _proc_owner(client, server)


def _addresses(client: tuple, server: tuple):
    """The two ends' addresses, IPv4-mapped ones as IPv4."""
    src, dst = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    if isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped:
        src, dst = src.ipv4_mapped, ipaddress.ip_address(str(dst).removeprefix("::ffff:"))
    return src, dst


def _proc_owner(client: tuple, server: tuple) -> int | None:
    src, dst = _addresses(client, server)

    def hexaddr(ip) -> str:
        # /proc/net/tcp prints each 32-bit word of the address in host order.
        b = ip.packed
        return "".join(b[i:i + 4][::-1].hex().upper() for i in range(0, len(b), 4))

    local, remote = f"{hexaddr(src)}:{client[1]:04X}", f"{hexaddr(dst)}:{server[1]:04X}"
    try:
        with open("/proc/net/tcp" if src.version == 4 else "/proc/net/tcp6") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == local and fields[2] == remote:
                    return int(fields[7])
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    return None


def _diag_owner(client: tuple, server: tuple) -> int | None:
    src, dst = _addresses(client, server)
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    req = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + \
        _SOCKID.pack(client[1], server[1], src.packed.ljust(16, b"\0"), dst.packed.ljust(16, b"\0")) + \
        _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, 1, 1, 0) + req   # NLM_F_REQUEST
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.sendto(msg, (0, 0))
        data = nl.recv(65536)
    if len(data) < _NLMSGHDR.size:
        return None
    _, kind, _, _, _ = _NLMSGHDR.unpack_from(data)
    body = data[_NLMSGHDR.size:]
    if kind != SOCK_DIAG_BY_FAMILY or len(body) < _UID_OFFSET + 4:
        return None   # NLMSG_ERROR: no such socket
    return struct.unpack_from("=I", body, _UID_OFFSET)[0]
