"""Incremental translation: keep each resource's translation, redo only
what a change touches.

A control plane pushes often, and a push usually touches a few resources in
a large mesh (one ClusterLoadAssignment among 10 000). The builder is fed
what changes (``Inputs``) and keeps, per resource, what it translated to and
the notes it produced, plus indexes from EDS service and route names to the
resources that use them and from cluster names to the (ip, port) entries that
reference them. A cluster is kept as its translated head (translate.py): an
endpoints push translates the ClusterLoadAssignments it carries, once per
service, and recomposes the clusters of those services without their
Cluster resources. ``prepare`` computes a Change without touching that state
(so a refused push changes nothing; ``mesh(change)`` shows what it would
make); ``commit`` makes it current. The standalone path uses the same
builder once, from empty, so both modes share one translator.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.message import DecodeError, Message

from kmesh.config.errors import ConfigError
from kmesh.config.model import Cluster, Listener, MeshConfig
from kmesh.config import filters, translate as tr

Key = tuple[str, int]


@dataclass(slots=True)
class Inputs:
    """What changes in the builder's inputs: name -> (field path, resource)
    to add or replace, or None to remove. A resource is a protobuf message
    or its serialized form. Clusters and endpoints are translated and not
    kept; listeners and route configurations are kept as given (a listener
    is translated again when a route configuration it uses changes)."""

    clusters: dict = field(default_factory=dict)
    endpoints: dict = field(default_factory=dict)    # by EDS service name
    listeners: dict = field(default_factory=dict)
    routes: dict = field(default_factory=dict)


@dataclass(slots=True)
class _ClusterState:
    head: tr.ClusterHead
    cluster: Cluster | None
    reason: str              # why it is not governed
    own_path: str | None     # None: the xDS path, CDS[<name>] (not kept: 10 000 strings)
    warnings: tuple          # shared notes, relative to path (translate._share)
    skipped: tuple

    @property
    def path(self) -> str:
        return self.own_path if self.own_path is not None else f"CDS[{self.head.name}]"

    @property
    def governed(self) -> bool:
        return self.cluster is not None

    @property
    def service(self) -> str | None:
        return self.head.service


@dataclass(slots=True)
class _ListenerState:
    pb: object               # the resource, as given
    routes: tuple[str, ...]  # route configurations it uses
    entries: list            # [_Entry]
    seq: int
    path: str
    warnings: tuple
    skipped: tuple


@dataclass(slots=True)
class _KeyState:
    listener: Listener | None
    referenced: tuple[str, ...]
    order: int               # _order(listener seq, entry index): config order
    warnings: tuple
    skipped: tuple
    path: str = ""


@dataclass
class Change:
    """Translated state to make current, name -> state (None: remove)."""

    clusters: dict[str, _ClusterState | None] = field(default_factory=dict)
    services: dict[str, tr.ServiceEndpoints | None] = field(default_factory=dict)
    listeners: dict[str, _ListenerState | None] = field(default_factory=dict)
    routes: dict[str, tuple | None] = field(default_factory=dict)
    keys: dict[Key, _KeyState | None] = field(default_factory=dict)
    next_seq: int = 0

    def cluster_models(self) -> dict[str, Cluster | None]:
        """Changed clusters as the data plane sees them (None: gone or not governed)."""
        return {n: (c.cluster if c else None) for n, c in self.clusters.items()}

    def listener_models(self) -> dict[Key, Listener | None]:
        return {k: (s.listener if s else None) for k, s in self.keys.items()}

    @property
    def empty(self) -> bool:
        return not (self.clusters or self.services or self.listeners or self.routes or self.keys)


class _Packed(bytes):
    """A large serialized resource kept zlib-compressed. Istio sends a port's
    HTTP services as one RouteConfiguration (3.4 MB at 10 000 services, much
    of it alike); it is only read again when a listener using it changes."""


PACK_ABOVE = 64 * 1024


def _pack(resource):
    if isinstance(resource, (bytes, bytearray)) and len(resource) > PACK_ABOVE:
        return _Packed(zlib.compress(resource, 1))
    return resource


def _msg(cls, x):
    """Resources may be held serialized (a parsed protobuf costs several
    times its wire size); parse when needed."""
    if isinstance(x, _Packed):
        x = zlib.decompress(x)
    return cls.FromString(x) if isinstance(x, (bytes, bytearray)) else x


class _Overlay(Mapping):
    """Committed state with a change's on top (None in the change: removed)."""

    __slots__ = ("_base", "_top")

    def __init__(self, base: Mapping, top: Mapping):
        self._base, self._top = base, top

    def __getitem__(self, name):
        got = self._top[name] if name in self._top else self._base[name]
        if got is None:
            raise KeyError(name)
        return got

    def get(self, name, default=None):
        got = self._top[name] if name in self._top else self._base.get(name)
        return default if got is None else got

    def __contains__(self, name):
        return self.get(name) is not None

    def __iter__(self) -> Iterator:
        yield from (n for n in self._base if n not in self._top)
        yield from (n for n, v in self._top.items() if v is not None)

    def __len__(self):
        return sum(1 for _ in self)


class _Parsed(Mapping):
    """name -> (path, message) view over name -> (path, message or bytes)."""

    def __init__(self, inner: Mapping, cls):
        self._inner, self._cls = inner, cls
        self._parsed: dict = {}   # for one prepare(): a route config used by many listeners is parsed once

    def __getitem__(self, name):
        got = self.get(name)
        if got is None:
            raise KeyError(name)
        return got

    def get(self, name, default=None):
        got = self._inner.get(name)
        if got is None:
            return default
        if name not in self._parsed:
            self._parsed[name] = (got[0], _msg(self._cls, got[1]))
        return self._parsed[name]

    def __iter__(self):
        return iter(self._inner)

    def __len__(self):
        return len(self._inner)


class _Index:
    """key -> the set of values indexed under it. Nearly every key has one
    value, kept bare (a one-element set costs ~200 bytes, which adds up over
    a mesh of 10 000 services)."""

    __slots__ = ("_d",)

    def __init__(self):
        self._d: dict = {}

    def get(self, key) -> tuple | set:
        v = self._d.get(key, _NONE)
        return () if v is _NONE else v if type(v) is set else (v,)

    def add(self, key, value) -> None:
        cur = self._d.get(key, _NONE)
        if cur is _NONE:
            self._d[key] = value
        elif type(cur) is set:
            cur.add(value)
        elif cur != value:
            self._d[key] = {cur, value}

    def keys(self):
        return self._d.keys()

    def discard(self, key, value) -> None:
        cur = self._d.get(key, _NONE)
        if type(cur) is set:
            cur.discard(value)
            if len(cur) == 1:
                self._d[key] = next(iter(cur))
        elif cur is not _NONE and cur == value:
            del self._d[key]


_NONE = object()


class MeshBuilder:
    def __init__(self, source: str, lenient: bool, cluster_origin: str = "static_resources.clusters",
                 *, eds: bool = False, rds: bool = False):
        self.source, self.lenient, self.cluster_origin = source, lenient, cluster_origin
        self.eds, self.rds = eds, rds     # whether EDS / RDS exist (ADS mode)
        self.clusters: dict[str, _ClusterState] = {}
        self.services: dict[str, tr.ServiceEndpoints] = {}
        self.listeners: dict[str, _ListenerState] = {}
        self.routes: dict[str, tuple] = {}   # name -> (path, RouteConfiguration or its serialized form)
        self.keys: dict[Key, _KeyState] = {}
        self._services = _Index()        # EDS service -> cluster names
        self._route_users = _Index()     # route name -> listener names
        self._cluster_keys = _Index()    # cluster name -> keys referencing it
        # key -> ((order, _Entry), ...) of every listener, in no particular order
        self._key_entries: dict[Key, tuple] = {}
        self._seq = 0
        # Running totals for counts(): the admin API polls them, and a sum
        # over every resource would take the lock for O(mesh) each time.
        self._totals = {"listeners": 0, "clusters": 0, "warnings": 0, "skipped": 0}

    def _count(self, st, sign: int) -> None:
        t = self._totals
        t["warnings"] += sign * len(st.warnings)
        t["skipped"] += sign * len(st.skipped)
        if isinstance(st, _KeyState):
            t["listeners"] += sign * (st.listener is not None)
        elif isinstance(st, _ClusterState):
            t["clusters"] += sign * st.governed

    def _ctx(self, base: str = "") -> "tr.Ctx":
        return tr.Ctx(self.source, self.cluster_origin, self.lenient, base)

    # -- prepare ------------------------------------------------------------
    def prepare(self, inputs: Inputs) -> Change:
        """Compute what ``inputs`` change; raises ConfigError. The cost
        follows the resources changed and those that use them."""
        change = Change(next_seq=self._seq)
        problems: list = []
        for svc, got in inputs.endpoints.items():
            change.services[svc] = got and self._service(*got)
        change.routes.update(inputs.routes)
        problems += self._prepare_clusters(inputs.clusters, change)
        problems += self._prepare_listeners(inputs.listeners, change)
        if problems:
            raise ConfigError(problems)
        problems += self._prepare_keys(change)
        if problems:
            raise ConfigError(problems)
        return change

    def _service(self, path: str, cla) -> tr.ServiceEndpoints:
        return tr.service_endpoints(self._ctx(), path, _msg(endpoint_pb2.ClusterLoadAssignment, cla))

    @staticmethod
    def _users(index: _Index, names, skip: Mapping, key=None) -> list[str]:
        """Who uses any of ``names``, but for those in ``skip``; sorted (by
        ``key``) so that problems are listed in a stable order."""
        return sorted({u for n in names for u in index.get(n) if u not in skip}, key=key)

    def _prepare_clusters(self, given: dict, change: Change) -> list:
        """New heads for the Cluster resources given; recomposed clusters for
        the services whose endpoints changed."""
        problems = []
        redo: dict[str, tuple[str, tr.ClusterHead]] = {}
        for name, got in given.items():
            if got is None:
                change.clusters[name] = None
                continue
            path, res = got
            ctx = self._ctx(path)
            head = _decoding(ctx, path, tr.cluster_head, lambda: _msg(cluster_pb2.Cluster, res), self.eds)
            if head is None:
                problems += ctx.problems   # else the head carries them to compose_cluster
            else:
                redo[name] = path, head
        for name in self._users(self._services, change.services, given):
            st = self.clusters[name]
            redo[name] = st.path, st.head
        services = _Overlay(self.services, change.services)
        for name, (path, head) in redo.items():
            ctx = self._ctx(path)
            outcome = tr.compose_cluster(ctx, path, head, services)
            problems += ctx.problems
            change.clusters[name] = _ClusterState(head, outcome.cluster, outcome.reason,
                                                  None if path == f"CDS[{head.name}]" else path, *ctx.notes())
        return problems

    def _prepare_listeners(self, given: dict, change: Change) -> list:
        """The listeners given, and those using a route configuration that changed."""
        problems = []
        redo = {}
        for name, got in given.items():
            if got is None:
                change.listeners[name] = None
            else:
                redo[name] = got
        for name in self._users(self._route_users, change.routes, given, key=lambda n: self.listeners[n].seq):
            st = self.listeners[name]
            redo[name] = st.path, st.pb
        routes = _Parsed(_Overlay(self.routes, change.routes), route_pb2.RouteConfiguration) if self.rds else None
        for name, (path, res) in redo.items():
            pb = _msg(listener_pb2.Listener, res)
            ctx = self._ctx(path)
            entries = _decoding(ctx, path, tr.translate_listener, lambda: pb, routes) or []
            used = (_decoding(ctx, path, lambda _c, _p, x: tuple(filters.rds_names([x])), lambda: pb) or ()) \
                if self.rds else ()
            problems += ctx.problems
            old = self.listeners.get(name)
            seq = old.seq if old else change.next_seq
            if old is None:
                change.next_seq += 1
            change.listeners[name] = _ListenerState(res, used, entries, seq, path, *ctx.notes())
        return problems

    def _prepare_keys(self, change: Change) -> list:
        """Resolve again the keys of redone listeners (old and new entries),
        and those referencing a cluster that appeared, went away or changed
        between governed and not."""
        problems = []
        keys: set[Key] = set()
        for name, st in change.listeners.items():
            old = self.listeners.get(name)
            for e in (old.entries if old else []):
                keys.add((e.ip, e.port))
            for e in (st.entries if st else []):
                keys.add((e.ip, e.port))
        for name, st in change.clusters.items():
            old = self.clusters.get(name)
            if (old.governed if old else None) != (st.governed if st else None):
                keys.update(self._cluster_keys.get(name))
        outcome_of = _Overlay(self.clusters, change.clusters).get   # a cluster state has .cluster and .reason

        new_by_key: dict[Key, dict[str, list]] = {}
        for name, st in change.listeners.items():
            for i, e in enumerate(st.entries if st else ()):
                new_by_key.setdefault((e.ip, e.port), {}).setdefault(name, []).append((_order(st.seq, i), e))
        for key in keys:
            entries = self._entries_for(key, change, new_by_key.get(key, {}))
            if not entries:
                change.keys[key] = None
                continue
            ctx = self._ctx()
            lst, referenced = tr.resolve_key(ctx, key, [e for _, e in entries], outcome_of)
            problems += ctx.problems
            change.keys[key] = _KeyState(lst, tuple(referenced), entries[0][0], *ctx.notes())
        return problems

    def _entries_for(self, key: Key, change: Change, new: dict[str, list]) -> list:
        """Entries for a key across listeners, in config order: the committed
        ones of unchanged listeners plus ``new`` (this change's, by listener)."""
        kept = [it for it in self._key_entries.get(key, ()) if it[1].listener not in change.listeners]
        if not kept and len(new) == 1:
            return next(iter(new.values()))
        return sorted(kept + [it for items in new.values() for it in items], key=lambda x: x[0])

    # -- commit -------------------------------------------------------------
    def commit(self, change: Change) -> None:
        for group, states in ((change.clusters, self.clusters), (change.listeners, self.listeners),
                              (change.keys, self.keys)):
            for name, st in group.items():
                if (old := states.get(name)) is not None:
                    self._count(old, -1)
                if st is not None:
                    self._count(st, 1)
        for name, st in change.services.items():
            _put(self.services, name, st)
        for name, st in change.routes.items():
            _put(self.routes, name, (st[0], _pack(st[1])) if st else None)
        for name, st in change.clusters.items():
            old = _put(self.clusters, name, st)
            if old and st and old.head is st.head:
                continue   # recomposed with new endpoints: same service
            if old and old.service:
                self._services.discard(old.service, name)
            if st and st.service:
                self._services.add(st.service, name)
        canon = {k: k for k in change.keys}
        for name, st in change.listeners.items():
            old = _put(self.listeners, name, st)
            if old:
                for r in old.routes:
                    self._route_users.discard(r, name)
                for key in {(e.ip, e.port) for e in old.entries}:
                    left = tuple(it for it in self._key_entries.get(key, ()) if it[1].listener != name)
                    if left:
                        self._key_entries[key] = left
                    else:
                        self._key_entries.pop(key, None)
            if st:
                for r in st.routes:
                    self._route_users.add(r, name)
                for i, e in enumerate(st.entries):
                    key = (e.ip, e.port)
                    key = canon.get(key, key)   # one tuple per address, shared with self.keys
                    self._key_entries[key] = self._key_entries.get(key, ()) + ((_order(st.seq, i), e),)
        for key, st in change.keys.items():
            old = _put(self.keys, key, st)
            if old:
                for c in old.referenced:
                    self._cluster_keys.discard(c, key)
            if st:
                for c in st.referenced:
                    self._cluster_keys.add(c, key)
        self._seq = change.next_seq

    # -- views ----------------------------------------------------------------
    def mesh(self, change: Change | None = None) -> MeshConfig:
        """The whole current model, or the one ``change`` would make current
        (O(size): for the admin API, a full reconcile and tests)."""
        clusters, listeners, keys = ((_Overlay(self.clusters, change.clusters),
                                      _Overlay(self.listeners, change.listeners), _Overlay(self.keys, change.keys))
                                     if change is not None else (self.clusters, self.listeners, self.keys))
        ordered = sorted(keys.values(), key=lambda st: st.order)
        warnings, skipped = [], []
        for group in (clusters.values(), listeners.values(), ordered):
            for st in group:
                warnings += self.notes(st, "warnings")
                skipped += self.notes(st, "skipped")
        return MeshConfig(tuple(st.listener for st in ordered if st.listener),
                          tuple(st.cluster for st in clusters.values() if st.governed),
                          tuple(warnings), tuple(skipped))

    def notes(self, st, kind: str) -> list[str]:
        """A resource state's warnings or skipped notes, as shown."""
        return [tr.note_text(self.source, st.path, n) for n in getattr(st, kind)]

    def needed(self, change: Change | None = None) -> tuple[set[str], set[str]]:
        """EDS services and route names the (changed) config references."""
        if change is None:
            return set(self._services.keys()), set(self._route_users.keys())
        clusters = _Overlay(self.clusters, change.clusters)
        listeners = _Overlay(self.listeners, change.listeners)
        return ({st.service for st in clusters.values() if st.service},
                {r for st in listeners.values() for r in st.routes})

    def counts(self) -> dict[str, int]:
        return dict(self._totals)


def _decoding(ctx: "tr.Ctx", path: str, translate, resource, *args):
    """``translate(ctx, path, resource(), *args)``; a typed_config inside
    that does not decode (bytes from a control plane) is a problem of the
    resource, as Envoy refuses it, not an exception."""
    try:
        return translate(ctx, path, resource(), *args)
    except DecodeError as e:
        ctx.error(path, f"a typed_config inside cannot be decoded: {e}")
        return None


def _order(seq: int, index: int) -> int:
    """Config order of a listener's index-th entry, as one int."""
    return seq << 24 | index


def _put(states: dict, name, st):
    """Set or remove (None) ``name``; returns what it replaced."""
    if st is None:
        return states.pop(name, None)
    old = states.get(name)
    states[name] = st
    return old


# -- the whole pipeline at once ---------------------------------------------

def translate(source: str, listeners: Sequence[tuple[str, listener_pb2.Listener]],
              clusters: Sequence[tuple[str, cluster_pb2.Cluster]],
              *, endpoints: Mapping[str, tuple[str, Message]] | None = None,
              routes: Mapping[str, tuple[str, Message]] | None = None,
              lenient: bool = False, cluster_origin: str = "static_resources.clusters") -> MeshConfig:
    """Translate resources; raises ConfigError listing every problem found.

    ``listeners``/``clusters`` are (field path, proto) pairs and
    ``endpoints``/``routes`` map a resource name to one, so that problems
    point into the source each resource came from. ``endpoints`` and
    ``routes`` are None where EDS / RDS do not exist (standalone).
    """
    dup = tr.Ctx(source, cluster_origin, lenient)
    cmap: dict[str, tuple[str, Message]] = {}
    for path, pb in clusters:
        if not pb.name:
            cmap[f"\0{path}"] = (path, pb)   # cluster_head reports the missing name
        elif pb.name in cmap:
            dup.error(f"{path}.name", f"duplicate cluster name '{pb.name}' (first at {cmap[pb.name][0]})")
        else:
            cmap[pb.name] = (path, pb)
    lmap: dict[str, tuple[str, Message]] = {}
    for path, pb in listeners:
        if not pb.name:
            lmap[f"\0{path}"] = (path, pb)
        elif pb.name in lmap:
            dup.error(f"{path}.name", f"duplicate listener name '{pb.name}' (first at {lmap[pb.name][0]})")
        else:
            lmap[pb.name] = (path, pb)
    builder = MeshBuilder(source, lenient, cluster_origin, eds=endpoints is not None, rds=routes is not None)
    try:
        change = builder.prepare(Inputs(cmap, dict(endpoints or {}), lmap, dict(routes or {})))
    except ConfigError as e:
        raise ConfigError(dup.problems + e.problems) from None
    if dup.problems:
        raise ConfigError(dup.problems)
    builder.commit(change)
    return builder.mesh()


def translate_bootstrap(cfg) -> MeshConfig:
    """Standalone mode: a Bootstrap's static_resources."""
    sr = cfg.bootstrap.static_resources
    return translate(
        cfg.source,
        [(f"static_resources.listeners[{i}]", pb) for i, pb in enumerate(sr.listeners)],
        [(f"static_resources.clusters[{i}]", pb) for i, pb in enumerate(sr.clusters)],
    )
