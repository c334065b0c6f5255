"""Envoy v3 resources -> kmesh's model (pure functions).

One translator serves every config source: a standalone Bootstrap hands in
``static_resources``; the ADS client hands in the Listeners, Clusters,
ClusterLoadAssignments and RouteConfigurations it accepted. Meaning is
checked here (the schema was checked when parsing) and every problem names
its field path.

Two strictness levels, because the two sources have different authors:

* strict (a file a person wrote): anything kmesh cannot do is an error, or an
  explicit warning where the rest still means what the author wanted;
* lenient (a control plane such as istiod): a resource kmesh cannot govern is
  *skipped with a reason* and its connections are left untouched, so they
  keep whatever path they had without kmesh (e.g. kube-proxy). Only what
  kmesh would get wrong, or what Envoy itself would refuse, is an error (and
  so a NACK).

A connect is decided by (destination IP, port) only, so a listener becomes
one or more *entries*: its address, the /32 ``prefix_ranges`` of its filter
chains, and — for HTTP connection managers on wildcard listeners, as istiod
sends them — the IPv4 literals in each virtual host's ``domains`` (istiod
lists a service's VIP there). More specific entries win over less specific.
"""
from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterable, Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2
from google.protobuf.message import Message

from kmesh.bpf.records import (KMESH_MAX_ENDPOINTS, KMESH_MAX_WEIGHTED_CLUSTERS, NO_POLICY, NO_RATE_LIMIT,
                               ClusterPolicy, LbPolicy, RateLimit, host_port)
from kmesh.config import fields, filters, policies
from kmesh.config.errors import Problem
from kmesh.config.model import FILTER_ORDER, Cluster, Endpoint, HttpFilters, Listener, WeightedCluster

if TYPE_CHECKING:   # loaded late, where a config has HTTP routes
    from kmesh.config.http.rbac import Rbac
    from kmesh.config.http.routes import FilterFault, RouteTable
    from kmesh.config.policies import HttpRateLimit

_Cluster = cluster_pb2.Cluster
_LB = {
    _Cluster.ROUND_ROBIN: LbPolicy.ROUND_ROBIN,
    _Cluster.RANDOM: LbPolicy.RANDOM,
    _Cluster.LEAST_REQUEST: LbPolicy.LEAST_REQUEST,
}
_DISCOVERY_HINT = {
    _Cluster.EDS: "EDS clusters need ADS mode (-enable-ads=true)",
    _Cluster.STRICT_DNS: "DNS clusters are not supported; list IP endpoints in a STATIC cluster",
    _Cluster.LOGICAL_DNS: "DNS clusters are not supported; list IP endpoints in a STATIC cluster",
    _Cluster.ORIGINAL_DST: "ORIGINAL_DST (passthrough) clusters are not supported",
}
_UNHEALTHY = {health_check_pb2.UNHEALTHY, health_check_pb2.DRAINING, health_check_pb2.TIMEOUT}
# Fields whose effect kmesh reproduces (or that change nothing at L4). Any
# other field that is set produces a "not enforced" warning.
_TCP_PROXY_APPLIED = {"stat_prefix", "cluster", "weighted_clusters"}
_PLAINTEXT_ALPN = {"http/1.1", "http/1.0", "h2c"}
_MAX_U32 = 2**32 - 1
WILDCARD = "0.0.0.0"
WILDCARD6 = "::"
WILDCARDS = (WILDCARD, WILDCARD6)

# Entry priority: a more specific source of an (ip, port) entry wins.
_P_WILDCARD, _P_DOMAIN, _P_PREFIX, _P_ADDRESS = 0, 10, 20, 30


# Notes are shared: most resources of a big mesh have the same notes
# relative to their own path (every Istio cluster: mTLS skipped, circuit
# breakers not enforced), so each keeps a reference to one shared tuple. The
# table is bounded; once full it starts over, and sharing simply begins anew.
_SHARED_NOTES: dict[tuple, tuple] = {}
_SHARED_NOTES_MAX = 4096


# Endpoints are shared the same way: a pod's address appears in its
# service's cluster and in each subset cluster, every push.
_SHARED_ENDPOINTS: dict[tuple, Endpoint] = {}
_SHARED_ENDPOINTS_MAX = 65536


def _endpoint(ip: str, port: int, weight: int, alt: str = "") -> Endpoint:
    key = (ip, port, weight, alt)
    got = _SHARED_ENDPOINTS.get(key)
    if got is None:
        if len(_SHARED_ENDPOINTS) >= _SHARED_ENDPOINTS_MAX:
            _SHARED_ENDPOINTS.clear()
        got = _SHARED_ENDPOINTS[key] = Endpoint(sys.intern(ip), port, weight, alt)
    return got


def _alt_address(ctx: Ctx, epath: str, ep, addr: tuple[str, int]) -> str | None:
    """The address of the other family among an endpoint's
    additional_addresses (Envoy tries them for Happy Eyeballs; kmesh sends
    each client to the one of its own family), "" for none, None when
    refused."""
    if len(ep.additional_addresses) > 1:
        ctx.unsupported(f"{epath}.endpoint.additional_addresses",
                        "kmesh takes one additional address per endpoint: one of the other family")
        return None
    apath = f"{epath}.endpoint.additional_addresses[0].address"
    got = _socket_address(ctx, apath, ep.additional_addresses[0].address, "an endpoint")
    if got is None:
        return None
    if (":" in got[0]) == (":" in addr[0]) or got[1] != addr[1]:
        ctx.unsupported(apath, f"{host_port(*got)}: kmesh takes an additional address of the other family "
                        f"than {host_port(*addr)} and on the same port")
        return None
    return got[0]


def _share(notes: list) -> tuple:
    if not notes:
        return ()
    key = tuple(notes)
    got = _SHARED_NOTES.get(key)
    if got is None:
        if len(_SHARED_NOTES) >= _SHARED_NOTES_MAX:
            _SHARED_NOTES.clear()
        got = _SHARED_NOTES[key] = key
    return got


@dataclass
class Ctx:
    source: str
    cluster_origin: str
    lenient: bool
    # The path of the resource being translated. Notes under it are kept
    # relative to it (see _share); ``note_text`` puts it back.
    base: str = ""
    problems: list[Problem] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def error(self, path: str, reason: str) -> None:
        self.problems.append(Problem(self.source, path, reason))

    def _note(self, notes: list, path: str, reason: str) -> None:
        # Notes are kept as (path, reason) and formatted only when shown: a big
        # mesh produces tens of thousands of them on every full pass.
        b = self.base
        if b and path.startswith(b) and path[len(b):len(b) + 1] in ("", ".", "["):
            path = path[len(b):]
        notes.append((path, reason))

    def warn(self, path: str, reason: str) -> None:
        self._note(self.skipped if self.lenient else self.warnings, path, reason)

    def skip(self, path: str, reason: str) -> None:
        """Not governed by kmesh: a note from a control plane, a warning from a file."""
        self.warn(path, reason)

    def unsupported(self, path: str, reason: str) -> None:
        """An error in a file; skipped (left to the host) from a control plane."""
        if self.lenient:
            self._note(self.skipped, path, reason)
        else:
            self.error(path, reason)

    def notes(self) -> tuple[tuple, tuple]:
        """(warnings, skipped), shared."""
        return _share(self.warnings), _share(self.skipped)


def note_text(source: str, base: str, note: tuple[str, str]) -> str:
    """A note as shown: relative paths start with '.' or '[' (an absolute
    one starts with a resource kind or a config section)."""
    path, reason = note
    if path[:1] in (".", "[") or not path:
        path = base + path
    return str(Problem(source, path, reason))


def _ip_version(text: str) -> int:
    """4, 6, or 0 when ``text`` is not an IP address literal (fast path of
    ipaddress.ip_address, which is too slow for meshes of 10 000 services)."""
    try:
        socket.inet_pton(socket.AF_INET, text)
        return 4
    except (OSError, ValueError):   # ValueError: a NUL in the text
        pass
    try:
        ipaddress.IPv6Address(text)
        return 6
    except ValueError:
        return 0


def canonical_ip(text: str) -> str:
    """An IPv6 literal as kmesh keys it: compressed, and an IPv4-mapped one
    as the IPv4 address it names (what an IPv4 client connects to too)."""
    a = ipaddress.IPv6Address(text.partition("%")[0])
    return str(a.ipv4_mapped) if a.ipv4_mapped else a.compressed


def _set_fields(msg: Message) -> list[str]:
    return [f.name for f, _ in msg.ListFields()]


def _warn_unenforced(ctx: Ctx, path: str, msg: Message, applied: set[str],
                     set_fields: list[str] | None = None) -> None:
    for name in set_fields if set_fields is not None else _set_fields(msg):
        if name not in applied:
            ctx.warn(f"{path}.{name}", "accepted but not enforced by kmesh yet")


def _socket_address(ctx: Ctx, path: str, addr: address_pb2.Address, what: str) -> tuple[str, int] | None:
    kind = addr.WhichOneof("address")
    if kind != "socket_address":
        ctx.unsupported(path, f"{what} needs a socket_address" + (f", not {kind}" if kind else ""))
        return None
    # Paths are made only for a problem: endpoints come by the ten thousand.
    sa = addr.socket_address
    ip, port = sa.address, sa.port_value
    version = _ip_version(ip)
    if version == 0:
        ctx.unsupported(f"{path}.socket_address.address", f"'{ip}' is not an IP address (hostnames are not resolved)")
        return None
    if version == 6:
        ip = canonical_ip(ip)
    if sa.WhichOneof("port_specifier") != "port_value":
        ctx.unsupported(f"{path}.socket_address.port_value",
                        "a numeric port_value is required (named ports are not supported)")
        return None
    if not 1 <= port <= 65535:
        ctx.error(f"{path}.socket_address.port_value", f"port {port} is out of range 1..65535")
        return None
    if sa.resolver_name:
        ctx.unsupported(f"{path}.socket_address.resolver_name", "custom resolvers are not supported")
        return None
    return ip, port


# --- clusters ------------------------------------------------------------------
#
# A cluster is translated in two parts, so that a push of endpoints (the most
# frequent push by far) costs only the endpoints: its *head*, from the
# Cluster resource alone, and for EDS the endpoints of its service, from the
# ClusterLoadAssignment alone (shared by every cluster of that service).
# ``compose_cluster`` puts them together with the notes and problems that
# translating both at once would give.

# The records below are built tens of thousands of times per push and never
# changed; they are not frozen because a frozen dataclass costs five times
# as much to build.

@dataclass(slots=True)
class ClusterHead:
    """What a Cluster resource says on its own."""

    name: str
    policy: LbPolicy | None
    service: str | None            # EDS: the service whose ClusterLoadAssignment holds the endpoints
    reason: str                    # set: not governed, and why (for EDS: once its endpoints are in)
    endpoints: tuple[Endpoint, ...] | None   # STATIC: the inline load_assignment
    traffic: ClusterPolicy         # circuit breaker, connect timeout, outlier detection
    warnings: tuple                # shared notes, relative to the cluster's path
    skipped: tuple
    problems: tuple[Problem, ...]


@dataclass(slots=True)
class ServiceEndpoints:
    """A ClusterLoadAssignment translated on its own; notes have absolute paths."""

    endpoints: tuple[Endpoint, ...] | None   # None: invalid
    warnings: tuple = ()
    skipped: tuple = ()
    problems: tuple[Problem, ...] = ()


@dataclass(slots=True)
class _ClusterOutcome:
    cluster: Cluster | None
    reason: str = ""  # why it is not governed (skipped, warming)


def cluster_head(ctx: Ctx, path: str, pb: cluster_pb2.Cluster, eds: bool) -> ClusterHead:
    """The head of the cluster at ``path`` (``ctx``: fresh, based at ``path``;
    ``eds``: whether EDS exists, i.e. ADS mode)."""
    reason, service, endpoints = _cluster_head(ctx, path, pb, eds)
    traffic = policies.cluster_policy(ctx, path, pb) if not reason else NO_POLICY
    return ClusterHead(sys.intern(pb.name), _LB.get(pb.lb_policy), service, reason, endpoints, traffic,
                       *ctx.notes(), tuple(ctx.problems))


def _cluster_head(ctx: Ctx, path: str, pb: cluster_pb2.Cluster,
                  eds: bool) -> tuple[str, str | None, tuple[Endpoint, ...] | None]:
    """(reason, EDS service, inline endpoints)."""
    if not pb.name:
        ctx.error(f"{path}.name", "a cluster needs a name")
        return "invalid", None, None
    if pb.WhichOneof("cluster_discovery_type") == "cluster_type":
        ctx.unsupported(f"{path}.cluster_type", "custom cluster types are not supported")
        return "custom cluster type", None, None
    if pb.type == _Cluster.ORIGINAL_DST and ctx.lenient:
        ctx.skip(path, "passthrough (ORIGINAL_DST) cluster: connections routed to it are left untouched")
        return "passthrough", None, None
    if pb.type not in (_Cluster.STATIC, _Cluster.EDS) or (pb.type == _Cluster.EDS and not eds):
        ctx.unsupported(f"{path}.type", _DISCOVERY_HINT.get(pb.type, f"cluster type {pb.type} is not supported"))
        return "unsupported type", None, None
    service = sys.intern(pb.eds_cluster_config.service_name or pb.name) if pb.type == _Cluster.EDS else None
    ok = True
    if pb.lb_policy not in _LB:
        name = _Cluster.LbPolicy.Name(pb.lb_policy) if pb.lb_policy in _Cluster.LbPolicy.values() \
            else f"lb_policy {pb.lb_policy}"
        ctx.unsupported(f"{path}.lb_policy", f"{name} is not supported; use ROUND_ROBIN, RANDOM or LEAST_REQUEST")
        if ctx.lenient:
            return "unsupported lb_policy", service, None
        ok = False
    set_fields = _set_fields(pb)
    tls = [n for n in ("transport_socket", "transport_socket_matches", "transport_socket_matcher") if n in set_fields]
    if tls:
        if ctx.lenient:
            ctx.skip(f"{path}.{tls[0]}", "TLS/mTLS is not applied by kmesh yet: connections stay plaintext")
        else:
            ctx.error(f"{path}.{tls[0]}", "upstream TLS is not supported: kmesh forwards connections as they are")
            ok = False
    # The refused fields (TLS, cluster_type, an unsupported type or policy)
    # are reported above with what they mean here.
    fields.check(pb, path, lambda p, r: None, ctx.warn)
    if service is not None:
        return "", service, None   # a problem above makes it invalid (compose_cluster)
    endpoints = _endpoints(ctx, f"{path}.load_assignment", pb.load_assignment)
    if endpoints is None or not ok:
        return "invalid endpoints", None, None
    return "", None, tuple(endpoints)


def service_endpoints(ctx: Ctx, path: str, cla) -> ServiceEndpoints:
    """A ClusterLoadAssignment at ``path`` (``ctx``: fresh, based nowhere)."""
    got = _endpoints(ctx, path, cla)
    return ServiceEndpoints(None if got is None else tuple(got), *ctx.notes(), tuple(ctx.problems))


def compose_cluster(ctx: Ctx, path: str, head: ClusterHead,
                    eds: Mapping[str, ServiceEndpoints]) -> _ClusterOutcome:
    """The cluster at ``path`` from its head and, for EDS, its service's
    endpoints; ``ctx`` (fresh, based at ``path``) gets the notes and problems
    that translating the resources together gives. A cluster waiting for its
    endpoints has only that to say."""
    got = None
    if head.service is not None:
        got = eds.get(head.service)
        if got is None:
            ctx.skip(path, f"warming: waiting for EDS '{head.service}'")
            return _ClusterOutcome(None, "warming")
    ctx.warnings += head.warnings
    ctx.skipped += head.skipped
    ctx.problems += head.problems
    if head.reason:
        return _ClusterOutcome(None, head.reason)
    if got is None:
        return _ClusterOutcome(Cluster(head.name, head.policy, head.endpoints, head.traffic))
    for notes, kept in ((got.warnings, ctx.warnings), (got.skipped, ctx.skipped)):
        for note in notes:
            ctx._note(kept, *note)
    ctx.problems += got.problems
    if got.endpoints is None or head.problems:
        return _ClusterOutcome(None, "invalid endpoints")
    return _ClusterOutcome(Cluster(head.name, head.policy, got.endpoints, head.traffic))


def _endpoints(ctx: Ctx, path: str, cla) -> list[Endpoint] | None:
    """Endpoints of the highest-priority (lowest number) level that has a
    healthy endpoint, as Envoy routes with no further health information."""
    by_priority: dict[int, list[Endpoint]] = {}
    ok = True
    for j, lle in enumerate(cla.endpoints):
        for k, lbe in enumerate(lle.lb_endpoints):
            epath = f"{path}.endpoints[{j}].lb_endpoints[{k}]"
            if lbe.WhichOneof("host_identifier") != "endpoint":
                ctx.unsupported(epath, "an inline endpoint with an address is required (endpoint_name is not supported)")
                ok = ok and ctx.lenient
                continue
            weight = 1
            if lbe.HasField("load_balancing_weight"):
                weight = lbe.load_balancing_weight.value
                if weight < 1:
                    ctx.error(f"{epath}.load_balancing_weight", "must be at least 1")
                    ok = False
            addr = _socket_address(ctx, f"{epath}.endpoint.address", lbe.endpoint.address, "an endpoint")
            if addr is None:
                ok = ok and ctx.lenient
                continue
            alt = _alt_address(ctx, epath, lbe.endpoint, addr) if lbe.endpoint.additional_addresses else ""
            if alt is None:
                ok = ok and ctx.lenient
                continue
            if lbe.health_status in _UNHEALTHY:
                continue
            by_priority.setdefault(lle.priority, []).append(_endpoint(addr[0], addr[1], weight, alt))
    if not ok:
        return None
    chosen = by_priority[min(by_priority)] if by_priority else []
    if len(chosen) > KMESH_MAX_ENDPOINTS:
        ctx.unsupported(f"{path}.endpoints",
                        f"{len(chosen)} endpoints exceed kmesh's limit of {KMESH_MAX_ENDPOINTS} per cluster")
        return None
    if sum(e.weight for e in chosen) > _MAX_U32:
        ctx.error(f"{path}.endpoints", "the sum of endpoint weights exceeds 4294967295")
        return None
    return chosen


# --- listeners -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Ref:
    """A cluster reference and the field path that made it."""

    path: str
    cluster: str
    weight: int


@dataclass(frozen=True, slots=True)
class _Entry:
    """A candidate (ip, port) -> clusters mapping."""

    ip: str
    port: int
    refs: tuple[_Ref, ...]
    priority: int
    path: str
    listener: str
    rate_limit: RateLimit = NO_RATE_LIMIT
    routes: RouteTable | None = None   # when the routes need the request
    http_filters: HttpFilters | None = None   # with routes
    accept_http_10: bool = False  # the connection manager's http_protocol_options
    route_faults: bool = True     # the fault filter is in its chain


def _weighted(ctx: Ctx, path: str, items: Iterable[tuple[str, int]]) -> list[_Ref] | None:
    refs = [_Ref(f"{path}[{i}].name", sys.intern(n), w) for i, (n, w) in enumerate(items)]
    if not refs:
        ctx.error(path, "weighted clusters need at least one cluster")
        return None
    if len([r for r in refs if r.weight > 0]) > KMESH_MAX_WEIGHTED_CLUSTERS:
        ctx.unsupported(path, f"more than {KMESH_MAX_WEIGHTED_CLUSTERS} weighted clusters are not supported")
        return None
    total = sum(r.weight for r in refs)
    if total == 0:
        ctx.error(path, "the weights add up to 0; at least one cluster needs a positive weight")
        return None
    if total > _MAX_U32:
        ctx.error(path, "the weights add up to more than 4294967295")
        return None
    return refs


def _tcp_proxy(ctx: Ctx, path: str, tp) -> list[_Ref] | None:
    _warn_unenforced(ctx, path, tp, _TCP_PROXY_APPLIED)
    which = tp.WhichOneof("cluster_specifier")
    if which == "cluster":
        return [_Ref(f"{path}.cluster", sys.intern(tp.cluster), 1)]
    if which == "weighted_clusters":
        return _weighted(ctx, f"{path}.weighted_clusters.clusters",
                         ((c.name, c.weight) for c in tp.weighted_clusters.clusters))
    ctx.error(path, "tcp_proxy needs 'cluster' or 'weighted_clusters'")
    return None


def _l7_conditions(match: route_components_pb2.RouteMatch) -> list[str]:
    """What in a route match needs an HTTP-level decision (empty: catch-all)."""
    needs = []
    for f, value in match.ListFields():
        if f.name == "prefix" and value in ("", "/"):
            continue
        if f.name == "case_sensitive":
            continue
        if f.name == "headers":
            needs += [f"header '{h.name}'" for h in value]
        elif f.name == "query_parameters":
            needs += [f"query parameter '{q.name}'" for q in value]
        elif isinstance(value, str):
            needs.append(f"{f.name} '{value}'")
        else:
            needs.append(f.name)
    return needs


def _route_action(ctx: Ctx, path: str, route) -> list[_Ref] | None:
    kind = route.WhichOneof("action")
    if kind != "route":
        if kind:
            ctx.unsupported(f"{path}.{kind}", f"route action '{kind}' needs L7 handling, which kmesh does not do yet")
        else:
            ctx.error(f"{path}.route", "a route needs an action")
        return None
    ra = route.route
    which = ra.WhichOneof("cluster_specifier")
    if which == "cluster":
        return [_Ref(f"{path}.route.cluster", sys.intern(ra.cluster), 1)]
    if which == "weighted_clusters":
        return _weighted(ctx, f"{path}.route.weighted_clusters.clusters",
                         ((c.name, c.weight.value if c.HasField("weight") else 0) for c in ra.weighted_clusters.clusters))
    ctx.unsupported(f"{path}.route", f"cluster_specifier '{which}' is not supported; use cluster or weighted_clusters"
                    if which else "a route needs cluster or weighted_clusters")
    return None


def _virtual_host_refs(ctx: Ctx, vpath: str, vhost, l7: bool = False) -> list[_Ref] | None:
    """The route a connection takes in a virtual host at L4: the first
    catch-all route (no L7 condition), else the first route; the clusters
    of the other routes come along with weight 0, to be checked. With
    ``l7`` the routes are decided per request and this is only the fallback
    for a daemon without L7: no notes about it, and a virtual host may have
    no cluster route at all (direct responses, redirects)."""
    routes = list(vhost.routes)
    if not routes:
        ctx.unsupported(f"{vpath}.routes", "the virtual host has no routes")
        return None
    chosen = next((i for i, r in enumerate(routes) if not _l7_conditions(r.match)), 0)
    refs: list[_Ref] | None = [] if l7 else None
    others: list[_Ref] = []
    for i, r in enumerate(routes):
        rpath = f"{vpath}.routes[{i}]"
        needs = _l7_conditions(r.match)
        if l7 and r.WhichOneof("action") != "route":
            continue   # answered by the hand-off listener
        if i == chosen:
            if needs and not l7:
                ctx.warn(f"{rpath}.match", f"{', '.join(needs)} needs the request, which this listener is not "
                         "routed by: the route applies to every connection")
            refs = _route_action(ctx, rpath, r)
            continue
        if not l7:
            # At L4 only when routes[chosen] is a plain catch-all, which
            # Envoy also matches first: this route is never reached there.
            ctx.warn(f"{rpath}.match", f"never reached: routes[{chosen}] matches every request first "
                     "(as in Envoy)")
        if r.WhichOneof("action") == "route":
            # Checked even where not applied at L4.
            others += [_Ref(x.path, x.cluster, 0) for x in _route_action(ctx, rpath, r) or ()]
    return None if refs is None else refs + others


# The HTTP filters kmesh applies (the router; RBAC and the local rate limit
# here; the fault filter through its per-route configs, kmesh.config.http.routes).
_FAULT_FILTER_TYPE = "envoy.extensions.filters.http.fault.v3.HTTPFault"
_HTTP_FILTERS_KNOWN = {"envoy.extensions.filters.http.router.v3.Router", filters.RBAC_TYPE,
                       policies.HTTP_LOCAL_RATELIMIT_TYPE, _FAULT_FILTER_TYPE}


def _http_filters(ctx: Ctx, path: str, hcm) -> tuple[HttpRateLimit | None, Rbac | None, FilterFault | None, bool,
                                                     tuple[str, ...]]:
    """The HTTP local rate limit, RBAC and the fault filter's own fault among
    the connection manager's filters (applied by the L7 hand-off listener):
    (HttpRateLimit | None, Rbac | None, FilterFault | None, whether per-route
    fault configs apply, the order they run in). Per-route faults need the
    fault filter in the chain, as in Envoy; a file that lists no HTTP filter
    at all (not even the router, which Envoy would need) keeps them."""
    rate_limit = rbac = fault = None
    order: list[str] = []
    fault_filter = not hcm.http_filters
    for i, f in enumerate(hcm.http_filters):
        if f.WhichOneof("config_type") != "typed_config":
            if not ctx.lenient:
                ctx.warn(f"{path}.http_filters[{i}]", f"HTTP filter '{f.name}' without a typed_config: not applied "
                         "by kmesh")
            continue
        fpath, kind = f"{path}.http_filters[{i}].typed_config", f.typed_config.TypeName()
        if kind not in _HTTP_FILTERS_KNOWN and not ctx.lenient:
            # A file says what it means: a filter kmesh does not run is said
            # so (from a control plane, Istio's telemetry filters would make
            # this a note on every listener).
            ctx.warn(fpath, f"HTTP filter '{f.name}' ({kind or 'no type'}): not applied by kmesh")
        if kind == _FAULT_FILTER_TYPE:
            if fault_filter and hcm.http_filters:
                ctx.unsupported(fpath, "kmesh applies one fault filter per connection manager")
                continue
            from kmesh.config.http import routes as http_routes   # late: only configs with HTTP routes pay for it

            fault_filter = True
            fault = http_routes.filter_fault(f.typed_config, fpath, problem=ctx.unsupported, note=ctx.warn)
            order.append("fault")
        if kind == policies.HTTP_LOCAL_RATELIMIT_TYPE and rate_limit is None:
            rate_limit = policies.http_rate_limit(ctx, fpath, f.typed_config)
            order.append("rate_limit")
        elif kind == filters.RBAC_TYPE:
            if rbac is not None:
                ctx.unsupported(fpath, "kmesh applies one RBAC filter per connection manager")
                continue
            from kmesh.config.http import rbac as http_rbac   # late: only configs with RBAC pay for it
            rbac = http_rbac.compile_rbac(f.typed_config, fpath, problem=ctx.unsupported, note=ctx.warn,
                                       fail_closed=ctx.lenient)
            order.append("rbac")
    return rate_limit, rbac, fault, fault_filter, tuple(order) if hcm.http_filters else FILTER_ORDER


def _domain_ips(domains: Iterable[str], port: int, v6: bool = False) -> list[str]:
    """IP literals of one family among a virtual host's domains ("10.96.1.2",
    "10.96.1.2:9080"; "[fd00::1]", "[fd00::1]:9080")."""
    out = []
    for d in domains:
        if v6:
            if d[:1] != "[":
                continue
            host, _, rest = d[1:].partition("]")
            p = rest[1:] if rest[:1] == ":" else ""
            if _ip_version(host) != 6:
                continue
            host = canonical_ip(host)
            if ":" not in host:
                continue   # a mapped IPv4 address: the IPv4 wildcard's
        else:
            if not d[:1].isdigit():
                continue  # a name, or '*'
            host, _, p = d.partition(":")
            if _ip_version(host) != 4:
                continue
        if p and p != str(port):
            continue
        if host not in out:
            out.append(host)
    return out


_HCM_OWN = frozenset({"scoped_routes"})   # reported with the route specifier
_HCM = fields.HCM


def _http_connection_manager(ctx: Ctx, path: str, hcm, keys: list[tuple[str, int, int]], listener: str,
                             routes: Mapping | None) -> list[_Entry] | None:
    fields.check(hcm, path, ctx.unsupported, ctx.warn, skip=_HCM_OWN)
    if hcm.codec_type not in (_HCM.AUTO, _HCM.HTTP1):
        ctx.unsupported(f"{path}.codec_type", f"{_HCM.CodecType.Name(hcm.codec_type)}: kmesh speaks HTTP/1.1 only; "
                        "use AUTO or HTTP1")
    for f, _ in hcm.http_protocol_options.ListFields():
        if f.name != "accept_http_10":
            ctx.warn(f"{path}.http_protocol_options.{f.name}", fields.NOT_ENFORCED)
    spec = hcm.WhichOneof("route_specifier")
    if spec == "rds":
        name = hcm.rds.route_config_name
        if routes is None:
            ctx.unsupported(f"{path}.rds", "RDS needs ADS mode (-enable-ads=true); inline the routes as route_config")
            return None
        got = routes.get(name)
        if got is None:
            ctx.skip(path, f"warming: waiting for RDS '{name}'")
            return []
        rc_path, rc = got
    elif spec == "route_config":
        rc_path, rc = f"{path}.route_config", hcm.route_config
    else:
        ctx.unsupported(f"{path}.{spec or 'route_config'}", "an inline route_config is required")
        return None
    vhosts = list(rc.virtual_hosts)
    if not vhosts:
        ctx.unsupported(f"{rc_path}.virtual_hosts", "route_config has no virtual_hosts")
        return None
    from kmesh.config.http import routes as http_routes   # late: only configs with HTTP routes pay for it

    # Each (VIP, port) is decided by the virtual host it addresses: the one
    # whose domains name the VIP (a wildcard listener: each such VIP; an
    # explicit address: its own), else the '*' one. It needs the request
    # when that virtual host's result can depend on it (its routes, faults,
    # HTTP filters), whatever the listener's shape (docs/l7.md, "L4 or L7").
    # Routed per request, Host then picks among all the virtual hosts, as in
    # Envoy.
    http_rl, rbac, fault, fault_filter, order = _http_filters(ctx, path, hcm)
    http_filters = HttpFilters(http_rl, rbac, fault, order) \
        if http_rl is not None or rbac is not None or fault is not None else None
    star = next((i for i, v in enumerate(vhosts) if "*" in v.domains), None)
    fallback = star if star is not None else (None if ctx.lenient else 0)
    # (ip, port, prio, virtual host index, field path of the choice)
    chosen: list[tuple[str, int, int, int, str]] = []
    for ip, port, prio in keys:
        if ip in WILDCARDS:
            for i, v in enumerate(vhosts):
                for vip in _domain_ips(v.domains, port, ip == WILDCARD6):
                    chosen.append((vip, port, _P_DOMAIN + prio % 10, i, f"{rc_path}.virtual_hosts[{i}].domains"))
            # The wildcard itself: every connection to the port that named no
            # VIP comes to the catch-all.
            if fallback is not None:
                chosen.append((ip, port, prio, fallback, f"{rc_path}.virtual_hosts[{fallback}]"))
        else:
            i = next((i for i, v in enumerate(vhosts) if ip in _domain_ips(v.domains, port, ":" in ip)), fallback)
            if i is not None:
                chosen.append((ip, port, prio, i, f"{rc_path}.virtual_hosts[{i}]"))
    # Compiled whatever the listener's shape: its fields are checked (and
    # noted) alike, and the compiled routes say exactly which virtual hosts
    # a connection-level decision gives every request what Envoy gives it.
    compiled = http_routes.compile_routes(rc, rc_path, problem=ctx.unsupported, note=ctx.warn)
    needs = [http_filters is not None or compiled is None or compiled.needs_request(i) for i in range(len(vhosts))]
    table = compiled if any(needs[i] for *_, i, _ in chosen) else None
    if len(vhosts) > 1 and table is None:
        ctx.warn(f"{rc_path}.virtual_hosts", "routed at L4: a connection takes the virtual host whose domains name "
                 "its destination IP, else the '*' one, whatever its Host header (docs/l7.md, \"L4 or L7\")")
    refs_cache: dict[int, list[_Ref] | None] = {}

    def refs_of(i: int) -> list[_Ref] | None:
        if i not in refs_cache:
            refs_cache[i] = _virtual_host_refs(ctx, f"{rc_path}.virtual_hosts[{i}]", vhosts[i], table is not None)
        return refs_cache[i]

    entries = []
    for ip, port, prio, i, where in chosen:
        refs = refs_of(i)
        routes = table if needs[i] else None
        # A wildcard catch-all only with a governed route: every
        # connection to the port would come to it.
        if ip in WILDCARDS and not refs:
            continue
        if refs or routes:
            entries.append(_Entry(ip, port, tuple(refs or ()), prio, where, listener, routes=routes,
                                  http_filters=http_filters,
                                  accept_http_10=hcm.http_protocol_options.accept_http_10,
                                  route_faults=fault_filter))
    if any(refs_cache.get(i, True) is None for i in refs_cache) and not ctx.lenient:
        return None
    return entries


_TERMINAL = {filters.TCP_PROXY_TYPE, filters.HCM_TYPE}


def _chain_keys(ctx: Ctx, cpath: str, chain, addrs: list[tuple[str, int, str]]) -> list[tuple[str, int, int]] | None:
    """(ip, port, priority) keys a filter chain serves, or None to skip it."""
    m = chain.filter_chain_match
    mpath = f"{cpath}.filter_chain_match"
    set_ = set(_set_fields(m))
    if "server_names" in set_ or (m.transport_protocol and m.transport_protocol != "raw_buffer"):
        ctx.skip(mpath, "matches TLS (SNI / transport_protocol); kmesh decides at connect time, before any bytes")
        return None
    bonus = 0
    if m.application_protocols:
        if not set(m.application_protocols) & _PLAINTEXT_ALPN:
            ctx.skip(mpath, f"matches application protocols {list(m.application_protocols)} that a plaintext "
                     "connection never has")
            return None
        bonus = 1
    for src in ("source_type", "source_prefix_ranges", "direct_source_prefix_ranges", "source_ports"):
        if src in set_:
            ctx.skip(f"{mpath}.{src}", "matching on the connection's source is not supported")
            return None
    ips: list[tuple[str, int]] = []
    if m.prefix_ranges:
        for i, r in enumerate(m.prefix_ranges):
            plen = r.prefix_len.value if r.HasField("prefix_len") else None
            try:
                ip = ipaddress.ip_address(r.address_prefix)
            except ValueError:
                ctx.error(f"{mpath}.prefix_ranges[{i}].address_prefix", f"'{r.address_prefix}' is not an IP address")
                return None
            full = 32 if ip.version == 4 else 128
            if plen in (None, full):
                ips.append((str(ip) if ip.version == 4 else canonical_ip(str(ip)), _P_PREFIX))
            elif plen == 0:
                ips.append((WILDCARD if ip.version == 4 else WILDCARD6, _P_WILDCARD))
            else:
                ctx.skip(f"{mpath}.prefix_ranges[{i}]", "only single addresses (/32, /128) or 0.0.0.0/0 and ::/0 "
                         "can be matched at connect time")
    else:
        ips = [(ip, _P_WILDCARD if ip in WILDCARDS else _P_ADDRESS) for ip, _, _ in addrs]
    if not ips:
        return None
    ports = [m.destination_port.value] if m.HasField("destination_port") else sorted({p for _, p, _ in addrs})
    return [(ip, port, prio + bonus) for ip, prio in ips for port in ports]


def _filter_chain(ctx: Ctx, cpath: str, chain, keys, listener: str, routes) -> list[_Entry] | None:
    entries, rate_limit = _chain_filters(ctx, cpath, chain, keys, listener, routes)
    if entries and rate_limit != NO_RATE_LIMIT:
        entries = [replace(e, rate_limit=rate_limit) for e in entries]
    return entries


def _chain_filters(ctx: Ctx, cpath: str, chain, keys, listener: str,
                   routes) -> tuple[list[_Entry] | None, RateLimit]:
    """The chain's entries, and the rate limit of a local_ratelimit filter
    before its terminal filter."""
    rate_limit = NO_RATE_LIMIT
    if not chain.filters:
        ctx.error(f"{cpath}.filters", "a filter chain needs a tcp_proxy or http_connection_manager filter")
        return None, rate_limit
    for i, f in enumerate(chain.filters):
        fpath = f"{cpath}.filters[{i}]"
        if f.WhichOneof("config_type") != "typed_config":
            ctx.unsupported(f"{fpath}.typed_config", f"filter '{f.name}' needs a typed_config")
            return None, rate_limit
        type_name = f.typed_config.TypeName()
        if type_name == policies.LOCAL_RATELIMIT_TYPE:
            if rate_limit != NO_RATE_LIMIT:
                ctx.warn(fpath, "a second local_ratelimit filter: kmesh applies only the first")
                continue
            got = policies.rate_limit(ctx, f"{fpath}.typed_config", f.typed_config)
            if got is None:
                return None, rate_limit
            rate_limit = got
            continue
        if type_name not in _TERMINAL:
            if ctx.lenient:
                ctx.skip(fpath, f"network filter '{f.name}' ({type_name}) is not applied by kmesh")
                continue
            ctx.error(f"{fpath}.typed_config", f"unsupported network filter '{f.name}' ({type_name}); "
                      f"kmesh supports {filters.LOCAL_RATELIMIT}, {filters.TCP_PROXY} and "
                      f"{filters.HTTP_CONNECTION_MANAGER}")
            return None, rate_limit
        tpath = f"{fpath}.typed_config"
        if type_name == filters.TCP_PROXY_TYPE:
            msg = filters.tcp_proxy_pb2.TcpProxy()
            f.typed_config.Unpack(msg)
            refs = _tcp_proxy(ctx, tpath, msg)
            if refs is None:
                return None, rate_limit
            return [_Entry(ip, port, tuple(refs), prio, tpath, listener) for ip, port, prio in keys], rate_limit
        msg = filters.hcm_pb2.HttpConnectionManager()
        f.typed_config.Unpack(msg)
        return _http_connection_manager(ctx, tpath, msg, keys, listener, routes), rate_limit
    ctx.unsupported(f"{cpath}.filters", "no tcp_proxy or http_connection_manager filter in the chain")
    return None, rate_limit


def translate_listener(ctx: Ctx, path: str, pb: listener_pb2.Listener, routes: Mapping | None) -> list[_Entry] | None:
    if not pb.name:
        ctx.error(f"{path}.name", "a listener needs a name")
        return None
    if ctx.lenient and pb.traffic_direction == base_pb2.INBOUND:
        ctx.skip(path, "inbound listener: kmesh governs the connects of local clients (outbound)")
        return []
    if pb.HasField("use_original_dst") and pb.use_original_dst.value:
        ctx.skip(f"{path}.use_original_dst", "a capture listener (use_original_dst) has no role without iptables "
                 "redirection; kmesh sees each connect directly")
        return []
    if not pb.HasField("address"):
        ctx.error(f"{path}.address", "a listener needs an address")
        return None
    if pb.address.socket_address.protocol == address_pb2.SocketAddress.UDP:
        ctx.skip(f"{path}.address.socket_address.protocol", "UDP listeners are left alone; listener skipped")
        return []
    addrs_pb = [(f"{path}.address", pb.address)]
    addrs_pb += [(f"{path}.additional_addresses[{i}].address", a.address) for i, a in enumerate(pb.additional_addresses)]
    addrs = []
    for apath, addr in addrs_pb:
        got = _socket_address(ctx, apath, addr, "a listener")
        if got is None:
            return [] if ctx.lenient else None
        addrs.append((got[0], got[1], apath))
    chains = [(f"{path}.filter_chains[{i}]", c) for i, c in enumerate(pb.filter_chains)]
    if pb.HasField("default_filter_chain"):
        chains.append((f"{path}.default_filter_chain", pb.default_filter_chain))
    if not chains:
        ctx.error(f"{path}.filter_chains", "a listener needs a filter chain")
        return None
    if pb.listener_filters and not ctx.lenient:
        ctx.warn(f"{path}.listener_filters", "listener filters are not applied by kmesh")
    entries: list[_Entry] = []
    ok = True
    for cpath, chain in chains:
        keys = _chain_keys(ctx, cpath, chain, addrs)
        if keys is None:
            continue
        got = _filter_chain(ctx, cpath, chain, keys, pb.name, routes)
        if got is None:
            ok = False
            continue
        entries += got
    return entries if ok or ctx.lenient else None


# --- the whole config ------------------------------------------------------------

def _ipv6_only(c: Cluster) -> bool:
    return bool(c.endpoints) and all(":" in e.ip and (not e.alt or ":" in e.alt) for e in c.endpoints)


def resolve_key(ctx: Ctx, key: tuple[str, int], entries: list[_Entry],
                 outcome_of) -> tuple[Listener | None, set[str]]:
    """The most specific entry for one (ip, port), its references checked.
    Returns the listener (None: leave the key untouched) and every cluster
    name the entries referenced (so a change of those clusters re-resolves
    the key)."""
    chosen: _Entry | None = None
    weighted: tuple[WeightedCluster, ...] = ()
    referenced: set[str] = set()
    for e in entries:
        referenced.update(r.cluster for r in e.refs)
        if chosen is not None:
            if chosen.priority > e.priority:
                continue
            if chosen.priority == e.priority:
                if e.priority in (_P_ADDRESS, _P_WILDCARD) and chosen.listener != e.listener and not ctx.lenient:
                    ctx.error(e.path.split(".filter_chains")[0] + ".address",
                              f"address {host_port(e.ip, e.port)} is already used by listener "
                              f"'{chosen.listener}'")
                else:
                    ctx.warn(e.path, f"{host_port(e.ip, e.port)} is already served by {chosen.path}; "
                             "this one is ignored")
                continue
        live = []
        for r in e.refs:
            outcome = outcome_of(r.cluster)
            if outcome is None:
                if ctx.lenient:
                    ctx.skip(r.path, f"cluster '{r.cluster}' is unknown; its share is left untouched")
                else:
                    ctx.error(r.path, f"cluster '{r.cluster}' is not defined in {ctx.cluster_origin}")
                continue
            if outcome.cluster is None:
                ctx.skip(r.path, f"cluster '{r.cluster}' is not governed ({outcome.reason})")
                continue
            # (An L7 listener's requests go up from the daemon's own socket,
            # of any family.)
            if r.weight > 0 and e.routes is None and ":" not in key[0] and _ipv6_only(outcome.cluster):
                msg = (f"cluster '{r.cluster}' has IPv6 endpoints only, and a connect to the IPv4 address "
                       f"{host_port(*key)} cannot change its socket's family; give its endpoints IPv4 addresses "
                       "(additional_addresses), or serve it on an IPv6 address")
                if ctx.lenient:
                    ctx.skip(r.path, msg)
                else:
                    ctx.error(r.path, msg)
                continue
            if r.weight > 0:
                live.append(WeightedCluster(r.cluster, r.weight))
        chosen, weighted = e, tuple(live)
    if chosen is None or not (weighted or chosen.routes is not None):
        return None, referenced
    if key[0] in WILDCARDS and chosen.refs and not weighted:
        # A wildcard's catch-all that forwards only to clusters kmesh does
        # not govern (Istio's allow_any to PassthroughCluster): connections
        # to addresses no virtual host names are left alone.
        return None, referenced
    return Listener(chosen.listener, key[0], key[1], weighted, chosen.rate_limit, chosen.routes,
                    chosen.http_filters if chosen.routes is not None else None,
                    chosen.accept_http_10, chosen.route_faults), referenced
