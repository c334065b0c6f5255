"""kmesh's own view of a mesh config: what the data plane enforces.

Both config sources (a standalone Bootstrap file, an xDS stream) are
translated into these records, and only these records reach the BPF maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kmesh.bpf.records import NO_POLICY, NO_RATE_LIMIT, ClusterPolicy, LbPolicy, RateLimit

if TYPE_CHECKING:   # the HTTP compile steps load only where a config has HTTP routes
    from kmesh.config.http.rbac import Rbac
    from kmesh.config.http.routes import FilterFault, RouteTable
    from kmesh.config.policies import HttpRateLimit


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str   # canonical text: IPv4 dotted (never mapped), IPv6 compressed
    port: int
    weight: int = 1
    alt: str = ""   # an address of the other family (Envoy's additional_addresses)


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    lb_policy: LbPolicy
    endpoints: tuple[Endpoint, ...]
    policy: ClusterPolicy = NO_POLICY   # circuit breaker, connect timeout, outlier detection


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    cluster: str
    weight: int


@dataclass(frozen=True, slots=True)
class HttpFilters:
    """HTTP filters of a connection manager, applied to the request that
    routes a connection: local_ratelimit (policies.HttpRateLimit) and RBAC
    (kmesh.config.http.rbac.Rbac), each None when absent."""
    rate_limit: HttpRateLimit | None = None
    rbac: Rbac | None = None
    fault: FilterFault | None = None    # the fault filter's own fault
    # The order they run in, as listed in http_filters: "rbac", "rate_limit",
    # "fault" (Envoy runs the filters in the order given: a rate limit before
    # RBAC takes a token from a request RBAC then denies).
    order: tuple[str, ...] = ("rbac", "rate_limit", "fault")


FILTER_ORDER = HttpFilters.__dataclass_fields__["order"].default   # a file that lists no filters


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    ip: str  # "0.0.0.0" is the wildcard
    port: int
    clusters: tuple[WeightedCluster, ...]
    rate_limit: RateLimit = NO_RATE_LIMIT   # new connections (network local_ratelimit)
    # HTTP routes that need the request (kmesh.config.http.routes.RouteTable), decided
    # by the daemon's hand-off listener; ``clusters`` then hold the catch-all
    # route, used when the daemon runs without L7.
    routes: RouteTable | None = field(default=None, compare=False)
    # the HTTP connection manager's filters the hand-off listener applies
    http_filters: HttpFilters | None = field(default=None, compare=False)
    # HTTP/1.0 requests: refused with 426 unless the connection manager
    # accepts them (http_protocol_options.accept_http_10), as Envoy does
    accept_http_10: bool = field(default=False, compare=False)
    # the fault filter is in the chain: per-route fault configs apply
    route_faults: bool = field(default=True, compare=False)

    @property
    def http_rate_limit(self):
        return self.http_filters.rate_limit if self.http_filters else None

    @property
    def rbac(self):
        return self.http_filters.rbac if self.http_filters else None


@dataclass(frozen=True)
class MeshConfig:
    listeners: tuple[Listener, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # What a control plane sent that kmesh leaves to the host, and why.
    skipped: tuple[str, ...] = field(default=(), compare=False)

    def cluster(self, name: str) -> Cluster | None:
        return next((c for c in self.clusters if c.name == name), None)
