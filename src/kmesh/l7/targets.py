"""Which L7 listener a handed-off connection was going to, and what it is
routed with: looked up in the mesh in force (an exact address first, then
the wildcard on its port), indexed once per mesh; a listener's HTTP rate
limit bucket is kept across config updates while its settings stay."""
from __future__ import annotations

from typing import Callable

from kmesh.config.model import FILTER_ORDER, Listener, MeshConfig
from kmesh.l7.handoff import WARMING, Target, TokenBucket


class Targets:
    """``targets(vip)``: the Target for a connection to ``vip``, None when no
    L7 listener has it, or WARMING while ``warming()`` says the config is
    not there yet (the routes come with the control plane's first full
    config)."""

    def __init__(self, mesh: Callable[[], MeshConfig], warming: Callable[[], bool] = lambda: False):
        self._mesh = mesh
        self._warming = warming
        self._index: tuple = (None, {}, {})
        self._made: dict[tuple, Target] = {}   # this mesh's Targets, by listener address
        self._buckets: dict[tuple, tuple] = {}

    def __call__(self, vip: tuple[str, int]):
        if self._warming():
            return WARMING
        mesh = self._mesh()
        if self._index[0] is not mesh:
            listeners = {(x.ip, x.port): x for x in mesh.listeners if x.routes is not None}
            self._index = (mesh, listeners, {c.name: c for c in mesh.clusters})
            self._made = {}
        _, listeners, clusters = self._index
        lst = listeners.get(vip) or listeners.get(("0.0.0.0", vip[1]))
        if lst is None:
            return None
        key = (lst.ip, lst.port)
        target = self._made.get(key)
        if target is None:
            target = self._made[key] = self._target(lst, clusters)
        return target

    def _target(self, lst: Listener, clusters: dict) -> Target:
        filters = lst.http_filters
        return Target(lst.name, lst.routes, clusters, lst.http_rate_limit, self._bucket(lst), lst.rbac,
                      lst.accept_http_10, lst.route_faults, filters.fault if filters else None,
                      filters.order if filters else FILTER_ORDER)

    def _bucket(self, lst: Listener) -> TokenBucket | None:
        rl = lst.http_rate_limit
        if rl is None:
            return None
        key = (lst.name, lst.ip, lst.port)
        got = self._buckets.get(key)
        if got is None or got[0] != rl.bucket:
            got = self._buckets[key] = (rl.bucket, TokenBucket(*rl.bucket))
        return got[1]
