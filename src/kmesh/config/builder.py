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

from kmesh.config.errors import ConfigError, Problem
from kmesh.config.model import Cluster, Listener, MeshConfig
from kmesh.config import filters, translate as tr

Key = tuple[str, int]


@dataclass(slots=True)
class _ClusterState:
    pb: object
    cla: object | None
    outcome: "tr._ClusterOutcome"
    service: str | None
    warnings: list[str]
    skipped: list[str]

    @property
    def governed(self) -> bool:
        return self.outcome.cluster is not None


@dataclass(slots=True)
class _ListenerState:
    pb: object
    routes: dict            # route name -> RouteConfiguration used (identity)
    entries: list           # [_Entry]
    seq: int
    warnings: list[str]
    skipped: list[str]


@dataclass(slots=True)
class _KeyState:
    listener: Listener | None
    referenced: set[str]
    order: tuple[int, int]
    warnings: list[str]
    skipped: list[str]


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


class MeshBuilder:
    def __init__(self, source: str, lenient: bool, cluster_origin: str = "static_resources.clusters"):
        self.source, self.lenient, self.cluster_origin = source, lenient, cluster_origin
        self.clusters: dict[str, _ClusterState] = {}
        self.listeners: dict[str, _ListenerState] = {}
        self.keys: dict[Key, _KeyState] = {}
        self._services: dict[str, set[str]] = {}        # EDS service -> cluster names
        self._route_users: dict[str, set[str]] = {}     # route name -> listener names
        self._key_entries: dict[Key, dict[str, list]] = {}   # key -> listener -> [(order, _Entry)]
        self._cluster_keys: dict[str, set[Key]] = {}    # cluster name -> keys referencing it
        self._seq = 0

    def _ctx(self) -> "tr._Ctx":
        return tr._Ctx(self.source, self.cluster_origin, self.lenient)

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
                todo |= {n for n in self._services.get(svc, ()) if n in clusters}
        # Config order for a full pass; a handful from EDS in name order.
        for name in ([n for n in clusters if n in todo] if clusters_changed else sorted(todo)):
            path, raw = clusters[name]
            pb = _msg(cluster_pb2.Cluster, raw)
            ctx = self._ctx()
            outcome = tr._cluster(ctx, path, pb, eds_view)
            problems += ctx.problems
            service = self._service(pb)
            change.clusters[name] = _ClusterState(raw, self._cla(service, endpoints), outcome, service,
                                                  ctx.warnings, ctx.skipped)

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
                ltodo |= {n for n in self._route_users.get(r, ()) if n in listeners}
        for name in (n for n in listeners if n in ltodo):
            path, raw = listeners[name]
            pb = _msg(listener_pb2.Listener, raw)
            ctx = self._ctx()
            entries = tr._listener(ctx, path, pb, rds_view) or []
            problems += ctx.problems
            used = {r: (routes or {}).get(r, (None, None))[1] for r in _route_names(pb)} if routes is not None else {}
            old = self.listeners.get(name)
            seq = old.seq if old else change.next_seq
            if old is None:
                change.next_seq += 1
            change.listeners[name] = _ListenerState(raw, used, entries, seq, ctx.warnings, ctx.skipped)
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
                keys |= self._cluster_keys.get(name, set())

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
            change.keys[key] = _KeyState(lst, referenced, entries[0][0], ctx.warnings, ctx.skipped)
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
        per = {n: v for n, v in self._key_entries.get(key, {}).items() if n not in change.listeners}
        per.update(new)
        if len(per) == 1:
            return next(iter(per.values()))
        return sorted((item for items in per.values() for item in items), key=lambda x: x[0])

    # -- commit -------------------------------------------------------------
    def commit(self, change: Change) -> None:
        for name, st in change.clusters.items():
            old = self.clusters.pop(name, None)
            if old and old.service:
                self._services.get(old.service, set()).discard(name)
            if st:
                self.clusters[name] = st
                if st.service:
                    self._services.setdefault(st.service, set()).add(name)
        for name, st in change.listeners.items():
            old = self.listeners.pop(name, None)
            if old:
                for r in old.routes:
                    self._route_users.get(r, set()).discard(name)
                for e in old.entries:
                    self._key_entries.get((e.ip, e.port), {}).pop(name, None)
            if st:
                self.listeners[name] = st
                for r in st.routes:
                    self._route_users.setdefault(r, set()).add(name)
                for i, e in enumerate(st.entries):
                    self._key_entries.setdefault((e.ip, e.port), {}).setdefault(name, []).append(((st.seq, i), e))
        for key, st in change.keys.items():
            old = self.keys.pop(key, None)
            if old:
                for c in old.referenced:
                    self._cluster_keys.get(c, set()).discard(key)
            if st:
                self.keys[key] = st
                for c in st.referenced:
                    self._cluster_keys.setdefault(c, set()).add(key)
            if not self._key_entries.get(key):
                self._key_entries.pop(key, None)
        self._seq = change.next_seq

    # -- views ----------------------------------------------------------------
    def mesh(self) -> MeshConfig:
        """The whole current model (O(size): for the admin API and tests)."""
        keys = sorted((k for k, s in self.keys.items() if s.listener), key=lambda k: self.keys[k].order)
        warnings, skipped = [], []
        for group in (self.clusters.values(), self.listeners.values(), [self.keys[k] for k in sorted(
                self.keys, key=lambda k: self.keys[k].order)]):
            for st in group:
                warnings += [self.note(n) for n in st.warnings]
                skipped += [self.note(n) for n in st.skipped]
        return MeshConfig(tuple(self.keys[k].listener for k in keys),
                          tuple(s.outcome.cluster for s in self.clusters.values() if s.governed),
                          tuple(warnings), tuple(skipped))

    def note(self, note: tuple[str, str]) -> str:
        return str(Problem(self.source, *note))

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
        groups = (self.clusters.values(), self.listeners.values(), self.keys.values())
        return {"listeners": sum(1 for s in self.keys.values() if s.listener),
                "clusters": sum(1 for s in self.clusters.values() if s.governed),
                "warnings": sum(len(st.warnings) for g in groups for st in g),
                "skipped": sum(len(st.skipped) for g in groups for st in g)}
