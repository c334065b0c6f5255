"""Istio's real shapes (tests/fixtures/istio, see its README): what istiod
sends the productpage sidecar in bookinfo goes through the ADS state and
comes out as the right (VIP, port) -> cluster records, with everything kmesh
leaves alone skipped with a reason."""
from __future__ import annotations

import json
from pathlib import Path

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from kmesh.bpf.records import LbPolicy
from kmesh.config import schema
from kmesh.config.model import Endpoint, WeightedCluster
from kmesh.xds import resources as rt
from kmesh.xds.node import NodeIdentity
from kmesh.xds.state import AdsState

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "istio"
REVIEWS = "reviews.default.svc.cluster.local"


def load(t: rt.ResourceType, name: str):
    items = json.loads((FIX / name).read_text())
    schema.import_types(items)
    return [json_format.ParseDict(i, t.message()) for i in items]


def response(t, msgs, version="1"):
    r = discovery_pb2.DiscoveryResponse(type_url=t.url, version_info=version, nonce=f"{t.short}-{version}")
    for m in msgs:
        r.resources.add().Pack(m)
    return r


def bookinfo_state():
    applied = []
    state = AdsState(NodeIdentity("", "", "productpage-v1", "default", "10.244.1.10").to_proto(),
                     lambda change, full: applied.append(change))
    reqs = []
    for t, f in ((rt.CDS, "bookinfo_cds.json"), (rt.EDS, "bookinfo_eds.json"), (rt.LDS, "bookinfo_lds.json"),
                 (rt.RDS, "bookinfo_rds.json")):
        reqs += state.handle(response(t, load(t, f)))
    return state, reqs, applied


def test_all_acked_and_synced():
    state, reqs, applied = bookinfo_state()
    assert not [r for r in reqs if r.HasField("error_detail")], [r.error_detail.message for r in reqs]
    assert state.synced.is_set() and len(applied) == 4
    eds = [r for r in reqs if r.type_url == rt.EDS.url]
    assert any(f"outbound|9080||{REVIEWS}" in r.resource_names for r in eds)
    assert [list(r.resource_names) for r in reqs if r.type_url == rt.RDS.url][-1] == ["9080"]


def test_vips_route_at_connect_time():
    mesh = bookinfo_state()[0].mesh()
    by_key = {(l.ip, l.port): l.clusters for l in mesh.listeners}
    # HTTP services: the VIP among the virtual host's domains of route "9080"
    assert by_key[("10.96.0.11", 9080)] == (WeightedCluster(f"outbound|9080|v1|{REVIEWS}", 80),
                                            WeightedCluster(f"outbound|9080|v3|{REVIEWS}", 20))
    for vip, svc in (("10.96.0.10", "productpage"), ("10.96.0.12", "ratings"), ("10.96.0.13", "details")):
        assert by_key[(vip, 9080)] == (WeightedCluster(f"outbound|9080||{svc}.default.svc.cluster.local", 1),)
    # TCP service: its own listener address
    assert by_key[("10.96.0.20", 3306)] == (WeightedCluster("outbound|3306||mysqldb.default.svc.cluster.local", 1),)
    # nothing for capture listeners, the inbound side, or wildcard passthrough
    assert not [k for k in by_key if k[0] == "0.0.0.0"]
    assert not [k for k in by_key if k[1] in (15001, 15006)]


def test_endpoints_health_and_priority():
    mesh = bookinfo_state()[0].mesh()
    ratings = mesh.cluster("outbound|9080||ratings.default.svc.cluster.local")
    assert ratings.endpoints == (Endpoint("10.244.2.15", 9080),)       # priority 0 all unhealthy -> 1
    details = mesh.cluster("outbound|9080||details.default.svc.cluster.local")
    assert details.endpoints == (Endpoint("10.244.1.16", 9080),)       # DRAINING left out
    assert ratings.lb_policy == LbPolicy.LEAST_REQUEST                  # Istio's default
    assert mesh.cluster(f"outbound|9080|v1|{REVIEWS}").lb_policy == LbPolicy.ROUND_ROBIN


def test_what_is_skipped_says_why():
    skipped = "\n".join(bookinfo_state()[0].mesh().skipped)
    for needle in ("LDS[virtualOutbound]", "LDS[virtualInbound]", "CDS[PassthroughCluster]",
                   "CDS[InboundPassthroughCluster]", "DNS clusters are not supported",
                   "TLS/mTLS is not applied", "istio.stats", "prefix_ranges"):
        assert needle in skipped, needle
