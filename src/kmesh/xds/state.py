"""ADS protocol bookkeeping, without I/O (unit-testable).

State of the world, as Envoy does it:

* CDS and LDS are wildcard subscriptions; a response holds the whole set,
  so a name missing from it is removed.
* EDS and RDS are subscribed by name (the EDS clusters' service names, the
  route names the HTTP connection managers reference); a response may hold a
  part of them, and what it leaves out stays as it was.
* Every response is answered: an ACK carries its version_info and nonce; a
  NACK carries the nonce, the last accepted version and an error_detail that
  names each resource and reason. A NACKed response changes nothing.
* CDS is requested first; LDS once the first CDS response is handled, so the
  clusters (and, through EDS, their endpoints) are there before listeners
  point at them. A cluster waiting for its endpoints, or a listener waiting
  for its routes, is left out of the maps until they arrive (warming).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from kmesh.config.errors import ConfigError
from kmesh.config.model import MeshConfig
from kmesh.config.builder import MeshBuilder
from kmesh.xds import resources as rt

log = logging.getLogger("kmesh.xds")

INVALID_ARGUMENT = 3  # google.rpc.Code


@dataclass
class TypeState:
    type: rt.ResourceType
    resources: dict = field(default_factory=dict)   # accepted: name -> serialized resource
    version: str = ""                               # accepted version_info
    nonce: str = ""                                 # of the last response
    subscribed: set[str] = field(default_factory=set)
    sorted_names: list[str] | None = None
    requested: bool = False
    responses: int = 0
    last_ack: dict | None = None
    last_nack: dict | None = None

    def as_dict(self) -> dict:
        return {
            "version_info": self.version, "nonce": self.nonce, "resources": len(self.resources),
            "subscribed": "*" if self.type.wildcard else (
                sorted(self.subscribed) if len(self.subscribed) <= 50 else f"{len(self.subscribed)} names"),
            "responses": self.responses, "last_ack": self.last_ack, "last_nack": self.last_nack,
        }


class AdsState:
    """What was accepted per type, and the requests to send in answer.

    ``apply(change, full_mesh)`` is called with what a response changes (a
    builder Change; None after a restart, when ``full_mesh()`` gives the
    whole model to reconcile the pinned maps with) and must raise to refuse
    it: a failed map write NACKs too.
    """

    def __init__(self, node, apply: Callable[[MeshConfig], None], static=None, hold_until_warm: bool = False):
        self.node = node
        self.apply = apply
        # A restarted daemon keeps serving what it pinned until the first full
        # set is in, instead of writing a half-received config over it.
        self.hold_until_warm = hold_until_warm
        self.static = static          # bootstrap.LoadedConfig: static resources apply alongside
        self.types = {t.url: TypeState(t) for t in rt.ALL}
        self.builder = MeshBuilder("xDS", lenient=True, cluster_origin="CDS or static_resources.clusters")
        self.synced = threading.Event()   # first CDS and LDS applied
        self.lock = threading.Lock()
        self._first_request = True

    def ts(self, t: rt.ResourceType) -> TypeState:
        return self.types[t.url]

    # -- requests -----------------------------------------------------------
    def _request(self, t: rt.ResourceType, nonce: str = "", error: str = "") -> discovery_pb2.DiscoveryRequest:
        s = self.ts(t)
        s.requested = True
        req = discovery_pb2.DiscoveryRequest(type_url=t.url, version_info=s.version, response_nonce=nonce)
        if not t.wildcard:
            if s.sorted_names is None:
                s.sorted_names = sorted(s.subscribed)   # every ACK repeats them: sort once
            req.resource_names.extend(s.sorted_names)
        if error:
            req.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT, message=error))
        if self._first_request:
            req.node.CopyFrom(self.node)
            self._first_request = False
        return req

    def on_connect(self) -> list[discovery_pb2.DiscoveryRequest]:
        """A new stream: (re)subscribe to what we had, CDS first; versions
        tell the server what we already hold."""
        with self.lock:
            self._first_request = True
            for s in self.types.values():
                s.nonce = ""
            reqs = [self._request(rt.CDS)]
            if self.ts(rt.CDS).responses:
                for t in (rt.EDS, rt.LDS, rt.RDS):
                    if t.wildcard or self.ts(t).subscribed:
                        reqs.append(self._request(t))
            return reqs

    # -- responses ----------------------------------------------------------
    def _static_maps(self, static) -> tuple[dict, dict]:
        sr = static.bootstrap.static_resources if static else None
        if sr is None:
            return {}, {}
        return ({pb.name: (f"static_resources.clusters[{i}]", pb) for i, pb in enumerate(sr.clusters)},
                {pb.name: (f"static_resources.listeners[{i}]", pb) for i, pb in enumerate(sr.listeners)})

    def _prepare(self, inputs: dict[str, dict], static, builder: MeshBuilder | None = None, **hints):
        sc, sl = self._static_maps(static)
        cds, eds, lds, rds = (rt.WithPaths(t, inputs[t.url]) for t in rt.ALL)
        cmap = {**sc, **cds} if sc else cds
        lmap = {**sl, **lds} if sl else lds
        return (builder or self.builder).prepare(cmap, eds, lmap, rds, **hints)

    def _inputs(self) -> dict[str, dict]:
        return {url: s.resources for url, s in self.types.items()}

    def check_static(self, static) -> list[str]:
        """Check a static config against the accepted xDS state without
        applying it; returns its warnings, raises ConfigError."""
        with self.lock:
            change = self._prepare(self._inputs(), static)
        return [w for group in (change.clusters, change.listeners, change.keys)
                for st in group.values() if st for w in self.builder.notes(st, "warnings")]

    def replace_static(self, static, apply_fn):
        """A new static config (SIGHUP, admin API), applied with the accepted
        xDS resources under the same lock as pushes, so neither undoes the
        other. Raises ConfigError; returns what ``apply_fn(change)`` returns."""
        with self.lock:
            change = self._prepare(self._inputs(), static)
            res = apply_fn(change)
            if getattr(res, "ok", True):
                self.builder.commit(change)
                self.static = static
            return res

    def mesh(self) -> MeshConfig:
        with self.lock:
            return self.builder.mesh()

    def counts(self) -> dict[str, int]:
        with self.lock:
            return self.builder.counts()

    def handle(self, resp: discovery_pb2.DiscoveryResponse) -> list[discovery_pb2.DiscoveryRequest]:
        t = rt.BY_URL.get(resp.type_url)
        if t is None:
            log.warning("response for a type kmesh did not ask for", extra={"kv": {"type_url": resp.type_url}})
            return []
        with self.lock:
            return self._handle(t, resp)

    def _decode(self, t: rt.ResourceType, resp) -> dict:
        """name -> serialized resource. Resources are kept serialized
        (a parsed protobuf costs several times its wire size) and parsed again
        only when they are translated. One equal to the accepted resource keeps
        the accepted object, so the builder sees it as unchanged at once."""
        out = {}
        accepted = self.ts(t).resources
        for i, anyres in enumerate(resp.resources):
            if anyres.type_url != t.url:
                raise ValueError(f"{t.short} resources[{i}]: type {anyres.type_url} in a {t.short} response")
            msg = t.message()
            try:
                anyres.Unpack(msg)
            except DecodeError as e:
                raise ValueError(f"{t.short} resources[{i}]: cannot decode: {e}") from None
            # Interned: a cluster's name is also held by every reference to it.
            name = sys.intern(t.name_of(msg))
            if not name:
                raise ValueError(f"{t.short} resources[{i}]: a resource needs a name")
            if name in out:
                raise ValueError(f"{t.short}[{name}]: the name appears twice in one response")
            old = accepted.get(name)
            raw = anyres.value
            out[name] = old if old == raw else raw
        return out

    def _handle(self, t: rt.ResourceType, resp) -> list[discovery_pb2.DiscoveryRequest]:
        s = self.ts(t)
        s.responses += 1
        s.nonce = resp.nonce
        started = time.monotonic()
        try:
            received = self._decode(t, resp)
            inputs = self._inputs()
            if t.wildcard:
                inputs[t.url] = received
            else:
                inputs[t.url] = {**s.resources, **{n: v for n, v in received.items() if n in s.subscribed}}
            change = self._prepare(inputs, self.static, clusters_changed=t is rt.CDS, listeners_changed=t is rt.LDS,
                                   changed_services=set(received) if t is rt.EDS else None,
                                   changed_routes=set(received) if t is rt.RDS else None)
            fresh = None
            if self.hold_until_warm:
                if self._warm(inputs, handling=t, change=change):
                    # After a restart: reconcile the pinned maps with the whole model.
                    fresh = MeshBuilder("xDS", lenient=True, cluster_origin=self.builder.cluster_origin)
                    fresh.commit(self._prepare(inputs, self.static, builder=fresh))
                    self.apply(None, fresh.mesh)
            else:
                self.apply(change, self.builder.mesh)
        except (ValueError, ConfigError, OSError) as e:
            reason = str(e)
            s.last_nack = {"version_info": resp.version_info, "nonce": resp.nonce, "error": reason,
                           "time": time.time()}
            log.error("xDS response rejected (NACK); the previous config stays in force",
                      extra={"kv": {"type": t.short, "version": resp.version_info, "error": reason}})
            return [self._request(t, nonce=resp.nonce, error=reason)]

        if fresh is not None:
            self.builder, self.hold_until_warm = fresh, False
        else:
            self.builder.commit(change)
        s.resources = inputs[t.url]
        s.version = resp.version_info
        s.last_ack = {"version_info": resp.version_info, "nonce": resp.nonce, "resources": len(received),
                      "time": time.time(), "apply_ms": round((time.monotonic() - started) * 1000, 3)}
        log.log(logging.INFO if t.wildcard else logging.DEBUG, "xDS response applied (ACK)", extra={"kv": {
            "type": t.short, "version": resp.version_info, "resources": len(received),
            "changed_clusters": len(change.clusters), "changed_addresses": len(change.keys),
            "ms": s.last_ack["apply_ms"]}})
        reqs = [self._request(t, nonce=resp.nonce)]
        reqs += self._follow_ups(t)
        if not self.synced.is_set() and self._warm(self._inputs()):
            self.synced.set()
        return reqs

    def _warm(self, inputs: dict, handling: rt.ResourceType | None = None, change=None) -> bool:
        """The first full set is in: CDS and LDS received, and every EDS and
        RDS resource the config references too."""
        for t in (rt.CDS, rt.LDS):
            if not (self.ts(t).last_ack or t is handling):
                return False
        services, routes = self.builder.needed(change)
        return services <= inputs[rt.EDS.url].keys() and routes <= inputs[rt.RDS.url].keys()

    def _follow_ups(self, t: rt.ResourceType) -> list[discovery_pb2.DiscoveryRequest]:
        """Subscriptions that change because of what was just accepted."""
        reqs = []
        if t not in (rt.CDS, rt.LDS):
            return reqs
        services, routes = self.builder.needed()
        if t is rt.CDS:
            reqs += self._resubscribe(rt.EDS, services)
            if not self.ts(rt.LDS).requested:
                reqs.append(self._request(rt.LDS))
        elif t is rt.LDS:
            reqs += self._resubscribe(rt.RDS, routes)
        return reqs

    def _resubscribe(self, t: rt.ResourceType, names: set[str]) -> list[discovery_pb2.DiscoveryRequest]:
        s = self.ts(t)
        if names == s.subscribed and s.requested:
            return []
        s.subscribed, s.sorted_names = names, None
        s.resources = {n: m for n, m in s.resources.items() if n in names}
        return [self._request(t, nonce=s.nonce)]

    def as_dict(self) -> dict:
        with self.lock:
            return {s.type.short: s.as_dict() for s in self.types.values()}
