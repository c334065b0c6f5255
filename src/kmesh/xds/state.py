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
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from kmesh.config import filters
from kmesh.config.errors import ConfigError
from kmesh.config.model import MeshConfig
from kmesh.config.translate import translate
from kmesh.xds import resources as rt

log = logging.getLogger("kmesh.xds")

INVALID_ARGUMENT = 3  # google.rpc.Code


@dataclass
class TypeState:
    type: rt.ResourceType
    resources: dict = field(default_factory=dict)   # accepted: name -> proto
    version: str = ""                               # accepted version_info
    nonce: str = ""                                 # of the last response
    subscribed: set[str] = field(default_factory=set)
    requested: bool = False
    responses: int = 0
    last_ack: dict | None = None
    last_nack: dict | None = None

    def as_dict(self) -> dict:
        return {
            "version_info": self.version, "nonce": self.nonce, "resources": len(self.resources),
            "subscribed": "*" if self.type.wildcard else sorted(self.subscribed),
            "responses": self.responses, "last_ack": self.last_ack, "last_nack": self.last_nack,
        }


class AdsState:
    """What was accepted per type, and the requests to send in answer.

    ``apply(mesh)`` is called with the translation of a candidate state and
    must raise to refuse it (a failed map write NACKs too).
    """

    def __init__(self, node, apply: Callable[[MeshConfig], None], static=None, hold_until_warm: bool = False):
        self.node = node
        self.apply = apply
        # A restarted daemon keeps serving what it pinned until the first full
        # set is in, instead of writing a half-received config over it.
        self.hold_until_warm = hold_until_warm
        self.static = static          # bootstrap.LoadedConfig: static resources apply alongside
        self.types = {t.url: TypeState(t) for t in rt.ALL}
        self.synced = threading.Event()   # first CDS and LDS applied
        self.lock = threading.Lock()
        self._first_request = True
        self._handling = ""

    def ts(self, t: rt.ResourceType) -> TypeState:
        return self.types[t.url]

    # -- requests -----------------------------------------------------------
    def _request(self, t: rt.ResourceType, nonce: str = "", error: str = "") -> discovery_pb2.DiscoveryRequest:
        s = self.ts(t)
        s.requested = True
        req = discovery_pb2.DiscoveryRequest(type_url=t.url, version_info=s.version, response_nonce=nonce)
        if not t.wildcard:
            req.resource_names.extend(sorted(s.subscribed))
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
    def translate(self, candidate: dict[str, dict], static=None) -> MeshConfig:
        """Static resources plus a candidate set of xDS resources."""
        static = static or self.static
        sr = static.bootstrap.static_resources if static else None
        listeners = [(f"static_resources.listeners[{i}]", pb) for i, pb in enumerate(sr.listeners)] if sr else []
        clusters = [(f"static_resources.clusters[{i}]", pb) for i, pb in enumerate(sr.clusters)] if sr else []
        listeners += [(f"LDS[{n}]", pb) for n, pb in candidate[rt.LDS.url].items()]
        clusters += [(f"CDS[{n}]", pb) for n, pb in candidate[rt.CDS.url].items()]
        endpoints = {n: (f"EDS[{n}]", pb) for n, pb in candidate[rt.EDS.url].items()}
        routes = {n: (f"RDS[{n}]", pb) for n, pb in candidate[rt.RDS.url].items()}
        return translate("xDS", listeners, clusters, endpoints=endpoints, routes=routes, lenient=True,
                         cluster_origin="CDS or static_resources.clusters")

    def current(self) -> dict[str, dict]:
        return {url: dict(s.resources) for url, s in self.types.items()}

    def replace_static(self, static, apply_fn):
        """A new static config (SIGHUP, admin API), applied with the accepted
        xDS resources under the same lock as pushes, so neither undoes the
        other. Raises ConfigError; returns what ``apply_fn(mesh)`` returns."""
        with self.lock:
            mesh = self.translate(self.current(), static=static)
            res = apply_fn(mesh)
            if getattr(res, "ok", True):
                self.static = static
            return res

    def handle(self, resp: discovery_pb2.DiscoveryResponse) -> list[discovery_pb2.DiscoveryRequest]:
        t = rt.BY_URL.get(resp.type_url)
        if t is None:
            log.warning("response for a type kmesh did not ask for", extra={"kv": {"type_url": resp.type_url}})
            return []
        with self.lock:
            return self._handle(t, resp)

    def _decode(self, t: rt.ResourceType, resp) -> dict:
        out = {}
        for i, anyres in enumerate(resp.resources):
            if anyres.type_url != t.url:
                raise ValueError(f"{t.short} resources[{i}]: type {anyres.type_url} in a {t.short} response")
            msg = t.message()
            try:
                anyres.Unpack(msg)
            except DecodeError as e:
                raise ValueError(f"{t.short} resources[{i}]: cannot decode: {e}") from None
            name = t.name_of(msg)
            if not name:
                raise ValueError(f"{t.short} resources[{i}]: a resource needs a name")
            if name in out:
                raise ValueError(f"{t.short}[{name}]: the name appears twice in one response")
            out[name] = msg
        return out

    def _handle(self, t: rt.ResourceType, resp) -> list[discovery_pb2.DiscoveryRequest]:
        s = self.ts(t)
        s.responses += 1
        s.nonce = resp.nonce
        self._handling = t.url
        started = time.monotonic()
        try:
            received = self._decode(t, resp)
            candidate = self.current()
            if t.wildcard:
                candidate[t.url] = received
            else:
                merged = {**candidate[t.url], **received}
                candidate[t.url] = {n: m for n, m in merged.items() if n in s.subscribed}
            mesh = self.translate(candidate)
            if not self.hold_until_warm or self._warm(candidate):
                self.apply(mesh)
                self.hold_until_warm = False
        except (ValueError, ConfigError, OSError) as e:
            reason = str(e)
            s.last_nack = {"version_info": resp.version_info, "nonce": resp.nonce, "error": reason,
                           "time": time.time()}
            log.error("xDS response rejected (NACK); the previous config stays in force",
                      extra={"kv": {"type": t.short, "version": resp.version_info, "error": reason}})
            return [self._request(t, nonce=resp.nonce, error=reason)]

        for url, res in candidate.items():
            self.types[url].resources = res
        s.version = resp.version_info
        s.last_ack = {"version_info": resp.version_info, "nonce": resp.nonce, "resources": len(received),
                      "time": time.time(), "apply_ms": round((time.monotonic() - started) * 1000, 3)}
        log.info("xDS response applied (ACK)", extra={"kv": {
            "type": t.short, "version": resp.version_info, "resources": len(received),
            "listeners": len(mesh.listeners), "clusters": len(mesh.clusters), "skipped": len(mesh.skipped),
            "ms": s.last_ack["apply_ms"]}})
        reqs = [self._request(t, nonce=resp.nonce)]
        reqs += self._follow_ups(t)
        if self._warm():
            self.synced.set()
        return reqs

    def _warm(self, candidate: dict | None = None) -> bool:
        """The first full set is in: CDS and LDS received, and every
        subscribed EDS and RDS resource too."""
        res = candidate or {url: s.resources for url, s in self.types.items()}
        got = {rt.CDS.url: self.ts(rt.CDS).last_ack, rt.LDS.url: self.ts(rt.LDS).last_ack}
        if candidate is not None:  # the response being handled counts as received
            for url in got:
                got[url] = got[url] or (res is candidate and self._handling == url)
        if not all(got.values()):
            return False
        eds_names = {c.eds_cluster_config.service_name or c.name for c in res[rt.CDS.url].values() if c.type == c.EDS}
        if not eds_names <= set(res[rt.EDS.url]):
            return False
        return rds_names(res[rt.LDS.url].values()) <= set(res[rt.RDS.url])

    def _follow_ups(self, t: rt.ResourceType) -> list[discovery_pb2.DiscoveryRequest]:
        """Subscriptions that change because of what was just accepted."""
        reqs = []
        if t is rt.CDS:
            names = set()
            for c in self.ts(rt.CDS).resources.values():
                if c.type == c.EDS:
                    names.add(c.eds_cluster_config.service_name or c.name)
            reqs += self._resubscribe(rt.EDS, names)
            if not self.ts(rt.LDS).requested:
                reqs.append(self._request(rt.LDS))
        elif t is rt.LDS:
            reqs += self._resubscribe(rt.RDS, rds_names(self.ts(rt.LDS).resources.values()))
        return reqs

    def _resubscribe(self, t: rt.ResourceType, names: set[str]) -> list[discovery_pb2.DiscoveryRequest]:
        s = self.ts(t)
        if names == s.subscribed and s.requested:
            return []
        s.subscribed = names
        s.resources = {n: m for n, m in s.resources.items() if n in names}
        return [self._request(t, nonce=s.nonce)]

    def as_dict(self) -> dict:
        with self.lock:
            return {s.type.short: s.as_dict() for s in self.types.values()}


def rds_names(listeners) -> set[str]:
    """Route names referenced by the HTTP connection managers of listeners."""
    names = set()
    for lst in listeners:
        chains = list(lst.filter_chains) + ([lst.default_filter_chain] if lst.HasField("default_filter_chain") else [])
        for chain in chains:
            for f in chain.filters:
                if f.typed_config.TypeName() == filters.HCM_TYPE:
                    hcm = filters.hcm_pb2.HttpConnectionManager()
                    f.typed_config.Unpack(hcm)
                    if hcm.WhichOneof("route_specifier") == "rds":
                        names.add(hcm.rds.route_config_name)
    return names
