"""Endpoint choice for the L7 hand-off's upstream connections, with the
kernel's LB semantics (bpf/include/cluster.h, policy.h) applied to the
connections the daemon itself opens:

* ROUND_ROBIN walks the endpoints by weight from a cursor per cluster;
  RANDOM draws by weight;
* LEAST_REQUEST takes the endpoint with the smallest (active + 1) / weight,
  scanning from a rotating start so that ties spread;
* outlier detection (the cluster's ``outlier_*`` policy): ``outlier_failures``
  connect failures in a row eject an endpoint for base × (times ejected), at
  most max, while no more than ``outlier_max_percent`` of the cluster is
  ejected (at least one may be); a successful connect resets its counts.
  Ejected endpoints are skipped unless every endpoint is (panic routing).

The counts are the daemon's own (the kernel's cover the connections
governed applications open directly); both sides apply the same rules.
Pure apart from the clock and the random source, which tests replace.
"""
from __future__ import annotations

import random as _random
import time
from dataclasses import dataclass

from kmesh.bpf import records
from kmesh.config.model import Cluster

Address = tuple[str, int]


@dataclass
class _Outlier:
    failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0


class Balancer:
    def __init__(self, clock=time.monotonic, rng: _random.Random | None = None):
        self.clock = clock
        self.rng = rng or _random.Random()
        self._cursors: dict[str, int] = {}
        self._active: dict[tuple[str, Address], int] = {}
        self._outliers: dict[tuple[str, Address], _Outlier] = {}

    # -- choice ----------------------------------------------------------------
    def order(self, c: Cluster) -> list[Address]:
        """The endpoints to try for one new connection: the LB's choice
        first, then the others (for retries), ejected ones left out unless
        all are ejected."""
        eps = [(e.ip, e.port, max(1, e.weight)) for e in c.endpoints]
        if not eps:
            return []
        if self._outliers:
            now = self.clock()
            healthy = [e for e in eps if not self._ejected(c.name, e[:2], now)]
            eps = healthy or eps
        if c.lb_policy == records.LbPolicy.LEAST_REQUEST:
            return self._least_request(c.name, eps)
        if c.lb_policy == records.LbPolicy.ROUND_ROBIN:
            slots = [e[:2] for e in eps for _ in range(e[2])]
            cursor = self._cursors.get(c.name, 0)
            self._cursors[c.name] = cursor + 1
            start = cursor % len(slots)
        else:
            slots = [e[:2] for e in eps for _ in range(e[2])]
            start = self.rng.randrange(len(slots))
        return list(dict.fromkeys(slots[start:] + slots[:start]))

    def first(self, c: Cluster) -> Address | None:
        """order(c)[0] (the same draw, the same cursor step) without the
        others: what the native engine tries for a request."""
        if self._outliers or c.lb_policy == records.LbPolicy.LEAST_REQUEST:
            order = self.order(c)
            return order[0] if order else None
        if not c.endpoints:
            return None
        total = sum(max(1, e.weight) for e in c.endpoints)
        if c.lb_policy == records.LbPolicy.ROUND_ROBIN:
            cursor = self._cursors.get(c.name, 0)
            self._cursors[c.name] = cursor + 1
            k = cursor % total
        else:
            k = self.rng.randrange(total)
        for e in c.endpoints:   # the k-th slot of the weighted schedule
            w = max(1, e.weight)
            if k < w:
                return e.ip, e.port
            k -= w
        return None   # pragma: no cover - k < total

    def _least_request(self, cluster: str, eps: list[tuple[str, int, int]]) -> list[Address]:
        cursor = self._cursors.get(cluster, 0)
        self._cursors[cluster] = cursor + 1
        n = len(eps)
        rotated = [eps[(cursor + i) % n] for i in range(n)]
        # smallest (active + 1) / weight first; the scan order breaks ties
        load = [((self._active.get((cluster, e[:2]), 0) + 1) / e[2], i) for i, e in enumerate(rotated)]
        return [rotated[i][:2] for _, i in sorted(load)]

    # -- what happened -----------------------------------------------------------
    def opened(self, c: Cluster, ep: Address) -> None:
        key = (c.name, ep)
        self._active[key] = self._active.get(key, 0) + 1

    def closed(self, c: Cluster, ep: Address) -> None:
        key = (c.name, ep)
        left = self._active.get(key, 0) - 1
        if left > 0:
            self._active[key] = left
        else:
            self._active.pop(key, None)

    def succeeded(self, c: Cluster, ep: Address) -> None:
        self._outliers.pop((c.name, ep), None)

    def failed(self, c: Cluster, ep: Address) -> None:
        p = c.policy
        if not p.outlier_failures:
            return
        o = self._outliers.setdefault((c.name, ep), _Outlier())
        o.failures += 1
        now = self.clock()
        if o.failures < p.outlier_failures or o.ejected_until > now or not self._room(c, now):
            return
        o.ejections += 1
        o.ejected_until = now + min(p.outlier_base_ms * o.ejections, p.outlier_max_ms) / 1000
        o.failures = 0

    def ejected(self, c: Cluster) -> list[Address]:
        now = self.clock()
        return [(e.ip, e.port) for e in c.endpoints if self._ejected(c.name, (e.ip, e.port), now)]

    def _ejected(self, cluster: str, ep: Address, now: float) -> bool:
        o = self._outliers.get((cluster, ep))
        return o is not None and o.ejected_until > now

    def _room(self, c: Cluster, now: float) -> bool:
        """Ejecting one more keeps the cluster within max_ejection_percent
        (at least one may always be ejected)."""
        ejected = sum(self._ejected(c.name, (e.ip, e.port), now) for e in c.endpoints)
        allowed = max(1, len(c.endpoints) * c.policy.outlier_max_percent // 100)
        return ejected < allowed
