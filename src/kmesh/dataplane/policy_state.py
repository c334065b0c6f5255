"""What the traffic policies hold right now (GET /policies, /metrics).

The policies themselves come from the config in force; what they count
(slots held, refusals, ejections, tokens) from the kernel's maps. Only
clusters and listeners that have a policy are read, so a big mesh without
policies costs nothing here.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

from kmesh.bpf import mapnames, records
from kmesh.config.model import MeshConfig


@dataclass
class ClusterPolicyState:
    name: str
    policy: records.ClusterPolicy
    active: int = 0      # connections holding a max_connections slot
    overflow: int = 0    # connects refused by max_connections
    ejections: int = 0   # endpoints ejected by outlier detection, ever
    ejected: list[str] = field(default_factory=list)   # endpoints ejected now

    def as_dict(self) -> dict:
        out = {"policy": {k: v for k, v in self.policy._asdict().items() if v}, "overflow": self.overflow}
        if self.policy.max_connections:
            out["active"] = self.active
        if self.policy.outlier_failures:
            out.update(ejections=self.ejections, ejected=self.ejected)
        return out


@dataclass
class ListenerPolicyState:
    address: str
    rate_limit: records.RateLimit
    tokens: int | None   # in the bucket now (None: no connect seen yet)

    def as_dict(self) -> dict:
        return {"rate_limit": self.rate_limit._asdict(), "tokens": self.tokens}


def read(mesh: MeshConfig, cluster_ids: dict[str, int], maps: dict,
         now_ns: int | None = None) -> tuple[list[ClusterPolicyState], list[ListenerPolicyState]]:
    """The state of every policy in ``mesh`` (``maps``: the loaded maps by name)."""
    now_ns = time.monotonic_ns() if now_ns is None else now_ns   # bpf_ktime_get_ns's clock
    clusters = []
    by_id = {}
    for c in mesh.clusters:
        cid = cluster_ids.get(c.name)
        if c.policy == records.NO_POLICY or cid is None:
            continue
        st = ClusterPolicyState(c.name, c.policy)
        key = ctypes.c_uint32(cid)
        state = maps[mapnames.CLUSTER_STATE].lookup(key)
        st.active = max(0, state.active) if state is not None else 0
        counters = maps[mapnames.STATS_CLUSTER].sum(key)
        if counters is not None:
            st.overflow, st.ejections = counters.overflow, counters.ejections
        clusters.append(st)
        by_id[cid] = st
    if any(st.policy.outlier_failures for st in clusters):
        for k, o in maps[mapnames.OUTLIER].items():
            st = by_id.get(k.cluster_id & ~records.CLUSTER_V6)
            if st is not None and o.ejected_until_ns > now_ns:
                st.ejected.append(records.addr_text(k.ep))
    listeners = []
    for lst in mesh.listeners:
        if lst.rate_limit == records.NO_RATE_LIMIT:
            continue
        bucket = maps[mapnames.RATE_LIMIT].lookup(records.addr_key(lst.ip, lst.port))
        listeners.append(ListenerPolicyState(records.host_port(lst.ip, lst.port), lst.rate_limit,
                                             tokens_now(bucket, lst.rate_limit, now_ns)))
    return clusters, listeners


def tokens_now(bucket, rl: records.RateLimit, now_ns: int) -> int | None:
    """The tokens a connect would find now: the kernel refills the bucket
    only when a connect comes (bpf/include/policy.h)."""
    if bucket is None:
        return None
    interval = rl.fill_interval_ms * 1_000_000
    fills = max(0, now_ns - bucket.last_fill_ns) // interval if interval else 0
    return min(rl.max_tokens, bucket.tokens + fills * rl.tokens_per_fill)
