"""The daemon's L7 hand-off listener (docs/l7.md).

connect4 sends every connection to an L7 listener's VIP here, and sockops
publishes where it was going (km_orig_dst, by the client socket's address,
which is the peer of the socket accepted here). This side reads the request
head, lets the listener's route table decide (kmesh.config.http.routes), answers
itself (404, direct response, redirect, fault abort, 431, 503) or connects
to an endpoint of the chosen cluster, writes the head there and relays the
rest of the connection both ways.

Every request is routed, authorized, retried, mirrored and rewritten on
its own, as Envoy does (``_requests``); a connection whose only request
needs nothing of the daemon after its head is spliced whole in the kernel
(``_forward``).
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import logging
import random
import resource
import select
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping

import httptools

from kmesh import limits
from kmesh.bpf import records
from kmesh.config.http import headers, native
from kmesh.config.http import routes as rt
from kmesh.config.http.match import Request
from kmesh.config.http.rbac import DENIED
from kmesh.config.model import FILTER_ORDER, Cluster
from kmesh.l7 import engine, fdstore, http1, netns, splice
from kmesh.l7.balancer import Balancer
from kmesh.l7.splice import Splicer

log = logging.getLogger("kmesh.l7")

HEAD_LIMIT = 64 * 1024        # a larger request head gets 431, as Envoy's default max_request_headers_kb
RESUME_WAIT = 60.0            # a taken-over keep-alive connection waits this long for its listener's config
DRAIN_SECONDS = 5.0           # at stop, a keep-alive connection inside a request may finish it
KEEPALIVE_IDLE = 300.0        # a keep-alive connection may wait this long for its next request (Envoy's stream idle)
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


WARMING = object()   # what ``targets`` returns while the daemon has no config yet: wait for it


@dataclass(frozen=True)
class Target:
    """What connections to one L7 listener address are routed with."""

    listener: str
    routes: rt.RouteTable
    clusters: Mapping[str, Cluster]
    rate_limit: object = None          # policies.HttpRateLimit
    bucket: TokenBucket | None = None  # its bucket, kept across config updates
    rbac: object = None                # kmesh.config.http.rbac.Rbac
    accept_http_10: bool = False       # else an HTTP/1.0 request gets 426, as in Envoy
    route_faults: bool = True          # the fault filter is in the chain: per-route faults apply
    filter_fault: object = None        # kmesh.config.http.routes.FilterFault: where no per-route config says
    order: tuple[str, ...] = FILTER_ORDER   # "rbac", "rate_limit", "fault" as http_filters lists them


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
    per_request: int = 0   # keep-alive connections routed request by request (not spliced whole)
    mirrored: int = 0      # request copies sent to a mirror cluster
    resumed: int = 0       # of those, taken over from a previous daemon

    def answer(self, status: int) -> None:
        self.answered[status] = self.answered.get(status, 0) + 1

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "routed": self.routed, "upstream_failures": self.upstream_failures,
                "per_request": self.per_request, "resumed": self.resumed, "mirrored": self.mirrored,
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


def parse_head(head: bytes) -> Request:
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
    hosts = [v for n, v in h.headers if n.lower() == "host"]
    path = h.url.decode("latin-1")
    host, normalised = ",".join(hosts), len(hosts) > 1   # Envoy joins a repeated Host
    scheme = path[:8].lower()
    if scheme.startswith(("http://", "https://")):
        # Absolute form (RFC 9112 3.2.2): the URL's authority is the host,
        # whatever Host says, and the origin-form path goes upstream.
        rest = path[path.index("://") + 3:]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        # 'http://x' is path '/'; 'http://x?q' keeps '?q' (Envoy's path then
        # matches no prefix route).
        host, path, normalised = rest[:cut], rest[cut:] or "/", True
    elif not hosts:
        raise BadRequest("no Host header")   # Envoy: 400, also for HTTP/1.0
    return Request(method=parser.get_method().decode("latin-1"), path=path, host=host,
                      headers=tuple(h.headers), normalised=normalised)


def _one_host(hdrs, host: str) -> list[tuple[str, str]]:
    """``hdrs`` with one Host, ``host``, where the first was (else last)."""
    out, done = [], False
    for n, v in hdrs:
        if n.lower() != "host":
            out.append((n, v))
        elif not done:
            out.append((n, host))
            done = True
    return out if done else out + [("Host", host)]


@dataclass(frozen=True, slots=True)
class Routed:
    """A request's route, the cluster drawn for it, and what its header
    values may refer to."""
    route: rt.RouteTo
    cluster: str
    ctx: headers.Context
    # (origin-form target, authority) when the head as sent says otherwise
    # (an absolute-form target, Host sent twice): what goes upstream.
    origin: tuple[str, str] | None = None

    def host(self, framed: http1.Head) -> str:
        """The Host sent upstream (before header mutations)."""
        host = self.route.host_for(self.cluster)
        if host is None:
            host = self.origin[1] if self.origin else next((v for n, v in framed.headers if n.lower() == "host"), "")
        return host

    def upstream_head(self, head: bytes, framed: http1.Head, attempt: int = 0) -> bytes:
        """The head to send upstream: the route's path and Host rewrites and
        request header mutations applied (else the bytes as received); with
        ``include_request_attempt_count``, the attempt's number."""
        route = self.route
        levels = route.request_levels(self.cluster)
        count = route.attempt_count_request and attempt
        host = route.host_for(self.cluster)
        if route.rewrite_path is None and host is None and not levels and not count and self.origin is None:
            return head
        method, target, version = framed.start
        if self.origin is not None:
            target = self.origin[0]
        hdrs = framed.headers
        if host is not None or self.origin is not None:
            hdrs = _one_host(hdrs, self.host(framed))
        if levels:
            hdrs = headers.apply(levels, hdrs, self.ctx)
        if count:
            hdrs = [h for h in hdrs if h[0].lower() != ATTEMPT_COUNT] + [(ATTEMPT_COUNT, str(attempt))]
        path = route.rewrite_path if route.rewrite_path is not None else target
        return http1.serialize((method, path, version), hdrs)

    def _response_headers(self, hdrs, attempt: int):
        levels = self.route.response_levels(self.cluster)
        if levels:
            hdrs = headers.apply(levels, hdrs, self.ctx)
        if self.route.attempt_count_response and attempt:
            hdrs = [h for h in hdrs if h[0].lower() != ATTEMPT_COUNT] + [(ATTEMPT_COUNT, str(attempt))]
        return hdrs

    def response_head(self, rhead: bytes, resp: http1.Head, attempt: int = 0) -> bytes:
        """The upstream's response head with the response mutations applied
        (and, with include_attempt_count_in_response, the attempt count)."""
        if not self.route.response_levels(self.cluster) and not self.route.attempt_count_response:
            return rhead
        return http1.serialize(resp.start, self._response_headers(resp.headers, attempt))

    def answer(self, status: int, body: bytes = b"", extra: tuple = (), attempt: int = 0) -> tuple:
        """A local answer to this request (status, body, headers): Envoy
        applies the route's response mutations to those too (and the attempt
        count to the router's own answers)."""
        return status, body, tuple(self._response_headers(extra, attempt))

    @property
    def carried_as_is_back(self) -> bool:
        """The response goes back as the upstream sends it and nothing but
        a failed connect is retried: what the native engine carries."""
        r = self.route
        return not (r.response_levels(self.cluster) or r.mirrors or r.attempt_count_response
                    or r.retry is not None and not r.retry.connect_only)

    @property
    def spliceable(self) -> bool:
        """Nothing to change in either direction's heads (the kernel can
        carry a one-request connection whole)."""
        r = self.route
        return self.carried_as_is_back and not (r.request_levels(self.cluster) or r.attempt_count_request)


def response(status: int, body: bytes = b"", extra: tuple[tuple[str, str], ...] = (), close: bool = True) -> bytes:
    """A whole HTTP/1.1 response (that closes the connection, with ``close``)."""
    reason = _REASONS.get(status, "")
    lines = [f"HTTP/1.1 {status} {reason}", f"content-length: {len(body)}"]
    if close:
        lines.append("connection: close")
    if body:
        lines.append("content-type: text/plain")
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 303: "See Other", 307: "Temporary Redirect",
            308: "Permanent Redirect", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            426: "Upgrade Required", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_BODY = {"none": engine.BODY_NONE, "length": engine.BODY_LENGTH, "chunked": engine.BODY_CHUNKED}


@functools.lru_cache(maxsize=4096)
def _ip_text(field: int) -> str:
    """A VIP or endpoint address as the engine holds it (IPv4, a u32), as
    text (cached: few)."""
    return records.ipv4_of(field)


@functools.lru_cache(maxsize=4096)
def _ip_field(ip: str) -> int:
    return records.ipv4_field(ip)


def _native_answers() -> dict[tuple[int, bool], bytes]:
    """The engine's own answers to a forward's failures, keep-alive or not."""
    out = {}
    for keep in (False, True):
        out[engine.A_RESET, keep] = response(503, UPSTREAM_RESET, close=not keep)
        out[engine.A_TIMEOUT, keep] = response(504, UPSTREAM_TIMEOUT, close=not keep)
        out[engine.A_BAD, keep] = response(400, close=not keep)
        out[engine.A_TOO_LARGE, keep] = response(431, close=not keep)
    return out


# Envoy 1.40's bodies for the same failures.
UPSTREAM_FAILURE = b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
UPSTREAM_RESET = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
ATTEMPT_COUNT = "x-envoy-attempt-count"
RETRY_BUFFER = 1 << 20   # a body held for retries, at most: Envoy's default per-connection buffer limit
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


class _Waiting:
    __slots__ = ("handoff", "task")

    def __init__(self, handoff: "Handoff"):
        self.handoff = handoff

    def __enter__(self):
        h = self.handoff
        self.task = asyncio.current_task()
        h._waiting[self.task] = None
        if len(h._waiting) > h.max_waiting:
            limits.hit(limits.L7_PENDING_HEADS)
            next(iter(h._waiting)).cancel()   # the oldest: its _serve closes it

    def __exit__(self, *exc):
        self.handoff._waiting.pop(self.task, None)


class Handoff:
    """The hand-off listener: an asyncio loop in a thread of the daemon.
    With a Splicer, routed connections are spliced in the kernel; without
    one (or when a connection cannot be spliced) they are relayed here."""

    def __init__(self, address: tuple[str, int], orig_dst, targets: Callable[[tuple[str, int]], Target | None],
                 splicer: Splicer | None = None, head_limit: int = HEAD_LIMIT,
                 max_waiting: int = limits.L7_PENDING_HEADS.value, native: bool = False):
        self.address = address
        self.orig_dst = orig_dst   # km_orig_dst: (netns, client address) -> VIP
        self.targets = targets
        self.splicer = splicer
        self.head_limit = head_limit
        # Connections waiting for their request head, oldest first: past
        # max_waiting the oldest is closed (slowloris costs the slow ones).
        self.max_waiting = max_waiting
        self._waiting: dict[asyncio.Task, None] = {}
        # Keep-alive connections (routed per request): tasks waiting for
        # their next request with nothing buffered, how many are inside an
        # exchange, and those parked for the next daemon at stop.
        self._idle: dict[asyncio.Task, None] = {}
        self._exchanging = 0
        self._stopping = False
        self._parked: dict[socket.socket, str] = {}
        self._mirroring: set[asyncio.Task] = set()   # request copies on their way to a mirror cluster
        self._fd_ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE
        self.stats = Stats()
        self.balancer = Balancer()
        self._loop = _new_loop()
        self._listener: socket.socket | None = None
        self._host_netns = netns.own_inode()
        # Workloads' namespaces (by inode): the listener opened there.
        self._netns: dict[int, tuple[netns.Netns, socket.socket]] = {}
        self._thread: threading.Thread | None = None
        # The native engine (kmesh.l7.engine) serves the listeners when on;
        # this loop then runs only what the engine hands back.
        self.native = native
        self.engine: engine.Engine | None = None
        self._hold = b""   # the last upstream head given to the engine, alive until it copies it
        self._hold_table = b""   # likewise the last route table
        self._tables: dict[int, tuple[Target, bytes]] = {}   # route tables given to the engine, by target

    def status(self) -> dict:
        out = self.totals().as_dict()
        out["splice"] = asdict(self.splicer.stats) if self.splicer else None
        out["namespaces"] = self.namespaces()
        out["engine"] = "native" if self.engine else "python"
        if self.engine:
            out["native"] = self.engine.stats()
        return out

    def totals(self) -> Stats:
        """The hand-off's counters, the native engine's added."""
        if not self.engine:
            return self.stats
        n = self.engine.stats()
        st = replace(self.stats, answered=dict(self.stats.answered))
        for key in ("accepted", "routed", "upstream_failures", "connect_failures", "no_destination",
                    "bad_requests", "per_request"):
            setattr(st, key, getattr(st, key) + n[key])
        for status, count in n["answered"].items():
            st.answered[int(status)] = st.answered.get(int(status), 0) + count
        return st

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
            self._serve_listener(sock, ns)
        self._in_loop(add)
        return {"netns": path, "inode": ns.inode, "added": True}

    def remove_netns(self, inode: int) -> bool:
        """Close the listener in the namespace ``inode`` (its connections go on)."""
        def remove():
            got = self._netns.pop(inode, None)
            if got is None:
                return False
            ns, sock = got
            self._unserve_listener(sock)
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
    def _serve_listener(self, sock: socket.socket, ns: netns.Netns | None) -> None:
        """Accept on ``sock`` (of namespace ``ns``, None: the daemon's own):
        in the native engine when on, else in this loop."""
        if self.engine:
            self.engine.add_listener(sock.fileno(), ns.inode if ns else self._host_netns, ns.fd if ns else -1)
        else:
            self._loop.add_reader(sock.fileno(), self._accept, sock, ns)

    def _unserve_listener(self, sock: socket.socket) -> None:
        if self.engine:
            self.engine.remove_listener(sock.fileno())
        else:
            self._loop.remove_reader(sock.fileno())

    def start(self) -> None:
        """Bind now (a port in use fails the daemon's start), serve in a thread."""
        sock = self._listen(socket.socket())
        self._listener = sock
        if self.native:
            self.engine = engine.Engine(
                self.orig_dst.fd, self._native_decide, head_limit=self.head_limit, head_timeout=HEAD_TIMEOUT,
                idle_timeout=KEEPALIVE_IDLE, max_waiting=self.max_waiting, fd_ceiling=self._fd_ceiling,
                drain=DRAIN_SECONDS, fixed=_native_answers())
            self._loop.add_reader(self.engine.ready, self._taken)
            self.engine.start()
        self._serve_listener(sock, None)
        self._thread = threading.Thread(target=self._loop.run_forever, name="l7-handoff", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stop accepting; hand spliced connections to the service manager's
        fd store (when there is one) so that they outlive this process.
        Returns how many connections were handed over."""
        if self._thread is None:
            return 0

        async def close():
            self._unserve_listener(self._listener)
            self._listener.close()
            for ns, sock in self._netns.values():
                self._unserve_listener(sock)
                sock.close()
                ns.close()
            self._netns.clear()
            # A connection waiting for a request (its first: nothing was read,
            # only peeked; a later one: nothing buffered) is parked for the
            # next daemon; one inside an exchange finishes it first.
            self._stopping = True
            # The engine's idle connections come back to be parked with the
            # rest; its exchanges finish first (within DRAIN_SECONDS).
            engine_stopped = asyncio.get_running_loop().run_in_executor(None, self.engine.stop) \
                if self.engine else None
            waiting = list(self._waiting)
            for t in waiting:
                t.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            deadline = time.monotonic() + DRAIN_SECONDS
            while True:
                idle = list(self._idle)
                for t in idle:
                    t.cancel()
                await asyncio.gather(*idle, return_exceptions=True)
                if not self._exchanging or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            if self._exchanging:
                log.warning("keep-alive L7 connections still inside a request at stop are closed",
                            extra={"kv": {"connections": self._exchanging, "waited_s": DRAIN_SECONDS}})
            if engine_stopped is not None:
                await engine_stopped
                self._taken()
                self._loop.remove_reader(self.engine.ready)
            if self.splicer:
                await self.splicer.quiesce()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        if self.engine:
            self.engine.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._thread = None
        for t in asyncio.all_tasks(self._loop):
            t._log_destroy_pending = False   # parked for good: this process is on its way out
        kept = 0
        if self._parked:
            kept = fdstore.store([(name, sock.fileno()) for sock, name in self._parked.items()])
            log.info("idle keep-alive L7 connections handed to the service manager's fd store for the next daemon"
                     if kept else "no fd store (NOTIFY_SOCKET / FileDescriptorStoreMax): idle keep-alive L7 "
                     "connections close with the daemon", extra={"kv": {"kept": kept, "open": len(self._parked)}})
        if not self.splicer or not self.splicer.pairs:
            return kept
        spliced = fdstore.store(self.splicer.handover()) // 2
        log.info("spliced L7 connections handed to the service manager's fd store for the next daemon" if spliced
                 else "no fd store (NOTIFY_SOCKET / FileDescriptorStoreMax): spliced L7 connections close with the "
                 "daemon", extra={"kv": {"kept": spliced, "open": len(self.splicer.pairs)}})
        return kept + spliced

    def adopt(self, named: dict[str, int]) -> int:
        """Take over the spliced connections a previous daemon left in the fd
        store (name -> fd, from fdstore.received()); how many."""
        sides: dict[tuple[int, int], dict[str, int]] = {}
        for name, fd in named.items():
            got = fdstore.parse_name(name)
            if got is not None:
                sides.setdefault(got[:2], {})[got[2]] = fd
        fdstore.remove(n for n in named if fdstore.parse_name(n))
        resumed = self._resume(named)
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
        if sides:
            log.info("spliced L7 connections taken over", extra={"kv": {"adopted": adopted,
                                                                        "closed": len(sides) - adopted}})
        if resumed:
            log.info("idle keep-alive L7 connections taken over", extra={"kv": {"connections": resumed}})
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

    def _resume(self, named: dict[str, int]) -> int:
        """Serve again the keep-alive connections a previous daemon parked
        between two requests; how many."""
        resumed = 0
        for name, fd in named.items():
            got = fdstore.parse_keepalive_name(name)
            if got is None:
                continue
            fdstore.remove([name])
            conn = socket.socket(fileno=fd)
            cookie, inode, vip, peer = got
            try:
                ok = splice.cookie(conn) == cookie
            except OSError:
                ok = False
            if not ok:
                log.warning("a stored keep-alive connection is not the one its name says", extra={"kv": {
                    "name": name}})
                conn.close()
                continue
            conn.setblocking(False)
            asyncio.run_coroutine_threadsafe(self._serve_resumed(conn, peer, inode, vip), self._loop)
            resumed += 1
        self.stats.resumed += resumed
        return resumed

    async def _serve_resumed(self, conn: socket.socket, peer: tuple, inode: int, vip: tuple) -> None:
        try:
            # Taken over before the daemon has its config (or, in ADS mode,
            # the control plane's): the request waits in the socket meanwhile.
            deadline = time.monotonic() + RESUME_WAIT
            while (target := self.targets(vip)) in (None, WARMING) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if target not in (None, WARMING):
                await self._requests(target, peer, vip, conn, inode, None)
        except (OSError, asyncio.CancelledError):
            pass
        except Exception:   # noqa: BLE001
            log.exception("l7 connection failed")
        finally:
            if conn not in self._parked:
                conn.close()

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
        return records.ip_of(vip.ip6), records.port_of(vip.port)

    async def _serve(self, conn: socket.socket, peer: tuple, ns: netns.Netns | None, counted: bool = False) -> None:
        if not counted:   # else the engine counted it
            self.stats.accepted += 1
        await self._guarded(conn, self._route(conn, peer, ns))

    async def _guarded(self, conn: socket.socket, work) -> None:
        """One connection's ``work``: whatever happens, the connection ends
        closed (unless parked for the next daemon)."""
        try:
            await work
        except (OSError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        except Exception:   # noqa: BLE001 - one connection must not take the listener down
            log.exception("l7 connection failed")
        finally:
            if conn not in self._parked:
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
                      extra: tuple[tuple[str, str], ...] = (), keep: bool = False) -> bool:
        """Answer the request here: its head is read first (unread bytes at
        close would make the kernel send an RST). ``keep``: the connection
        goes on (else the answer says close, and the caller closes); returns
        ``keep``."""
        self.stats.answer(status)
        if head:
            conn.recv(len(head))
        await splice.sendall(asyncio.get_running_loop(), conn, response(status, body, extra, close=not keep))
        return keep

    @staticmethod
    def _may_keep(framed: http1.Head) -> bool:
        """Whether the connection goes on after a local answer to this
        request: as Envoy, when the request has no body and does not end
        the connection (after a body, Envoy answers with close)."""
        try:
            return framed.keep_alive() and http1.request_framing(framed).kind == "none" \
                and not framed.tokens("upgrade")
        except http1.FramingError:
            return False

    def _waiting_for_head(self) -> "_Waiting":
        """Context: this task waits for a request head (counted against
        max_waiting; past it the task waiting longest is cancelled)."""
        return _Waiting(self)

    async def _route(self, conn: socket.socket, peer: tuple, ns: netns.Netns | None) -> None:
        vip = self._destination(peer, ns)
        target = self.targets(vip) if vip else None
        if target is WARMING:   # a daemon just started, before its control plane's config: the client waits
            deadline = time.monotonic() + RESUME_WAIT
            while (target := self.targets(vip)) is WARMING and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if target is None or target is WARMING:
            self.stats.no_destination += 1
            return   # not handed off by kmesh, or its listener is gone: close
        try:
            with self._waiting_for_head():
                async with asyncio.timeout(HEAD_TIMEOUT):   # no extra task, unlike wait_for
                    head = await self._peek_head(conn)
        except asyncio.CancelledError:
            if self._stopping:   # only peeked: the next daemon reads it all
                return self._park(conn, ns.inode if ns else self._host_netns, vip, peer)
            raise
        except HeadTooLarge:
            return await self._answer(conn, b"", 431)
        except TimeoutError:
            limits.hit(limits.L7_HEAD_SECONDS)
            return
        if head is None:
            return
        try:
            req, framed = parse_head(head), http1.parse(head)
        except (BadRequest, http1.FramingError):
            self.stats.bad_requests += 1
            return await self._answer(conn, head, 400)
        decision = await self._decide(target, req, framed, peer, vip)
        inode = ns.inode if ns else self._host_netns
        if not isinstance(decision, Routed):
            status, body, extra, keepable = decision
            if await self._answer(conn, head, status, body, extra, keepable and self._may_keep(framed)):
                await self._requests(target, peer, vip, conn, inode, None)
            return
        if (not framed.keep_alive() or framed.tokens("upgrade")) and decision.spliceable:
            # The only request on this connection (or a protocol switch):
            # the whole connection is the route's, spliced in the kernel.
            return await self._forward(target, decision, head, framed, conn, ns, req)
        conn.recv(len(head))   # peeked, so all there
        await self._requests(target, peer, vip, conn, inode, (head, framed, decision, req))

    @staticmethod
    def _fault(target: Target, decision, req: Request) -> rt.Fault | None:
        """The fault for this request, as Envoy's fault filter decides it:
        none without the filter in the chain; the route configuration's
        (route, then virtual host, then configuration) when one sets it (on a
        direct response or redirect: none, warned at compile time); else
        the filter's own (also for a request no route matches)."""
        if not target.route_faults:
            return None
        if decision is not None and decision.fault_set:
            return decision.fault if isinstance(decision, rt.RouteTo) else None
        return target.filter_fault.for_request(req) if target.filter_fault else None

    async def _decide(self, target: Target, req: Request, framed: http1.Head, peer: tuple, vip: tuple):
        """The request's Routed, or the local answer (status, body, extra
        headers, whether the connection may go on after it): _steps, with
        the fault filter's delays slept."""
        steps = self._steps(target, req, framed, peer, vip)
        try:
            while True:
                await asyncio.sleep(next(steps))
        except StopIteration as done:
            return done.value

    def _decide_now(self, target: Target, req: Request, framed: http1.Head, peer: tuple, vip: tuple):
        """_decide without waiting: None when the fault filter delays this
        request (the caller leaves it to _decide, which draws again)."""
        try:
            next(self._steps(target, req, framed, peer, vip))
        except StopIteration as done:
            return done.value
        return None

    def _steps(self, target: Target, req: Request, framed: http1.Head, peer: tuple, vip: tuple):
        """The decision, as a generator that yields each delay (seconds) the
        fault filter puts before the rest. Envoy's codec answers first: a
        fragment in the target is 400, HTTP/1.0 is 426 unless the connection
        manager accepts it. Then the HTTP filters in their order (RBAC, the
        local rate limit, the fault filter's delay and abort), then the
        router (no route: 404; a direct response; a redirect; else
        upstream). The route is found first: local answers carry its
        response header mutations, as Envoy's do."""
        if "#" in req.path:
            self.stats.bad_requests += 1
            return 400, b"", (), False
        if framed.version == "HTTP/1.0" and not target.accept_http_10:
            return 426, b"Upgrade Required", (), False
        decision = target.routes.match(req)
        ctx = headers.Context(peer[:2], vip, req.headers)
        if isinstance(decision, rt.RouteTo):
            routed = Routed(decision, rt.pick_weighted(decision.clusters, random.random()), ctx,
                            (req.path, req.host) if req.normalised else None)
            answer = routed.answer
        else:
            levels = decision.response_headers if decision is not None else ()

            def answer(status: int, body: bytes = b"", extra: tuple = ()) -> tuple:
                return status, body, tuple(headers.apply(levels, extra, ctx)) if levels else extra

        def local(*args) -> tuple:   # the route's answer, after which the connection may go on
            return (*answer(*args), True)
        for step in target.order:
            if step == "rbac":
                if target.rbac is not None and not target.rbac.allows(req, peer[0], vip):
                    self.stats.denied += 1
                    return local(403, DENIED)
            elif step == "rate_limit":
                rl = target.rate_limit
                if rl and target.bucket and random.random() * 100 < rl.enabled_percent \
                        and not target.bucket.take() and random.random() * 100 < rl.enforced_percent:
                    return local(rl.status, b"local_rate_limited")
            elif (fault := self._fault(target, decision, req)) is not None:
                if fault.delay_ms and random.random() * 100 < fault.delay_percent:
                    yield fault.delay_ms / 1000
                if fault.abort_status and random.random() * 100 < fault.abort_percent:
                    return local(fault.abort_status, b"fault filter abort")
        if decision is None:
            return 404, b"", (), True
        if isinstance(decision, rt.DirectResponse):
            where = (("location", f"http://{req.host}{req.path}"),) if decision.location else ()
            return local(decision.status, decision.body, where)
        if isinstance(decision, rt.Redirect):
            return local(decision.status, b"", (("location", decision.location),))
        return routed

    # -- the native engine's side ------------------------------------------------
    def _native_decide(self, r: engine.Request, d: engine.Decision) -> None:
        """One request head the engine read (in the engine's thread): what
        the engine does with it (``d``). The engine carries plain forwards
        and local answers; what needs more of the daemon (HTTP filters with
        state, faults, retries beyond failed connects, mirrors, response
        rewrites, Expect, Upgrade, HTTP/1.0, outlier-aware or least-request
        balancing) is handed to this loop, before any of it was decided."""
        vip = (_ip_text(r.vip_ip), r.vip_port)
        target = self.targets(vip)
        if target is None:
            d.kind = engine.CLOSE
            return
        d.kind = engine.HANDOFF
        if target is WARMING:
            return
        if r.want_table:
            self._give_table(target, r.gen, d)
        if target.rate_limit is not None:
            return
        head = ctypes.string_at(r.head, r.head_len)
        try:
            req, framed = parse_head(head), http1.parse(head)
            framing = http1.request_framing(framed)
        except (BadRequest, http1.FramingError):
            self.stats.bad_requests += 1
            self._native_answer(d, 400, b"", (), False)
            return
        names = {n.lower() for n, _ in framed.headers}
        if framed.start[2] != "HTTP/1.1" or "upgrade" in names or "expect" in names:
            return
        peer = (records.ipv4_of(r.peer_ip), r.peer_port)
        got = self._decide_now(target, req, framed, peer, vip)
        if got is None:   # a fault delay: the loop's path sleeps it
            return
        req_keep = "connection" not in names or framed.keep_alive()
        may_keep = req_keep and framing.kind == "none"   # _may_keep (no Upgrade here)
        if not isinstance(got, Routed):
            status, body, extra, keepable = got
            self._native_answer(d, status, body, extra, keepable and may_keep)
            return
        cluster = target.clusters.get(got.cluster)
        if cluster is None or not got.carried_as_is_back or cluster.policy.outlier_failures \
                or cluster.lb_policy == records.LbPolicy.LEAST_REQUEST:
            return
        ep = self.balancer.first(cluster)
        if ep is None or ":" in ep[0]:   # the engine connects over IPv4 only
            return
        up = got.upstream_head(head, framed, 1)
        d.kind = engine.FORWARD
        d.keep = may_keep
        d.req_keep = req_keep
        if up is not head:
            self._hold = up
            d.data, d.data_len = ctypes.cast(ctypes.c_char_p(up), ctypes.c_void_p), len(up)
        d.n_eps = 1
        d.eps[0].ip, d.eps[0].port = _ip_field(ep[0]), ep[1]
        d.timeout_ms = got.route.timeout_ms or 0
        d.connect_timeout_ms = cluster.policy.connect_timeout_ms or int(DEFAULT_CONNECT_TIMEOUT * 1000)
        d.body = _BODY[framing.kind]
        d.body_len = framing.length
        d.head_request = framed.start[0] == "HEAD"

    def _give_table(self, target: Target, gen: int, d: engine.Decision) -> None:
        """The route table the engine decides requests to this target with
        (kmesh.config.http.native), for config generation ``gen``: empty
        when every request needs this side (RBAC, a rate limit)."""
        got = self._tables.get(id(target))
        if got is None or got[0] is not target:
            if target.rbac is not None or target.rate_limit is not None:
                raw = b""
            else:
                raw = native.table(target.routes, target.clusters, int(DEFAULT_CONNECT_TIMEOUT * 1000),
                                   target.route_faults, target.filter_fault)
            tables = self._tables if len(self._tables) < 1024 else {}
            tables[id(target)] = got = (target, raw)
            self._tables = tables
        self._hold_table = got[1]
        d.table_given, d.table_gen, d.table_len = 1, gen, len(got[1])
        d.table = ctypes.cast(ctypes.c_char_p(got[1]), ctypes.c_void_p) if got[1] else None

    def config_changed(self) -> None:
        """The mesh changed (any thread, after it is in force): the engine's
        route tables are stale."""
        self._tables = {}
        if self.engine is not None:
            self.engine.invalidate()

    def _native_answer(self, d: engine.Decision, status: int, body: bytes, extra: tuple, keep: bool) -> None:
        data = response(status, body, extra, close=not keep)
        self._hold = data
        d.kind, d.status, d.keep = engine.ANSWER, status, keep
        d.data, d.data_len = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p), len(data)

    def _taken(self) -> None:
        """The connections the engine handed back: parked at stop, else
        served here from where the engine left them."""
        for h in self.engine.take():
            conn = socket.socket(fileno=h.fd)
            conn.setblocking(False)
            ns = self._netns.get(h.netns, (None,))[0]
            if h.reason == engine.R_PARK:
                self._park(conn, h.netns, h.vip, h.peer)
            elif h.first:   # untouched: the whole path, from the peek
                self._loop.create_task(self._serve(conn, h.peer, ns, counted=True))
            else:
                self._loop.create_task(self._serve_rest(conn, h, ns))

    async def _serve_rest(self, conn: socket.socket, h: engine.Handoff, ns: netns.Netns | None) -> None:
        """A keep-alive connection the engine carried until now: its next
        request (in ``h.buffered``) and the rest, request by request."""
        target = self.targets(h.vip)
        if target is None or target is WARMING:
            conn.close()
            return
        await self._guarded(conn, self._requests(target, h.peer, h.vip, conn, h.netns, None, h.buffered))

    # -- a keep-alive connection, request by request ---------------------------
    async def _requests(self, target: Target, peer: tuple, vip: tuple, conn: socket.socket, inode: int,
                        first: tuple | None, buffered: bytes = b"") -> None:
        """Every request on the connection routed, authorized and answered on
        its own, as Envoy does; responses in request order (a pipelined
        request is read once the one before it is answered). Upstream
        connections are kept per endpoint for the client connection.
        ``first``: the (head, parsed head, route) of a request already read;
        ``buffered``: bytes read from ``conn`` already (by the native engine)."""
        reader = http1.Reader(conn, buffered)
        pool: dict[tuple, tuple[socket.socket, http1.Reader]] = {}
        task = asyncio.current_task()
        self.stats.per_request += 1
        try:
            while True:
                if first is not None:
                    head, framed, route, req = first
                    first = None
                    ns = self._netns.get(inode, (None,))[0]   # the client's namespace, for upstream sockets
                    self._exchanging += 1
                    try:
                        if not await self._exchange(target, route, req, head, framed, reader, conn, ns,
                                                    pool):
                            return
                    finally:
                        self._exchanging -= 1
                if self._stopping and not reader.buf:
                    return self._park(conn, inode, vip, peer)
                try:
                    with self._waiting_for_head():
                        self._idle[task] = None
                        try:
                            async with asyncio.timeout(KEEPALIVE_IDLE):
                                head = await reader.head(self.head_limit)
                        finally:
                            self._idle.pop(task, None)
                    if head is None:
                        return
                    req, framed = parse_head(head), http1.parse(head)
                except asyncio.CancelledError:
                    if self._stopping and not reader.buf:
                        return self._park(conn, inode, vip, peer)
                    raise
                except (BadRequest, http1.FramingError):
                    self.stats.bad_requests += 1
                    return await self._answer(conn, b"", 400)
                except TimeoutError:
                    return
                route = await self._decide(target, req, framed, peer, vip)
                if not isinstance(route, Routed):
                    status, body, extra, keepable = route
                    if not await self._answer(conn, b"", status, body, extra, keepable and self._may_keep(framed)):
                        return
                    continue
                first = head, framed, route, req
        finally:
            for sock, _ in pool.values():
                sock.close()

    def _park(self, conn: socket.socket, inode: int, vip: tuple, peer: tuple) -> None:
        """Keep ``conn`` (between two requests) for the fd store."""
        try:
            self._parked[conn] = fdstore.keepalive_name(splice.cookie(conn), inode, vip, peer)
        except OSError:
            pass

    async def _exchange(self, target: Target, routed: Routed, req: Request, head: bytes, framed: http1.Head,
                        reader: http1.Reader, conn: socket.socket, ns: netns.Netns | None, pool: dict) -> bool:
        """One request to its upstream (retried as its route's retry policy
        says) and its response back; whether the connection goes on."""
        keep = self._may_keep(framed)   # after an answer of its own, as Envoy
        route = routed.route
        cluster = target.clusters.get(routed.cluster)
        if cluster is None:
            self.stats.upstream_failures += 1
            return await self._answer(conn, b"", *routed.answer(503, b"no healthy upstream"), keep=keep)
        loop = asyncio.get_running_loop()
        if "100-continue" in framed.tokens("expect"):
            # As Envoy (proxy_100_continue off): the 100 comes from here and
            # the upstream never sees the Expect.
            await splice.sendall(loop, conn, CONTINUE)
            framed = http1.Head(framed.start, tuple(h for h in framed.headers if h[0].lower() != "expect"))
            head = http1.serialize(framed.start, framed.headers)
        framing = http1.request_framing(framed)
        policy = route.retry if route.retry is not None and route.retry.applies(req) else None
        mirrors = [m for m in route.mirrors if random.random() * 100 < m.percent]
        held, first = None, b""   # held: the whole body, so that a retry or a mirror can send it again
        if (policy is not None or mirrors) and framing.kind != "none":
            first, rest = await http1.read_body(reader, framing, route.buffer_limit or RETRY_BUFFER)
            if rest is None:
                held, first = first, b""
            else:
                framing = rest
        # A body over the buffer limit goes up once, as it comes (``first``,
        # then the rest): Envoy does not retry or mirror such a request either.
        if held is not None or framing.kind == "none":
            for m in mirrors:
                self._mirror(target, routed, m, head, framed, held or b"", ns)
        attempts = 1 + (policy.num_retries if policy is not None and (held is not None or framing.kind == "none")
                        else 0)
        deadline = loop.time() + route.timeout_ms / 1000 if route.timeout_ms else None
        avoid: list[tuple] = []   # endpoints a retry should not go to again
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                await asyncio.sleep(policy.back_off(attempt - 1, random.random()))
            last = attempt == attempts
            got = await self._pooled(cluster, ns, pool, avoid)
            if got is None:
                if not last and policy.on_connect_failure:
                    continue
                self.stats.upstream_failures += 1
                return await self._answer(conn, b"", *routed.answer(503, UPSTREAM_FAILURE, attempt=attempt), keep=keep)
            ep = got[0]
            if policy.other_hosts if policy is not None else False:
                avoid.append(ep)
            self.stats.routed += 1
            self.balancer.opened(cluster, ep)
            try:
                done = await self._attempt(routed, head, framed, framing, held or first, held is not None, reader,
                                           conn, got, pool, attempt, policy, not last, deadline, keep, cluster)
            finally:
                self.balancer.closed(cluster, ep)
            if done is not None:
                return done
        return False   # pragma: no cover - the last attempt always decides

    def _mirror(self, target: Target, routed: Routed, m: rt.Mirror, head: bytes, framed: http1.Head,
                body: bytes, ns: netns.Netns | None) -> None:
        """A copy of the request to the mirror's cluster, its answer dropped
        (as Envoy's request_mirror_policies): Host with '-shadow'."""
        cluster = target.clusters.get(m.cluster)
        if cluster is None:
            return
        shadow = replace(routed, route=replace(routed.route, rewrite_host=m.host(routed.host(framed))))
        data = shadow.upstream_head(head, framed, 1) + body
        timeout = routed.route.timeout_ms / 1000 if routed.route.timeout_ms else rt.DEFAULT_TIMEOUT_MS / 1000

        async def send() -> None:
            order = self.balancer.order(cluster)
            sock = await self._connect_one(cluster, order[0], ns) if order else None
            if sock is None:
                return
            try:
                loop = asyncio.get_running_loop()
                async with asyncio.timeout(timeout):
                    await splice.sendall(loop, sock, data)
                    r = http1.Reader(sock)
                    rhead = await r.head(self.head_limit)
                    if rhead is not None:   # read (up to 1 MiB): the backend sees a whole exchange
                        await http1.read_body(r, http1.response_framing(http1.parse(rhead), framed.start[0]), 1 << 20)
            except (OSError, TimeoutError, http1.FramingError):
                pass
            finally:
                sock.close()
        self.stats.mirrored += 1
        task = asyncio.ensure_future(send())
        self._mirroring.add(task)
        task.add_done_callback(self._mirroring.discard)

    async def _attempt(self, routed: Routed, head: bytes, framed: http1.Head, framing: http1.Framing,
                       body: bytes, whole: bool, reader: http1.Reader, conn: socket.socket, got: tuple, pool: dict,
                       attempt: int, policy: rt.Retry | None, may_retry: bool, deadline: float | None,
                       keep: bool, cluster: Cluster) -> bool | None:
        """One attempt on the connection ``got`` (endpoint, socket, reader):
        whether the client connection goes on, or None to retry (only when
        ``may_retry`` and the retry ``policy`` says so). ``body``: the body
        read already (all of it when ``whole``; else the rest follows from
        ``reader``). ``keep``: the connection may go on after an answer of
        the daemon's own."""
        retry = policy if may_retry else None
        ep, upstream, ureader = got
        loop = asyncio.get_running_loop()
        upload = None

        async def drop(reset: bool = False) -> None:
            """Let the upstream connection go: the body's upload first (its
            watcher on the socket must be gone before the socket is: the
            event loop aborts on a closed descriptor it still polls)."""
            nonlocal upload
            pool.pop(ep, None)
            if upload is not None:
                upload.cancel()
                await asyncio.gather(upload, return_exceptions=True)
                upload = None
            splice.reset(upstream) if reset else upstream.close()
        try:
            await splice.sendall(loop, upstream, routed.upstream_head(head, framed, attempt) + body)
            if not whole and framing.kind != "none":
                # The body goes up while the response may already come (an
                # early answer).
                upload = asyncio.ensure_future(http1.copy_body(reader, upstream, framing))
                upload.add_done_callback(lambda t: t.cancelled() or t.exception())
            per_try = policy.per_try_timeout_ms / 1000 if policy is not None and policy.per_try_timeout_ms else None
            while True:
                left = deadline - loop.time() if deadline is not None else None
                wait = min(x for x in (left, per_try) if x is not None) if left or per_try else None
                try:
                    async with asyncio.timeout(wait):
                        rhead = await ureader.head(self.head_limit)
                except TimeoutError:
                    had_upload = upload is not None
                    await drop(reset=True)   # as on a spliced connection: the upstream sees the request cancelled
                    if retry is not None and retry.on_reset and (deadline is None or loop.time() < deadline):
                        return None          # a per-try timeout
                    return await self._answer(conn, b"", *routed.answer(504, UPSTREAM_TIMEOUT, attempt=attempt),
                                              keep=keep and not had_upload)
                if rhead is None:   # reset or closed before a response
                    had_upload = upload is not None
                    await drop()
                    if retry is not None and retry.on_reset:
                        return None
                    self.stats.upstream_failures += 1
                    return await self._answer(conn, b"", *routed.answer(503, UPSTREAM_RESET, attempt=attempt),
                                              keep=keep and not had_upload)
                resp = http1.parse(rhead)
                if not 100 <= resp.status < 200:
                    break
                if resp.status == 101:   # switched protocols: bytes both ways until either side ends
                    await splice.sendall(loop, conn, rhead)
                    pool.pop(ep, None)
                    if upload is not None:
                        upload.cancel()
                    raw = asyncio.ensure_future(self._raw(reader, upstream))
                    await ureader.copy_to_end(conn)
                    raw.cancel()
                    return False
                # Another 1xx (the Expect was answered here): not passed on.
            # Outlier detection counts 5xx responses as Envoy's
            # consecutive_5xx does (the daemon's own counts, docs/l7.md).
            if resp.status >= 500:
                self.balancer.failed(cluster, ep)
            else:
                self.balancer.succeeded(cluster, ep)
            if retry is not None and retry.on_response(resp.status, resp.headers):
                await drop()
                return None
            rframing = http1.response_framing(resp, framed.start[0])
            # The head and what is already here of a sized body in one send:
            # one wake-up of the client for a small response, not two.
            ahead = ureader.take(rframing.length if rframing.kind == "length" else 0)
            rhead = routed.response_head(rhead, resp, attempt)
            await splice.sendall(loop, conn, rhead + ahead if ahead else rhead)
            if rframing.kind == "length":
                rframing = http1.Framing("length", rframing.length - len(ahead))
            await http1.copy_body(ureader, conn, rframing)
            if upload is not None:
                await upload
                upload = None
            if rframing.kind == "close" or not resp.keep_alive():
                await drop()
                return False
            return framed.keep_alive()
        except (OSError, http1.FramingError):
            await drop()
            return False
        finally:
            if upload is not None:
                upload.cancel()

    @staticmethod
    async def _raw(reader: http1.Reader, dst: socket.socket) -> None:
        try:
            await reader.copy_to_end(dst)
        except OSError:
            pass

    async def _pooled(self, cluster: Cluster, ns: netns.Netns | None, pool: dict,
                      avoid: list) -> tuple[tuple, socket.socket, http1.Reader] | None:
        """(endpoint, socket, reader) for one attempt: the LB's choice among
        the endpoints not in ``avoid`` (all of them when that leaves none),
        over the client connection's idle connection to it when there is
        one. None: the connect failed (the endpoint is added to ``avoid``)."""
        order = self.balancer.order(cluster)
        ep = next((e for e in order if e not in avoid), order[0] if order else None)
        if ep is None:
            return None
        if ep in pool:
            return ep, *pool[ep]
        upstream = await self._connect_one(cluster, ep, ns)
        if upstream is None:
            avoid.append(ep)
            return None
        pool[ep] = upstream, http1.Reader(upstream)
        return ep, *pool[ep]

    async def _forward(self, target: Target, routed: Routed, head: bytes, framed: http1.Head, conn: socket.socket,
                       ns: netns.Netns | None, req: Request) -> None:
        cluster = target.clusters.get(routed.cluster)
        upstream, ep = await self._connect(cluster, routed.route.retries, ns) if cluster else (None, None)
        if upstream is None:
            self.stats.upstream_failures += 1
            return await self._answer(conn, head, 503, UPSTREAM_FAILURE if cluster else b"no healthy upstream")
        self.stats.routed += 1
        self.balancer.opened(cluster, ep)
        try:
            await self._carry(routed.route, head, routed.upstream_head(head, framed), conn, upstream)
        finally:
            self.balancer.closed(cluster, ep)

    async def _carry(self, route, head: bytes, upstream_head: bytes, conn: socket.socket,
                     upstream: socket.socket) -> None:
        """The routed connection until it ends: spliced, else relayed."""
        timeout = route.timeout_ms / 1000 if route.timeout_ms else None
        rewrites = upstream_head is not head
        cookies = self.splicer.splice(conn, upstream) if self.splicer and not rewrites else None
        if cookies is None:
            return await self._relay(head, upstream_head, conn, upstream, timeout)
        if not await self.splicer.carry(conn, upstream, cookies, timeout, response(504, UPSTREAM_TIMEOUT)):
            self.stats.answer(504)

    async def _relay(self, head: bytes, upstream_head: bytes, conn: socket.socket, upstream: socket.socket,
                     timeout: float | None) -> None:
        """The connection through the daemon: a route that rewrites the head
        (the kernel cannot), or a connection the kernel would not splice.
        Same socket helpers as the splice's own relay; closes upstream."""
        loop = asyncio.get_running_loop()
        upload = None
        try:
            conn.recv(len(head))   # peeked, so all there
            await splice.sendall(loop, upstream, upstream_head)
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
            if upload is not None:   # gone before the socket it watches (the loop aborts otherwise)
                upload.cancel()
                await asyncio.gather(upload, return_exceptions=True)
            upstream.close()

    async def _connect(self, cluster: Cluster, retries: int,
                       ns: netns.Netns | None) -> tuple[socket.socket | None, tuple | None]:
        """A connected upstream socket and its endpoint, trying the LB's
        choice and then up to ``retries`` others; (None, None) if none took."""
        for ep in self.balancer.order(cluster)[:1 + retries]:
            sock = await self._connect_one(cluster, ep, ns)
            if sock is not None:
                return sock, ep
        return None, None

    async def _connect_one(self, cluster: Cluster, ep: tuple, ns: netns.Netns | None) -> socket.socket | None:
        """A socket connected to ``ep``, None if the connect failed (counted
        for outlier detection). From the client's namespace: the backend
        sees the workload's address."""
        loop = asyncio.get_running_loop()
        timeout = (cluster.policy.connect_timeout_ms / 1000) or DEFAULT_CONNECT_TIMEOUT
        family = socket.AF_INET6 if ":" in ep[0] else socket.AF_INET
        sock = ns.socket(family) if ns else socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(timeout):
                await splice.connect(loop, sock, ep)
        except (OSError, asyncio.TimeoutError):
            sock.close()
            self.stats.connect_failures += 1
            self.balancer.failed(cluster, ep)
            return None
        self.balancer.succeeded(cluster, ep)
        return sock
