"""Plan map updates as an ordered diff (pure: no I/O, easy to test).

Ordering is what keeps every connect consistent while a config changes:

1. clusters are written first (new ids, or an in-place replace of a record:
   one atomic map update, since a cluster record holds its endpoints);
2. listeners are written next, so they only ever point at clusters that exist;
3. listeners that went away are deleted;
4. clusters nothing points at any more are deleted last, after a grace period
   for connects that read an old listener record just before step 2.

A cluster whose IPv6 clients reach other addresses than its IPv4 clients
(endpoints with an IPv6 address) has a second record, its IPv6 view, under
its id with records.CLUSTER_V6 set. IPv6 listeners always name that id; the
connect hook falls back to the plain id when there is no such record, so an
endpoint change that adds or drops the view never rewrites a listener.

A restarted daemon does not know which cluster id stood for which name; it
plans against what it reads from the pinned maps and reuses an id whose record
is byte-identical to a wanted cluster, so a restart with the same config
writes nothing at all, and any other difference is made before anything is
removed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kmesh.bpf import records
from kmesh.config.model import Cluster, Listener, MeshConfig

ListenerKey = tuple[str, int]


@dataclass
class MapState:
    """What the maps hold, as far as the daemon knows."""

    cluster_ids: dict[str, int] = field(default_factory=dict)   # name -> id
    clusters: dict[int, bytes] = field(default_factory=dict)    # id -> content fingerprint
    listeners: dict[ListenerKey, bytes] = field(default_factory=dict)
    next_id: int = 1   # a hint: ids below it may be taken



@dataclass
class Plan:
    # What to write, as content: the writer makes the records, a batch at a
    # time (a record is 1.8 KB; a plan for a big mesh holds 10 000 of them).
    cluster_upserts: list[tuple[int, records.ClusterSpec]] = field(default_factory=list)
    listener_upserts: list[tuple[ListenerKey, records.ListenerSpec]] = field(default_factory=list)
    listener_deletes: list[ListenerKey] = field(default_factory=list)
    cluster_deletes: list[int] = field(default_factory=list)
    new_state: MapState | None = None
    # For a delta plan: what to patch into the state once written.
    _patch: tuple | None = None

    @property
    def empty(self) -> bool:
        return not (self.cluster_upserts or self.listener_upserts or self.listener_deletes or self.cluster_deletes)

    def commit(self, state: MapState) -> MapState:
        """The state after this plan was written (patched in place for a delta)."""
        if self.new_state is not None:
            return self.new_state
        ids, clusters, listeners, state.next_id = self._patch
        for name, cid in ids.items():
            if cid is None:
                state.cluster_ids.pop(name, None)
            else:
                state.cluster_ids[name] = cid
        for cid, raw in clusters.items():
            if raw is None:
                state.clusters.pop(cid, None)
            else:
                state.clusters[cid] = raw
        for key, raw in listeners.items():
            if raw is None:
                state.listeners.pop(key, None)
            else:
                state.listeners[key] = raw
        return state

    def summary(self) -> dict[str, int]:
        return {
            "clusters_written": len(self.cluster_upserts),
            "listeners_written": len(self.listener_upserts),
            "listeners_deleted": len(self.listener_deletes),
            "clusters_deleted": len(self.cluster_deletes),
        }


class CapacityError(ValueError):
    pass


def _is_v4(ip: str) -> bool:
    return ":" not in ip   # addresses are canonical text: IPv4 dotted, IPv6 never mapped


def cluster_views(c: Cluster) -> tuple[records.ClusterSpec, records.ClusterSpec | None]:
    """The cluster as IPv4 clients reach it (the IPv4 address of each
    endpoint that has one), and as IPv6 clients do (each endpoint's IPv6
    address, else its IPv4 one, which they reach mapped) when that differs.
    A connect cannot change its socket's family."""
    v4, v6 = [], []
    for e in c.endpoints:
        if _is_v4(e.ip):
            v4.append((e.ip, e.port, e.weight))
            v6.append((e.alt if e.alt and not _is_v4(e.alt) else e.ip, e.port, e.weight))
        else:
            v6.append((e.ip, e.port, e.weight))
            if e.alt and _is_v4(e.alt):
                v4.append((e.alt, e.port, e.weight))
    base = (c.lb_policy, tuple(v4), c.policy)
    return base, (None if v6 == v4 else (c.lb_policy, tuple(v6), c.policy))


def cluster_spec(c: Cluster) -> records.ClusterSpec:
    return cluster_views(c)[0]


def listener_spec(lst: Listener, cluster_id) -> records.ListenerSpec:
    view = 0 if _is_v4(lst.ip) else records.CLUSTER_V6
    return (tuple((cluster_id(w.cluster) | view, w.weight) for w in lst.clusters if w.weight > 0), lst.rate_limit,
            records.LISTENER_L7 if lst.routes is not None else 0)


def plan(state: MapState, config: MeshConfig,
         max_clusters: int = records.KMESH_MAX_CLUSTERS,
         max_listeners: int = records.KMESH_MAX_LISTENERS) -> Plan:
    out = Plan()
    new = MapState()
    views = {c.name: cluster_views(c) for c in config.clusters}
    wanted = {name: v[0] for name, v in views.items()}
    content = {name: records.cluster_fingerprint(spec) for name, spec in wanted.items()}

    # Ids: keep a name's id; else adopt an unclaimed id with identical content
    # (takeover after restart); else take the lowest free id.
    claimed: set[int] = set()
    for name in wanted:
        cid = state.cluster_ids.get(name)
        if cid is not None and cid in state.clusters:
            new.cluster_ids[name] = cid
            claimed.add(cid)
    by_content: dict[bytes, list[int]] = {}
    for cid, raw in sorted(state.clusters.items()):
        if cid not in claimed and not cid & records.CLUSTER_V6:
            by_content.setdefault(raw, []).append(cid)
    for name in wanted:
        if name in new.cluster_ids:
            continue
        spare = by_content.get(content[name])
        if spare:
            cid = spare.pop(0)
            new.cluster_ids[name] = cid
            claimed.add(cid)
    next_id = 1
    for name in wanted:
        if name in new.cluster_ids:
            continue
        while next_id in state.clusters or next_id in claimed:
            next_id += 1
        new.cluster_ids[name] = next_id
        claimed.add(next_id)

    for name, spec in wanted.items():
        cid = new.cluster_ids[name]
        new.clusters[cid] = content[name]
        if state.clusters.get(cid) != content[name]:
            out.cluster_upserts.append((cid, spec))
        v6 = views[name][1]
        if v6 is not None:
            vid, raw = cid | records.CLUSTER_V6, records.cluster_fingerprint(v6)
            new.clusters[vid] = raw
            if state.clusters.get(vid) != raw:
                out.cluster_upserts.append((vid, v6))
    out.cluster_deletes = sorted(cid for cid in state.clusters if cid not in new.clusters)

    for lst in config.listeners:
        key = (lst.ip, lst.port)
        spec = listener_spec(lst, new.cluster_ids.__getitem__)
        raw = records.listener_fingerprint(spec)
        new.listeners[key] = raw
        if state.listeners.get(key) != raw:
            out.listener_upserts.append((key, spec))
    out.listener_deletes = [k for k in state.listeners if k not in new.listeners]

    # Old and new clusters coexist between steps 1 and 4.
    peak_clusters = len(set(state.clusters) | set(new.clusters))
    if peak_clusters > max_clusters:
        raise CapacityError(f"{peak_clusters} clusters during the update exceed the map size {max_clusters}")
    if len(new.listeners) > max_listeners:
        raise CapacityError(f"{len(new.listeners)} listener addresses exceed the map size {max_listeners}")
    new.next_id = next_id
    out.new_state = new
    return out


def plan_changes(state: MapState, clusters: dict, listeners: dict,
                 max_clusters: int = records.KMESH_MAX_CLUSTERS,
                 max_listeners: int = records.KMESH_MAX_LISTENERS) -> Plan:
    """Plan only what changed: ``clusters`` maps a name to its new Cluster
    (None: no longer governed), ``listeners`` an (ip, port) to its new
    Listener (None: untouched from now on). Same ordering as ``plan``; cost
    proportional to the change, not to the mesh."""
    out = Plan()
    ids: dict[str, int | None] = {}
    craw: dict[int, bytes | None] = {}
    lraw: dict[ListenerKey, bytes | None] = {}
    next_id = state.next_id
    for name, c in clusters.items():
        cid = state.cluster_ids.get(name)
        if c is None:
            if cid is not None:
                ids[name], craw[cid] = None, None
                out.cluster_deletes.append(cid)
                if cid | records.CLUSTER_V6 in state.clusters:
                    craw[cid | records.CLUSTER_V6] = None
                    out.cluster_deletes.append(cid | records.CLUSTER_V6)
            continue
        if cid is None:
            while next_id in state.clusters or next_id in craw:
                next_id += 1
            cid = next_id
            ids[name] = cid
        spec, v6 = cluster_views(c)
        raw = records.cluster_fingerprint(spec)
        if state.clusters.get(cid) != raw:
            out.cluster_upserts.append((cid, spec))
            craw[cid] = raw
        vid = cid | records.CLUSTER_V6
        if v6 is not None:
            raw = records.cluster_fingerprint(v6)
            if state.clusters.get(vid) != raw:
                out.cluster_upserts.append((vid, v6))
                craw[vid] = raw
        elif vid in state.clusters:
            craw[vid] = None
            out.cluster_deletes.append(vid)

    def cluster_id(name: str) -> int:
        got = ids.get(name, state.cluster_ids.get(name))
        assert got is not None, f"listener references cluster {name} that has no record"
        return got

    for key, lst in listeners.items():
        if lst is None:
            if key in state.listeners:
                out.listener_deletes.append(key)
                lraw[key] = None
            continue
        spec = listener_spec(lst, cluster_id)
        raw = records.listener_fingerprint(spec)
        if state.listeners.get(key) != raw:
            out.listener_upserts.append((key, spec))
            lraw[key] = raw
    added = sum(1 for cid, raw in craw.items() if raw is not None and cid not in state.clusters)
    if len(state.clusters) + added > max_clusters:
        raise CapacityError(f"{len(state.clusters) + added} clusters exceed the map size {max_clusters}")
    if len(state.listeners) + sum(1 for k, r in lraw.items() if r is not None and k not in state.listeners) \
            > max_listeners:
        raise CapacityError(f"listener addresses exceed the map size {max_listeners}")
    out._patch = (ids, craw, lraw, next_id)
    return out
