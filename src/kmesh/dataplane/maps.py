"""Apply a Plan to the pinned maps and read their state back."""
from __future__ import annotations

import collections
import ctypes
import logging
import time

from kmesh.bpf import mapnames, records
from kmesh.bpf.libbpf import Map
from kmesh.dataplane.plan import MapState, Plan

log = logging.getLogger("kmesh.dataplane")

# Connect programs run in well under a microsecond; a connect that read an
# old listener record has finished long before this.
DELETE_GRACE_SECONDS = 0.05
# Records made and written per batch syscall: bounds the memory a big plan
# needs (1024 cluster records are 1.8 MB) at no cost in speed.
BATCH = 1024


def _batches(items: list):
    for i in range(0, len(items), BATCH):
        yield items[i:i + BATCH]


class ConfigMaps:
    """The listener and cluster maps, written in Plan order."""

    def __init__(self, listener: Map, cluster: Map, ep_active: Map | None = None, policy: dict | None = None,
                 ports: Map | None = None):
        self.listener = listener
        self.cluster = cluster
        self.ep_active = ep_active
        # km_listener_ports: a port is set while some listener is on it.
        # Counted from the listeners pinned (a daemon taking over), and set
        # again for each (a daemon killed between setting a port and writing
        # its listener left it set: harmless; the other way cannot happen).
        self.ports = ports
        self._keys: set[tuple[str, int]] = set()
        self._on_port: collections.Counter = collections.Counter()
        if ports is not None:
            for k in listener.keys():
                self._keys.add((records.ip_of(k.ip6), records.port_of(k.port)))
            for key in self._keys:
                self._on_port[key[1]] += 1
            for port in self._on_port:
                self._set_port(port, True)
        # km_rate_limit, km_cluster_state, km_stats_cluster, km_outlier: the
        # state of a deleted listener's or cluster's policies goes with it, so
        # that a cluster id given out again starts from nothing.
        self.policy = policy or {}

    def read_state(self) -> MapState:
        st = MapState()
        for k, v in self.cluster.items():
            st.clusters[int(k.value)] = records.cluster_fingerprint(records.cluster_spec_of(v))
        for k, v in self.listener.items():
            st.listeners[(records.ip_of(k.ip6), records.port_of(k.port))] = \
                records.listener_fingerprint(records.listener_spec_of(v))
        return st

    def apply(self, plan: Plan) -> None:
        for batch in _batches(plan.cluster_upserts):
            self.cluster.update_batch([(records.ClusterId(cid), records.cluster_record(*spec))
                                       for cid, spec in batch])
        for k, _ in plan.listener_upserts:   # a port before its first listener
            if k not in self._keys:
                self._keys.add(k)
                self._on_port[k[1]] += 1
                if self._on_port[k[1]] == 1:
                    self._set_port(k[1], True)
        for batch in _batches(plan.listener_upserts):
            self.listener.update_batch([(records.addr_key(*k), records.listener_record(*spec)) for k, spec in batch])
        for k in plan.listener_deletes:
            self.listener.delete(records.addr_key(*k))
            if mapnames.RATE_LIMIT in self.policy:
                self.policy[mapnames.RATE_LIMIT].delete(records.addr_key(*k))
            if k in self._keys:   # and after its last
                self._keys.discard(k)
                self._on_port[k[1]] -= 1
                if not self._on_port[k[1]]:
                    del self._on_port[k[1]]
                    self._set_port(k[1], False)
        if plan.cluster_deletes:
            time.sleep(DELETE_GRACE_SECONDS)
            for cid in plan.cluster_deletes:
                self.cluster.delete(records.ClusterId(cid))
            self._forget_clusters(set(plan.cluster_deletes))

    def _set_port(self, port: int, on: bool) -> None:
        if self.ports is not None:
            self.ports.update(ctypes.c_uint32(records.port_key(port)), ctypes.c_uint32(int(on)))

    def _forget_clusters(self, ids: set[int]) -> None:
        for name in (mapnames.CLUSTER_STATE, mapnames.STATS_CLUSTER):
            if name in self.policy:
                for cid in ids:
                    self.policy[name].delete(records.ClusterId(cid))
        if mapnames.OUTLIER in self.policy:
            m = self.policy[mapnames.OUTLIER]
            for k in [k for k in m.keys() if k.cluster_id in ids]:
                m.delete(k)

    def dump(self, names: dict[int, str] | None = None) -> dict:
        names = names or {}
        clusters = {}
        for k, v in self.cluster.items():
            d = records.decode_cluster(v)
            d["name"] = names.get(int(k.value))
            clusters[str(int(k.value))] = d
        listeners = {records.addr_text(k): records.decode_listener(v) for k, v in self.listener.items()}
        out = {mapnames.LISTENER: listeners, mapnames.CLUSTER: clusters}
        if self.ep_active is not None:
            out[mapnames.EP_ACTIVE] = {records.addr_text(k): v.active for k, v in self.ep_active.items()}
        return out
