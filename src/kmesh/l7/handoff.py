"""The daemon's L7 hand-off listener (docs/l7.md).

connect4 sends every connection to an L7 listener's VIP here, and sockops
publishes where it was going (km_orig_dst, by the client socket's address,
which is the peer of the socket accepted here). This side reads the request
head, lets the listener's route table decide (kmesh.l7.routes), answers
itself (404, direct response, redirect, fault abort, 431, 503) or connects
to an endpoint of the chosen cluster, writes the head there and relays the
rest of the connection both ways.

The first request on a connection picks the route; later requests on a
keep-alive connection follow it. Clients that send ``Connection: close``
are routed per request.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import random
import resource
import select
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import httptools

from kmesh import limits
from kmesh.bpf import records
from kmesh.config.model import Cluster
from kmesh.l7 import routes as rt
from kmesh.l7 import fdstore, netns, splice
from kmesh.l7.balancer import Balancer
from kmesh.l7.rbac import DENIED
from kmesh.l7.splice import Splicer

log = logging.getLogger("kmesh.l7")

HEAD_LIMIT = 64 * 1024        # a larger request head gets 431, as Envoy's default max_request_headers_kb
READ_CHUNK = 64 * 1024
DEFAULT_CONNECT_TIMEOUT = 5.0  # Envoy's connect_timeout default
FD_RESERVE = 256               # descriptors the hand-off leaves to the admin API, xDS and the maps
HEAD_TIMEOUT = float(limits.L7_HEAD_SECONDS.value)   # a client that sends no complete head in time is closed


class TokenBucket:
    """The HTTP local rate limit's bucket (Envoy's token bucket: starts full,
    tokens_per_fill at every whole fill_interval)."""

    def __init__(self, max_tokens: int, tokens_per_fill: int, fill_interval_ms: int, clock=time.monotonic):
        self.max, self.per_fill, self.interval, self.clock = max_tokens, tokens_per_fill, fill_interval_ms / 1000, clock
        self.tokens, self.last = max_tokens, clock()

    def take(self) -> bool:
        fills = int((self.clock() - self.last) / self.interval)
        if fills:
            self.tokens = min(self.max, self.tokens + fills * self.per_fill)
            self.last += fills * self.interval
        if self.tokens <= 0:
            return False
        self.tokens -= 1
        return True


@dataclass(frozen=True)
class Target:
    """What connections to one L7 listener address are routed with."""

    listener: str
    routes: rt.RouteTable
    clusters: Mapping[str, Cluster]
    rate_limit: object = None          # policies.HttpRateLimit
    bucket: TokenBucket | None = None  # its bucket, kept across config updates
    rbac: object = None                # kmesh.l7.rbac.Rbac


@dataclass
class Stats:
    accepted: int = 0
    routed: int = 0
    answered: dict = field(default_factory=dict)   # status -> count (answered here)
    upstream_failures: int = 0
    connect_failures: int = 0   # upstream connects that failed (retried or not)
    no_destination: int = 0
    bad_requests: int = 0
    denied: int = 0   # by RBAC

    def answer(self, status: int) -> None:
        self.answered[status] = self.answered.get(status, 0) + 1

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "routed": self.routed, "upstream_failures": self.upstream_failures,
                "connect_failures": self.connect_failures,
                "answered": {str(k): v for k, v in sorted(self.answered.items())},
                "no_destination": self.no_destination, "bad_requests": self.bad_requests, "denied": self.denied}


class _Head:
    """httptools callbacks: the parts of a request head routing needs."""

    def __init__(self):
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.complete = True


class BadRequest(Exception):
    pass


def parse_head(head: bytes) -> rt.Request:
    """A complete request head (up to and including the blank line)."""
    h = _Head()
    parser = httptools.HttpRequestParser(h)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass   # Upgrade / CONNECT: the head is parsed; the rest is relayed as it comes
    except httptools.HttpParserError as e:
        raise BadRequest(str(e)) from None
    if not h.complete:
        raise BadRequest("incomplete request head")
    host = next((v for n, v in h.headers if n.lower() == "host"), "")
    return rt.Request(method=parser.get_method().decode("latin-1"), path=h.url.decode("latin-1"), host=host,
                      headers=tuple(h.headers))


def rewrite_head(head: bytes, route) -> bytes:
    """The head with the route's path and Host rewrites applied."""
    if route.rewrite_path is None and route.rewrite_host is None:
        return head
    lines = head.split(b"\r\n")
    if route.rewrite_path is not None:
        method, _, rest = lines[0].partition(b" ")
        _, _, version = rest.rpartition(b" ")
        lines[0] = b" ".join((method, route.rewrite_path.encode("latin-1"), version))
    if route.rewrite_host is not None:
        lines = [b"Host: " + route.rewrite_host.encode("latin-1") if line[:5].lower() == b"host:" else line
                 for line in lines]
    return b"\r\n".join(lines)


def response(status: int, body: bytes = b"", extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response that closes the connection."""
    reason = _REASONS.get(status, "")
    lines = [f"HTTP/1.1 {status} {reason}", f"content-length: {len(body)}", "connection: close"]
    if body:
        lines.append("content-type: text/plain")
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 303: "See Other", 307: "Temporary Redirect",
            308: "Permanent Redirect", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
UPSTREAM_FAILURE = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
UPSTREAM_TIMEOUT = b"upstream request timeout"


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop (libuv; ~2x asyncio's for many short
    connections) when installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _peer_closed(conn: socket.socket) -> bool:
    """Whether the peer has shut its sending side (or the socket failed)."""
    p = select.poll()
    p.register(conn, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(p.poll(0))


class HeadTooLarge(Exception):
    pass


class Handoff:
    """The hand-off listener: an asyncio loop in a thread of the daemon.
    With a Splicer, routed connections are spliced in the kernel; without
    one (or when a connection cannot be spliced) they are relayed here."""

    def __init__(self, address: tuple[str, int], orig_dst, targets: Callable[[tuple[str, int]], Target | None],
                 splicer: Splicer | None = None, head_limit: int = HEAD_LIMIT,
                 max_waiting: int = limits.L7_PENDING_HEADS.value):
        self.address = address
        self.orig_dst = orig_dst   # km_orig_dst: (netns, client address) -> VIP
        self.targets = targets
        self.splicer = splicer
        self.head_limit = head_limit
        # Connections waiting for their request head, oldest first: past
        # max_waiting the oldest is closed (slowloris costs the slow ones).
        self.max_waiting = max_waiting
        self._waiting: dict[asyncio.Task, None] = {}
        self._fd_ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE
        self.stats = Stats()
        self.balancer = Balancer()
        self._loop = _new_loop()
        self._listener: socket.socket | None = None
        self._host_netns = netns.own_inode()
        # Workloads' namespaces (by inode): the listener opened there.
        self._netns: dict[int, tuple[netns.Netns, socket.socket]] = {}
        self._thread: threading.Thread | None = None

    def status(self) -> dict:
        out = self.stats.as_dict()
        out["splice"] = asdict(self.splicer.stats) if self.splicer else None
        out["namespaces"] = self.namespaces()
        return out

    def namespaces(self) -> list[dict]:
        """The workload namespaces with a listener of their own."""
        return [{"netns": ns.path, "inode": inode} for inode, (ns, _) in sorted(self._netns.items())]

    # -- workloads in namespaces of their own --------------------------------
    def add_netns(self, path: str) -> dict:
        """Open the hand-off listener inside the network namespace at
        ``path`` too (idempotent). Raises OSError naming what failed."""
        ns = netns.Netns(path)
        if ns.inode == self._host_netns or ns.inode in self._netns:
            ns.close()
            return {"netns": path, "inode": ns.inode, "added": False}
        try:
            sock = self._listen(ns.socket())
        except OSError as e:
            ns.close()
            raise OSError(e.errno, f"hand-off listener {self.address[0]}:{self.address[1]} in {path}: "
                                   f"{e.strerror}") from None

        def add():
            self._netns[ns.inode] = (ns, sock)
            self._loop.add_reader(sock.fileno(), self._accept, sock, ns)
        self._in_loop(add)
        return {"netns": path, "inode": ns.inode, "added": True}

    def remove_netns(self, inode: int) -> bool:
        """Close the listener in the namespace ``inode`` (its connections go on)."""
        def remove():
            got = self._netns.pop(inode, None)
            if got is None:
                return False
            ns, sock = got
            self._loop.remove_reader(sock.fileno())
            sock.close()
            ns.close()
            return True
        removed = self._in_loop(remove)
        # What its clients' connects published and nobody will read now.
        for key in [k for k in self.orig_dst.keys() if k.netns == inode]:
            self.orig_dst.delete(key)
        return removed

    def _in_loop(self, fn):
        """Run ``fn`` in the loop's thread (where the listeners are served)."""
        if self._thread is None:
            return fn()

        async def call():
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    def _listen(self, sock: socket.socket) -> socket.socket:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # accepted sockets inherit it
        try:
            sock.bind(self.address)
            sock.listen(4096)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    # -- life cycle -----------------------------------------------------------
    def start(self) -> None:
        """Bind now (a port in use fails the daemon's start), serve in a thread."""
        sock = self._listen(socket.socket())
        self._listener = sock
        self._loop.add_reader(sock.fileno(), self._accept, sock, None)
        self._thread = threading.Thread(target=self._loop.run_forever, name="l7-handoff", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stop accepting; hand spliced connections to the service manager's
        fd store (when there is one) so that they outlive this process.
        Returns how many connections were handed over."""
        if self._thread is None:
            return 0

        async def close():
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            for ns, sock in self._netns.values():
                self._loop.remove_reader(sock.fileno())
                sock.close()
                ns.close()
            self._netns.clear()
            # Not routed yet: nothing was sent upstream, the client sees the
            # close before any response and may retry on the next daemon.
            waiting = list(self._waiting)
            for t in waiting:
                t.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            if self.splicer:
                await self.splicer.quiesce()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._thread = None
        for t in asyncio.all_tasks(self._loop):
            t._log_destroy_pending = False   # parked for good: this process is on its way out
        if not self.splicer or not self.splicer.pairs:
            return 0
        kept = fdstore.store(self.splicer.handover()) // 2
        log.info("spliced L7 connections handed to the service manager's fd store for the next daemon" if kept else
                 "no fd store (NOTIFY_SOCKET / FileDescriptorStoreMax): spliced L7 connections close with the "
                 "daemon", extra={"kv": {"kept": kept, "open": len(self.splicer.pairs)}})
        return kept

    def adopt(self, named: dict[str, int]) -> int:
        """Take over the spliced connections a previous daemon left in the fd
        store (name -> fd, from fdstore.received()); how many."""
        sides: dict[tuple[int, int], dict[str, int]] = {}
        for name, fd in named.items():
            got = fdstore.parse_name(name)
            if got is not None:
                sides.setdefault(got[:2], {})[got[2]] = fd
        fdstore.remove(n for n in named if fdstore.parse_name(n))
        adopted = 0
        for cookies, fds in sides.items():
            socks = [socket.socket(fileno=fds[s]) for s in ("c", "u") if s in fds]
            for s in socks:
                s.setblocking(False)
            if len(socks) == 2 and self.splicer and self.splicer.adoptable(*socks, cookies):
                asyncio.run_coroutine_threadsafe(self.splicer.adopt(*socks, cookies), self._loop)
                adopted += 1
            else:
                for s in socks:
                    s.close()
        if named:
            log.info("spliced L7 connections taken over", extra={"kv": {"adopted": adopted,
                                                                        "closed": len(sides) - adopted}})
        if self.splicer:
            # After the adopted pairs' sockets are back in use; those closed
            # above left km_splice with their last descriptor. In the loop:
            # a pair being set up there is never seen half-inserted.
            async def prune():
                return self.splicer.prune()
            stale = asyncio.run_coroutine_threadsafe(prune(), self._loop).result(10)
            if stale:
                log.info("dropped the splice state of connections that ended with the previous daemon",
                         extra={"kv": {"connections": stale}})
        return adopted

    def _accept(self, listener: socket.socket, ns: netns.Netns | None) -> None:
        """Accept every pending connection (``listener``, the one in namespace
        ``ns`` or the daemon's own, is readable)."""
        for _ in range(256):   # then let the loop run the connections already accepted
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # EMFILE & co.: the listener stays; the client is refused by its backlog
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    limits.hit(limits.OPEN_FILES)
                log.warning("l7 accept failed", extra={"kv": {"error": str(e)}})
                return
            if conn.fileno() >= self._fd_ceiling:
                # Descriptors are allocated lowest first: this one means the
                # process is nearly out. Refuse (RST) rather than leave the
                # admin API and xDS none to work with.
                limits.hit(limits.OPEN_FILES)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            conn.setblocking(False)
            self._loop.create_task(self._serve(conn, peer, ns))

    # -- one connection ------------------------------------------------------
    def _destination(self, peer: tuple, ns: netns.Netns | None) -> tuple[str, int] | None:
        """The VIP the client connected to. The entry is left in place (one
        syscall less per connection): the next connection from the same
        client address overwrites it before it could be accepted here, and
        the LRU map makes room by itself."""
        inode = ns.inode if ns else self._host_netns
        vip = self.orig_dst.lookup(records.handoff_key(inode, peer[0], peer[1]))
        if vip is None:
            return None
        return records.ip_of(vip.ip), records.port_of(vip.port)

    async def _serve(self, conn: socket.socket, peer: tuple, ns: netns.Netns | None) -> None:
        self.stats.accepted += 1
        try:
            await self._route(conn, peer, ns)
        except (OSError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        except Exception:   # noqa: BLE001 - one connection must not take the listener down
            log.exception("l7 connection failed")
        finally:
            conn.close()

    async def _peek_head(self, conn: socket.socket) -> bytes | None:
        """The request head, left unread in the socket (MSG_PEEK): once
        spliced, the kernel forwards it with the rest. A plain read would
        not do: the kernel splices whole skbs, so bytes read from a
        partly-read skb would go upstream a second time. None: the client
        closed first (also after part of a head: it can never complete)."""
        loop = asyncio.get_running_loop()
        seen = 0
        try:
            while True:
                data = await splice.recv(loop, conn, self.head_limit, socket.MSG_PEEK)
                if not data:
                    return None
                end = data.find(b"\r\n\r\n")
                if end >= 0:
                    return data[:end + 4]
                if len(data) >= self.head_limit:
                    raise HeadTooLarge()
                if len(data) == seen and _peer_closed(conn):
                    return None
                # Partial head: a non-blocking peek returns the same bytes
                # at once, whatever SO_RCVLOWAT says, so wait (yielding the
                # loop to every other connection) until poll() says more
                # than this has come, or the peer closed.
                seen = len(data)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, seen + 1)
                await splice.readable(loop, conn)
        finally:
            if seen and conn.fileno() >= 0:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    async def _answer(self, conn: socket.socket, head: bytes, status: int, body: bytes = b"",
                      extra: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer the request here and close: its head is read first (unread
        bytes at close would make the kernel send an RST)."""
        self.stats.answer(status)
        if head:
            conn.recv(len(head))
        await splice.sendall(asyncio.get_running_loop(), conn, response(status, body, extra))

    async def _route(self, conn: socket.socket, peer: tuple, ns: netns.Netns | None) -> None:
        vip = self._destination(peer, ns)
        target = self.targets(vip) if vip else None
        if target is None:
            self.stats.no_destination += 1
            return   # not handed off by kmesh, or its listener is gone: close
        task = asyncio.current_task()
        self._waiting[task] = None
        if len(self._waiting) > self.max_waiting:
            limits.hit(limits.L7_PENDING_HEADS)
            next(iter(self._waiting)).cancel()   # the oldest: its _serve closes it
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):   # no extra task, unlike wait_for
                head = await self._peek_head(conn)
        except HeadTooLarge:
            return await self._answer(conn, b"", 431)
        except TimeoutError:
            limits.hit(limits.L7_HEAD_SECONDS)
            return
        finally:
            self._waiting.pop(task, None)
        if head is None:
            return
        try:
            req = parse_head(head)
        except BadRequest:
            self.stats.bad_requests += 1
            return await self._answer(conn, head, 400)
        if target.rbac is not None and not target.rbac.allows(req, peer[0], vip):
            self.stats.denied += 1
            return await self._answer(conn, head, 403, DENIED)
        rl = target.rate_limit
        if rl and target.bucket and random.random() * 100 < rl.enabled_percent and not target.bucket.take() \
                and random.random() * 100 < rl.enforced_percent:
            return await self._answer(conn, head, rl.status, b"local_rate_limited")
        decision = target.routes.match(req)
        if decision is None:
            return await self._answer(conn, head, 404)
        if isinstance(decision, rt.DirectResponse):
            return await self._answer(conn, head, decision.status, decision.body)
        if isinstance(decision, rt.Redirect):
            return await self._answer(conn, head, decision.status, extra=(("location", decision.location),))
        await self._forward(target, decision, head, conn, ns)

    async def _forward(self, target: Target, route, head: bytes, conn: socket.socket,
                       ns: netns.Netns | None) -> None:
        fault = route.fault
        if fault and fault.delay_ms and random.random() * 100 < fault.delay_percent:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault and fault.abort_status and random.random() * 100 < fault.abort_percent:
            return await self._answer(conn, head, fault.abort_status, b"fault filter abort")
        cluster = target.clusters.get(rt.pick_weighted(route.clusters, random.random()))
        upstream, ep = await self._connect(cluster, route.retries, ns) if cluster else (None, None)
        if upstream is None:
            self.stats.upstream_failures += 1
            return await self._answer(conn, head, 503, UPSTREAM_FAILURE if cluster else b"no healthy upstream")
        self.stats.routed += 1
        self.balancer.opened(cluster, ep)
        try:
            await self._carry(route, head, conn, upstream)
        finally:
            self.balancer.closed(cluster, ep)

    async def _carry(self, route, head: bytes, conn: socket.socket, upstream: socket.socket) -> None:
        """The routed connection until it ends: spliced, else relayed."""
        timeout = route.timeout_ms / 1000 if route.timeout_ms else None
        rewrites = route.rewrite_path is not None or route.rewrite_host is not None
        cookies = self.splicer.splice(conn, upstream) if self.splicer and not rewrites else None
        if cookies is None:
            return await self._relay(route, head, conn, upstream, timeout)
        if not await self.splicer.carry(conn, upstream, cookies, timeout, response(504, UPSTREAM_TIMEOUT)):
            self.stats.answer(504)

    async def _relay(self, route, head: bytes, conn: socket.socket, upstream: socket.socket,
                     timeout: float | None) -> None:
        """The connection through the daemon: a route that rewrites the head
        (the kernel cannot), or a connection the kernel would not splice.
        Same socket helpers as the splice's own relay; closes upstream."""
        loop = asyncio.get_running_loop()
        upload = None
        try:
            conn.recv(len(head))   # peeked, so all there
            await splice.sendall(loop, upstream, rewrite_head(head, route))
            upload = asyncio.ensure_future(splice.pump(loop, conn, upstream))   # a request body goes on meanwhile
            upload.add_done_callback(lambda t: t.cancelled() or t.exception())   # its error is seen below
            # The route's timeout covers the upstream's first byte (after
            # that, the connection is the application's).
            try:
                async with asyncio.timeout(timeout):
                    first = await splice.recv(loop, upstream, READ_CHUNK)
            except asyncio.TimeoutError:
                self.stats.answer(504)
                await splice.sendall(loop, conn, response(504, UPSTREAM_TIMEOUT))
                return
            await splice.pump(loop, upstream, conn, first)
            await upload
        except OSError:
            pass   # a reset on either side ends both (the caller closes the client)
        finally:
            if upload is not None:
                upload.cancel()
            upstream.close()

    async def _connect(self, cluster: Cluster, retries: int,
                       ns: netns.Netns | None) -> tuple[socket.socket | None, tuple | None]:
        """A connected upstream socket and its endpoint, trying the LB's
        choice and then up to ``retries`` others; (None, None) if none took.
        From the client's namespace: the backend sees the workload's address."""
        loop = asyncio.get_running_loop()
        timeout = (cluster.policy.connect_timeout_ms / 1000) or DEFAULT_CONNECT_TIMEOUT
        for ep in self.balancer.order(cluster)[:1 + retries]:
            sock = ns.socket() if ns else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                async with asyncio.timeout(timeout):
                    await splice.connect(loop, sock, ep)
            except (OSError, asyncio.TimeoutError):
                sock.close()
                self.stats.connect_failures += 1
                self.balancer.failed(cluster, ep)
                continue
            self.balancer.succeeded(cluster, ep)
            return sock, ep
        return None, None
