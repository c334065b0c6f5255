"""Config parsing and translation: valid configs, and malformed ones that must
be refused with the exact field path."""
from __future__ import annotations


import pytest

from kmesh.bpf.records import LbPolicy
from kmesh.config import bootstrap
from kmesh.config.errors import ConfigError
from kmesh.config.model import Endpoint, WeightedCluster
from kmesh.config.builder import translate_bootstrap

from tests.support.envoy import HCM, cluster, hcm_listener, lb_ep, sock, tcp_listener  # noqa: F401


def base():
    return {"static_resources": {
        "listeners": [tcp_listener("l1", "127.0.0.1", 23333)],
        "clusters": [cluster("c1", lb_ep("127.0.0.1", 8080), lb_ep("127.0.0.1", 8081, 3))],
    }}


def translate(data, source="test.yaml"):
    import yaml

    return translate_bootstrap(bootstrap.parse_text(yaml.safe_dump(data), source))


def test_valid_tcp_proxy():
    m = translate(base())
    (l,) = m.listeners
    assert (l.ip, l.port, l.clusters) == ("127.0.0.1", 23333, (WeightedCluster("c1", 1),))
    (c,) = m.clusters
    assert c.lb_policy == LbPolicy.ROUND_ROBIN
    assert c.endpoints == (Endpoint("127.0.0.1", 8080, 1), Endpoint("127.0.0.1", 8081, 3))
    assert m.warnings == ()


def test_bundled_example_translates():
    m = translate_bootstrap(bootstrap.load_file("config/examples/standalone.yaml"))
    assert {l.name for l in m.listeners} == {"demo_vip", "demo_canary"}
    canary = next(l for l in m.listeners if l.name == "demo_canary")
    assert canary.clusters == (WeightedCluster("demo-v1", 80), WeightedCluster("demo-v2", 20))


def test_json_and_camel_case_accepted():
    import json

    d = base()
    d["static_resources"]["clusters"][0]["lbPolicy"] = d["static_resources"]["clusters"][0].pop("lb_policy")
    m = translate_bootstrap(bootstrap.parse_text(json.dumps(d), "x.json"))
    assert m.clusters[0].lb_policy == LbPolicy.ROUND_ROBIN


def test_weighted_and_lb_policies():
    d = base()
    d["static_resources"]["clusters"].append(cluster("c2", lb_ep("127.0.0.1", 9000), lb="LEAST_REQUEST"))
    d["static_resources"]["clusters"].append(cluster("c3", lb_ep("127.0.0.1", 9001), lb="RANDOM"))
    d["static_resources"]["listeners"].append(tcp_listener("l2", "0.0.0.0", 80, [("c2", 80), ("c3", 20)]))
    m = translate(d)
    assert m.cluster("c2").lb_policy == LbPolicy.LEAST_REQUEST
    assert m.cluster("c3").lb_policy == LbPolicy.RANDOM
    assert m.listeners[1].clusters == (WeightedCluster("c2", 80), WeightedCluster("c3", 20))


def test_hcm_routes_that_need_the_request_go_l7():
    d = base()
    d["static_resources"]["listeners"] = [hcm_listener("h", "127.0.0.2", 80, [
        {"match": {"prefix": "/api"}, "route": {"cluster": "c1"}},
        {"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
            {"name": "c1", "weight": 80}, {"name": "c2", "weight": 20}]}}},
    ])]
    d["static_resources"]["clusters"].append(cluster("c2", lb_ep("127.0.0.1", 9000)))
    m = translate(d)
    (lst,) = m.listeners
    assert lst.routes is not None   # decided per request by the hand-off listener
    # without L7, the first catch-all route (the other route's cluster checked, at weight 0)
    assert lst.clusters == (WeightedCluster("c1", 80), WeightedCluster("c2", 20))
    assert m.warnings == ()


def test_hcm_header_match_is_l7():
    d = base()
    d["static_resources"]["listeners"] = [hcm_listener("h", "127.0.0.2", 80, [
        {"match": {"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]},
         "route": {"cluster": "c1"}}])]
    m = translate(d)
    assert m.listeners[0].routes is not None
    assert m.listeners[0].clusters == (WeightedCluster("c1", 1),)
    assert m.warnings == ()


def test_hcm_direct_response_only_is_l7_without_clusters():
    d = base()
    d["static_resources"]["listeners"] = [hcm_listener("h", "127.0.0.2", 80, [
        {"match": {"prefix": "/"}, "direct_response": {"status": 200}}])]
    (lst,) = translate(d).listeners
    assert lst.routes is not None and lst.clusters == ()


def test_hcm_catch_all_only_stays_l4():
    d = base()
    d["static_resources"]["listeners"] = [hcm_listener("h", "127.0.0.2", 80, [
        {"match": {"prefix": "/"}, "route": {"cluster": "c1"}}, {"match": {"prefix": "/never"}, "route": {"cluster": "c1"}}])]
    m = translate(d)
    (lst,) = m.listeners
    assert lst.routes is None and lst.clusters == (WeightedCluster("c1", 1),)
    # The route after the catch-all is shadowed, in Envoy too: said so, not "L7 not supported".
    assert [w for w in m.warnings if "routes[1].match" in w] == [
        "test.yaml: static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config"
        ".virtual_hosts[0].routes[1].match: never reached: routes[0] matches every request first (as in Envoy)"]


def test_priority_and_health():
    d = base()
    d["static_resources"]["clusters"][0]["load_assignment"]["endpoints"] = [
        {"priority": 1, "lb_endpoints": [lb_ep("127.0.0.1", 7001)]},
        {"priority": 0, "lb_endpoints": [dict(lb_ep("127.0.0.1", 7000), health_status="UNHEALTHY")]},
    ]
    m = translate(d)
    assert m.clusters[0].endpoints == (Endpoint("127.0.0.1", 7001, 1),)


def test_unenforced_fields_warn():
    d = base()
    d["static_resources"]["clusters"][0]["per_connection_buffer_limit_bytes"] = 1024
    m = translate(d)
    assert any("static_resources.clusters[0].per_connection_buffer_limit_bytes" in w for w in m.warnings)


def test_udp_listener_skipped_with_warning():
    d = base()
    l2 = tcp_listener("udp", "127.0.0.1", 53)
    l2["address"]["socket_address"]["protocol"] = "UDP"
    d["static_resources"]["listeners"].append(l2)
    m = translate(d)
    assert [l.name for l in m.listeners] == ["l1"]
    assert any("UDP" in w for w in m.warnings)


def test_empty_config_is_valid():
    assert translate({}).listeners == ()


# --- malformed configs: (mutation, exact path, reason fragment) ---------------

def _set(path_fn):
    def mut(d):
        path_fn(d)
        return d
    return mut


SR = "static_resources"
C0 = f"{SR}.clusters[0]"
L0 = f"{SR}.listeners[0]"
EP = f"{C0}.load_assignment.endpoints[0].lb_endpoints"
TC = f"{L0}.filter_chains[0].filters[0].typed_config"

MALFORMED = [
    ("unknown cluster field",
     lambda d: d[SR]["clusters"][0].__setitem__("lbpolicy", "RANDOM"),
     f"{C0}.lbpolicy", "unknown field"),
    ("unknown top-level field",
     lambda d: d.__setitem__("static_resource", {}),
     "static_resource", "unknown field"),
    ("bad lb_policy enum",
     lambda d: d[SR]["clusters"][0].__setitem__("lb_policy", "FASTEST"),
     f"{C0}.lb_policy", "FASTEST"),
    ("unsupported lb_policy",
     lambda d: d[SR]["clusters"][0].__setitem__("lb_policy", "MAGLEV"),
     f"{C0}.lb_policy", "not supported"),
    ("port is a string",
     lambda d: d[SR]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][1]["endpoint"]["address"]
     ["socket_address"].__setitem__("port_value", "http"),
     f"{EP}[1].endpoint.address.socket_address.port_value", ""),
    ("port out of range",
     lambda d: d[SR]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][1]["endpoint"]["address"]
     ["socket_address"].__setitem__("port_value", 70000),
     f"{EP}[1].endpoint.address.socket_address.port_value", "out of range"),
    ("port zero on listener",
     lambda d: d[SR]["listeners"][0]["address"]["socket_address"].__setitem__("port_value", 0),
     f"{L0}.address.socket_address.port_value", "out of range"),
    ("additional address of the same family",
     lambda d: d[SR]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
     .__setitem__("additional_addresses", [{"address": {"socket_address": {"address": "127.0.0.9",
                                                                           "port_value": 8080}}}]),
     f"{EP}[0].endpoint.additional_addresses[0].address", "of the other family"),
    ("hostname endpoint",
     lambda d: d[SR]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
     ["socket_address"].__setitem__("address", "backend.local"),
     f"{EP}[0].endpoint.address.socket_address.address", "not an IP address"),
    ("undefined cluster in tcp_proxy",
     lambda d: d[SR]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"].__setitem__("cluster", "nope"),
     f"{TC}.cluster", "cluster 'nope' is not defined"),
    ("undefined weighted cluster",
     lambda d: d[SR]["listeners"].__setitem__(0, tcp_listener("l1", "127.0.0.1", 23333, [("c1", 1), ("ghost", 1)])),
     f"{TC}.weighted_clusters.clusters[1].name", "cluster 'ghost' is not defined"),
    ("weights add up to zero",
     lambda d: d[SR]["listeners"].__setitem__(0, tcp_listener("l1", "127.0.0.1", 23333, [("c1", 0)])),
     f"{TC}.weighted_clusters.clusters", "add up to 0"),
    ("endpoint weight zero",
     lambda d: d[SR]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][1].__setitem__(
         "load_balancing_weight", 0),
     f"{EP}[1].load_balancing_weight", "at least 1"),
    ("duplicate listener address",
     lambda d: d[SR]["listeners"].append(tcp_listener("l2", "127.0.0.1", 23333)),
     f"{SR}.listeners[1].address", "already used"),
    ("duplicate listener name",
     lambda d: d[SR]["listeners"].append(tcp_listener("l1", "127.0.0.1", 23334)),
     f"{SR}.listeners[1].name", "duplicate listener name"),
    ("duplicate cluster name",
     lambda d: d[SR]["clusters"].append(cluster("c1", lb_ep("127.0.0.1", 1))),
     f"{SR}.clusters[1].name", "duplicate cluster name"),
    ("EDS cluster in standalone",
     lambda d: d[SR]["clusters"][0].__setitem__("type", "EDS"),
     f"{C0}.type", "ADS mode"),
    ("DNS cluster",
     lambda d: d[SR]["clusters"][0].__setitem__("type", "STRICT_DNS"),
     f"{C0}.type", "DNS clusters are not supported"),
    ("unsupported network filter",
     lambda d: d[SR]["listeners"][0]["filter_chains"][0]["filters"].insert(0, {
         "name": "envoy.filters.network.echo",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo"}}),
     f"{L0}.filter_chains[0].filters[0].typed_config", "unsupported network filter"),
    ("unknown typed_config type",
     lambda d: d[SR]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"].__setitem__(
         "@type", "type.googleapis.com/envoy.nope.v3.Nope"),
     f"{TC}.@type", "unknown type"),
    ("unknown field inside typed_config",
     lambda d: d[SR]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"].__setitem__("clustr", "c1"),
     f"{TC}.clustr", "unknown field"),
    ("tcp_proxy without cluster",
     lambda d: d[SR]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"].pop("cluster"),
     TC, "needs 'cluster' or 'weighted_clusters'"),
    ("listener without filter chains",
     lambda d: d[SR]["listeners"][0].pop("filter_chains"),
     f"{L0}.filter_chains", "needs a filter chain"),
    ("listener without address",
     lambda d: d[SR]["listeners"][0].pop("address"),
     f"{L0}.address", "needs an address"),
    ("clusters is not a list",
     lambda d: d[SR].__setitem__("clusters", {"name": "c1"}),
     f"{SR}.clusters", "expected a list"),
    ("HCM with RDS",
     lambda d: d[SR]["listeners"].__setitem__(0, {**hcm_listener("l1", "127.0.0.1", 23333, []), "filter_chains": [
         {"filters": [{"name": "hcm", "typed_config": {"@type": HCM, "stat_prefix": "x", "rds": {
             "route_config_name": "r"}}}]}]}),
     f"{TC}.rds", "RDS needs ADS mode"),
    ("HCM route to undefined cluster",
     lambda d: d[SR]["listeners"].__setitem__(0, hcm_listener("l1", "127.0.0.1", 23333, [
         {"match": {"prefix": "/"}, "route": {"cluster": "missing"}}])),
     f"{TC}.route_config.virtual_hosts[0].routes[0].route.cluster", "cluster 'missing' is not defined"),
    ("upstream TLS",
     lambda d: d[SR]["clusters"][0].__setitem__("transport_socket", {"name": "tls", "typed_config": {
         "@type": "type.googleapis.com/google.protobuf.Struct", "value": {}}}),
     f"{C0}.transport_socket", "upstream TLS"),
    ("duration with bad format",
     lambda d: d[SR]["clusters"][0].__setitem__("connect_timeout", "5 seconds"),
     f"{C0}.connect_timeout", ""),
    ("endpoint_name instead of address",
     lambda d: d[SR]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"].__setitem__(
         0, {"endpoint_name": "x"}),
     f"{EP}[0]", "endpoint_name is not supported"),
]


@pytest.mark.parametrize("mutate,path,reason", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_config_names_path(mutate, path, reason):
    d = base()
    mutate(d)
    with pytest.raises(ConfigError) as ei:
        translate(d, source="/etc/kmesh/bad.yaml")
    paths = [p.path for p in ei.value.problems]
    assert path in paths, f"expected {path}, got {[str(p) for p in ei.value.problems]}"
    p = ei.value.problems[paths.index(path)]
    assert p.source == "/etc/kmesh/bad.yaml"
    assert reason in p.reason
    assert str(ei.value).startswith("/etc/kmesh/bad.yaml: ")


def test_invalid_yaml_names_line():
    with pytest.raises(ConfigError) as ei:
        bootstrap.parse_text("static_resources:\n  clusters: [\n", "bad.yaml")
    assert ei.value.problems[0].path.startswith("line ")


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="expected an Envoy Bootstrap object"):
        bootstrap.parse_text("- a\n- b\n", "list.yaml")


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read the config file"):
        bootstrap.load_file("/nonexistent/kmesh.yaml")


def test_all_problems_reported_at_once():
    d = base()
    d[SR]["clusters"][0]["lb_policy"] = "MAGLEV"
    d[SR]["listeners"][0]["address"]["socket_address"]["port_value"] = 0
    with pytest.raises(ConfigError) as ei:
        translate(d)
    assert len(ei.value.problems) >= 2


def _rbac_listener(rules: dict) -> dict:
    lst = hcm_listener("h", "127.0.0.2", 80, [{"match": {"prefix": "/"}, "route": {"cluster": "c1"}}])
    lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"] = [
        {"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC", "rules": rules}},
        {"name": "envoy.filters.http.router",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    return lst


MTLS_DENY = {"action": "DENY", "policies": {"p": {"permissions": [{"any": True}],
                                                  "principals": [{"authenticated": {}}]}}}


def test_rbac_makes_a_listener_l7_and_an_unenforceable_one_is_an_error():
    d = base()
    d["static_resources"]["listeners"] = [_rbac_listener({"action": "ALLOW", "policies": {}})]
    (lst,) = translate(d).listeners
    assert lst.routes is not None and lst.rbac is not None and lst.http_rate_limit is None
    d["static_resources"]["listeners"] = [_rbac_listener(MTLS_DENY)]
    with pytest.raises(ConfigError) as e:
        translate(d)
    assert "http_filters[0].typed_config.rules.policies[p].principals[0].authenticated" in str(e.value)


def test_rbac_from_a_control_plane_that_cannot_be_enforced_denies_everything():
    from google.protobuf import json_format
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.cluster.v3 import cluster_pb2

    from kmesh.config.builder import translate as translate_resources

    lst = json_format.ParseDict(_rbac_listener(MTLS_DENY), listener_pb2.Listener())
    c = json_format.ParseDict(base()["static_resources"]["clusters"][0], cluster_pb2.Cluster())
    m = translate_resources("ads", [("LDS h", lst)], [("CDS c1", c)], endpoints={}, routes={}, lenient=True)
    (out,) = m.listeners
    assert out.rbac is not None and out.rbac.policies == ()   # ALLOW with no policy: 403 for all
    notes = [str(n) for n in m.skipped]   # from a control plane, notes go to /status
    assert any("denies every request" in n for n in notes), notes


def test_http_filters_kmesh_does_not_apply_are_warned():
    from tests.support.envoy import http_listener

    lst = http_listener("h", "127.0.0.2", 80, [{"name": "v", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "c1"}}]}])
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][:0] = [
        {"name": "envoy.filters.http.cors",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": "envoy.filters.http.fault",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                          "abort": {"http_status": 503, "percentage": {"numerator": 100}}}}]
    d = base()
    d["static_resources"]["listeners"] = [lst]
    hf = "test.yaml: static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters"
    m = translate(d)
    assert [w for w in m.warnings if "http_filters" in w] == [
        f"{hf}[0].typed_config: HTTP filter 'envoy.filters.http.cors' (envoy.extensions.filters.http.cors.v3.Cors): "
        "not applied by kmesh"]
    # The fault filter's own abort applies to every request: the listener is L7.
    (lst,) = m.listeners
    assert lst.routes is not None and lst.route_faults and lst.http_filters.fault.rule.fault.abort_status == 503
    assert lst.http_filters.order == ("fault",)


def test_http_filters_run_in_the_order_listed():
    lst = _rbac_listener({"action": "ALLOW", "policies": {}})
    chain = lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    chain[:0] = [{"name": "envoy.filters.http.local_ratelimit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "rl", "token_bucket": {"max_tokens": 1, "fill_interval": "1s"}}}]
    chain.insert(2, {"name": "envoy.filters.http.fault", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "abort": {"http_status": 503, "percentage": {"numerator": 100}}}})
    d = base()
    d["static_resources"]["listeners"] = [lst]
    (out,) = translate(d).listeners
    assert out.http_filters.order == ("rate_limit", "rbac", "fault")


def test_per_route_faults_need_the_fault_filter_in_the_chain():
    from tests.support.envoy import http_listener

    fault = {"envoy.filters.http.fault": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "abort": {"http_status": 503, "percentage": {"numerator": 100}}}}
    lst = http_listener("h", "127.0.0.2", 80, [{"name": "v", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "c1"}, "typed_per_filter_config": fault}]}])
    d = base()
    d["static_resources"]["listeners"] = [lst]
    (got,) = translate(d).listeners
    assert not got.route_faults          # router only: Envoy ignores the per-route fault
    lst["filter_chains"][0]["filters"][0]["typed_config"].pop("http_filters")
    (got,) = translate(d).listeners
    assert got.route_faults              # no filter list at all: kmesh's shorthand keeps them


# --- IPv6 ----------------------------------------------------------------------

def test_ipv6_listeners_and_endpoints_are_taken_in_canonical_form():
    """Addresses are keyed as text: IPv6 compressed, a mapped IPv4 one as
    the IPv4 address (what an IPv4 client connects to)."""
    svc = tcp_listener("svc", "10.96.0.1", 80, "c1")
    svc["additional_addresses"] = [{"address": sock("FD00:0:0::0001", 80)}]
    d = {"static_resources": {"listeners": [svc, tcp_listener("any", "::", 81, "c1"),
                                            tcp_listener("mapped", "::ffff:10.96.0.2", 82, "c1")],
                              "clusters": [cluster("c1", lb_ep("fd00:0:0:0:a:0:0:1", 8080), lb_ep("10.0.0.1", 8080))]}}
    m = translate(d)
    assert sorted((l.ip, l.port) for l in m.listeners) == [("10.96.0.1", 80), ("10.96.0.2", 82), ("::", 81),
                                                           ("fd00::1", 80)]
    assert m.clusters[0].endpoints == (Endpoint("fd00::a:0:0:1", 8080, 1), Endpoint("10.0.0.1", 8080, 1))
    assert m.warnings == ()


def test_an_endpoint_takes_an_additional_address_of_the_other_family():
    ep = lb_ep("10.0.0.1", 8080)
    ep["endpoint"]["additional_addresses"] = [{"address": sock("fd00::1", 8080)}]
    d = base()
    d["static_resources"]["clusters"] = [cluster("c1", ep)]
    assert translate(d).clusters[0].endpoints == (Endpoint("10.0.0.1", 8080, 1, "fd00::1"),)


def test_an_ipv4_listener_of_an_ipv6_only_cluster_is_refused():
    d = base()
    d["static_resources"]["clusters"] = [cluster("c1", lb_ep("fd00::1", 8080))]
    with pytest.raises(ConfigError) as e:
        translate(d)
    msg = str(e.value)
    assert "static_resources.listeners[0]" in msg and "has IPv6 endpoints only" in msg, msg
    d["static_resources"]["listeners"] = [tcp_listener("l1", "fd96::1", 80, "c1")]
    assert translate(d).listeners[0].clusters == (WeightedCluster("c1", 1),)


def test_ipv6_prefix_ranges_and_wildcards():
    lst = tcp_listener("l", "0.0.0.0", 80, "c1")
    lst["additional_addresses"] = [{"address": sock("::", 80)}]
    lst["filter_chains"][0]["filter_chain_match"] = {"prefix_ranges": [
        {"address_prefix": "fd96::7", "prefix_len": 128}, {"address_prefix": "10.96.0.7", "prefix_len": 32},
        {"address_prefix": "::", "prefix_len": 0}, {"address_prefix": "fd96::", "prefix_len": 64}]}
    d = base()
    d["static_resources"]["listeners"] = [lst]
    m = translate(d)
    assert sorted(l.ip for l in m.listeners) == ["10.96.0.7", "::", "fd96::7"]
    assert any("prefix_ranges[3]" in w for w in m.warnings), m.warnings
