"""What kmesh does with each field of the Envoy messages that shape HTTP
traffic: the one list the compilers check configs against and
``docs/l7.md``'s field table is generated from (``python -m
kmesh.config.fields``).

Every field of these messages is in exactly one class:

* ``ENFORCED``: applied as Envoy applies it (or it changes no traffic: names,
  metadata, stat prefixes);
* ``REFUSED``: a config that sets it is rejected with the field's path (from
  a control plane: NACKed), because applying the rest without it would
  route or authorize differently;
* ``WARNED``: accepted and reported (a warning for a file, a note in
  ``/status`` for a control plane) as not enforced, with the reason.

``tests/unit/test_fields.py`` walks the protobuf descriptors: a field in no
class (a newer Envoy API) fails it, and so does a warned or refused field
that is not reported when set.
"""
from __future__ import annotations

import sys
from typing import Callable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from google.protobuf.message import Message

ENFORCED, REFUSED, WARNED = "enforced", "refused", "warned"
NOT_ENFORCED = "accepted but not enforced by kmesh"
NO_TRAFFIC = "changes no traffic"

Report = Callable[[str, str], None]


def _e(why: str = "") -> tuple[str, str]:
    return ENFORCED, why


def _r(why: str) -> tuple[str, str]:
    return REFUSED, why


def _w(why: str = NOT_ENFORCED) -> tuple[str, str]:
    return WARNED, why


_STATS = _w("statistics kmesh does not keep")
_TRACING = _w("kmesh does not trace")
_H1_ONLY = _w("kmesh speaks HTTP/1.1 to clients and upstreams")
_PLUGIN = _r("cluster specifier plugins are not supported by kmesh")
_HEADERS = _e("Envoy's order and append actions (docs/l7.md, Semantics)")

HCM = http_connection_manager_pb2.HttpConnectionManager
RC = route_pb2.RouteConfiguration
VHOST = route_components_pb2.VirtualHost
ROUTE = route_components_pb2.Route
ACTION = route_components_pb2.RouteAction
WEIGHTED = route_components_pb2.WeightedCluster
CLUSTER_WEIGHT = route_components_pb2.WeightedCluster.ClusterWeight
FAULT = fault_pb2.HTTPFault
RBAC = rbac_pb2.RBAC
CLUSTER = cluster_pb2.Cluster

FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    HCM.DESCRIPTOR.full_name: {
        "codec_type": _e("AUTO and HTTP1 (HTTP/1.1 is what the hand-off speaks); HTTP2 and HTTP3 are refused"),
        "stat_prefix": _e(NO_TRAFFIC),
        "rds": _e(), "route_config": _e(),
        "scoped_routes": _r("scoped routes are not supported by kmesh; use rds or route_config"),
        "http_filters": _e("RBAC, local rate limit, fault and the router; any other filter is warned"),
        "add_user_agent": _w(),
        "tracing": _TRACING,
        "common_http_protocol_options": _w(),
        "http1_safe_max_connection_duration": _w(),
        "http_protocol_options": _e("accept_http_10; its other fields are warned"),
        "http2_protocol_options": _H1_ONLY, "http3_protocol_options": _H1_ONLY,
        "server_name": _w("the hand-off's own answers carry no server header"),
        "server_header_transformation": _w(),
        "scheme_header_transformation": _w(),
        "max_request_headers_kb": _w("the hand-off's limit is -l7 head limit (64 KiB)"),
        "stream_idle_timeout": _w("a keep-alive connection may wait 300 s for its next request"),
        "stream_flush_timeout": _w(),
        "request_timeout": _w(),
        "request_headers_timeout": _w("a request head must arrive within 30 s (limits.L7_HEAD_SECONDS)"),
        "drain_timeout": _w(),
        "delayed_close_timeout": _w(),
        "access_log": _w("kmesh's access log is -access-log (docs/observability.md)"),
        "access_log_flush_interval": _w(), "flush_access_log_on_new_request": _w(), "access_log_options": _w(),
        "use_remote_address": _w("x-forwarded-for and internal-request detection are not done by kmesh"),
        "xff_num_trusted_hops": _w(), "original_ip_detection_extensions": _w(),
        "early_header_mutation_extensions": _w(), "internal_address_config": _w(), "skip_xff_append": _w(),
        "via": _w(),
        "generate_request_id": _w("kmesh adds no x-request-id"), "preserve_external_request_id": _w(),
        "always_set_request_id_in_response": _w(),
        "forward_client_cert_details": _w("plaintext only: there is no client certificate"),
        "set_current_client_cert_details": _w("plaintext only: there is no client certificate"),
        "forward_client_cert_matcher": _w("plaintext only: there is no client certificate"),
        "proxy_100_continue": _w("the hand-off answers Expect: 100-continue itself, as Envoy by default"),
        "represent_ipv4_remote_address_as_ipv4_mapped_ipv6": _w(),
        "upgrade_configs": _w("an Upgrade request is forwarded and its connection carried as it is"),
        "normalize_path": _w("paths are matched as sent"), "merge_slashes": _w("paths are matched as sent"),
        "path_with_escaped_slashes_action": _w("paths are matched as sent"),
        "request_id_extension": _w(),
        "local_reply_config": _w("local replies are Envoy's defaults"),
        "strip_matching_host_port": _w(), "strip_any_host_port": _w(),
        "stream_error_on_invalid_http_message": _w("an invalid request closes its connection"),
        "path_normalization_options": _w("paths are matched as sent"),
        "strip_trailing_host_dot": _w(),
        "proxy_status_config": _w(),
        "typed_header_validation_config": _w(),
        "append_x_forwarded_port": _w(),
        "append_local_overload": _w(),
        "add_proxy_protocol_connection_state": _w(),
    },
    RC.DESCRIPTOR.full_name: {
        "name": _e(NO_TRAFFIC), "metadata": _e(NO_TRAFFIC),
        "virtual_hosts": _e(),
        "vhds": _r("on-demand virtual hosts (VHDS) are not supported by kmesh"),
        "internal_only_headers": _w("internal-request detection is not done by kmesh"),
        "request_headers_to_add": _HEADERS, "request_headers_to_remove": _HEADERS,
        "response_headers_to_add": _HEADERS, "response_headers_to_remove": _HEADERS,
        "most_specific_header_mutations_wins": _e(),
        "validate_clusters": _e("cluster references are always checked by kmesh's translator"),
        "max_direct_response_body_size_bytes": _e(),
        "cluster_specifier_plugins": _PLUGIN,
        "request_mirror_policies": _e(),
        "ignore_port_in_host_matching": _e(),
        "vhost_header": _r("choosing the virtual host by another header than Host is not supported by kmesh"),
        "ignore_path_parameters_in_path_matching": _e(),
        "typed_per_filter_config": _e("the fault filter's; any other filter's is warned"),
    },
    VHOST.DESCRIPTOR.full_name: {
        "name": _e(NO_TRAFFIC), "metadata": _e(NO_TRAFFIC),
        "domains": _e(), "routes": _e(),
        "matcher": _r("the generic matcher tree of a virtual host is not supported by kmesh; use routes"),
        "require_tls": _e(),
        "virtual_clusters": _STATS,
        "rate_limits": _w("global rate limiting (a rate limit service) is not done by kmesh"),
        "request_headers_to_add": _HEADERS, "request_headers_to_remove": _HEADERS,
        "response_headers_to_add": _HEADERS, "response_headers_to_remove": _HEADERS,
        "cors": _w("CORS is not applied by kmesh"),
        "typed_per_filter_config": _e("the fault filter's; any other filter's is warned"),
        "include_request_attempt_count": _e(), "include_attempt_count_in_response": _e(),
        "retry_policy": _e("docs/l7.md, Retries"),
        "retry_policy_typed_config": _w("retry policy extensions are not applied by kmesh"),
        "hedge_policy": _w(),
        "include_is_timeout_retry_header": _w(),
        "per_request_buffer_limit_bytes": _e("the most a body held for a retry or a mirror may be"),
        "request_body_buffer_limit": _w(),
        "request_mirror_policies": _e(),
    },
    ROUTE.DESCRIPTOR.full_name: {
        "name": _e(NO_TRAFFIC), "metadata": _e(NO_TRAFFIC), "stat_prefix": _e(NO_TRAFFIC),
        "match": _e(), "route": _e(), "redirect": _e(), "direct_response": _e(),
        "filter_action": _r("filter_action routes are not supported by kmesh"),
        "non_forwarding_action": _r("non-forwarding routes are not supported by kmesh"),
        "decorator": _TRACING, "tracing": _TRACING,
        "typed_per_filter_config": _e("the fault filter's; any other filter's is warned"),
        "request_headers_to_add": _HEADERS, "request_headers_to_remove": _HEADERS,
        "response_headers_to_add": _HEADERS, "response_headers_to_remove": _HEADERS,
        "per_request_buffer_limit_bytes": _e("the most a body held for a retry or a mirror may be"),
        "request_body_buffer_limit": _w(),
    },
    ACTION.DESCRIPTOR.full_name: {
        "cluster": _e(), "weighted_clusters": _e(),
        "cluster_header": _r("choosing the cluster from a request header is not supported by kmesh"),
        "cluster_specifier_plugin": _PLUGIN, "inline_cluster_specifier_plugin": _PLUGIN,
        "cluster_not_found_response_code": _w("a missing cluster is answered 503"),
        "metadata_match": _w("subset load balancing is not done by kmesh: all the cluster's endpoints are used"),
        "prefix_rewrite": _e(), "regex_rewrite": _e(),
        "path_rewrite_policy": _r("path rewrite extensions are not supported by kmesh"),
        "path_rewrite": _r("substitution-format path rewrites are not supported by kmesh"),
        "host_rewrite_literal": _e(),
        "auto_host_rewrite": _w(), "host_rewrite_header": _w(), "host_rewrite_path_regex": _w(),
        "host_rewrite": _w(),
        "append_x_forwarded_host": _w(),
        "timeout": _e("covers the upstream's response head"),
        "idle_timeout": _w(), "flush_timeout": _w(), "early_data_policy": _w(),
        "retry_policy": _e("docs/l7.md, Retries"),
        "retry_policy_typed_config": _w("retry policy extensions are not applied by kmesh"),
        "request_mirror_policies": _e(),
        "priority": _w(),
        "rate_limits": _w("global rate limiting (a rate limit service) is not done by kmesh"),
        "include_vh_rate_limits": _w("global rate limiting (a rate limit service) is not done by kmesh"),
        "hash_policy": _w("the cluster's lb_policy picks the endpoint; hashing is not done by kmesh"),
        "cors": _w("CORS is not applied by kmesh"),
        "max_grpc_timeout": _w("grpc-timeout headers are not read by kmesh"),
        "grpc_timeout_offset": _w("grpc-timeout headers are not read by kmesh"),
        "upgrade_configs": _w("an Upgrade request is forwarded and its connection carried as it is"),
        "internal_redirect_policy": _w(), "internal_redirect_action": _w(), "max_internal_redirects": _w(),
        "hedge_policy": _w(),
        "max_stream_duration": _w(),
    },
    WEIGHTED.DESCRIPTOR.full_name: {
        "clusters": _e(),
        "total_weight": _w("deprecated; the sum of the weights is used, as in Envoy"),
        "runtime_key_prefix": _w("runtime weight overrides are not enforced by kmesh; the configured weights apply"),
        "header_name": _w("drawing the cluster from a request header is not enforced by kmesh; it is drawn at random"),
        "use_hash_policy": _w("drawing the cluster by hash policy is not enforced by kmesh; it is drawn at random"),
    },
    CLUSTER_WEIGHT.DESCRIPTOR.full_name: {
        "name": _e(), "weight": _e(),
        "cluster_header": _r("choosing the cluster from a request header is not supported by kmesh"),
        "metadata_match": _w("subset load balancing is not done by kmesh: all the cluster's endpoints are used"),
        "request_headers_to_add": _HEADERS, "request_headers_to_remove": _HEADERS,
        "response_headers_to_add": _HEADERS, "response_headers_to_remove": _HEADERS,
        "typed_per_filter_config": _w(),
        "host_rewrite_literal": _e(),
    },
    FAULT.DESCRIPTOR.full_name: {
        "delay": _e("fixed delays"), "abort": _e("HTTP status aborts"), "headers": _e(),
        "upstream_cluster": _r("faults limited to one upstream cluster are not supported by kmesh"),
        "downstream_nodes": _r("faults limited to downstream nodes are not supported by kmesh"),
        "max_active_faults": _w(), "response_rate_limit": _w(),
        "delay_percent_runtime": _w("runtime overrides are not enforced by kmesh"),
        "abort_percent_runtime": _w("runtime overrides are not enforced by kmesh"),
        "delay_duration_runtime": _w("runtime overrides are not enforced by kmesh"),
        "abort_http_status_runtime": _w("runtime overrides are not enforced by kmesh"),
        "max_active_faults_runtime": _w("runtime overrides are not enforced by kmesh"),
        "response_rate_limit_percent_runtime": _w("runtime overrides are not enforced by kmesh"),
        "abort_grpc_status_runtime": _w("runtime overrides are not enforced by kmesh"),
        "disable_downstream_cluster_stats": _e(NO_TRAFFIC),
        "filter_metadata": _e(NO_TRAFFIC),
    },
    RBAC.DESCRIPTOR.full_name: {
        "rules": _e("docs/l7.md, RBAC"),
        "matcher": _r("RBAC matcher trees are not supported by kmesh: use rules"),
        "shadow_rules": _w("shadow rules only log in Envoy: not applied"),
        "shadow_matcher": _w("shadow rules only log in Envoy: not applied"),
        "rules_stat_prefix": _e(NO_TRAFFIC), "shadow_rules_stat_prefix": _e(NO_TRAFFIC),
        "track_per_rule_stats": _e(NO_TRAFFIC),
    },
    CLUSTER.DESCRIPTOR.full_name: {
        "name": _e(), "alt_stat_name": _e(NO_TRAFFIC), "metadata": _e(NO_TRAFFIC),
        "type": _e("STATIC and EDS; DNS and ORIGINAL_DST clusters are refused"),
        "cluster_type": _r("custom cluster types are not supported by kmesh"),
        "eds_cluster_config": _e(), "load_assignment": _e(),
        "connect_timeout": _e(),
        "lb_policy": _e("ROUND_ROBIN, RANDOM, LEAST_REQUEST; others are refused"),
        "circuit_breakers": _e("max_connections (docs/policies.md); its other thresholds are warned"),
        "outlier_detection": _e("consecutive failures, ejection times, max percent (docs/policies.md)"),
        "transport_socket": _r("upstream TLS is not supported: kmesh forwards connections as they are "
                               "(from a control plane: skipped, plaintext)"),
        "transport_socket_matches": _r("upstream TLS is not supported: kmesh forwards connections as they are "
                                       "(from a control plane: skipped, plaintext)"),
        "transport_socket_matcher": _r("upstream TLS is not supported: kmesh forwards connections as they are"),
        "per_connection_buffer_limit_bytes": _w(),
        "health_checks": _w("active health checking is not done by kmesh; EDS health status is used"),
        "max_requests_per_connection": _w(),
        "upstream_http_protocol_options": _w(), "common_http_protocol_options": _w(),
        "http_protocol_options": _w(), "http2_protocol_options": _H1_ONLY,
        "typed_extension_protocol_options": _w(),
        "dns_refresh_rate": _w(), "dns_jitter": _w(), "dns_failure_refresh_rate": _w(), "respect_dns_ttl": _w(),
        "dns_lookup_family": _w(), "dns_resolvers": _w(), "use_tcp_for_dns_lookups": _w(),
        "dns_resolution_config": _w(), "typed_dns_resolver_config": _w(),
        "wait_for_warm_on_init": _w(),
        "cleanup_interval": _w(),
        "upstream_bind_config": _w(),
        "lb_subset_config": _w("subset load balancing is not done by kmesh: all the cluster's endpoints are used"),
        "ring_hash_lb_config": _w(), "maglev_lb_config": _w(), "original_dst_lb_config": _w(),
        "least_request_lb_config": _w(), "round_robin_lb_config": _w(), "common_lb_config": _w(),
        "protocol_selection": _w(),
        "upstream_connection_options": _w(),
        "close_connections_on_host_health_failure": _w(),
        "ignore_health_on_host_removal": _w(),
        "filters": _w(),
        "load_balancing_policy": _w(),
        "lrs_server": _w(), "lrs_report_endpoint_metrics": _w(),
        "track_timeout_budgets": _STATS, "track_cluster_stats": _STATS,
        "upstream_config": _w(),
        "preconnect_policy": _w(),
        "connection_pool_per_downstream_connection": _w(),
    },
}

MESSAGES = (HCM, RC, VHOST, ROUTE, ACTION, WEIGHTED, CLUSTER_WEIGHT, FAULT, RBAC, CLUSTER)


def of(message_type) -> dict[str, tuple[str, str]]:
    return FIELDS[message_type.DESCRIPTOR.full_name]


def names(message_type, status: str) -> frozenset[str]:
    """The fields of ``message_type`` in class ``status``."""
    return frozenset(n for n, (s, _) in of(message_type).items() if s == status)


def check(msg: Message, path: str, problem: Report, note: Report, skip: frozenset[str] = frozenset()) -> None:
    """Report each set field of ``msg`` that kmesh does not enforce:
    ``problem`` for a refused one, ``note`` for a warned one (a field this
    list does not know, from a newer API, is noted too). ``skip``: fields
    the caller reports itself."""
    table = FIELDS[msg.DESCRIPTOR.full_name]
    for f, _ in msg.ListFields():
        if f.name in skip:
            continue
        status, why = table.get(f.name, (WARNED, NOT_ENFORCED))
        if status == REFUSED:
            problem(f"{path}.{f.name}", why)
        elif status == WARNED:
            note(f"{path}.{f.name}", why)


def markdown() -> str:
    """docs/l7.md's field table."""
    out = []
    for m in MESSAGES:
        d = m.DESCRIPTOR
        out += [f"**`{d.full_name}`**", "", "| field | kmesh | |", "|---|---|---|"]
        for f in d.fields:
            status, why = FIELDS[d.full_name][f.name]
            out.append(f"| `{f.name}` | {status} | {why} |")
        out.append("")
    return "\n".join(out)


def main() -> None:   # pragma: no cover - a docs helper
    sys.stdout.write(markdown())


if __name__ == "__main__":   # pragma: no cover
    main()
