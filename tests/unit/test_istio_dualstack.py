"""Istio's dual-stack shapes (tests/fixtures/istio/bookinfo_dualstack_*.json,
see the fixtures' README): the bookinfo sidecar config as istiod sends it
when the cluster and the proxy have IPv4 and IPv6 addresses. Listeners carry
``additional_addresses`` (the IPv6 VIP; ``[::]`` on wildcards), the RDS
virtual hosts name the bracketed IPv6 VIP, endpoints carry their pod's IPv6
address as an ``additional_addresses`` entry. mysqldb is a single-stack IPv6
Service (IPv6 VIP listener, IPv6 endpoints); redis is the dual-stack TCP
service."""
from __future__ import annotations

import copy
import json

import pytest
from google.protobuf import json_format

from kmesh.bpf import records
from kmesh.config import schema
from kmesh.config.model import Endpoint, WeightedCluster
from kmesh.dataplane.plan import MapState, plan
from kmesh.xds import resources as rt
from kmesh.xds.node import NodeIdentity
from kmesh.xds.state import AdsState
from tests.unit.test_istio_fixtures import FIX, REVIEWS, bookinfo_state, response

FILES = {rt.CDS: "bookinfo_dualstack_cds.json", rt.EDS: "bookinfo_dualstack_eds.json",
         rt.LDS: "bookinfo_dualstack_lds.json", rt.RDS: "bookinfo_dualstack_rds.json"}
SVC = {"productpage": "10", "reviews": "11", "ratings": "12", "details": "13"}   # VIP 10.96.0.X / fd00:10:96::X
MYSQL = "outbound|3306||mysqldb.default.svc.cluster.local"
REDIS = "outbound|6379||redis.default.svc.cluster.local"


def items(t: rt.ResourceType) -> list[dict]:
    return json.loads((FIX / FILES[t]).read_text())


def dualstack_state(**override: list[dict]):
    """The ADS state after istiod's four responses; ``override`` replaces a
    file's resources (cds=, eds=, lds=, rds=) with edited copies."""
    applied, reqs = [], []
    state = AdsState(NodeIdentity("", "", "productpage-v1", "default", "10.244.1.10").to_proto(),
                     lambda change, full: applied.append(change))
    for t in (rt.CDS, rt.EDS, rt.LDS, rt.RDS):
        data = override.get(t.short.lower()) or items(t)
        schema.import_types(data)
        reqs += state.handle(response(t, [json_format.ParseDict(i, t.message()) for i in data]))
    return state, reqs, applied


def keys(mesh) -> dict[tuple[str, int], object]:
    return {(lst.ip, lst.port): lst for lst in mesh.listeners}


def without_per_request_routing(rds: list[dict]) -> list[dict]:
    """Route "9080" as istiod sends it with retries off (VirtualService
    ``retries: {attempts: 0}``) and ``proxyHeaders.attemptCount.disabled``:
    no route retry_policy, no include_request_attempt_count. Then a plain
    '/' route only picks a cluster and is decided at connect time."""
    rds = copy.deepcopy(rds)
    for vh in rds[0]["virtual_hosts"]:
        vh.pop("include_request_attempt_count", None)
        for r in vh["routes"]:
            r["route"].pop("retry_policy", None)
    return rds


def with_port_domains(rds: list[dict]) -> list[dict]:
    """The bracketed IPv6 VIP also with its port, as istiod lists domains
    where it does not set ignore_port_in_host_matching (proxyless gRPC,
    Istio < 1.16): "[fd00:10:96::11]:9080"."""
    rds = copy.deepcopy(rds)
    for vh in rds[0]["virtual_hosts"]:
        d = vh["domains"]
        for v in [x for x in d if x.startswith("[")]:
            d.insert(d.index(v) + 1, f"{v}:9080")
    return rds


# --- the fixtures themselves ---------------------------------------------------

@pytest.mark.parametrize("t", [rt.CDS, rt.EDS, rt.LDS, rt.RDS], ids=lambda t: t.short)
def test_fixture_is_canonical_proto_json(t):
    data = items(t)
    schema.import_types(data)
    msgs = [json_format.ParseDict(i, t.message()) for i in data]
    assert [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in msgs] == data
    for i, d in enumerate(data):
        assert schema.parse(d, t.message, FILES[t], f"[{i}]")[1] == []


def test_fixture_has_the_dual_stack_shapes():
    lds = {lst["name"]: lst for lst in items(rt.LDS)}
    extra = {n: [a["address"]["socket_address"]["address"] for a in lst.get("additional_addresses", ())]
             for n, lst in lds.items()}
    assert extra == {"0.0.0.0_9080": ["::"], "fd00:10:96::20_3306": [], "10.96.0.21_6379": ["fd00:10:96::21"],
                     "0.0.0.0_27017": ["::"], "virtualOutbound": ["::"], "virtualInbound": ["::"]}
    domains = {vh["name"].split(".")[0]: vh["domains"] for vh in items(rt.RDS)[0]["virtual_hosts"]}
    for svc, x in SVC.items():
        assert domains[svc][-2:] == [f"10.96.0.{x}", f"[fd00:10:96::{x}]"]


# --- ADS -----------------------------------------------------------------------

def test_all_acked_and_synced():
    state, reqs, applied = dualstack_state()
    assert not [r for r in reqs if r.HasField("error_detail")], [r.error_detail.message for r in reqs]
    assert state.synced.is_set() and len(applied) == 4
    eds = [r for r in reqs if r.type_url == rt.EDS.url]
    assert any(MYSQL in r.resource_names and REDIS in r.resource_names for r in eds)
    assert [list(r.resource_names) for r in reqs if r.type_url == rt.RDS.url][-1] == ["9080"]


def test_ipv4_vips_as_in_the_ipv4_only_fixture():
    v4_only = {k: lst.clusters for k, lst in keys(bookinfo_state()[0].mesh()).items() if k[1] == 9080}
    mesh = dualstack_state()[0].mesh()
    got = keys(mesh)
    assert {k: lst.clusters for k, lst in got.items() if k[1] == 9080 and ":" not in k[0]} == v4_only
    assert got[("10.96.0.11", 9080)].clusters == (WeightedCluster(f"outbound|9080|v1|{REVIEWS}", 80),
                                                  WeightedCluster(f"outbound|9080|v3|{REVIEWS}", 20))


def test_ipv6_http_vips_are_routed_per_request_as_the_ipv4_ones():
    # Every route istiod sends carries its default retry_policy, and every
    # virtual host include_request_attempt_count: both act on each request,
    # so every virtual host needs the request and both VIPs of each service
    # go through the L7 hand-off with the same routes and clusters.
    mesh = dualstack_state()[0].mesh()
    got = keys(mesh)
    for svc, x in SVC.items():
        v4, v6 = got[(f"10.96.0.{x}", 9080)], got[(f"fd00:10:96::{x}", 9080)]
        assert v4.routes is not None and v6.routes is not None, svc
        assert v4.clusters == v6.clusters, svc
    assert mesh.warnings == ()
    p = plan(MapState(), mesh)
    upserts = dict(p.listener_upserts)
    assert upserts[("fd00:10:96::11", 9080)][2] == records.LISTENER_L7


@pytest.mark.parametrize("port_domains", [False, True], ids=["bracketed-vip", "bracketed-vip-and-port"])
def test_connect_time_http_vips_serve_both_families(port_domains):
    rds = without_per_request_routing(items(rt.RDS))
    if port_domains:
        rds = with_port_domains(rds)
    state, reqs, _ = dualstack_state(rds=rds)
    assert not [r for r in reqs if r.HasField("error_detail")]
    mesh = state.mesh()
    got = keys(mesh)
    for svc in ("productpage", "ratings", "details"):
        x = SVC[svc]
        v4, v6 = got[(f"10.96.0.{x}", 9080)], got[(f"fd00:10:96::{x}", 9080)]
        assert v4.clusters == v6.clusters == (WeightedCluster(f"outbound|9080||{svc}.default.svc.cluster.local", 1),)
        assert v4.routes is None and v6.routes is None
    # reviews still needs the request (header end-user: jason -> v2): both
    # of its VIPs are routed per request.
    assert got[("10.96.0.11", 9080)].routes is not None and got[("fd00:10:96::11", 9080)].routes is not None

    p = plan(MapState(), mesh)
    ids = p.new_state.cluster_ids
    upserts = dict(p.listener_upserts)
    for svc in ("productpage", "ratings", "details"):
        cid = ids[f"outbound|9080||{svc}.default.svc.cluster.local"]
        x = SVC[svc]
        assert upserts[(f"10.96.0.{x}", 9080)][0] == ((cid, 1),)
        assert upserts[(f"fd00:10:96::{x}", 9080)][0] == ((cid | records.CLUSTER_V6, 1),)
        assert upserts[(f"fd00:10:96::{x}", 9080)][2] == 0   # not handed to L7


# --- endpoints -----------------------------------------------------------------

def test_endpoints_carry_their_ipv6_address():
    mesh = dualstack_state()[0].mesh()
    c = mesh.cluster
    assert c(f"outbound|9080||{REVIEWS}").endpoints == (
        Endpoint("10.244.1.11", 9080, 1, "fd00:10:244::1:11"), Endpoint("10.244.2.12", 9080, 1, "fd00:10:244::2:12"),
        Endpoint("10.244.2.13", 9080, 1, "fd00:10:244::2:13"))
    # health and priority as in the IPv4-only fixture, with the alt address
    assert c("outbound|9080||ratings.default.svc.cluster.local").endpoints == \
        (Endpoint("10.244.2.15", 9080, 1, "fd00:10:244::2:15"),)
    assert c("outbound|9080||details.default.svc.cluster.local").endpoints == \
        (Endpoint("10.244.1.16", 9080, 1, "fd00:10:244::1:16"),)
    assert c(REDIS).endpoints == (Endpoint("10.244.1.21", 6379, 1, "fd00:10:244::1:21"),)
    # ServiceEntry endpoints are IPv4 only
    assert c("outbound|27017||analytics-mongo.ext.example.com").endpoints == (Endpoint("192.168.60.5", 27017),)
    # every in-mesh pod has its other-family address
    for cl in mesh.clusters:
        for e in cl.endpoints:
            if e.ip.startswith("10.244."):
                assert e.alt.startswith("fd00:10:244::"), (cl.name, e)


# --- TCP services ----------------------------------------------------------------

def test_tcp_services():
    mesh = dualstack_state()[0].mesh()
    got = keys(mesh)
    # redis: dual-stack Service, one listener with an additional address
    assert got[("10.96.0.21", 6379)].clusters == got[("fd00:10:96::21", 6379)].clusters == \
        (WeightedCluster(REDIS, 1),)
    assert got[("fd00:10:96::21", 6379)].name == "10.96.0.21_6379"
    # mysqldb: single-stack IPv6 Service
    assert [k for k in got if k[1] == 3306] == [("fd00:10:96::20", 3306)]
    assert got[("fd00:10:96::20", 3306)].clusters == (WeightedCluster(MYSQL, 1),)
    assert mesh.cluster(MYSQL).endpoints == (Endpoint("fd00:10:244::2:20", 3306),)
    assert all(":" in e.ip and not e.alt for e in mesh.cluster(MYSQL).endpoints)


def test_ipv4_key_of_an_ipv6_only_cluster_is_skipped():
    # mysqldb's listener on an IPv4 VIP too (its endpoints stay IPv6 only): a
    # connect to the IPv4 VIP cannot become IPv6, so that key is skipped with
    # a note (lenient), the IPv6 one served, and the response still ACKed.
    lds = items(rt.LDS)
    mysql = next(lst for lst in lds if lst["name"] == "fd00:10:96::20_3306")
    mysql["name"] = "10.96.0.20_3306"
    mysql["address"]["socket_address"]["address"] = "10.96.0.20"
    mysql["additional_addresses"] = [{"address": {"socket_address": {"address": "fd00:10:96::20",
                                                                     "port_value": 3306}}}]
    state, reqs, _ = dualstack_state(lds=lds)
    assert not [r for r in reqs if r.HasField("error_detail")]
    mesh = state.mesh()
    got = keys(mesh)
    assert ("10.96.0.20", 3306) not in got
    assert got[("fd00:10:96::20", 3306)].clusters == (WeightedCluster(MYSQL, 1),)
    assert any(f"cluster '{MYSQL}' has IPv6 endpoints only" in s and "10.96.0.20:3306" in s for s in mesh.skipped)


# --- wildcards -----------------------------------------------------------------

def test_wildcards_and_capture_listeners_stay_untouched():
    mesh = dualstack_state()[0].mesh()
    got = keys(mesh)
    assert not [k for k in got if k[0] in ("0.0.0.0", "::")]
    assert not [k for k in got if k[1] in (15001, 15006, 27017)]
    skipped = "\n".join(mesh.skipped)
    for needle in ("LDS[virtualOutbound]", "LDS[virtualInbound]", "CDS[InboundPassthroughCluster]", "prefix_ranges"):
        assert needle in skipped, needle


# --- map plan --------------------------------------------------------------------

def test_plan_writes_ipv6_views_and_ipv6_keys_name_them():
    mesh = dualstack_state()[0].mesh()
    p = plan(MapState(), mesh)
    ids = p.new_state.cluster_ids
    clusters = dict(p.cluster_upserts)
    listeners = dict(p.listener_upserts)

    def view(name, v6):
        return [a for a, _, _ in clusters[ids[name] | (records.CLUSTER_V6 if v6 else 0)][1]]

    # dual-stack clusters: an IPv4 record and an IPv6 view record
    for svc in SVC:
        name = f"outbound|9080||{svc}.default.svc.cluster.local"
        assert all(":" not in a for a in view(name, False)) and view(name, False)
        assert [a for a in view(name, True)] == [e.alt for e in mesh.cluster(name).endpoints]
    assert view(f"outbound|9080|v3|{REVIEWS}", True) == ["fd00:10:244::2:13"]
    assert view(REDIS, False) == ["10.244.1.21"] and view(REDIS, True) == ["fd00:10:244::1:21"]
    # IPv6-only: nothing for IPv4 clients, its pods for IPv6 ones
    assert view(MYSQL, False) == [] and view(MYSQL, True) == ["fd00:10:244::2:20"]
    # IPv4-only (ServiceEntry) and endpoint-less clusters: no IPv6 view
    for name in ("outbound|27017||legacy-mongo.ext.example.com", "outbound|9080|v2|ratings.default.svc.cluster.local"):
        assert ids[name] | records.CLUSTER_V6 not in clusters, name

    # IPv4 keys name the plain id, IPv6 keys the id | CLUSTER_V6
    assert listeners[("10.96.0.21", 6379)][0] == ((ids[REDIS], 1),)
    assert listeners[("fd00:10:96::21", 6379)][0] == ((ids[REDIS] | records.CLUSTER_V6, 1),)
    assert listeners[("fd00:10:96::20", 3306)][0] == ((ids[MYSQL] | records.CLUSTER_V6, 1),)
    assert listeners[("10.96.0.11", 9080)][0] == ((ids[f"outbound|9080|v1|{REVIEWS}"], 80),
                                                 (ids[f"outbound|9080|v3|{REVIEWS}"], 20))
    assert listeners[("10.96.0.11", 9080)][2] == records.LISTENER_L7
    for (ip, _), spec in listeners.items():
        assert all(bool(cid & records.CLUSTER_V6) == (":" in ip) for cid, _ in spec[0]), (ip, spec)
