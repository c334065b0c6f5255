"""Builders for Envoy v3 Bootstrap dicts used across the tests."""
from __future__ import annotations

TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def sock(ip: str, port: int) -> dict:
    return {"socket_address": {"address": ip, "port_value": port}}


def lb_ep(ip: str, port: int, weight: int | None = None) -> dict:
    ep = {"endpoint": {"address": sock(ip, port)}}
    if weight is not None:
        ep["load_balancing_weight"] = weight
    return ep


def cluster(name: str, *eps: dict, lb: str = "ROUND_ROBIN") -> dict:
    return {"name": name, "type": "STATIC", "lb_policy": lb,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": list(eps)}]}}


def tcp_listener(name: str, ip: str, port: int, target="c1") -> dict:
    """target: a cluster name, or [(cluster, weight), ...]."""
    tc = {"@type": TCP, "stat_prefix": name}
    if isinstance(target, str):
        tc["cluster"] = target
    else:
        tc["weighted_clusters"] = {"clusters": [{"name": n, "weight": w} for n, w in target]}
    return {"name": name, "address": sock(ip, port),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": tc}]}]}


def hcm_listener(name: str, ip: str, port: int, routes: list[dict]) -> dict:
    return {"name": name, "address": sock(ip, port), "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {"@type": HCM, "stat_prefix": name, "route_config": {
            "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]}}}]}]}


def bootstrap(listeners: list[dict], clusters: list[dict]) -> dict:
    return {"static_resources": {"listeners": listeners, "clusters": clusters}}


LOCAL_RATELIMIT = "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit"


def rate_limited(listener: dict, max_tokens: int, tokens_per_fill: int = 1, fill_interval: str = "1s") -> dict:
    """``listener`` with a network local_ratelimit filter before its terminal filter."""
    rl = {"name": "envoy.filters.network.local_ratelimit", "typed_config": {
        "@type": LOCAL_RATELIMIT, "stat_prefix": "rl",
        "token_bucket": {"max_tokens": max_tokens, "tokens_per_fill": tokens_per_fill,
                         "fill_interval": fill_interval}}}
    for chain in listener["filter_chains"]:
        chain["filters"].insert(0, rl)
    return listener


ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def http_listener(name: str, ip: str, port: int, virtual_hosts: list[dict]) -> dict:
    """An HCM listener with these virtual hosts and the router filter (what
    Envoy itself needs to serve the same config)."""
    return {"name": name, "address": sock(ip, port), "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {"@type": HCM, "stat_prefix": name, "http_filters": [ROUTER],
                         "route_config": {"name": name, "virtual_hosts": virtual_hosts}}}]}]}
