"""HTTP/1.1 route decisions with Envoy's RouteConfiguration semantics
(kmesh.config.http.routes): virtual host selection, path/header/query matching, route
actions, and which fields are refused (problems) or accepted unenforced
(notes), each named by its exact field path."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from google.protobuf import empty_pb2, json_format

from kmesh.config.http.match import Request
from kmesh.config.http.routes import (DirectResponse, Fault, Redirect, Retry, RouteTo, TableOptions, compile_routes,
                                      compile_virtual_hosts, needs_l7, pick_weighted)

# Types that the configs below name in "@type" (ParseDict resolves them from the imported modules).
CORS = f"type.googleapis.com/{cors_pb2.CorsPolicy.DESCRIPTOR.full_name}"
EMPTY = {"name": "x", "typed_config": {"@type": f"type.googleapis.com/{empty_pb2.Empty.DESCRIPTOR.full_name}"}}
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "istio"
V = "rc.virtual_hosts[0]"
R = f"{V}.routes[0]"


# --------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------

def route(match: dict | None = None, action: dict | None = None, name: str = "r", **extra) -> dict:
    out = {"name": name, "match": {"prefix": "/"} if match is None else match, **extra}
    if not {"redirect", "direct_response", "filter_action"} & set(extra):
        out["route"] = {"cluster": "c"} if action is None else action
    return out


def vhost(*routes: dict, name: str = "vh", domains=("*",), **extra) -> dict:
    return {"name": name, "domains": list(domains), "routes": list(routes), **extra}


def rc(*vhosts: dict, **extra) -> route_pb2.RouteConfiguration:
    return json_format.ParseDict({"name": "rc", "virtual_hosts": list(vhosts), **extra},
                                 route_pb2.RouteConfiguration())


def compile_all(cfg: route_pb2.RouteConfiguration):
    problems, notes = [], []
    table = compile_routes(cfg, "rc", lambda p, r: problems.append((p, r)), lambda p, r: notes.append((p, r)))
    return table, problems, notes


def table_of(cfg: route_pb2.RouteConfiguration):
    table, problems, _ = compile_all(cfg)
    assert problems == [] and table is not None
    return table


def problems_of(cfg) -> list[tuple[str, str]]:
    table, problems, _ = compile_all(cfg)
    assert table is None and problems
    return problems


def notes_of(cfg) -> list[tuple[str, str]]:
    _, problems, notes = compile_all(cfg)
    assert problems == []
    return notes


def req(path: str = "/", host: str = "example.com", method: str = "GET", headers=()) -> Request:
    return Request(method, path, host, tuple(headers))


def one_route(match: dict | None = None, action: dict | None = None, **extra):
    """A table of one catch-all virtual host with one route named 'hit'."""
    return table_of(rc(vhost(route(match, action, name="hit", **extra))))


def hits(table, *args, **kwargs) -> bool:
    return table.match(req(*args, **kwargs)) is not None


# --------------------------------------------------------------------------
# virtual host selection
# --------------------------------------------------------------------------

HOSTS = [
    vhost(route(), name="exact", domains=["foo.example.com"]),
    vhost(route(), name="suffix", domains=["*.example.com"]),
    vhost(route(), name="suffix-long", domains=["*-bar.example.com"]),
    vhost(route(), name="prefix", domains=["foo.*"]),
    vhost(route(), name="prefix-long", domains=["foo.example.*"]),
    vhost(route(), name="port", domains=["port.example.com:8080"]),
    vhost(route(), name="any", domains=["*"]),
]


@pytest.mark.parametrize("host, expected", [
    ("foo.example.com", "exact"),
    ("FOO.Example.COM", "exact"),                   # hosts are case-insensitive
    ("a.example.com", "suffix"),
    ("a.b.example.com", "suffix"),
    ("x-bar.example.com", "suffix-long"),           # longest suffix wildcard first
    ("-bar.example.com", "suffix"),                 # a wildcard needs one character or more
    (".example.com", "any"),
    ("foo.x.example.com", "suffix"),                # any suffix wildcard beats any prefix wildcard
    ("foo.example.org", "prefix-long"),             # longest prefix wildcard first
    ("foo.org", "prefix"),
    ("foo.example.com:9090", "prefix-long"),        # the port is part of the host: no exact, no suffix
    ("port.example.com:8080", "port"),
    ("port.example.com", "suffix"),
    ("other.org", "any"),
    ("", "any"),
])
def test_virtual_host_precedence(host, expected):
    decision = table_of(rc(*HOSTS)).match(req(host=host))
    assert decision.vhost_name == expected


@pytest.mark.parametrize("host, expected", [
    ("foo.example.com:9090", "exact"),
    ("port.example.com:8080", "suffix"),            # the domain's own port no longer matches
    ("[::1]:80", "v6"),
    ("[::1]", "v6"),
])
def test_ignore_port_in_host_matching(host, expected):
    hosts = [*HOSTS, vhost(route(), name="v6", domains=["[::1]"])]
    table = table_of(rc(*hosts, ignore_port_in_host_matching=True))
    assert table.match(req(host=host)).vhost_name == expected


def test_no_catch_all_means_no_virtual_host():
    table = table_of(rc(vhost(route(), domains=["foo.com"])))
    assert hits(table, host="foo.com")
    assert not hits(table, host="bar.com")
    assert not hits(table, host="foo.com:80")


def test_only_catch_all_takes_any_host():
    assert table_of(rc(vhost(route()))).match(req(host="")).vhost_name == "vh"


def test_duplicate_domains_are_refused():
    cfg = rc(vhost(route(), name="a", domains=["Foo.com", "*"]),
             vhost(route(), name="b", domains=["bar.com", "foo.COM", "*"]))
    assert problems_of(cfg) == [
        ("rc.virtual_hosts[1].domains[1]",
         "duplicate domain 'foo.COM' (also at rc.virtual_hosts[0].domains[0]): Envoy requires unique domains"),
        ("rc.virtual_hosts[1].domains[2]", "only one virtual host may have the wildcard domain '*'"),
    ]


def test_duplicate_wildcard_domain_in_one_virtual_host_is_refused():
    paths = [p for p, _ in problems_of(rc(vhost(route(), domains=["*.a.com", "*.A.com"])))]
    assert paths == [f"{V}.domains[1]"]


def test_compile_virtual_hosts_takes_a_list_and_options():
    vh = json_format.ParseDict(vhost(route(), domains=["a.com"]), route_components_pb2.VirtualHost())
    problems = []
    table = compile_virtual_hosts([vh], "hcm.route_config.virtual_hosts", lambda p, r: problems.append(p),
                                  lambda p, r: None, TableOptions(ignore_port_in_host_matching=True))
    assert problems == [] and table.match(req(host="a.com:80")).vhost_name == "vh"
    compile_virtual_hosts([vh, vh], "hcm.route_config.virtual_hosts", lambda p, r: problems.append(p),
                          lambda p, r: None)
    assert problems == ["hcm.route_config.virtual_hosts[1].domains[0]"]


# --------------------------------------------------------------------------
# path specifiers
# --------------------------------------------------------------------------

@pytest.mark.parametrize("match, path, expected", [
    ({"prefix": "/foo"}, "/foo", True),
    ({"prefix": "/foo"}, "/foobar", True),
    ({"prefix": "/foo"}, "/fo", False),
    ({"prefix": "/foo"}, "/FOO", False),
    ({"prefix": "/foo", "case_sensitive": False}, "/FOO/x", True),
    ({"prefix": "/foo?"}, "/foo?x", False),         # the query is not part of the path
    ({"prefix": ""}, "/anything", True),
    ({"path": "/foo"}, "/foo", True),
    ({"path": "/foo"}, "/foo?x=1", True),
    ({"path": "/foo"}, "/foo#frag", True),
    ({"path": "/foo"}, "/foo/", False),
    ({"path": "/foo"}, "/Foo", False),
    ({"path": "/foo", "case_sensitive": False}, "/Foo", True),
    ({"safe_regex": {"regex": "/api/v[0-9]+/.*"}}, "/api/v2/users?x=1", True),
    ({"safe_regex": {"regex": "/api/v[0-9]+/.*"}}, "/api/v2", False),
    ({"safe_regex": {"regex": "/api/v[0-9]+"}}, "/api/v12/x", False),   # a full match
    ({"safe_regex": {"regex": "/a\\d"}}, "/a\u0663", False),              # \d is ASCII in RE2
    ({"safe_regex": {"regex": "/a.*\\z"}}, "/abc", True),                 # RE2's \z
    ({"path_separated_prefix": "/foo"}, "/foo", True),
    ({"path_separated_prefix": "/foo"}, "/foo/", True),
    ({"path_separated_prefix": "/foo"}, "/foo/bar", True),
    ({"path_separated_prefix": "/foo"}, "/foo?x", True),
    ({"path_separated_prefix": "/foo"}, "/foo#x", True),
    ({"path_separated_prefix": "/foo"}, "/foobar", False),
    ({"path_separated_prefix": "/foo"}, "/fo", False),
    ({"path_separated_prefix": "/foo"}, "/FOO/x", False),
    ({"path_separated_prefix": "/foo", "case_sensitive": False}, "/FOO/x", True),
    ({"path_separated_prefix": "/foo", "case_sensitive": False}, "/FOObar", False),
])
def test_path_specifiers(match, path, expected):
    assert hits(one_route(match), path) is expected


@pytest.mark.parametrize("value", ["/foo/", "/", "/a?b", "/a#b", ""])
def test_path_separated_prefix_must_be_a_clean_prefix(value):
    (problem,) = problems_of(rc(vhost(route({"path_separated_prefix": value}))))
    assert problem[0] == f"{R}.match.path_separated_prefix"


def test_path_parameters_are_ignored_when_configured():
    cfg = rc(vhost(route({"path": "/foo"})), ignore_path_parameters_in_path_matching=True)
    assert hits(table_of(cfg), "/foo;jsessionid=1?x=2")
    assert not hits(one_route({"path": "/foo"}), "/foo;jsessionid=1")


def test_first_matching_route_wins():
    table = table_of(rc(vhost(route({"prefix": "/api/v2"}, name="v2"),
                              route({"prefix": "/api"}, name="api"),
                              route({"prefix": "/api/v2/users"}, name="never"),
                              route({"prefix": "/"}, name="rest"))))
    assert [table.match(req(p)).route_name for p in ("/api/v2/users", "/api/v1", "/x")] == ["v2", "api", "rest"]


def test_no_route_matches():
    assert not hits(one_route({"prefix": "/api"}), "/web")
    assert table_of(rc(vhost())).match(req()) is None


def test_connect_requests_match_no_route():
    assert one_route().match(req("example.com:443", method="CONNECT")) is None


# --------------------------------------------------------------------------
# headers
# --------------------------------------------------------------------------

def header_route(*matchers: dict):
    return one_route({"prefix": "/", "headers": list(matchers)})


@pytest.mark.parametrize("matcher, headers, expected", [
    ({"exact_match": "jason"}, [("end-user", "jason")], True),
    ({"exact_match": "jason"}, [("End-User", "jason")], True),            # names are case-insensitive
    ({"exact_match": "jason"}, [("end-user", "Jason")], False),           # values are not
    ({"exact_match": "jason"}, [("end-user", " jason\t")], True),         # surrounding white space is not a value
    ({"exact_match": "jason"}, [], False),
    ({"exact_match": ""}, [("end-user", "anyone")], True),                # Envoy: empty exact_match = any value
    ({"prefix_match": "ja"}, [("end-user", "jason")], True),
    ({"suffix_match": "son"}, [("end-user", "jason")], True),
    ({"contains_match": "aso"}, [("end-user", "jason")], True),
    ({"contains_match": "x"}, [("end-user", "jason")], False),
    ({"safe_regex_match": {"regex": "j.*n"}}, [("end-user", "jason")], True),
    ({"safe_regex_match": {"regex": "j.*s"}}, [("end-user", "jason")], False),
    ({"string_match": {"exact": "JASON", "ignore_case": True}}, [("end-user", "jason")], True),
    ({"string_match": {"exact": "JASON"}}, [("end-user", "jason")], False),
    ({"string_match": {"prefix": "JA", "ignore_case": True}}, [("end-user", "jAson")], True),
    ({"string_match": {"suffix": "SON", "ignore_case": True}}, [("end-user", "jason")], True),
    ({"string_match": {"contains": "AS", "ignore_case": True}}, [("end-user", "jason")], True),
    ({"string_match": {"safe_regex": {"regex": "[a-z]+"}}}, [("end-user", "jason")], True),
    ({"string_match": {"safe_regex": {"regex": "[a-z]+"}}}, [("end-user", "jason1")], False),
    # a repeated header matches when one of its values does (Envoy 1.40, same bytes)
    ({"exact_match": "a,b"}, [("end-user", "a"), ("End-User", "b")], False),
    ({"exact_match": "a"}, [("end-user", "a"), ("end-user", "b")], True),
    ({"string_match": {"exact": "a"}}, [("end-user", "b"), ("end-user", "a")], True),
    ({"string_match": {"exact": "a,b"}}, [("end-user", "a,b")], True),
    ({"exact_match": "a", "invert_match": True}, [("end-user", "a"), ("end-user", "b")], False),
    # present_match
    ({"present_match": True}, [("end-user", "")], True),
    ({"present_match": True}, [], False),
    ({"present_match": False}, [], True),
    ({"present_match": False}, [("end-user", "x")], False),
    ({}, [("end-user", "x")], True),                                      # no specifier: must be present
    ({}, [], False),
    # invert_match
    ({"exact_match": "jason", "invert_match": True}, [("end-user", "bob")], True),
    ({"exact_match": "jason", "invert_match": True}, [("end-user", "jason")], False),
    ({"exact_match": "jason", "invert_match": True}, [], False),          # an absent header never matches
    ({"present_match": True, "invert_match": True}, [], True),
    ({"present_match": True, "invert_match": True}, [("end-user", "x")], False),
    ({"present_match": False, "invert_match": True}, [], False),
    ({"present_match": False, "invert_match": True}, [("end-user", "x")], True),
    # treat_missing_header_as_empty
    ({"exact_match": "jason", "invert_match": True, "treat_missing_header_as_empty": True}, [], True),
    ({"string_match": {"exact": ""}, "treat_missing_header_as_empty": True}, [], True),
    ({"string_match": {"exact": ""}}, [], False),
    # range_match: [start, end) over an int64
    ({"range_match": {"start": "-10", "end": "10"}}, [("end-user", "-10")], True),
    ({"range_match": {"start": "-10", "end": "10"}}, [("end-user", "10")], False),
    ({"range_match": {"start": "-10", "end": "10"}}, [("end-user", " +9 ")], True),
    ({"range_match": {"start": "-10", "end": "10"}}, [("end-user", "1_0")], False),
    ({"range_match": {"start": "-10", "end": "10"}}, [("end-user", "5x")], False),
    ({"range_match": {"start": "-10", "end": "10"}}, [("end-user", "")], False),
    ({"range_match": {"start": "0", "end": "10"}, "invert_match": True}, [("end-user", "20")], True),
])
def test_header_matchers(matcher, headers, expected):
    assert hits(header_route({"name": "End-User", **matcher}), headers=headers) is expected


def test_all_header_matchers_must_match():
    table = header_route({"name": "a", "exact_match": "1"}, {"name": "b", "present_match": True})
    assert hits(table, headers=[("a", "1"), ("b", "")])
    assert not hits(table, headers=[("a", "1")])


@pytest.mark.parametrize("name, value, request_kw", [
    (":method", "POST", {"method": "POST"}),
    (":path", "/x?y=1", {"path": "/x?y=1"}),
    (":authority", "Foo.com:8080", {"host": "Foo.com:8080"}),
    ("host", "Foo.com:8080", {"host": "Foo.com:8080"}),      # Envoy's alias of :authority
    (":scheme", "http", {}),
    ("x-forwarded-proto", "http", {}),                        # set on a plaintext connection when absent
])
def test_pseudo_headers_are_matchable(name, value, request_kw):
    assert hits(header_route({"name": name, "exact_match": value}), **request_kw)
    assert not hits(header_route({"name": name, "exact_match": value + "-no"}), **request_kw)


def test_grpc_match_is_the_grpc_content_type():
    table = one_route({"prefix": "/", "grpc": {}})
    for ct, expected in [("application/grpc", True), ("application/grpc+proto", True),
                         ("application/grpc-web", False), ("application/json", False)]:
        assert hits(table, headers=[("Content-Type", ct)]) is expected, ct
    assert not hits(table)


# --------------------------------------------------------------------------
# query parameters
# --------------------------------------------------------------------------

@pytest.mark.parametrize("matcher, path, expected", [
    ({"string_match": {"exact": "1"}}, "/?debug=1", True),
    ({"string_match": {"exact": "1"}}, "/?a=2&debug=1", True),
    ({"string_match": {"exact": "1"}}, "/?debug=2", False),
    ({"string_match": {"exact": "1"}}, "/?debug=1&debug=2", True),       # the first value counts
    ({"string_match": {"exact": "1"}}, "/?debug=2&debug=1", False),
    ({"string_match": {"exact": "a%20b"}}, "/?debug=a%20b", True),       # not percent-decoded
    ({"string_match": {"exact": ""}}, "/?debug", True),                  # no '=': the value is ""
    ({"string_match": {"exact": "ON", "ignore_case": True}}, "/?debug=on", True),
    ({"string_match": {"safe_regex": {"regex": "[0-9]+"}}}, "/?debug=42", True),
    ({"string_match": {"exact": "1"}}, "/", False),
    ({"present_match": True}, "/?debug", True),
    ({"present_match": True}, "/?debugx=1", False),
    ({"present_match": False}, "/?debug=1", True),                      # Envoy reads it as "present" too
    ({"present_match": False}, "/", False),
    ({}, "/?debug=", True),
])
def test_query_parameters(matcher, path, expected):
    assert hits(one_route({"prefix": "/", "query_parameters": [{"name": "debug", **matcher}]}), path) is expected


# --------------------------------------------------------------------------
# forwarding
# --------------------------------------------------------------------------

def test_single_cluster_defaults():
    assert one_route().match(req()) == RouteTo((("c", 1),), 15_000, 0, None, "hit", "vh")


@pytest.mark.parametrize("timeout, expected", [("0s", None), ("2.5s", 2500), ("0.0005s", None), ("60s", 60_000)])
def test_timeout(timeout, expected):
    assert one_route(action={"cluster": "c", "timeout": timeout}).match(req()).timeout_ms == expected


def test_weighted_clusters_and_pick():
    table = one_route(action={"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 1}, {"name": "zero", "weight": 0}, {"name": "b", "weight": 3}]}})
    clusters = table.match(req()).clusters
    assert clusters == (("a", 1), ("zero", 0), ("b", 3))
    assert [pick_weighted(clusters, r) for r in (0.0, 0.2499, 0.25, 0.9999999999999999)] == ["a", "a", "b", "b"]
    counts = {n: 0 for n, _ in clusters}
    for i in range(1000):
        counts[pick_weighted(clusters, i / 1000)] += 1
    assert counts == {"a": 250, "zero": 0, "b": 750}
    with pytest.raises(ValueError):
        pick_weighted((("a", 0),), 0.5)


def test_weighted_clusters_are_checked():
    def wc(*clusters):
        return rc(vhost(route(action={"weighted_clusters": {"clusters": list(clusters)}})))
    assert problems_of(wc({"name": "a", "weight": 0})) == [
        (f"{R}.route.weighted_clusters.clusters", "the sum of the weights must be greater than 0")]
    assert problems_of(wc({"name": "a"})) == [(f"{R}.route.weighted_clusters.clusters[0].weight", "required")]
    assert problems_of(wc({"weight": 1})) == [
        (f"{R}.route.weighted_clusters.clusters[0].name", "a weighted cluster needs a name")]
    assert problems_of(wc()) == [(f"{R}.route.weighted_clusters.clusters", "needs at least one cluster")]


def test_bookinfo_reviews_routing():
    """Istio's "jason sees reviews v2" VirtualService, as istiod renders it."""
    reviews = "reviews.default.svc.cluster.local"
    cfg = rc(vhost(route({"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]},
                         {"cluster": f"outbound|9080|v2|{reviews}", "timeout": "0s"}, name="jason"),
                   route({"prefix": "/"}, {"cluster": f"outbound|9080|v1|{reviews}", "timeout": "0s"}, name="default"),
                   name=f"{reviews}:9080", domains=[reviews, "reviews", "10.96.0.11"]),
             vhost(route(action={"cluster": "PassthroughCluster"}, name="allow_any"), name="allow_any"),
             ignore_port_in_host_matching=True)
    table = table_of(cfg)
    jason = table.match(req("/reviews/0", "reviews:9080", headers=[("end-user", "jason")]))
    assert (jason.clusters, jason.route_name, jason.timeout_ms) == (((f"outbound|9080|v2|{reviews}", 1),), "jason", None)
    for r in (req("/reviews/0", "reviews:9080"), req("/", "10.96.0.11", headers=[("end-user", "bob")])):
        assert table.match(r).clusters == ((f"outbound|9080|v1|{reviews}", 1),)
    assert table.match(req("/", "details:9080")).clusters == (("PassthroughCluster", 1),)
    assert needs_l7(cfg)


def test_istio_fixture_compiles():
    assert previous_hosts_pb2.PreviousHostsPredicate    # named by istiod's retry policies: ParseDict needs it
    (d,) = json.loads((FIX / "bookinfo_rds.json").read_text())
    cfg = json_format.ParseDict(d, route_pb2.RouteConfiguration())
    table, problems, notes = compile_all(cfg)
    assert problems == []
    host = "reviews.default.svc.cluster.local:9080"
    jason = table.match(req("/", host, headers=[("end-user", "jason")]))
    assert jason.clusters == (("outbound|9080|v2|reviews.default.svc.cluster.local", 1),)
    assert (jason.retries, jason.timeout_ms) == (2, None)
    assert len(table.match(req("/", host)).clusters) == 2
    assert jason.retry == Retry(2, True, False, False, False, grpc=frozenset({1, 14}), other_hosts=True)
    assert not [n for n in notes if "retry_policy" in n[0]], notes


@pytest.mark.parametrize("retry_policy, expected", [
    ({"retry_on": "connect-failure", "num_retries": 3}, 3),
    ({"retry_on": "connect-failure"}, 1),                       # Envoy's default num_retries
    ({"retry_on": "5xx,retriable-4xx", "num_retries": 2}, 2),
    ({"retry_on": " gateway-error "}, 1),
    ({"retry_on": "reset"}, 1),
    ({"retry_on": "refused-stream"}, 0),                        # HTTP/2 only: never on an HTTP/1.1 upstream
    ({"retry_on": "retriable-4xx", "num_retries": 2}, 0),
    ({"num_retries": 2}, 0),
])
def test_retries_after_a_failed_connect(retry_policy, expected):
    assert one_route(action={"cluster": "c", "retry_policy": retry_policy}).match(req()).retries == expected


@pytest.mark.parametrize("retry_on, codes, retried, kept", [
    ("5xx", [], [(500, ()), (503, ()), (599, ())], [(404, ()), (409, ()), (200, ())]),
    ("gateway-error", [], [(502, ()), (503, ()), (504, ())], [(500, ()), (501, ())]),
    ("retriable-4xx", [], [(409, ())], [(404, ()), (503, ())]),
    ("retriable-status-codes", [418, 503], [(418, ()), (503, ())], [(500, ())]),
    ("unavailable,cancelled", [], [(200, (("grpc-status", "14"),)), (200, (("Grpc-Status", "1"),))],
     [(200, (("grpc-status", "0"),)), (503, ())]),
    ("envoy-ratelimited", [], [(429, (("x-envoy-ratelimited", "true"),))], [(429, ())]),
])
def test_retry_on_responses(retry_on, codes, retried, kept):
    r = one_route(action={"cluster": "c", "retry_policy": {"retry_on": retry_on, "retriable_status_codes": codes}}
                  ).match(req()).retry
    assert [r.on_response(*x) for x in retried] == [True] * len(retried)
    assert [r.on_response(*x) for x in kept] == [False] * len(kept)


def test_retry_back_off_and_request_conditions():
    r = one_route(action={"cluster": "c", "retry_policy": {
        "retry_on": "5xx", "retry_back_off": {"base_interval": "0.1s"}, "per_try_timeout": "2s",
        "retriable_request_headers": [{"name": ":method", "string_match": {"exact": "GET"}}]}}).match(req()).retry
    assert (r.base_ms, r.max_ms, r.per_try_timeout_ms) == (100, 1000, 2000)
    assert [r.back_off(n, 0.999999) for n in (1, 2, 3, 4, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0], rel=1e-3)
    assert r.back_off(3, 0.0) == 0
    assert r.applies(req(method="GET")) and not r.applies(req(method="POST"))


def test_retry_policy_of_the_virtual_host_is_the_default():
    table = table_of(rc(vhost(route({"prefix": "/own"}, {"cluster": "c", "retry_policy": {"retry_on": "reset"}}),
                              route(name="inherits"),
                              retry_policy={"retry_on": "connect-failure", "num_retries": 4})))
    assert table.match(req("/own")).retries == 1
    assert table.match(req("/")).retries == 4


def test_retry_notes():
    cfg = rc(vhost(route(action={"cluster": "c", "retry_policy": {
        "retry_on": "connect-failure,5xx,retriable-4xx,bogus", "per_try_idle_timeout": "1s",
        "retriable_status_codes": [503]}})))
    path = f"{R}.route.retry_policy"
    assert notes_of(cfg) == [
        (f"{path}.per_try_idle_timeout", "accepted but not enforced by kmesh"),
        (f"{path}.retry_on", "'bogus': unknown retry condition (Envoy ignores it)"),
        (f"{path}.retriable_status_codes", "set without 'retriable-status-codes' in retry_on: not used (as in Envoy)"),
    ]


@pytest.mark.parametrize("match, action, path, expected", [
    ({"prefix": "/old"}, {"prefix_rewrite": "/new"}, "/old/x?q=1", "/new/x?q=1"),
    ({"prefix": "/old", "case_sensitive": False}, {"prefix_rewrite": "/new"}, "/OLD/x", "/new/x"),
    ({"prefix": "/old/"}, {"prefix_rewrite": "/"}, "/old/x", "/x"),
    ({"path": "/a"}, {"prefix_rewrite": "/b"}, "/a?z", "/b?z"),
    ({"path_separated_prefix": "/v1"}, {"prefix_rewrite": "/v2"}, "/v1/x", "/v2/x"),
    ({"safe_regex": {"regex": "/x/.*"}}, {"prefix_rewrite": "/y"}, "/x/1?q", "/y?q"),   # the whole path
    ({"prefix": "/"}, {"regex_rewrite": {"pattern": {"regex": "^/service/([^/]+)(/.*)$"},
                                          "substitution": "\\2/instance/\\1"}},
     "/service/foo/v1/api?x=1", "/v1/api/instance/foo?x=1"),
    ({"prefix": "/"}, {"regex_rewrite": {"pattern": {"regex": "one"}, "substitution": "two"}},
     "/xxx/one/yyy/one/zzz", "/xxx/two/yyy/two/zzz"),
    ({"prefix": "/"}, {"regex_rewrite": {"pattern": {"regex": "a*"}, "substitution": "-"}}, "/baac", "-/-b-c-"),
    ({"prefix": "/"}, {"regex_rewrite": {"pattern": {"regex": "x"}, "substitution": "\\\\"}}, "/x", "/\\"),
])
def test_path_rewrites(match, action, path, expected):
    decision = one_route(match, {"cluster": "c", **action}).match(req(path))
    assert decision.rewrite_path == expected


def test_host_rewrite_literal():
    assert one_route(action={"cluster": "c", "host_rewrite_literal": "up.internal"}).match(req()).rewrite_host \
        == "up.internal"


def test_bad_rewrites_are_refused():
    def action(**ra):
        return rc(vhost(route(action={"cluster": "c", **ra})))
    both = action(prefix_rewrite="/a", regex_rewrite={"pattern": {"regex": "a"}, "substitution": "b"})
    assert problems_of(both) == [
        (f"{R}.route", "specify only one of prefix_rewrite, regex_rewrite or path_rewrite_policy")]
    (p,) = problems_of(action(regex_rewrite={"pattern": {"regex": "(a)"}, "substitution": "\\2"}))
    assert p[0] == f"{R}.route.regex_rewrite.substitution"
    (p,) = problems_of(action(regex_rewrite={"pattern": {"regex": "(a)"}, "substitution": "\\n"}))
    assert p[0] == f"{R}.route.regex_rewrite.substitution"


# --------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------

def fault(**config) -> dict:
    return {"envoy.filters.http.fault": {"@type": FAULT, **config}}


@pytest.mark.parametrize("config, expected", [
    ({"abort": {"http_status": 503, "percentage": {"numerator": 50}}}, Fault(503, 50.0, None, 0.0)),
    ({"abort": {"http_status": 500, "percentage": {"numerator": 25, "denominator": "TEN_THOUSAND"}}},
     Fault(500, 0.25, None, 0.0)),
    ({"abort": {"http_status": 500, "percentage": {"numerator": 1, "denominator": "MILLION"}}},
     Fault(500, 0.0001, None, 0.0)),
    ({"abort": {"http_status": 500, "percentage": {"numerator": 250}}}, Fault(500, 100.0, None, 0.0)),
    ({"abort": {"http_status": 500}}, Fault(500, 0.0, None, 0.0)),             # no percentage: 0 %
    ({"delay": {"fixed_delay": "1.5s", "percentage": {"numerator": 10}}}, Fault(None, 0.0, 1500, 10.0)),
    ({"delay": {"fixed_delay": "0.2s", "percentage": {"numerator": 100}},
      "abort": {"http_status": 418, "percentage": {"numerator": 1}}}, Fault(418, 1.0, 200, 100.0)),
    ({}, None),
])
def test_fault_parsing(config, expected):
    got = one_route(typed_per_filter_config=fault(**config)).match(req()).fault
    if expected is None:
        assert got is None
    else:
        assert (got.abort_status, got.delay_ms) == (expected.abort_status, expected.delay_ms)
        assert (got.abort_percent, got.delay_percent) == pytest.approx((expected.abort_percent, expected.delay_percent))


def test_fault_levels_most_specific_wins():
    vh_fault = fault(abort={"http_status": 503, "percentage": {"numerator": 100}})
    rc_fault = fault(delay={"fixed_delay": "1s", "percentage": {"numerator": 100}})
    cfg = rc(vhost(route({"prefix": "/own"}, typed_per_filter_config=fault(
                       abort={"http_status": 500, "percentage": {"numerator": 5}})),
                   route({"prefix": "/off"}, typed_per_filter_config={"envoy.filters.http.fault": {
                       "@type": FILTER_CONFIG, "disabled": True}}),
                   route({"prefix": "/wrapped"}, typed_per_filter_config={"envoy.filters.http.fault": {
                       "@type": FILTER_CONFIG, "config": {"@type": FAULT, "abort": {"http_status": 502}}}}),
                   route(name="inherits"), typed_per_filter_config=vh_fault, domains=["a.com"]),
             vhost(route(), name="b", domains=["b.com"]),
             typed_per_filter_config=rc_fault)
    table = table_of(cfg)
    assert table.match(req("/own", "a.com")).fault == Fault(500, 5.0, None, 0.0)
    assert table.match(req("/off", "a.com")).fault is None
    assert table.match(req("/wrapped", "a.com")).fault == Fault(502, 0.0, None, 0.0)
    assert table.match(req("/", "a.com")).fault == Fault(503, 100.0, None, 0.0)
    assert table.match(req("/", "b.com")).fault == Fault(None, 0.0, 1000, 100.0)


def test_fault_limited_to_headers():
    table = one_route(typed_per_filter_config=fault(
        abort={"http_status": 503, "percentage": {"numerator": 100}},
        headers=[{"name": "x-chaos", "exact_match": "on"}]))
    assert table.match(req(headers=[("X-Chaos", "on")])).fault == Fault(503, 100.0, None, 0.0)
    assert table.match(req()).fault is None


def test_fault_notes_and_problems():
    path = f'{R}.typed_per_filter_config["envoy.filters.http.fault"]'
    cfg = rc(vhost(route(typed_per_filter_config=fault(
        abort={"header_abort": {}, "percentage": {"numerator": 10}},
        delay={"header_delay": {}}, max_active_faults=3))))
    table, problems, notes = compile_all(cfg)
    assert problems == [] and table.match(req()).fault is None
    assert notes == [
        (f"{path}.max_active_faults", "accepted but not enforced by kmesh"),
        (f"{path}.abort.header_abort", "aborts asked for by a request header are accepted but not enforced by kmesh"),
        (f"{path}.delay.header_delay", "delays asked for by a request header are accepted but not enforced by kmesh"),
    ]
    bad = rc(vhost(route(typed_per_filter_config=fault(
        abort={"grpc_status": 14}, delay={"fixed_delay": "0s"}, upstream_cluster="c"))))
    assert [p for p, _ in problems_of(bad)] == [
        f"{path}.upstream_cluster", f"{path}.abort.grpc_status", f"{path}.delay.fixed_delay"]
    (p,) = problems_of(rc(vhost(route(typed_per_filter_config=fault(abort={"http_status": 99})))))
    assert p == (f"{path}.abort.http_status", "must be in [200, 600)")


# --------------------------------------------------------------------------
# direct responses and redirects
# --------------------------------------------------------------------------

def test_direct_response():
    table = table_of(rc(vhost(
        route({"path": "/health"}, direct_response={"status": 200, "body": {"inline_string": "ok\n"}}),
        route({"path": "/bin"}, direct_response={"status": 503, "body": {
            "inline_bytes": base64.b64encode(b"\x00\xff").decode()}}),
        route({"path": "/empty"}, direct_response={"status": 204}))))
    assert table.match(req("/health?x")) == DirectResponse(200, b"ok\n")
    assert table.match(req("/bin")) == DirectResponse(503, b"\x00\xff")
    assert table.match(req("/empty")) == DirectResponse(204, b"")


def test_direct_response_is_checked():
    def direct(dr, **top):
        return rc(vhost(route(direct_response=dr)), **top)
    path = f"{R}.direct_response"
    assert problems_of(direct({"status": 200, "body": {"filename": "/etc/motd"}}))[0][0] == f"{path}.body.filename"
    assert problems_of(direct({"status": 100}))[0][0] == f"{path}.status"
    assert problems_of(direct({"status": 200, "body": {"inline_string": "x" * 4097}})) == [
        (f"{path}.body", "response body size is 4097 bytes; maximum is 4096 (max_direct_response_body_size_bytes)")]
    assert table_of(direct({"status": 200, "body": {"inline_string": "x" * 4097}},
                           max_direct_response_body_size_bytes=5000))


@pytest.mark.parametrize("redirect, path, host, expected", [
    ({"https_redirect": True}, "/a?b=1", "foo.com", Redirect(301, "https://foo.com/a?b=1")),
    ({"https_redirect": True}, "/", "foo.com:80", Redirect(301, "https://foo.com/")),        # old default port
    ({"https_redirect": True}, "/", "foo.com:8080", Redirect(301, "https://foo.com:8080/")),
    ({"scheme_redirect": "https", "port_redirect": 8443}, "/", "foo.com:80", Redirect(301, "https://foo.com:8443/")),
    ({"port_redirect": 8080}, "/x", "[::1]:80", Redirect(301, "http://[::1]:8080/x")),
    ({"port_redirect": 8080}, "/x", "foo.com:80", Redirect(301, "http://foo.com:8080/x")),
    ({"port_redirect": 8080}, "/x", "foo.com", Redirect(301, "http://foo.com:8080/x")),
    ({"host_redirect": "bar.com"}, "/x", "foo.com:8080", Redirect(301, "http://bar.com/x")),
    ({"host_redirect": "bar.com", "port_redirect": 81}, "/x", "foo.com", Redirect(301, "http://bar.com:81/x")),
    ({"path_redirect": "/new"}, "/old?q=1", "foo.com", Redirect(301, "http://foo.com/new?q=1")),
    ({"path_redirect": "/new?own=1", "strip_query": True}, "/old?q=1", "foo.com",
     Redirect(301, "http://foo.com/new?own=1")),
    ({"path_redirect": "new"}, "/old", "foo.com", Redirect(301, "http://foo.com/new")),
    ({"path_redirect": "/new", "strip_query": True}, "/old?q=1", "foo.com", Redirect(301, "http://foo.com/new")),
    ({"strip_query": True}, "/old?q=1", "foo.com", Redirect(301, "http://foo.com/old")),
    ({"prefix_rewrite": "/v2"}, "/api/x?q=1", "foo.com", Redirect(301, "http://foo.com/v2/x?q=1")),
    ({"regex_rewrite": {"pattern": {"regex": "^/api/(.*)$"}, "substitution": "/\\1/index"}}, "/api/x?q", "foo.com",
     Redirect(301, "http://foo.com/x/index?q")),
    ({"response_code": "FOUND"}, "/", "foo.com", Redirect(302, "http://foo.com/")),
    ({"response_code": "SEE_OTHER"}, "/", "foo.com", Redirect(303, "http://foo.com/")),
    ({"response_code": "TEMPORARY_REDIRECT"}, "/", "foo.com", Redirect(307, "http://foo.com/")),
    ({"response_code": "PERMANENT_REDIRECT"}, "/", "foo.com", Redirect(308, "http://foo.com/")),
])
def test_redirect_location(redirect, path, host, expected):
    table = table_of(rc(vhost(route({"prefix": "/api"} if "prefix_rewrite" in redirect else None,
                                    redirect=redirect))))
    assert table.match(req(path, host)) == expected


def test_require_tls():
    table = table_of(rc(vhost(route(), require_tls="ALL", domains=["a.com", "a.com:8080"]),
                        vhost(route(), require_tls="EXTERNAL_ONLY", domains=["b.com"])))
    assert table.match(req("/x?y", "a.com:8080")) == Redirect(301, "https://a.com:8080/x?y")
    assert isinstance(table.match(req("/", "a.com", headers=[("X-Forwarded-Proto", "https")])), RouteTo)
    assert table.match(req("/", "b.com")) == Redirect(301, "https://b.com/")
    assert isinstance(table.match(req("/", "b.com", headers=[("x-envoy-internal", "true")])), RouteTo)


# --------------------------------------------------------------------------
# refused and unenforced fields, by exact path
# --------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, path, reason", [
    (rc(vhost(route({"connect_matcher": {}}))), f"{R}.match.connect_matcher", "CONNECT"),
    (rc(vhost(route({"path_match_policy": EMPTY}))), f"{R}.match.path_match_policy", "URI templates"),
    (rc(vhost(route({"prefix": "/", "runtime_fraction": {"default_value": {"numerator": 50}}}))),
     f"{R}.match.runtime_fraction", "runtime"),
    (rc(vhost(route({"prefix": "/", "tls_context": {"presented": True}}))), f"{R}.match.tls_context", "plaintext"),
    (rc(vhost(route({"prefix": "/", "dynamic_metadata": [{"filter": "f", "path": [{"key": "k"}],
                                                           "value": {"present_match": True}}]}))),
     f"{R}.match.dynamic_metadata", "dynamic metadata"),
    (rc(vhost(route({}))), f"{R}.match", "needs prefix, path"),
    (rc(vhost(route({"safe_regex": {"regex": "/(unclosed"}}))), f"{R}.match.safe_regex.regex", "missing )"),
    (rc(vhost(route({"safe_regex": {"regex": "/(?=x)"}}))), f"{R}.match.safe_regex.regex",
     "invalid perl operator: (?="),
    (rc(vhost(route({"safe_regex": {"regex": "/(a)\\1"}}))), f"{R}.match.safe_regex.regex",
     "invalid escape sequence: \\1"),
    (rc(vhost(route({"safe_regex": {"regex": "/a\\Z"}}))), f"{R}.match.safe_regex.regex",
     "invalid escape sequence: \\Z"),
    (rc(vhost(route({"safe_regex": {"regex": "/a++"}}))), f"{R}.match.safe_regex.regex", "bad repetition operator: ++"),
    (rc(vhost(route({"safe_regex": {"regex": "a{200}"}}))), f"{R}.match.safe_regex.regex",
     "RE2 program size of 204 > max program size of 100"),   # as Envoy 1.3x says
    (rc(vhost(route({"safe_regex": {"regex": ""}}))), f"{R}.match.safe_regex.regex", "must not be empty"),
    (rc(vhost(route(), route({"prefix": "/", "headers": [{"name": "a", "safe_regex_match": {"regex": "("}}]}))),
     f"{V}.routes[1].match.headers[0].safe_regex_match.regex", "missing )"),
    (rc(vhost(route({"prefix": "/", "headers": [{"name": "a", "string_match": {
        "safe_regex": {"regex": "a"}, "ignore_case": True}}]}))),
     f"{R}.match.headers[0].string_match.ignore_case", "no effect"),
    (rc(vhost(route({"prefix": "/", "headers": [{"name": "a", "string_match": {"prefix": ""}}]}))),
     f"{R}.match.headers[0].string_match.prefix", "must not be empty"),
    (rc(vhost(route({"prefix": "/", "headers": [{"name": "a", "prefix_match": ""}]}))),
     f"{R}.match.headers[0].prefix_match", "must not be empty"),
    (rc(vhost(route({"prefix": "/", "headers": [{"name": "", "present_match": True}]}))),
     f"{R}.match.headers[0].name", "needs a name"),
    (rc(vhost(route({"prefix": "/", "query_parameters": [{"name": "q", "string_match": {}}]}))),
     f"{R}.match.query_parameters[0].string_match", "needs exact"),
    (rc(vhost(route(action={"cluster_header": "x-cluster"}))), f"{R}.route.cluster_header", "request header"),
    (rc(vhost(route(action={"cluster_specifier_plugin": "p"}))), f"{R}.route.cluster_specifier_plugin", "plugins"),
    (rc(vhost(route(action={"cluster": "c", "path_rewrite_policy": EMPTY}))), f"{R}.route.path_rewrite_policy",
     "extensions"),
    (rc(vhost(route(action={"timeout": "1s"}))), f"{R}.route", "needs cluster or weighted_clusters"),
    (rc(vhost(route(action={"cluster": "c", "timeout": "-1s"}))), f"{R}.route.timeout", "non-negative"),
    (rc(vhost(route(filter_action={}))), f"{R}.filter_action", "not supported"),
    (rc(vhost({"name": "r", "match": {"prefix": "/"}})), R, "needs route, redirect or direct_response"),
    (rc(vhost(matcher={}, name="vh")), f"{V}.matcher", "matcher tree"),
    (rc(vhost(route(), name="")), f"{V}.name", "needs a name"),
    (rc(vhost(route(), domains=[])), f"{V}.domains", "at least one domain"),
    (rc(vhost(route()), vhds={"config_source": {"ads": {}}}), "rc.vhds", "VHDS"),
    (rc(vhost(route()), vhost_header="x-host"), "rc.vhost_header", "Host"),
])
def test_problems_name_the_field(cfg, path, reason):
    problems = problems_of(cfg)
    assert any(p == path and reason in r for p, r in problems), problems


@pytest.mark.parametrize("cfg, path", [
    (rc(vhost(route()), request_headers_to_add=[{"header": {"key": "a", "value": "%START_TIME%"}}]),
     "rc.request_headers_to_add[0].header.value"),
    (rc(vhost(route(response_headers_to_add=[{"header": {"key": "a", "value": "50%"}}]))),
     f"{R}.response_headers_to_add[0].header.value"),
    (rc(vhost(route()), internal_only_headers=["x-internal"]), "rc.internal_only_headers"),
    (rc(vhost(route()), validate_clusters=True), "rc.validate_clusters"),
    (rc(vhost(route(), cors={"allow_credentials": True})), f"{V}.cors"),
    (rc(vhost(route(), virtual_clusters=[{"name": "v", "headers": [{"name": ":path", "exact_match": "/"}]}])),
     f"{V}.virtual_clusters"),
    (rc(vhost(route(), rate_limits=[{"actions": [{"remote_address": {}}]}])), f"{V}.rate_limits"),
    (rc(vhost(route(decorator={"operation": "op"}))), f"{R}.decorator"),
    (rc(vhost(route(typed_per_filter_config={"envoy.filters.http.cors": {"@type": CORS}}))),
     f'{R}.typed_per_filter_config["envoy.filters.http.cors"]'),
    (rc(vhost(route(), typed_per_filter_config={"envoy.filters.http.cors": {"@type": CORS}})),
     f'{V}.typed_per_filter_config["envoy.filters.http.cors"]'),
    (rc(vhost(route(action={"cluster": "c", "hash_policy": [{"header": {"header_name": "x"}}]}))),
     f"{R}.route.hash_policy"),
    (rc(vhost(route(action={"cluster": "c", "idle_timeout": "1s"}))), f"{R}.route.idle_timeout"),
    (rc(vhost(route(action={"cluster": "c", "auto_host_rewrite": True}))), f"{R}.route.auto_host_rewrite"),
    (rc(vhost(route(action={"cluster": "c", "cors": {}}))), f"{R}.route.cors"),
    (rc(vhost(route(action={"weighted_clusters": {"total_weight": 2, "clusters": [
        {"name": "a", "weight": 2, "request_headers_to_add": [{"header": {"key": "a", "value": "b"}}]}]}}))),
     f"{R}.route.weighted_clusters.total_weight"),
    (rc(vhost(route(action={"cluster": "c", "retry_policy": {"retry_on": "connect-failure",
                                                             "retriable_status_codes": [503]}}))),
     f"{R}.route.retry_policy.retriable_status_codes"),
    (rc(vhost(route(direct_response={"status": 200, "body_format": {"text_format": "x"}}))),
     f"{R}.direct_response.body_format"),
    (rc(vhost(route({"safe_regex": {"regex": "/", "google_re2": {"max_program_size": 100}}, "case_sensitive": True}))),
     f"{R}.match.safe_regex.google_re2.max_program_size"),
    (rc(vhost(route({"safe_regex": {"regex": "/"}, "case_sensitive": False}))), f"{R}.match.case_sensitive"),
    (rc(vhost(route(redirect={"path_redirect": "/"}, typed_per_filter_config=fault(
        abort={"http_status": 503})))), f"{R}.redirect"),
])
def test_unenforced_fields_are_noted(cfg, path):
    notes = notes_of(cfg)
    assert path in [p for p, _ in notes], notes


def test_inert_fields_are_silent():
    cfg = rc(vhost(route(metadata={"filter_metadata": {"istio": {"config": "x"}}}),
                   metadata={"filter_metadata": {"istio": {}}}),
             validate_clusters=False, metadata={"filter_metadata": {"istio": {}}})
    assert notes_of(cfg) == []


# --------------------------------------------------------------------------
# needs_l7
# --------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, expected", [
    (rc(vhost(route())), False),
    (rc(vhost(route({"prefix": ""}))), False),
    (rc(vhost(route({"prefix": "/", "case_sensitive": False}))), False),
    (rc(vhost(route(action={"cluster": "c", "timeout": "0s"}))), False),
    (rc(vhost(route(action={"weighted_clusters": {"clusters": [{"name": "a", "weight": 1}]}}))), False),
    (rc(vhost(route(), route({"prefix": "/never"}, {"cluster": "d"})), ignore_port_in_host_matching=True), False),
    (rc(vhost(route({"prefix": "/", "headers": [{"name": "end-user", "exact_match": "jason"}]}), route())), True),
    (rc(vhost(route({"prefix": "/api"}))), True),
    (rc(vhost(route({"path": "/"}))), True),
    # at L4 the virtual host is chosen by address: its domains do not count
    (rc(vhost(route(), domains=["foo.com"])), False),
    (rc(vhost(route(), domains=["*"]), vhost(route({"prefix": "/b"}), name="b", domains=["b.com"])), False),
    (rc(vhost()), True),
    (rc(vhost(route(action={"cluster": "c", "timeout": "5s"}))), True),
    (rc(vhost(route(action={"cluster": "c", "prefix_rewrite": "/x"}))), True),
    (rc(vhost(route(redirect={"https_redirect": True}))), True),
    (rc(vhost(route(typed_per_filter_config=fault(abort={"http_status": 503})))), True),
    (rc(vhost(route(), typed_per_filter_config=fault(abort={"http_status": 503}))), True),
    (rc(vhost(route()), typed_per_filter_config=fault(abort={"http_status": 503})), True),
    (rc(vhost(route(), require_tls="ALL")), True),
])
def test_needs_l7(cfg, expected):
    assert needs_l7(cfg) is expected


def test_needs_l7_is_per_virtual_host():
    cfg = rc(vhost(route(), domains=["*"]), vhost(route({"prefix": "/b"}), name="b", domains=["b.com"]))
    assert (needs_l7(cfg, 0), needs_l7(cfg, 1)) == (False, True)


# --------------------------------------------------------------------------
# Header mutations (the order and actions seen from Envoy 1.40 on the same
# config: tests/e2e/test_l7.py runs both side by side)
# --------------------------------------------------------------------------

def _hv(key: str, value: str, action: str | None = None, **extra) -> dict:
    return {"header": {"key": key, "value": value}, **({"append_action": action} if action else {}), **extra}


def test_header_mutations_apply_from_the_weighted_cluster_out_to_the_route_configuration():
    from kmesh.config.http import headers

    cfg = rc(vhost(route(action={"weighted_clusters": {"clusters": [
        {"name": "c0", "weight": 1, "request_headers_to_add": [_hv("x-a", "wc")],
         "response_headers_to_add": [_hv("r-a", "wc")]}]}},
        request_headers_to_add=[_hv("x-a", "route"), _hv("x-o", "route", "OVERWRITE_IF_EXISTS_OR_ADD"),
                                _hv("x-n", "route", "ADD_IF_ABSENT"), _hv("x-e", ""),
                                _hv("x-k", "", keep_empty_value=True),
                                _hv("x-p", "100%% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %REQ(x-n)%")],
        request_headers_to_remove=["x-rm", "X-A"], response_headers_to_add=[_hv("r-a", "route")]),
        request_headers_to_add=[_hv("x-a", "vh"), _hv("x-o", "vh", "OVERWRITE_IF_EXISTS_OR_ADD"),
                                _hv("x-n", "vh", "ADD_IF_ABSENT")],
        request_headers_to_remove=["x-vrm"], response_headers_to_add=[_hv("r-a", "vh")]),
        response_headers_to_add=[_hv("r-a", "rc", append=False)])
    assert compile_all(cfg)[1:] == ([], [])
    to = table_of(cfg).match(req())
    ctx = headers.Context(("10.0.0.1", 40000), ("10.96.0.1", 80), (("x-n", "client"),))
    sent = [("Host", "x"), ("X-A", "client"), ("x-rm", "1"), ("x-vrm", "2"), ("x-n", "client")]
    assert headers.apply(to.request_levels("c0"), sent, ctx) == [
        ("Host", "x"), ("x-n", "client"), ("x-a", "route"), ("x-k", ""), ("x-p", "100% 10.0.0.1 client"),
        ("x-o", "vh"), ("x-a", "vh")]
    assert headers.apply(to.response_levels("c0"), [("r-a", "up")], ctx) == [("r-a", "rc")]
    assert headers.apply(to.response_levels("other"), [], ctx) == [("r-a", "rc")]


def test_most_specific_header_mutations_win_puts_the_route_last():
    from kmesh.config.http import headers

    cfg = rc(vhost(route(request_headers_to_add=[_hv("x", "route", "OVERWRITE_IF_EXISTS_OR_ADD")]),
                   request_headers_to_add=[_hv("x", "vh", "OVERWRITE_IF_EXISTS_OR_ADD")]),
             request_headers_to_add=[_hv("x", "rc", "OVERWRITE_IF_EXISTS_OR_ADD")])
    ctx = headers.Context(("10.0.0.1", 1), ("10.96.0.1", 80))
    assert headers.apply(table_of(cfg).match(req()).request_levels("c"), [], ctx) == [("x", "rc")]
    cfg.most_specific_header_mutations_wins = True
    assert headers.apply(table_of(cfg).match(req()).request_levels("c"), [], ctx) == [("x", "route")]


def test_a_weighted_clusters_mutations_go_first_whatever_the_order():
    from kmesh.config.http import headers

    wc = {"weighted_clusters": {"clusters": [{"name": "c0", "weight": 1, "request_headers_to_add": [
        _hv("x", "wc", "OVERWRITE_IF_EXISTS_OR_ADD"), _hv("y", "wc", "ADD_IF_ABSENT")]}]}}
    cfg = rc(vhost(route(action=wc, request_headers_to_add=[_hv("x", "route", "OVERWRITE_IF_EXISTS_OR_ADD"),
                                                            _hv("y", "route", "ADD_IF_ABSENT")])))
    ctx = headers.Context(("10.0.0.1", 1), ("10.96.0.1", 80))
    for most_specific in (False, True):
        cfg.most_specific_header_mutations_wins = most_specific
        assert headers.apply(table_of(cfg).match(req()).request_levels("c0"), [], ctx) == [("y", "wc"), ("x", "route")]


def test_direct_responses_and_redirects_carry_the_response_mutations():
    cfg = rc(vhost(route({"prefix": "/d"}, direct_response={"status": 200}, name="d",
                         response_headers_to_add=[_hv("r", "route")]),
                   route({"prefix": "/"}, redirect={"path_redirect": "/x"}, name="r"),
                   response_headers_to_add=[_hv("v", "vh")]))
    from kmesh.config.http import headers
    ctx = headers.Context(("10.0.0.1", 1), ("10.96.0.1", 80))
    d, r = table_of(cfg).match(req("/d")), table_of(cfg).match(req("/e"))
    assert headers.apply(d.response_headers, [], ctx) == [("r", "route"), ("v", "vh")]
    assert headers.apply(r.response_headers, [], ctx) == [("v", "vh")]


@pytest.mark.parametrize("extra, path", [
    ({"request_headers_to_add": [_hv(":path", "/x")]}, f"{R}.request_headers_to_add[0].header.key"),
    ({"request_headers_to_add": [_hv("Host", "x")]}, f"{R}.request_headers_to_add[0].header.key"),
    ({"response_headers_to_remove": [":status"]}, f"{R}.response_headers_to_remove[0]"),
    ({"request_headers_to_add": [_hv("x", "y", "ADD_IF_ABSENT", append=True)]},
     f"{R}.request_headers_to_add[0].append"),
])
def test_header_mutations_envoy_refuses_are_refused(extra, path):
    assert path in [p for p, _ in problems_of(rc(vhost(route(**extra))))]


def test_a_weighted_clusters_host_rewrite_unless_the_route_has_one():
    wc = {"weighted_clusters": {"clusters": [{"name": "c0", "weight": 1, "host_rewrite_literal": "wc.example"},
                                             {"name": "c1", "weight": 0}]}}
    to = table_of(rc(vhost(route(action=wc)))).match(req())
    assert (to.host_for("c0"), to.host_for("c1")) == ("wc.example", None)
    to = table_of(rc(vhost(route(action={**wc, "host_rewrite_literal": "route.example"})))).match(req())
    assert (to.host_for("c0"), to.host_for("c1")) == ("route.example", "route.example")


@pytest.mark.parametrize("status, location", [(200, False), (201, True), (302, True), (404, False)])
def test_direct_responses_that_name_the_request_url(status, location):
    d = table_of(rc(vhost(route(direct_response={"status": status})))).match(req())
    assert d.location is location
