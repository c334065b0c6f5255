"""A small ADS management server (state of the world) for tests and benchmarks.

It speaks the real protocol with grpcio and Envoy's generated protos: it
answers subscriptions, pushes new snapshots, records every request (so tests
can check ACKs, NACKs, nonces and versions), can send resources of its own
making (bad ones included), kill its streams and restart on the same port.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from kmesh.xds import resources as rt

_CLOSE = object()


@dataclass
class Request:
    type: str
    version_info: str
    nonce: str
    names: list[str]
    error: str
    node_id: str
    time: float = field(default_factory=time.time)

    @property
    def is_nack(self) -> bool:
        return bool(self.error)


class _Stream:
    def __init__(self):
        self.out: queue.Queue = queue.Queue()
        self.subscribed: dict[str, set[str] | None] = {}   # type url -> names (None = wildcard)
        self.nonces = itertools.count(1)


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, port: int = 0, tls: tuple[bytes, bytes] | None = None):
        self.port = port
        self.tls = tls   # (private key PEM, certificate chain PEM)
        self.requests: list[Request] = []
        self.snapshot: dict[str, dict[str, any_pb2.Any]] = {t.url: {} for t in rt.ALL}
        self.versions: dict[str, int] = {t.url: 0 for t in rt.ALL}
        self.streams: list[_Stream] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._server = None

    # -- lifecycle --------------------------------------------------------
    def start(self) -> "XdsServer":
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        if self.tls:
            creds = grpc.ssl_server_credentials([self.tls])
            self.port = self._server.add_secure_port(f"127.0.0.1:{self.port}", creds)
        else:
            self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        self._server.start()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill_streams(self) -> None:
        with self.lock:
            for s in self.streams:
                s.out.put(_CLOSE)

    def stop(self) -> None:
        self.kill_streams()
        if self._server:
            self._server.stop(grace=0).wait()
            self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- content ------------------------------------------------------------
    def set(self, t: rt.ResourceType, resources: list, push: bool = True, replace: bool = True) -> str:
        """Replace (or, with replace=False, add to) a type's resources and push."""
        anys = {}
        for r in resources:
            if isinstance(r, any_pb2.Any):
                msg = t.message()
                r.Unpack(msg)
                anys[t.name_of(msg)] = r
            else:
                a = any_pb2.Any()
                a.Pack(r)
                anys[t.name_of(r)] = a
        with self.lock:
            self.snapshot[t.url] = anys if replace else {**self.snapshot[t.url], **anys}
            self.versions[t.url] += 1
            version = str(self.versions[t.url])
            if push:
                for s in self.streams:
                    self._push(s, t, only=None if replace else set(anys))
        return version

    def push(self, types) -> None:
        """Push the current snapshot of ``types`` to every stream (after
        ``set(..., push=False)``: lets a benchmark build big snapshots first)."""
        with self.lock:
            for s in self.streams:
                for t in types:
                    self._push(s, t)

    def send_raw(self, t: rt.ResourceType, anys: list[any_pb2.Any], version: str = "bad") -> None:
        """Push exactly these Any resources (for bad-resource tests)."""
        with self.lock:
            for s in self.streams:
                if t.url in s.subscribed:
                    s.out.put(discovery_pb2.DiscoveryResponse(
                        type_url=t.url, version_info=version, resources=anys, nonce=str(next(s.nonces))))

    def _push(self, s: _Stream, t: rt.ResourceType, only: set[str] | None = None) -> None:
        if t.url not in s.subscribed:
            return
        names = s.subscribed[t.url]
        res = [a for n, a in self.snapshot[t.url].items()
               if (names is None or n in names) and (only is None or n in only)]
        s.out.put(discovery_pb2.DiscoveryResponse(
            type_url=t.url, version_info=str(self.versions[t.url]), resources=res, nonce=str(next(s.nonces))))

    # -- the RPC ------------------------------------------------------------
    def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802
        stream = _Stream()
        with self.lock:
            self.streams.append(stream)
        node_id = ""

        def read():
            nonlocal node_id
            try:
                for req in request_iterator:
                    node_id = node_id or req.node.id
                    t = rt.BY_URL.get(req.type_url)
                    with self.lock:
                        self.requests.append(Request(t.short if t else req.type_url, req.version_info,
                                                     req.response_nonce, list(req.resource_names),
                                                     req.error_detail.message, node_id))
                        self.changed.notify_all()
                        if t is None:
                            continue
                        names = None if t.wildcard else set(req.resource_names)
                        new_sub = t.url not in stream.subscribed or stream.subscribed[t.url] != names
                        stream.subscribed[t.url] = names
                        if new_sub or not req.response_nonce:
                            self._push(stream, t)
            except grpc.RpcError:
                pass
            stream.out.put(_CLOSE)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            while True:
                item = stream.out.get()
                if item is _CLOSE:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "stream closed by the test server")
                yield item
        finally:
            with self.lock:
                if stream in self.streams:
                    self.streams.remove(stream)

    # -- assertions helpers -------------------------------------------------
    def wait_for(self, predicate, timeout: float = 10.0):
        """Wait until predicate(requests) is truthy; returns its value."""
        end = time.monotonic() + timeout
        with self.lock:
            while True:
                got = predicate(list(self.requests))
                if got:
                    return got
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; requests so far: {self.requests[-10:]}")
                self.changed.wait(left)

    def wait_ack(self, t: rt.ResourceType, version: str, timeout: float = 10.0) -> Request:
        return self.wait_for(lambda reqs: next((r for r in reversed(reqs) if r.type == t.short and r.nonce
                                                and r.version_info == version and not r.is_nack), None), timeout)

    def wait_nack(self, t: rt.ResourceType, timeout: float = 10.0) -> Request:
        return self.wait_for(lambda reqs: next((r for r in reversed(reqs) if r.type == t.short and r.is_nack),
                                               None), timeout)
