"""Splicing a routed L7 connection in the kernel (docs/l7.md).

After the hand-off listener has routed a connection, its two daemon-side
sockets (the accepted client side and the upstream side) go into
``km_splice``, whose stream verdict (bpf/include/splice.h) moves each one's
incoming bytes to the other's send side: from then on the bytes never come
up to the daemon. What the kernel does not do, this side does:

- **FIN**: the verdict drops the empty FIN skb; when a socket reads EOF, the
  half-close is passed on once every byte redirected before it has been
  taken by the peer's send buffer (a FIN sent earlier would overtake them).
- **RST**: a reset on one side resets the other.
- **Backpressure**: while the peer falls behind by more than the budget,
  the verdict leaves bytes to the daemon (``KMESH_SPLICE_PASS``); they are
  read here and written to the peer after the redirected ones have drained,
  with ordinary socket backpressure. Each relayed byte is counted in
  ``km_splice_relayed``, and the verdict redirects again once the daemon
  has relayed all it was given.

Kernel memory per direction is then bounded by the budget, plus the peer's
send buffer and the receiving socket's receive buffer (TCP's own limits).
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass

from kmesh.bpf import records
from kmesh.l7 import fdstore

log = logging.getLogger("kmesh.l7")

SO_COOKIE = 57
DEFAULT_BUDGET = 256 * 1024   # bytes redirected ahead of the peer's send buffer, per direction
RELAY_CHUNK = 64 * 1024
DRAIN_POLL_MAX = 0.02         # seconds between checks that redirected bytes have left
# struct tcp_info (linux/tcp.h): tcpi_notsent_bytes, tcpi_bytes_sent, tcpi_bytes_retrans
_TCPI_NOTSENT, _TCPI_BYTES_SENT, _TCPI_BYTES_RETRANS = 144, 200, 208
_TCPI_LEN = 216


def cookie(sock: socket.socket) -> int:
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def taken(sock: socket.socket) -> int:
    """Payload bytes the socket's send side has taken so far (what the
    verdict's splice_taken() reads from the tcp_sock)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LEN)
    sent, retrans = struct.unpack_from("=QQ", info, _TCPI_BYTES_SENT)
    return sent - retrans + struct.unpack_from("=I", info, _TCPI_NOTSENT)[0]


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, write: bool) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(fd)


async def readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    await _ready(loop, sock, False)


async def writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    await _ready(loop, sock, True)


async def recv(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, flags: int = 0) -> bytes:
    """recv on a non-blocking socket, waiting for it to become readable."""
    while True:
        try:
            return sock.recv(n, flags)
        except (BlockingIOError, InterruptedError):
            await readable(loop, sock)


async def connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple[str, int]) -> None:
    """Non-blocking connect to a numeric address (the event loop's own
    sock_connect resolves the address first: ~4x slower)."""
    try:
        sock.connect(address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    await writable(loop, sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def sendall(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            await writable(loop, sock)


async def pump(loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
               first: bytes | None = None) -> None:
    """Copy src to dst until EOF, then pass the half-close on. ``first``:
    what was already read from src (b"": its EOF)."""
    data = await recv(loop, src, RELAY_CHUNK) if first is None else first
    while data:
        await sendall(loop, dst, data)
        data = await recv(loop, src, RELAY_CHUNK)
    dst.shutdown(socket.SHUT_WR)


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a proxy passes a reset on."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class UpstreamTimeout(Exception):
    """The upstream sent no byte within the route's timeout."""


@dataclass
class SpliceStats:
    spliced: int = 0          # connections spliced in the kernel
    not_spliceable: int = 0   # relayed by the daemon instead (closed early, map full)
    passed_bytes: int = 0     # bytes the verdict left to the daemon (a peer fell behind)
    repeated_bytes: int = 0   # bytes the verdict dropped as repeats (splice.h: splice_skip_repeat)
    active: int = 0
    adopted: int = 0          # taken over from the previous daemon (fdstore)


class Splicer:
    """The daemon's side of km_splice."""

    def __init__(self, sockhash, dirs, relayed, budget: int = DEFAULT_BUDGET):
        self.sockhash, self.dirs, self.relayed = sockhash, dirs, relayed
        self.budget = budget
        self.stats = SpliceStats()
        self.pairs: dict[tuple[int, int], tuple[socket.socket, socket.socket]] = {}
        self.handed_over = False   # the sockets went to the fd store: leave them and their entries
        self.stopping = False      # relays finish what they hold and read nothing more
        self._holding = 0          # relays holding bytes read and not yet written

    # -- pairing -----------------------------------------------------------
    def splice(self, client: socket.socket, upstream: socket.socket) -> tuple[int, int] | None:
        """Put the pair in km_splice; their cookies, or None when the kernel
        refuses (the client already sent FIN: EOPNOTSUPP; the map is full),
        in which case nothing is left in the maps and the caller relays.

        Order matters: both directions are described before either socket
        is inserted, and the upstream goes in first, because a socket whose
        peer is not in the map yet would drop what it redirects. Nothing
        reaches the upstream before the client is in (the request head is
        still unread in the client socket)."""
        cc, cu = cookie(client), cookie(upstream)
        keys = (ctypes.c_uint64(cc), ctypes.c_uint64(cu))
        self.dirs.update(keys[0], records.KmeshSpliceDir(peer=cu, budget=self.budget))
        self.dirs.update(keys[1], records.KmeshSpliceDir(peer=cc, budget=self.budget))
        inserted = []
        try:
            for key, sock in ((keys[1], upstream), (keys[0], client)):
                self.sockhash.update(key, ctypes.c_uint64(sock.fileno()))
                inserted.append(key)
        except OSError as e:
            for key in inserted:
                self.sockhash.delete(key)
            for key in keys:
                self.dirs.delete(key)
            self.stats.not_spliceable += 1
            if e.errno not in (errno.EOPNOTSUPP, errno.E2BIG, errno.ENOMEM, errno.ENOSPC):
                log.warning("could not splice an L7 connection", extra={"kv": {"error": str(e)}})
            return None
        self.stats.spliced += 1
        return cc, cu

    def forget(self, *cookies: int) -> None:
        """Drop a closed pair's entries (km_splice lets go of its sockets by
        itself), keeping what they counted."""
        for c in cookies:
            key = ctypes.c_uint64(c)
            d = self.dirs.lookup(key)
            if d is None:
                continue
            self.stats.repeated_bytes += d.repeated
            self.dirs.delete(key)
            if d.passed:
                self.relayed.delete(key)

    # -- a spliced connection ----------------------------------------------
    async def quiesce(self, timeout: float = 5.0) -> None:
        """Before a handover, in the event loop: let every relay write out
        the bytes it holds (read from one socket, not yet on the other), and
        read no more."""
        self.stopping = True
        end = asyncio.get_running_loop().time() + timeout
        while self._holding and asyncio.get_running_loop().time() < end:
            await asyncio.sleep(0.005)

    def prune(self) -> int:
        """Drop entries of pairs no longer in km_splice (their daemon died
        with them, or never handed them over); how many pairs."""
        live = {int(k.value) for k in self.sockhash.keys()}
        stale = [int(k.value) for k in self.dirs.keys() if int(k.value) not in live]
        for c in stale:
            self.dirs.delete(ctypes.c_uint64(c))
            self.relayed.delete(ctypes.c_uint64(c))
        return len(stale) // 2

    def handover(self) -> list[tuple[str, int]]:
        """(name, fd) of every spliced pair, for the fd store, once the event
        loop has stopped; from then on nothing here closes them or drops
        their entries."""
        self.handed_over = True
        return [(fdstore.pair_name(cc, cu, side), sock.fileno())
                for (cc, cu), pair in self.pairs.items() for side, sock in zip("cu", pair)]

    def adoptable(self, client: socket.socket, upstream: socket.socket, cookies: tuple[int, int]) -> bool:
        """Whether a pair from the fd store is the one its name says, still
        spliced with its entries in place."""
        try:
            got = (cookie(client), cookie(upstream))
        except OSError as e:
            log.warning("a stored L7 connection is no TCP socket", extra={"kv": {"error": str(e)}})
            return False
        if got != cookies:
            log.warning("a stored L7 connection is not the one its name says", extra={"kv": {
                "cookies": cookies, "found": got}})
            return False
        if not all(self.dirs.lookup(ctypes.c_uint64(c)) is not None for c in cookies):
            log.info("a stored L7 connection is no longer spliced (its entries are gone)")
            return False
        return True

    async def adopt(self, client: socket.socket, upstream: socket.socket, cookies: tuple[int, int]) -> None:
        """Watch a pair a previous daemon spliced (see adoptable())."""
        self.stats.adopted += 1
        relayed = [self.relayed.lookup(ctypes.c_uint64(c)) for c in cookies]
        await self.carry(client, upstream, cookies, relayed=tuple(int(r.value) if r else 0 for r in relayed))

    async def carry(self, client: socket.socket, upstream: socket.socket, cookies: tuple[int, int],
                    first_byte_timeout: float | None = None, timeout_response: bytes = b"",
                    relayed: tuple[int, int] = (0, 0)) -> bool:
        """Watch a spliced pair until both directions have ended: pass FIN
        and RST on, relay what the verdict leaves to the daemon. Closes both
        sockets. With ``first_byte_timeout``, an upstream that has sent
        nothing by then is reset and the client gets ``timeout_response``;
        False is returned then."""
        loop = asyncio.get_running_loop()
        cc, cu = cookies
        self.stats.active += 1
        self.pairs[cookies] = (client, upstream)
        directions = {asyncio.ensure_future(self._direction(loop, client, upstream, cc, relayed[0])),
                      asyncio.ensure_future(self._direction(loop, upstream, client, cu, relayed[1]))}
        waiting = set(directions)
        if first_byte_timeout:
            waiting.add(asyncio.ensure_future(self._first_byte(cu, first_byte_timeout)))
        every = set(waiting)
        try:
            while directions:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                directions -= done
                err = next((t.exception() for t in done if t.exception() is not None), None)
                if err is None:
                    continue
                for t in every:
                    t.cancel()
                await asyncio.gather(*every, return_exceptions=True)
                if isinstance(err, UpstreamTimeout):
                    reset(upstream)
                    await loop.sock_sendall(client, timeout_response)
                    return False
                if not isinstance(err, OSError):   # ConnectionResetError & co. are the peers' doing
                    log.error("spliced connection failed", exc_info=err)
                reset(client)
                reset(upstream)
            return True
        finally:
            if not self.handed_over:
                for t in every:
                    t.cancel()
                self.stats.active -= 1
                del self.pairs[cookies]
                client.close()
                upstream.close()
                self.forget(cc, cu)

    async def _first_byte(self, upstream_cookie: int, timeout: float) -> None:
        """Raise UpstreamTimeout if the upstream sent nothing in time."""
        await asyncio.sleep(timeout)
        key = ctypes.c_uint64(upstream_cookie)
        if self._heard(key):
            return
        self.sockhash.delete(key)   # from now on nothing of the upstream's reaches the client
        if not self._heard(key):
            raise UpstreamTimeout()

    def _heard(self, key) -> bool:
        d = self.dirs.lookup(key)
        return d is None or d.redirected > 0 or d.passed > 0

    async def _direction(self, loop, src: socket.socket, dst: socket.socket, key: int, relayed: int) -> None:
        """Bytes arriving on src for dst: the kernel moves them; this relays
        the passed ones and the end of the stream. ``relayed``: passed bytes
        already relayed (by a previous daemon)."""
        while True:
            if self.stopping:
                await loop.create_future()   # parked: the next daemon carries on
            data = await recv(loop, src, RELAY_CHUNK)   # ECONNRESET raises: both are reset
            if not data:
                # The FIN, unless bytes passed before it are still on their
                # way to the socket (queued behind its outgoing bytes).
                d = self.dirs.lookup(ctypes.c_uint64(key))
                if d is not None and d.passed > relayed:
                    await asyncio.sleep(0.001)
                    continue
                await self._drained(dst, key, relayed, d)
                break
            self._holding += 1
            try:
                self.stats.passed_bytes += len(data)
                await self._drained(dst, key, relayed)
                await sendall(loop, dst, data)
                relayed += len(data)
                self.relayed.update(ctypes.c_uint64(key), ctypes.c_uint64(relayed))
            finally:
                self._holding -= 1
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # the peer is gone already

    async def _drained(self, dst: socket.socket, key: int, relayed: int, d=None) -> None:
        """Wait until dst's send side has taken every byte redirected to it
        (``d``: the direction's entry, if just read). The kernel moves
        redirected bytes from a work queue, usually within tens of µs."""
        delay = 0.0001
        while True:
            if d is None:
                d = self.dirs.lookup(ctypes.c_uint64(key))
            if d is None or taken(dst) >= d.redirected + relayed:
                return
            d = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, DRAIN_POLL_MAX)
