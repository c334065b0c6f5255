"""Istio-shaped xDS resources (what istiod sends a sidecar), built from
parameters so tests can point them at loopback VIPs and local backends.
Shapes follow real istiod output: see tests/fixtures/istio/README.md."""
from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format

from kmesh.config import schema

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TYPED_STRUCT = "type.googleapis.com/udpa.type.v1.TypedStruct"
ISTIO_MTLS_MATCHES = [
    {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": {
        "name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"alpn_protocols": ["istio-peer-exchange", "istio"]}, "sni": "outbound_.9080_._.svc"}}},
    {"name": "tlsMode-disabled", "match": {}, "transport_socket": {"name": "envoy.transport_sockets.raw_buffer",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}},
]


def _parse(d: dict, cls):
    schema.import_types(d)
    return json_format.ParseDict(d, cls())


def outbound(port: int, host: str, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{host}"


def eds_cluster(name: str, lb: str = "ROUND_ROBIN", mtls: bool = True):
    d = {"name": name, "type": "EDS", "connect_timeout": "10s", "lb_policy": lb,
         "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}, "service_name": name},
         "circuit_breakers": {"thresholds": [{"max_connections": 4294967295, "max_retries": 4294967295}]},
         "common_lb_config": {"locality_weighted_lb_config": {}},
         "metadata": {"filter_metadata": {"istio": {"services": [{"host": name.split("|")[-1]}]}}}}
    if mtls:
        d["transport_socket_matches"] = ISTIO_MTLS_MATCHES
    return _parse(d, cluster_pb2.Cluster)


def passthrough_cluster():
    return _parse({"name": "PassthroughCluster", "type": "ORIGINAL_DST", "connect_timeout": "10s",
                   "lb_policy": "CLUSTER_PROVIDED"}, cluster_pb2.Cluster)


def blackhole_cluster():
    return _parse({"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "10s"}, cluster_pb2.Cluster)


def cla(name: str, endpoints: list[tuple[str, int]], weights: list[int] | None = None, health: list[str] | None = None,
        priority: int = 0):
    lbes = []
    for i, (ip, port) in enumerate(endpoints):
        e = {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
             "health_status": (health[i] if health else "HEALTHY"),
             "metadata": {"filter_metadata": {"istio": {"workload": f"pod-{i};default;svc;v1;Kubernetes"}}},
             "load_balancing_weight": (weights[i] if weights else 1)}
        lbes.append(e)
    return _parse({"cluster_name": name, "endpoints": [{
        "locality": {"region": "us-east", "zone": "us-east-1a"}, "lb_endpoints": lbes,
        "load_balancing_weight": len(lbes), "priority": priority}]}, endpoint_pb2.ClusterLoadAssignment)


def _istio_stats(name="istio.stats"):
    return {"name": name, "typed_config": {"@type": TYPED_STRUCT, "type_url": "type.googleapis.com/stats.PluginConfig",
                                           "value": {}}}


def http_listener(port: int, route_name: str | None = None):
    """The per-port outbound HTTP listener, 0.0.0.0_<port>, with RDS."""
    return _parse({
        "name": f"0.0.0.0_{port}", "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "traffic_direction": "OUTBOUND", "bind_to_port": False,
        "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": HCM, "stat_prefix": f"outbound_0.0.0.0_{port}",
            "rds": {"route_config_name": route_name or str(port),
                    "config_source": {"ads": {}, "resource_api_version": "V3"}},
            "http_filters": [{"name": "istio.metadata_exchange", "typed_config": {
                "@type": TYPED_STRUCT, "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config"}},
                # istiod chains the fault filter in every outbound HCM (see
                # tests/fixtures/istio/bookinfo_lds.json): per-route faults need it.
                {"name": "envoy.filters.http.fault", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}],
    }, listener_pb2.Listener)


def tcp_listener(vip: str, port: int, cluster: str):
    """A TCP service's own listener, <VIP>_<port>."""
    return _parse({
        "name": f"{vip}_{port}", "address": {"socket_address": {"address": vip, "port_value": port}},
        "traffic_direction": "OUTBOUND", "bind_to_port": False,
        "filter_chains": [{"filters": [_istio_stats(), {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": TCP, "stat_prefix": cluster, "cluster": cluster}}]}],
    }, listener_pb2.Listener)


def virtual_outbound():
    return _parse({
        "name": "virtualOutbound", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
        "use_original_dst": True, "traffic_direction": "OUTBOUND",
        "filter_chains": [{"name": "virtualOutbound-catchall-tcp", "filters": [_istio_stats(), {
            "name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": TCP, "stat_prefix": "PassthroughCluster", "cluster": "PassthroughCluster"}}]}],
    }, listener_pb2.Listener)


def virtual_inbound():
    return _parse({
        "name": "virtualInbound", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
        "traffic_direction": "INBOUND",
        "filter_chains": [{"filter_chain_match": {"destination_port": 9080, "transport_protocol": "raw_buffer"},
                           "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                               "@type": TCP, "stat_prefix": "inbound|9080||", "cluster": "inbound|9080||"}}]}],
    }, listener_pb2.Listener)


def route_config(name: str, vhosts: list[dict]):
    """vhosts: dicts with host, vip, port, and either cluster or weighted [(cluster, weight)];
    ``plain``: without istiod's retry policy and attempt count header (a
    virtual host kmesh decides at connect(), docs/l7.md "L4 or L7")."""
    out = []
    for v in vhosts:
        host, vip, port = v["host"], v["vip"], v["port"]
        short = host.split(".")[0]
        domains = [host, f"{host}:{port}", short, f"{short}:{port}", vip, f"{vip}:{port}"]
        if "weighted" in v:
            action = {"weighted_clusters": {"clusters": [{"name": c, "weight": w} for c, w in v["weighted"]]}}
        else:
            action = {"cluster": v["cluster"]}
        action.update({"timeout": "0s", "max_grpc_timeout": "0s"})
        if not v.get("plain"):
            action["retry_policy"] = {"retry_on": "connect-failure,refused-stream,unavailable", "num_retries": 2}
        routes = []
        if v.get("jason_abort"):   # Istio's fault injection for one user: an abort on its own route
            routes.append({"name": "jason-fault", "match": {"prefix": "/", "headers": [
                {"name": "end-user", "string_match": {"exact": "jason"}}]}, "route": dict(action),
                "typed_per_filter_config": {"envoy.filters.http.fault": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                    "abort": {"http_status": v["jason_abort"],
                              "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}}})
        if v.get("jason"):
            routes.append({"name": "jason", "match": {"prefix": "/", "headers": [
                {"name": "end-user", "string_match": {"exact": "jason"}}]}, "route": {"cluster": v["jason"]}})
        routes.append({"name": "default", "match": {"prefix": "/"}, "route": action,
                       "decorator": {"operation": f"{host}:{port}/*"}})
        out.append({"name": f"{host}:{port}", "domains": domains, "routes": routes,
                    **({} if v.get("plain") else {"include_request_attempt_count": True})})
    out.append({"name": "allow_any", "domains": ["*"], "routes": [
        {"name": "allow_any", "match": {"prefix": "/"}, "route": {"cluster": "PassthroughCluster", "timeout": "0s"}}]})
    return _parse({"name": name, "virtual_hosts": out, "validate_clusters": False}, route_pb2.RouteConfiguration)
