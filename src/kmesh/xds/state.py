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

What was accepted is kept as a content fingerprint per resource, to tell
what a response changes; the translation lives in the MeshBuilder, which
also keeps the listeners and route configurations (few) it may translate
again. A resource whose fingerprint is unchanged is not translated again.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from kmesh.config.errors import ConfigError
from kmesh.config.model import MeshConfig
from kmesh.config.builder import Change, Inputs, MeshBuilder
from kmesh.xds import resources as rt


class _Outcome(Protocol):
    ok: bool


_Applied = TypeVar("_Applied", bound=_Outcome)

log = logging.getLogger("kmesh.xds")

INVALID_ARGUMENT = 3  # google.rpc.Code
# Resources the builder keeps (it translates a listener again when a route
# configuration changes); serialized: a parsed protobuf costs several times
# its wire size. The others are handed over parsed, translated and dropped.
_KEPT_SERIALIZED = (rt.LDS, rt.RDS)
_INPUT = {rt.CDS: "clusters", rt.EDS: "endpoints", rt.LDS: "listeners", rt.RDS: "routes"}


def fingerprint(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def _leading_name(raw: bytes) -> str | None:
    """The name (field 1 of all four types) of a serialized resource when it
    is the first field and shorter than 128 bytes, as serializers write it;
    None: parse to know. Only trusted together with a known fingerprint."""
    if len(raw) < 2 or raw[0] != 0x0A or raw[1] >= 0x80:   # tag 1, length-delimited; one-byte length
        return None
    try:
        return raw[2:2 + raw[1]].decode()
    except UnicodeDecodeError:
        return None


@dataclass
class TypeState:
    type: rt.ResourceType
    resources: dict = field(default_factory=dict)   # accepted: name -> fingerprint
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
        self._static_in = None        # the static config the builder holds (self.static after the next push)
        self.types = {t.url: TypeState(t) for t in rt.ALL}
        self.builder = MeshBuilder("xDS", lenient=True, cluster_origin="CDS or static_resources.clusters",
                                   eds=True, rds=True)
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
    @staticmethod
    def _static_maps(static) -> dict[rt.ResourceType, dict]:
        sr = static.bootstrap.static_resources if static else None
        if sr is None:
            return {rt.CDS: {}, rt.LDS: {}}
        return {rt.CDS: {pb.name: (f"static_resources.clusters[{i}]", pb) for i, pb in enumerate(sr.clusters)},
                rt.LDS: {pb.name: (f"static_resources.listeners[{i}]", pb) for i, pb in enumerate(sr.listeners)}}

    def _prepare(self, static, t: rt.ResourceType | None = None, changes: dict | None = None,
                 accepted: dict | None = None) -> Change:
        """The builder change for a response of type ``t`` (``changes``: what
        it changes, ``accepted``: its names once accepted) with the static
        resources going from those the builder holds to ``static``."""
        inputs = Inputs()
        if t is not None:
            setattr(inputs, _INPUT[t], changes)
        old, new = self._static_maps(self._static_in), self._static_maps(static)
        for w in (rt.CDS, rt.LDS):
            xds = accepted if w is t else self.ts(w).resources
            setattr(inputs, _INPUT[w], _under_static(getattr(inputs, _INPUT[w]), xds, old[w], new[w],
                                                     static is not self._static_in))
        return self.builder.prepare(inputs)

    def check_static(self, static) -> list[str]:
        """Check a static config against the accepted xDS state without
        applying it; returns its warnings, raises ConfigError."""
        with self.lock:
            change = self._prepare(static)
        return [w for group in (change.clusters, change.listeners, change.keys)
                for st in group.values() if st for w in self.builder.notes(st, "warnings")]

    def replace_static(self, static, apply_fn: Callable[[Change], _Applied]) -> _Applied:
        """A new static config (SIGHUP, admin API), applied with the accepted
        xDS resources under the same lock as pushes, so neither undoes the
        other. Raises ConfigError; returns what ``apply_fn(change)`` returns
        (kept only if it says ok)."""
        with self.lock:
            change = self._prepare(static)
            res = apply_fn(change)
            if res.ok:
                self.builder.commit(change)
                self.static = self._static_in = static
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
        """name -> (fingerprint, resource): parsed, or serialized for the
        types the builder keeps; None for one as accepted (a wildcard type
        comes whole in every response, and most of it is unchanged)."""
        out = {}
        kept = t in _KEPT_SERIALIZED
        accepted = self.ts(t).resources
        for i, anyres in enumerate(resp.resources):
            if anyres.type_url != t.url:
                raise ValueError(f"{t.short} resources[{i}]: type {anyres.type_url} in a {t.short} response")
            raw = anyres.value
            fp = fingerprint(raw)
            name = _leading_name(raw)
            if name is not None and accepted.get(name) == fp:
                # The bytes accepted under that name: it parsed to it then.
                name, res = sys.intern(name), None
            else:
                msg = t.message()
                try:
                    anyres.Unpack(msg)   # not FromString(raw): the message would keep raw alive
                except DecodeError as e:
                    raise ValueError(f"{t.short} resources[{i}]: cannot decode: {e}") from None
                # Interned: a cluster's name is also held by every reference to it.
                name, res = sys.intern(t.name_of(msg)), (raw if kept else msg)
                if not name:
                    raise ValueError(f"{t.short} resources[{i}]: a resource needs a name")
            if name in out:
                raise ValueError(f"{t.short}[{name}]: the name appears twice in one response")
            out[name] = (fp, res)
        return out

    def _changes(self, t: rt.ResourceType, received: dict) -> tuple[dict, dict]:
        """(what a response changes: name -> (path, resource) or None when
        removed, the accepted fingerprints once it is accepted). A resource
        with the fingerprint already accepted is no change."""
        s = self.ts(t)
        if t.wildcard:
            accepted = {n: fp for n, (fp, _) in received.items()}
        else:   # a part of the subscribed names; what it leaves out stays
            received = {n: v for n, v in received.items() if n in s.subscribed}
            accepted = {**s.resources, **{n: fp for n, (fp, _) in received.items()}}
        changes: dict = {n: (f"{t.short}[{n}]", res) for n, (fp, res) in received.items()
                         if s.resources.get(n) != fp}
        if t.wildcard:
            changes.update((n, None) for n in s.resources if n not in accepted)
        return changes, accepted

    def _handle(self, t: rt.ResourceType, resp) -> list[discovery_pb2.DiscoveryRequest]:
        s = self.ts(t)
        s.responses += 1
        s.nonce = resp.nonce
        started = time.monotonic()
        try:
            received = self._decode(t, resp)
            changes, accepted = self._changes(t, received)
            change = self._prepare(self.static, t, changes, accepted)
            if not self.hold_until_warm:
                self.apply(change, self.builder.mesh)
            elif self._warm(handling=t, accepted=accepted, change=change):
                # After a restart: reconcile the pinned maps with the whole model.
                self.apply(None, lambda: self.builder.mesh(change))
                self.hold_until_warm = False
        except Exception as e:   # noqa: BLE001 - every response gets its ACK or NACK
            reason = str(e) if isinstance(e, (ValueError, ConfigError, OSError)) else f"internal error: {e!r}"
            if not isinstance(e, (ValueError, ConfigError, OSError)):
                log.exception("internal error while handling an xDS response; NACKed")
            s.last_nack = {"version_info": resp.version_info, "nonce": resp.nonce, "error": reason,
                           "time": time.time()}
            log.error("xDS response rejected (NACK); the previous config stays in force",
                      extra={"kv": {"type": t.short, "version": resp.version_info, "error": reason}})
            return [self._request(t, nonce=resp.nonce, error=reason)]

        self.builder.commit(change)
        self._static_in = self.static
        s.resources = accepted
        s.version = resp.version_info
        s.last_ack = {"version_info": resp.version_info, "nonce": resp.nonce, "resources": len(received),
                      "time": time.time(), "apply_ms": round((time.monotonic() - started) * 1000, 3)}
        log.log(logging.INFO if t.wildcard else logging.DEBUG, "xDS response applied (ACK)", extra={"kv": {
            "type": t.short, "version": resp.version_info, "resources": len(received),
            "changed_clusters": len(change.clusters), "changed_addresses": len(change.keys),
            "ms": s.last_ack["apply_ms"]}})
        reqs = [self._request(t, nonce=resp.nonce)]
        reqs += self._follow_ups(t)
        if not self.synced.is_set() and self._warm():
            self.synced.set()
        return reqs

    def _warm(self, handling: rt.ResourceType | None = None, accepted: dict | None = None,
              change: Change | None = None) -> bool:
        """The first full set is in: CDS and LDS received, and every EDS and
        RDS resource the config references too (``handling``: a response
        being handled, with its ``accepted`` names and builder ``change``)."""
        for t in (rt.CDS, rt.LDS):
            if not (self.ts(t).last_ack or t is handling):
                return False
        services, routes = self.builder.needed(change)
        names = {t: (accepted if t is handling else self.ts(t).resources) for t in (rt.EDS, rt.RDS)}
        return services <= names[rt.EDS].keys() and routes <= names[rt.RDS].keys()

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
        gone = [n for n in s.resources if n not in names]
        if gone:
            s.resources = {n: fp for n, fp in s.resources.items() if n in names}
            # Nothing uses them any more: a plain removal, which cannot fail.
            self.builder.commit(self.builder.prepare(Inputs(**{_INPUT[t]: dict.fromkeys(gone)})))
        return [self._request(t, nonce=s.nonce)]

    def as_dict(self) -> dict:
        with self.lock:
            return {s.type.short: s.as_dict() for s in self.types.values()}


def _under_static(changes: dict, xds, old: dict, new: dict, static_changed: bool) -> dict:
    """Changes of a wildcard type (CDS, LDS) with the static resources of
    that type underneath: xDS wins on a name clash, and a static resource is
    back when the xDS one of its name goes. ``xds``: the names accepted after
    the change; ``old``/``new``: the static resources before and after."""
    if not (new or static_changed):
        return changes
    out = {}
    for n in [*new, *changes, *(n for n in old if n not in new)]:   # config order: static resources first
        if n in out:
            continue
        if n in changes:
            got = changes[n]
            out[n] = got if got is not None else new.get(n)
        elif static_changed and n not in xds and old.get(n) != new.get(n):
            out[n] = new.get(n)
    return out
