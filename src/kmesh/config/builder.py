"""Incremental translation: keep each resource's translation, redo only
what a change touches.

A control plane pushes often, and a push usually touches a few resources in
a large mesh (one ClusterLoadAssignment among 10 000). The builder keeps, per
resource, what it translated to and the notes it produced, plus indexes from
EDS service and route names to the resources that use them and from cluster
names to the (ip, port) entries that reference them. ``prepare`` computes a
Change without touching that state (so a refused push changes nothing);
``commit`` makes it current. The standalone path uses the same builder once,
from empty, so both modes share one translator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from kmesh.config.errors import ConfigError
from kmesh.config.model import Cluster, Listener, MeshConfig
from kmesh.config import filters, translate as tr

Key = tuple[str, int]


@dataclass(slots=True)
class _ClusterState:
    pb: object
    cla: object | None
    outcome: "tr._ClusterOutcome"
    service: str | None
    path: str
    warnings: tuple          # shared notes, relative to path (translate._share)
    skipped: tuple

    @property
    def governed(self) -> bool:
        return self.outcome.cluster is not None


@dataclass(slots=True)
class _ListenerState:
    pb: object
    routes: dict            # route name -> RouteConfiguration used (identity)
    entries: list           # [_Entry]
    seq: int
    path: str
    warnings: tuple
    skipped: tuple


@dataclass(slots=True)
class _KeyState:
    listener: Listener | None
    referenced: tuple[str, ...]
    order: tuple[int, int]
    warnings: tuple
    skipped: tuple
    path: str = ""


@dataclass
class Change:
    clusters: dict[str, _ClusterState | None] = field(default_factory=dict)
    listeners: dict[str, _ListenerState | None] = field(default_factory=dict)
    keys: dict[Key, _KeyState | None] = field(default_factory=dict)
    next_seq: int = 0

    def cluster_models(self) -> dict[str, Cluster | None]:
        """Changed clusters as the data plane sees them (None: gone or not governed)."""
        return {n: (c.outcome.cluster if c else None) for n, c in self.clusters.items()}

    def listener_models(self) -> dict[Key, Listener | None]:
        return {k: (s.listener if s else None) for k, s in self.keys.items()}

    @property
    def empty(self) -> bool:
        return not (self.clusters or self.listeners or self.keys)


def _route_names(pb) -> set[str]:
    return filters.rds_names([pb])


def _same(a, b) -> bool:
    return a is b or (a is not None and b is not None and a == b)


def _msg(cls, x):
    """Resources may be held serialized (the ADS client keeps them so: a
    parsed protobuf costs several times its wire size); parse when needed."""
    return cls.FromString(x) if isinstance(x, (bytes, bytearray)) else x


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
    def __init__(self, source: str, lenient: bool, cluster_origin: str = "static_resources.clusters"):
        self.source, self.lenient, self.cluster_origin = source, lenient, cluster_origin
        self.clusters: dict[str, _ClusterState] = {}
        self.listeners: dict[str, _ListenerState] = {}
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

    def _ctx(self, base: str = "") -> "tr._Ctx":
        return tr._Ctx(self.source, self.cluster_origin, self.lenient, base)

    # -- prepare ------------------------------------------------------------
    def prepare(self, clusters: Mapping, endpoints: Mapping | None, listeners: Mapping, routes: Mapping | None,
                *, changed_services: set[str] | None = None, changed_routes: set[str] | None = None,
                clusters_changed: bool = True, listeners_changed: bool = True) -> Change:
        """Compute what changes. ``clusters``/``listeners`` are the complete
        wanted sets (name -> (path, proto)); the flags and name sets say
        what may differ from the committed state, so that a push touching
        one resource costs one resource."""
        change = Change(next_seq=self._seq)
        problems = []
        from envoy.config.cluster.v3 import cluster_pb2
        from envoy.config.endpoint.v3 import endpoint_pb2
        from envoy.config.listener.v3 import listener_pb2
        from envoy.config.route.v3 import route_pb2

        eds_view = _Parsed(endpoints, endpoint_pb2.ClusterLoadAssignment) if endpoints is not None else None
        rds_view = _Parsed(routes, route_pb2.RouteConfiguration) if routes is not None else None

        # Clusters to redo.
        todo: set[str] = set()
        if clusters_changed:
            for name in self.clusters.keys() - clusters.keys():
                change.clusters[name] = None
            for name, (path, pb) in clusters.items():
                old = self.clusters.get(name)
                if old is None or not _same(old.pb, pb) or not _same(old.cla, self._cla(old.service, endpoints)):
                    todo.add(name)
        if changed_services:
            for svc in changed_services:
                todo |= {n for n in self._services.get(svc) if n in clusters}
        # Config order for a full pass; a handful from EDS in name order.
        for name in ([n for n in clusters if n in todo] if clusters_changed else sorted(todo)):
            path, raw = clusters[name]
            pb = _msg(cluster_pb2.Cluster, raw)
            ctx = self._ctx(path)
            outcome = tr._cluster(ctx, path, pb, eds_view)
            problems += ctx.problems
            service = self._service(pb)
            change.clusters[name] = _ClusterState(raw, self._cla(service, endpoints), outcome, service, path,
                                                  *ctx.notes())

        # Listeners to redo.
        ltodo: set[str] = set()
        if listeners_changed:
            for name in self.listeners.keys() - listeners.keys():
                change.listeners[name] = None
            for name, (path, pb) in listeners.items():
                old = self.listeners.get(name)
                if old is None or not _same(old.pb, pb) or any(
                        not _same((routes or {}).get(r, (None, None))[1], m) for r, m in old.routes.items()):
                    ltodo.add(name)
        if changed_routes:
            for r in changed_routes:
                ltodo |= {n for n in self._route_users.get(r) if n in listeners}
        for name in (n for n in listeners if n in ltodo):
            path, raw = listeners[name]
            pb = _msg(listener_pb2.Listener, raw)
            ctx = self._ctx(path)
            entries = tr._listener(ctx, path, pb, rds_view) or []
            problems += ctx.problems
            used = {r: (routes or {}).get(r, (None, None))[1] for r in _route_names(pb)} if routes is not None else {}
            old = self.listeners.get(name)
            seq = old.seq if old else change.next_seq
            if old is None:
                change.next_seq += 1
            change.listeners[name] = _ListenerState(raw, used, entries, seq, path, *ctx.notes())
        if problems:
            raise ConfigError(problems)

        # Keys to resolve again: those of redone listeners (old and new
        # entries), and those referencing a cluster that appeared, went away
        # or changed between governed and not.
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

        def outcome_of(cname: str):
            if cname in change.clusters:
                st = change.clusters[cname]
                return st.outcome if st else None
            st = self.clusters.get(cname)
            return st.outcome if st else None

        new_by_key: dict[Key, dict[str, list]] = {}
        for name, st in change.listeners.items():
            for i, e in enumerate(st.entries if st else ()):
                new_by_key.setdefault((e.ip, e.port), {}).setdefault(name, []).append(((st.seq, i), e))
        for key in keys:
            entries = self._entries_for(key, change, new_by_key.get(key, {}))
            if not entries:
                change.keys[key] = None
                continue
            ctx = self._ctx()
            lst, referenced = tr._resolve_key(ctx, key, [e for _, e in entries], outcome_of)
            problems += ctx.problems
            change.keys[key] = _KeyState(lst, tuple(referenced), entries[0][0], *ctx.notes())
        if problems:
            raise ConfigError(problems)
        return change

    @staticmethod
    def _service(pb) -> str | None:
        return (pb.eds_cluster_config.service_name or pb.name) if pb.type == pb.EDS else None

    @staticmethod
    def _cla(svc: str | None, endpoints: Mapping | None):
        if svc is None or endpoints is None:
            return None
        got = endpoints.get(svc)
        return got[1] if got else None

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
        for name, st in change.clusters.items():
            old = self.clusters.pop(name, None)
            if old and old.service:
                self._services.discard(old.service, name)
            if st:
                self.clusters[name] = st
                if st.service:
                    self._services.add(st.service, name)
        for name, st in change.listeners.items():
            old = self.listeners.pop(name, None)
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
                self.listeners[name] = st
                for r in st.routes:
                    self._route_users.add(r, name)
                for i, e in enumerate(st.entries):
                    key = (e.ip, e.port)
                    self._key_entries[key] = self._key_entries.get(key, ()) + (((st.seq, i), e),)
        for key, st in change.keys.items():
            old = self.keys.pop(key, None)
            if old:
                for c in old.referenced:
                    self._cluster_keys.discard(c, key)
            if st:
                self.keys[key] = st
                for c in st.referenced:
                    self._cluster_keys.add(c, key)
        self._seq = change.next_seq

    # -- views ----------------------------------------------------------------
    def mesh(self) -> MeshConfig:
        """The whole current model (O(size): for the admin API and tests)."""
        keys = sorted((k for k, s in self.keys.items() if s.listener), key=lambda k: self.keys[k].order)
        warnings, skipped = [], []
        for group in (self.clusters.values(), self.listeners.values(), [self.keys[k] for k in sorted(
                self.keys, key=lambda k: self.keys[k].order)]):
            for st in group:
                warnings += self.notes(st, "warnings")
                skipped += self.notes(st, "skipped")
        return MeshConfig(tuple(self.keys[k].listener for k in keys),
                          tuple(s.outcome.cluster for s in self.clusters.values() if s.governed),
                          tuple(warnings), tuple(skipped))

    def notes(self, st, kind: str) -> list[str]:
        """A resource state's warnings or skipped notes, as shown."""
        return [tr.note_text(self.source, st.path, n) for n in getattr(st, kind)]

    def needed(self, change: Change | None = None) -> tuple[set[str], set[str]]:
        """EDS services and route names the (changed) config references."""
        clusters = dict(self.clusters)
        listeners = dict(self.listeners)
        for src, dst in ((change.clusters if change else {}, clusters), (change.listeners if change else {}, listeners)):
            for n, st in src.items():
                if st is None:
                    dst.pop(n, None)
                else:
                    dst[n] = st
        return ({st.service for st in clusters.values() if st.service},
                {r for st in listeners.values() for r in st.routes})

    def counts(self) -> dict[str, int]:
        return dict(self._totals)
