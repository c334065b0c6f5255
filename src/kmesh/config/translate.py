"""Envoy v3 Listeners and Clusters -> kmesh's model (pure functions).

One translator serves every config source: a standalone Bootstrap file hands
in ``static_resources``, the xDS client hands in the resources it received.
Meaning is checked here (the schema was checked when parsing): references,
address families, ranges, limits. Every problem names the field path; what
kmesh accepts but cannot enforce yet becomes an explicit warning.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, health_check_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2
from google.protobuf.message import Message

from kmesh.bpf.records import KMESH_MAX_ENDPOINTS, KMESH_MAX_WEIGHTED_CLUSTERS, LbPolicy
from kmesh.config import filters
from kmesh.config.errors import ConfigError, Problem
from kmesh.config.model import Cluster, Endpoint, Listener, MeshConfig, WeightedCluster

_Cluster = cluster_pb2.Cluster
_LB = {
    _Cluster.ROUND_ROBIN: LbPolicy.ROUND_ROBIN,
    _Cluster.RANDOM: LbPolicy.RANDOM,
    _Cluster.LEAST_REQUEST: LbPolicy.LEAST_REQUEST,
}
_DISCOVERY_HINT = {
    _Cluster.EDS: "EDS clusters need ADS mode (-enable-ads=true)",
    _Cluster.STRICT_DNS: "DNS clusters are not supported; list IPv4 endpoints in a STATIC cluster",
    _Cluster.LOGICAL_DNS: "DNS clusters are not supported; list IPv4 endpoints in a STATIC cluster",
    _Cluster.ORIGINAL_DST: "ORIGINAL_DST clusters are not supported yet",
}
_UNHEALTHY = {
    health_check_pb2.UNHEALTHY,
    health_check_pb2.DRAINING,
    health_check_pb2.TIMEOUT,
}
# Fields whose effect kmesh reproduces (or that change nothing at L4). Any
# other field that is set produces a "not enforced" warning.
_CLUSTER_APPLIED = {"name", "alt_stat_name", "type", "lb_policy", "load_assignment", "connect_timeout", "metadata"}
_TCP_PROXY_APPLIED = {"stat_prefix", "cluster", "weighted_clusters"}
_MAX_U32 = 2**32 - 1


@dataclass
class _Ctx:
    source: str
    cluster_origin: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, path: str, reason: str) -> None:
        self.problems.append(Problem(self.source, path, reason))

    def warn(self, path: str, reason: str) -> None:
        self.warnings.append(str(Problem(self.source, path, reason)))


def _set_fields(msg: Message) -> list[str]:
    return [f.name for f, _ in msg.ListFields()]


def _warn_unenforced(ctx: _Ctx, path: str, msg: Message, applied: set[str]) -> None:
    for name in _set_fields(msg):
        if name not in applied:
            ctx.warn(f"{path}.{name}", "accepted but not enforced by kmesh yet")


def _socket_address(ctx: _Ctx, path: str, addr: address_pb2.Address, what: str) -> tuple[str, int] | None:
    kind = addr.WhichOneof("address")
    if kind != "socket_address":
        ctx.error(path, f"{what} needs a socket_address" + (f", not {kind}" if kind else ""))
        return None
    sa = addr.socket_address
    path = f"{path}.socket_address"
    try:
        ip = ipaddress.ip_address(sa.address)
    except ValueError:
        ctx.error(f"{path}.address", f"'{sa.address}' is not an IP address (hostnames are not resolved)")
        return None
    if ip.version != 4:
        ctx.error(f"{path}.address", f"'{sa.address}' is IPv6; kmesh supports IPv4 only for now")
        return None
    if sa.WhichOneof("port_specifier") != "port_value":
        ctx.error(f"{path}.port_value", "a numeric port_value is required (named ports are not supported)")
        return None
    if not 1 <= sa.port_value <= 65535:
        ctx.error(f"{path}.port_value", f"port {sa.port_value} is out of range 1..65535")
        return None
    if sa.resolver_name:
        ctx.error(f"{path}.resolver_name", "custom resolvers are not supported")
        return None
    return str(ip), sa.port_value


# --- clusters ------------------------------------------------------------------

def _cluster(ctx: _Ctx, path: str, pb: cluster_pb2.Cluster) -> Cluster | None:
    ok = True
    if not pb.name:
        ctx.error(f"{path}.name", "a cluster needs a name")
        ok = False
    if pb.WhichOneof("cluster_discovery_type") == "cluster_type":
        ctx.error(f"{path}.cluster_type", "custom cluster types are not supported")
        return None
    if pb.type != _Cluster.STATIC:
        ctx.error(f"{path}.type", _DISCOVERY_HINT.get(pb.type, f"cluster type {pb.type} is not supported"))
        return None
    if pb.lb_policy not in _LB:
        name = _Cluster.LbPolicy.Name(pb.lb_policy)
        ctx.error(f"{path}.lb_policy", f"{name} is not supported; use ROUND_ROBIN, RANDOM or LEAST_REQUEST")
        ok = False
    if pb.HasField("transport_socket"):
        ctx.error(f"{path}.transport_socket", "upstream TLS is not supported: kmesh forwards connections as they are")
        ok = False
    _warn_unenforced(ctx, path, pb, _CLUSTER_APPLIED | {"transport_socket"})
    endpoints = _endpoints(ctx, f"{path}.load_assignment", pb.load_assignment)
    if endpoints is None or not ok:
        return None
    return Cluster(pb.name, _LB[pb.lb_policy], tuple(endpoints))


def _endpoints(ctx: _Ctx, path: str, cla) -> list[Endpoint] | None:
    """Endpoints of the highest-priority (lowest number) level that has a
    healthy endpoint, as Envoy routes with no health information otherwise."""
    by_priority: dict[int, list[Endpoint]] = {}
    ok = True
    for j, lle in enumerate(cla.endpoints):
        for k, lbe in enumerate(lle.lb_endpoints):
            epath = f"{path}.endpoints[{j}].lb_endpoints[{k}]"
            if lbe.WhichOneof("host_identifier") != "endpoint":
                ctx.error(epath, "an inline endpoint with an address is required (endpoint_name is not supported)")
                ok = False
                continue
            addr = _socket_address(ctx, f"{epath}.endpoint.address", lbe.endpoint.address, "an endpoint")
            weight = 1
            if lbe.HasField("load_balancing_weight"):
                weight = lbe.load_balancing_weight.value
                if weight < 1:
                    ctx.error(f"{epath}.load_balancing_weight", "must be at least 1")
                    ok = False
            if addr is None:
                ok = False
                continue
            if lbe.health_status in _UNHEALTHY:
                continue
            by_priority.setdefault(lle.priority, []).append(Endpoint(addr[0], addr[1], weight))
    if not ok:
        return None
    chosen = by_priority[min(by_priority)] if by_priority else []
    if len(chosen) > KMESH_MAX_ENDPOINTS:
        ctx.error(f"{path}.endpoints", f"{len(chosen)} endpoints exceed kmesh's limit of {KMESH_MAX_ENDPOINTS} per cluster")
        return None
    if sum(e.weight for e in chosen) > _MAX_U32:
        ctx.error(f"{path}.endpoints", "the sum of endpoint weights exceeds 4294967295")
        return None
    return chosen


# --- listeners -----------------------------------------------------------------

@dataclass(frozen=True)
class _Ref:
    """A cluster reference and the field path that made it."""

    path: str
    cluster: str
    weight: int


def _weighted(ctx: _Ctx, path: str, items: Iterable[tuple[str, int]], name_field: str = "name") -> list[_Ref] | None:
    refs = [_Ref(f"{path}[{i}].{name_field}", n, w) for i, (n, w) in enumerate(items)]
    if not refs:
        ctx.error(path, "weighted clusters need at least one cluster")
        return None
    if len([r for r in refs if r.weight > 0]) > KMESH_MAX_WEIGHTED_CLUSTERS:
        ctx.error(path, f"more than {KMESH_MAX_WEIGHTED_CLUSTERS} weighted clusters are not supported")
        return None
    total = sum(r.weight for r in refs)
    if total == 0:
        ctx.error(path, "the weights add up to 0; at least one cluster needs a positive weight")
        return None
    if total > _MAX_U32:
        ctx.error(path, "the weights add up to more than 4294967295")
        return None
    return refs


def _tcp_proxy(ctx: _Ctx, path: str, tp) -> list[_Ref] | None:
    _warn_unenforced(ctx, path, tp, _TCP_PROXY_APPLIED)
    which = tp.WhichOneof("cluster_specifier")
    if which == "cluster":
        return [_Ref(f"{path}.cluster", tp.cluster, 1)]
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


def _route_action(ctx: _Ctx, path: str, route) -> list[_Ref] | None:
    kind = route.WhichOneof("action")
    if kind != "route":
        ctx.error(f"{path}.{kind or 'route'}", f"route action '{kind}' needs L7 handling, which kmesh does not do yet"
                  if kind else "a route needs an action")
        return None
    ra = route.route
    which = ra.WhichOneof("cluster_specifier")
    if which == "cluster":
        return [_Ref(f"{path}.route.cluster", ra.cluster, 1)]
    if which == "weighted_clusters":
        return _weighted(ctx, f"{path}.route.weighted_clusters.clusters",
                         ((c.name, c.weight.value if c.HasField("weight") else 0) for c in ra.weighted_clusters.clusters))
    ctx.error(f"{path}.route", f"cluster_specifier '{which}' is not supported; use cluster or weighted_clusters"
              if which else "a route needs cluster or weighted_clusters")
    return None


def _http_connection_manager(ctx: _Ctx, path: str, hcm) -> list[_Ref] | None:
    spec = hcm.WhichOneof("route_specifier")
    if spec == "rds":
        ctx.error(f"{path}.rds", "RDS needs ADS mode (-enable-ads=true); inline the routes as route_config")
        return None
    if spec != "route_config":
        ctx.error(f"{path}.{spec or 'route_config'}", "an inline route_config is required")
        return None
    rc_path = f"{path}.route_config"
    vhosts = list(hcm.route_config.virtual_hosts)
    if not vhosts:
        ctx.error(f"{rc_path}.virtual_hosts", "route_config has no virtual_hosts")
        return None
    vi = next((i for i, v in enumerate(vhosts) if "*" in v.domains), 0)
    if len(vhosts) > 1:
        ctx.warn(f"{rc_path}.virtual_hosts", "choosing a virtual host by Host needs L7 routing (not yet supported); "
                 f"every connection uses virtual_hosts[{vi}] ({vhosts[vi].name})")
    routes = list(vhosts[vi].routes)
    vpath = f"{rc_path}.virtual_hosts[{vi}]"
    if not routes:
        ctx.error(f"{vpath}.routes", "the virtual host has no routes")
        return None
    chosen = next((i for i, r in enumerate(routes) if not _l7_conditions(r.match)), 0)
    chosen_refs = None
    for i, r in enumerate(routes):
        rpath = f"{vpath}.routes[{i}]"
        needs = _l7_conditions(r.match)
        if i == chosen:
            if needs:
                ctx.warn(f"{rpath}.match", f"{', '.join(needs)} needs L7 routing (not yet supported); "
                         "the route applies to every connection")
            chosen_refs = _route_action(ctx, rpath, r)
        else:
            ctx.warn(f"{rpath}.match", f"{', '.join(needs) or 'this route'} needs L7 routing (not yet supported); "
                     f"connections use routes[{chosen}] instead")
            if r.WhichOneof("action") == "route":
                # Validate what it references even though it is not applied.
                refs = _route_action(ctx, rpath, r)
                if refs and chosen_refs is not None:
                    chosen_refs = chosen_refs + [_Ref(x.path, x.cluster, 0) for x in refs]
    return chosen_refs


_TERMINAL = {filters.TCP_PROXY_TYPE: ("TcpProxy", _tcp_proxy),
             filters.HCM_TYPE: ("HttpConnectionManager", _http_connection_manager)}


def _filter_chain(ctx: _Ctx, path: str, chain) -> list[_Ref] | None:
    if not chain.filters:
        ctx.error(f"{path}.filters", "a filter chain needs a tcp_proxy or http_connection_manager filter")
        return None
    refs = None
    for i, f in enumerate(chain.filters):
        fpath = f"{path}.filters[{i}]"
        if f.WhichOneof("config_type") != "typed_config":
            ctx.error(f"{fpath}.typed_config", f"filter '{f.name}' needs a typed_config")
            return None
        type_name = f.typed_config.TypeName()
        if type_name not in _TERMINAL:
            ctx.error(f"{fpath}.typed_config", f"unsupported network filter '{f.name}' ({type_name}); "
                      f"kmesh supports {filters.TCP_PROXY} and {filters.HTTP_CONNECTION_MANAGER}")
            return None
        if refs is not None:
            ctx.error(fpath, "a filter after the terminal filter is never reached")
            return None
        _, fn = _TERMINAL[type_name]
        msg = (filters.tcp_proxy_pb2.TcpProxy() if type_name == filters.TCP_PROXY_TYPE
               else filters.hcm_pb2.HttpConnectionManager())
        f.typed_config.Unpack(msg)
        refs = fn(ctx, f"{fpath}.typed_config", msg)
        if refs is None:
            return None
    return refs


def _listener(ctx: _Ctx, path: str, pb: listener_pb2.Listener) -> tuple[list[tuple[str, int, str]], list[_Ref]] | None:
    """Returns ([(ip, port, address path)], cluster refs) or None."""
    if not pb.name:
        ctx.error(f"{path}.name", "a listener needs a name")
        return None
    if not pb.HasField("address"):
        ctx.error(f"{path}.address", "a listener needs an address")
        return None
    if pb.address.socket_address.protocol == address_pb2.SocketAddress.UDP:
        ctx.warn(f"{path}.address.socket_address.protocol", "UDP listeners are left alone; listener skipped")
        return [], []
    addrs = [(f"{path}.address", pb.address)]
    addrs += [(f"{path}.additional_addresses[{i}].address", a.address) for i, a in enumerate(pb.additional_addresses)]
    keys = []
    for apath, addr in addrs:
        got = _socket_address(ctx, apath, addr, "a listener")
        if got is not None:
            keys.append((got[0], got[1], apath))
    if len(keys) != len(addrs):
        return None
    chains = [(f"{path}.filter_chains[{i}]", c) for i, c in enumerate(pb.filter_chains)]
    if pb.HasField("default_filter_chain"):
        chains.append((f"{path}.default_filter_chain", pb.default_filter_chain))
    if not chains:
        ctx.error(f"{path}.filter_chains", "a listener needs a filter chain")
        return None
    cpath, chain = chains[0]
    if chain.HasField("filter_chain_match") and _set_fields(chain.filter_chain_match):
        ctx.warn(f"{cpath}.filter_chain_match", "filter chain matching is not supported yet; "
                 "the chain applies to every connection")
    for extra_path, _ in chains[1:]:
        ctx.warn(extra_path, f"only the first filter chain is used; this one is ignored")
    if pb.listener_filters:
        ctx.warn(f"{path}.listener_filters", "listener filters are not applied by kmesh")
    refs = _filter_chain(ctx, cpath, chain)
    if refs is None:
        return None
    return keys, refs


def translate(source: str, listeners: Sequence[tuple[str, listener_pb2.Listener]],
              clusters: Sequence[tuple[str, cluster_pb2.Cluster]],
              cluster_origin: str = "static_resources.clusters") -> MeshConfig:
    """Translate resources; raises ConfigError listing every problem found.

    ``listeners`` and ``clusters`` are (field path, proto) pairs so that errors
    point into the source the resource came from.
    """
    ctx = _Ctx(source, cluster_origin)
    out_clusters: dict[str, Cluster] = {}
    known_cluster_names: set[str] = set()
    first_cluster_path: dict[str, str] = {}
    for path, pb in clusters:
        if pb.name and pb.name in first_cluster_path:
            ctx.error(f"{path}.name", f"duplicate cluster name '{pb.name}' (first at {first_cluster_path[pb.name]})")
            continue
        if pb.name:
            first_cluster_path[pb.name] = path
            known_cluster_names.add(pb.name)
        c = _cluster(ctx, path, pb)
        if c is not None:
            out_clusters[c.name] = c

    out_listeners: list[Listener] = []
    seen_names: dict[str, str] = {}
    seen_addrs: dict[tuple[str, int], str] = {}
    for path, pb in listeners:
        if pb.name and pb.name in seen_names:
            ctx.error(f"{path}.name", f"duplicate listener name '{pb.name}' (first at {seen_names[pb.name]})")
            continue
        seen_names[pb.name] = path
        got = _listener(ctx, path, pb)
        if got is None:
            continue
        keys, refs = got
        for r in refs:
            if r.cluster not in known_cluster_names:
                ctx.error(r.path, f"cluster '{r.cluster}' is not defined in {ctx.cluster_origin}")
        for ip, port, apath in keys:
            if (ip, port) in seen_addrs:
                ctx.error(apath, f"address {ip}:{port} is already used by {seen_addrs[(ip, port)]}")
                continue
            seen_addrs[(ip, port)] = apath
            weighted = tuple(WeightedCluster(r.cluster, r.weight) for r in refs if r.weight > 0)
            out_listeners.append(Listener(pb.name, ip, port, weighted))
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return MeshConfig(tuple(out_listeners), tuple(out_clusters.values()), tuple(ctx.warnings))


def translate_bootstrap(cfg) -> MeshConfig:
    """Standalone mode: a Bootstrap's static_resources."""
    sr = cfg.bootstrap.static_resources
    return translate(
        cfg.source,
        [(f"static_resources.listeners[{i}]", pb) for i, pb in enumerate(sr.listeners)],
        [(f"static_resources.clusters[{i}]", pb) for i, pb in enumerate(sr.clusters)],
    )
