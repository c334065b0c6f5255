"""ADS bookkeeping: ACK/NACK, nonces, versions, subscriptions, warming, and
Istio-shaped pushes, without the kernel (apply is recorded, not written)."""
from __future__ import annotations

import types

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from kmesh.bpf.records import LbPolicy
from kmesh.config.model import Endpoint, WeightedCluster
from kmesh.xds import resources as rt
from kmesh.xds.node import NodeIdentity
from kmesh.xds.state import AdsState, fingerprint
from tests.support import istio

R = istio.outbound(9080, "reviews.default.svc.cluster.local")
R1 = istio.outbound(9080, "reviews.default.svc.cluster.local", "v1")
R3 = istio.outbound(9080, "reviews.default.svc.cluster.local", "v3")
VIP = "10.96.0.11"


def resp(t, resources, version="1", nonce="n1"):
    anys = []
    for r in resources:
        a = any_pb2.Any()
        a.Pack(r)
        anys.append(a)
    return discovery_pb2.DiscoveryResponse(type_url=t.url, version_info=version, resources=anys, nonce=nonce)


class Recorder:
    """Stands in for the daemon: counts applies; ``last`` is the model the
    maps would hold now."""

    def __init__(self):
        self.calls = []
        self.state = None

    def __call__(self, change, full_mesh):
        self.calls.append(change)

    @property
    def meshes(self):
        return self.calls

    @property
    def last(self):
        return self.state.mesh()


def new_state():
    rec = Recorder()
    state = AdsState(NodeIdentity("", "", "pod", "ns", "10.0.0.5").to_proto(), rec)
    rec.state = state
    return state, rec


def bookinfo(state):
    """CDS -> EDS -> LDS -> RDS as istiod would answer."""
    reqs = state.handle(resp(rt.CDS, [istio.eds_cluster(R), istio.eds_cluster(R1), istio.eds_cluster(R3),
                                      istio.passthrough_cluster(), istio.blackhole_cluster()]))
    reqs += state.handle(resp(rt.EDS, [istio.cla(R, [("10.244.1.5", 9080), ("10.244.2.7", 9080)]),
                                       istio.cla(R1, [("10.244.1.5", 9080)]),
                                       istio.cla(R3, [("10.244.2.7", 9080)])]))
    reqs += state.handle(resp(rt.LDS, [istio.virtual_outbound(), istio.virtual_inbound(), istio.http_listener(9080),
                                       istio.tcp_listener("10.96.0.20", 3306, R)]))
    reqs += state.handle(resp(rt.RDS, [istio.route_config("9080", [
        {"host": "reviews.default.svc.cluster.local", "vip": VIP, "port": 9080,
         "weighted": [(R1, 80), (R3, 20)], "jason": R}])]))
    return reqs


def test_node_identity_is_sidecar_shaped():
    n = NodeIdentity("", "", "productpage-v1-123", "default", "10.244.0.9").to_proto()
    assert n.id == "sidecar~10.244.0.9~productpage-v1-123.default~default.svc.cluster.local"
    assert n.metadata.fields["NAMESPACE"].string_value == "default"
    assert n.metadata.fields["INSTANCE_IPS"].string_value == "10.244.0.9"
    assert NodeIdentity(service_node="router~1.2.3.4~x~y").node_id() == "router~1.2.3.4~x~y"
    dual = NodeIdentity("", "", "p", "default", "10.244.0.9,fd00:10:244::9").to_proto()   # dual-stack pod
    assert dual.id == "sidecar~10.244.0.9~p.default~default.svc.cluster.local"
    assert dual.metadata.fields["INSTANCE_IPS"].string_value == "10.244.0.9,fd00:10:244::9"


def test_first_requests_cds_then_lds_with_node_once():
    state, _ = new_state()
    (first,) = state.on_connect()
    assert first.type_url == rt.CDS.url and first.node.id.startswith("sidecar~")
    reqs = state.handle(resp(rt.CDS, [istio.eds_cluster(R)], version="7", nonce="a"))
    ack, eds, lds = reqs
    assert (ack.type_url, ack.version_info, ack.response_nonce) == (rt.CDS.url, "7", "a")
    assert not ack.HasField("error_detail") and not ack.HasField("node")
    assert eds.type_url == rt.EDS.url and list(eds.resource_names) == [R]
    assert lds.type_url == rt.LDS.url


def test_bookinfo_translates_like_istio_means_it():
    state, rec = new_state()
    bookinfo(state)
    mesh = rec.last
    by_key = {(l.ip, l.port): l.clusters for l in mesh.listeners}
    # the VIP among the virtual host's domains routes at connect time
    assert by_key[(VIP, 9080)] == (WeightedCluster(R1, 80), WeightedCluster(R3, 20))
    # a TCP service listener by its own address
    assert by_key[("10.96.0.20", 3306)] == (WeightedCluster(R, 1),)
    # the '*' virtual host goes to PassthroughCluster: not governed, no wildcard entry
    assert ("0.0.0.0", 9080) not in by_key
    assert ("0.0.0.0", 15001) not in by_key and ("0.0.0.0", 15006) not in by_key
    assert {c.name for c in mesh.clusters} == {R, R1, R3, "BlackHoleCluster"}
    assert mesh.cluster(R).endpoints == (Endpoint("10.244.1.5", 9080), Endpoint("10.244.2.7", 9080))
    skipped = "\n".join(mesh.skipped)
    for reason in ("virtualOutbound", "inbound listener", "PassthroughCluster", "TLS/mTLS is not applied",
                   "istio.stats"):
        assert reason in skipped, reason
    # reviews' header route is decided per request (L7)
    assert next(x for x in mesh.listeners if (x.ip, x.port) == (VIP, 9080)).routes is not None
    assert state.synced.is_set()


def test_warming_cluster_waits_for_eds():
    state, rec = new_state()
    state.handle(resp(rt.CDS, [istio.eds_cluster(R)]))
    assert rec.last.clusters == ()          # no endpoints yet: not written
    assert any("waiting for EDS" in s for s in rec.last.skipped)
    state.handle(resp(rt.EDS, [istio.cla(R, [("10.244.1.5", 9080)])]))
    assert [c.name for c in rec.last.clusters] == [R]


def test_listener_waits_for_rds():
    state, rec = new_state()
    state.handle(resp(rt.CDS, [istio.eds_cluster(R)]))
    state.handle(resp(rt.EDS, [istio.cla(R, [("10.244.1.5", 9080)])]))
    reqs = state.handle(resp(rt.LDS, [istio.http_listener(9080)]))
    assert [list(r.resource_names) for r in reqs if r.type_url == rt.RDS.url] == [["9080"]]
    assert rec.last.listeners == ()
    assert not state.synced.is_set()
    state.handle(resp(rt.RDS, [istio.route_config("9080", [
        {"host": "reviews.default.svc.cluster.local", "vip": VIP, "port": 9080, "cluster": R}])]))
    assert [(l.ip, l.port) for l in rec.last.listeners] == [(VIP, 9080)]
    assert state.synced.is_set()


def test_bad_resource_is_nacked_and_changes_nothing():
    state, rec = new_state()
    bookinfo(state)
    before, calls = rec.last, len(rec.calls)
    bad = istio.eds_cluster(R)
    bad.name = "outbound|9080||bad"
    bad.type = bad.STATIC
    bad.load_assignment.cluster_name = bad.name
    ep = bad.load_assignment.endpoints.add().lb_endpoints.add()
    ep.endpoint.address.socket_address.address = "10.244.9.9"
    ep.endpoint.address.socket_address.port_value = 80
    ep.load_balancing_weight.value = 0         # Envoy refuses this too
    (nack,) = state.handle(resp(rt.CDS, [bad], version="2", nonce="n2"))
    assert nack.response_nonce == "n2" and nack.version_info == "1"   # the last accepted version
    assert nack.error_detail.code == 3
    assert "CDS[outbound|9080||bad].load_assignment.endpoints[0].lb_endpoints[0].load_balancing_weight: " \
           "must be at least 1" in nack.error_detail.message
    assert rec.last == before and len(rec.calls) == calls
    assert state.ts(rt.CDS).version == "1" and state.ts(rt.CDS).last_nack["nonce"] == "n2"
    assert R in state.ts(rt.CDS).resources


def test_undecodable_and_wrong_type_are_nacked():
    state, _ = new_state()
    wrong = discovery_pb2.DiscoveryResponse(type_url=rt.CDS.url, version_info="1", nonce="x")
    a = wrong.resources.add()
    a.Pack(istio.cla(R, [("10.244.1.5", 9080)]))
    (nack,) = state.handle(wrong)
    assert "in a CDS response" in nack.error_detail.message


def test_removed_resources_are_removed():
    state, rec = new_state()
    bookinfo(state)
    state.handle(resp(rt.LDS, [istio.virtual_outbound()], version="2", nonce="l2"))   # 9080 and 3306 gone
    assert rec.last.listeners == ()
    reqs = state.handle(resp(rt.CDS, [istio.eds_cluster(R)], version="2", nonce="c2"))
    eds = [r for r in reqs if r.type_url == rt.EDS.url]
    assert [list(r.resource_names) for r in eds] == [[R]]     # unsubscribed from v1, v3
    assert set(state.ts(rt.EDS).resources) == {R}
    assert [c.name for c in rec.last.clusters] == [R]


def test_eds_partial_push_keeps_the_rest():
    state, rec = new_state()
    bookinfo(state)
    state.handle(resp(rt.EDS, [istio.cla(R1, [("10.244.3.3", 9080)])], version="2", nonce="e2"))
    assert rec.last.cluster(R1).endpoints == (Endpoint("10.244.3.3", 9080),)
    assert rec.last.cluster(R3).endpoints == (Endpoint("10.244.2.7", 9080),)


def test_priority_and_health_in_cla():
    state, rec = new_state()
    state.handle(resp(rt.CDS, [istio.eds_cluster(R, lb="LEAST_REQUEST")]))
    c = istio.cla(R, [("10.244.1.1", 9080), ("10.244.1.2", 9080)], health=["UNHEALTHY", "DRAINING"])
    p1 = c.endpoints.add()
    p1.CopyFrom(istio.cla(R, [("10.244.2.1", 9080), ("10.244.2.2", 9080)], health=["HEALTHY", "UNKNOWN"],
                          priority=1).endpoints[0])
    state.handle(resp(rt.EDS, [c]))
    cl = rec.last.cluster(R)
    assert cl.lb_policy == LbPolicy.LEAST_REQUEST
    assert cl.endpoints == (Endpoint("10.244.2.1", 9080), Endpoint("10.244.2.2", 9080))


def test_reconnect_resubscribes_with_versions():
    state, _ = new_state()
    bookinfo(state)
    reqs = state.on_connect()
    assert [rt.BY_URL[r.type_url].short for r in reqs] == ["CDS", "EDS", "LDS", "RDS"]
    assert reqs[0].version_info == "1" and reqs[0].node.id and not reqs[1].HasField("node")
    assert all(r.response_nonce == "" for r in reqs)
    assert list(reqs[3].resource_names) == ["9080"]


def test_hold_until_warm_does_not_apply_a_partial_set():
    state, rec = new_state()
    state.hold_until_warm = True
    state.handle(resp(rt.CDS, [istio.eds_cluster(R)]))
    state.handle(resp(rt.EDS, [istio.cla(R, [("10.244.1.5", 9080)])]))
    assert rec.calls == []         # restarted daemon keeps serving the pinned maps
    state.handle(resp(rt.LDS, [istio.tcp_listener("10.96.0.20", 3306, R)]))
    assert rec.calls == [None] and rec.last.listeners   # one full reconcile


def test_failed_reconcile_after_restart_changes_nothing():
    state, rec = new_state()
    state.hold_until_warm = True
    state.handle(resp(rt.CDS, [istio.eds_cluster(R)]))
    state.handle(resp(rt.EDS, [istio.cla(R, [("10.244.1.5", 9080)])]))
    before, counts = state.mesh(), state.counts()

    def failing(change, full_mesh):
        assert change is None and full_mesh().listeners   # the whole model, as it would be
        raise OSError("map write failed")

    state.apply = failing
    (nack,) = state.handle(resp(rt.LDS, [istio.tcp_listener("10.96.0.20", 3306, R)], nonce="l1"))
    assert "map write failed" in nack.error_detail.message
    assert state.mesh() == before and state.mesh().skipped == before.skipped and state.counts() == counts
    assert state.hold_until_warm and not state.ts(rt.LDS).resources
    state.apply = rec
    state.handle(resp(rt.LDS, [istio.tcp_listener("10.96.0.20", 3306, R)], nonce="l2"))
    assert rec.calls == [None] and rec.last.listeners and not state.hold_until_warm


def test_only_what_changed_is_translated(monkeypatch):
    from kmesh.config import translate

    calls = {"heads": 0, "endpoints": 0}

    def counting(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(translate, "cluster_head", counting("heads", translate.cluster_head))
    monkeypatch.setattr(translate, "service_endpoints", counting("endpoints", translate.service_endpoints))
    state, rec = new_state()
    bookinfo(state)
    assert calls == {"heads": 5, "endpoints": 3}
    # CDS comes whole: only the changed cluster is translated again
    state.handle(resp(rt.CDS, [istio.eds_cluster(R), istio.eds_cluster(R1, lb="RANDOM"), istio.eds_cluster(R3),
                               istio.passthrough_cluster(), istio.blackhole_cluster()], version="2"))
    assert calls == {"heads": 6, "endpoints": 3}
    assert rec.last.cluster(R1).lb_policy == LbPolicy.RANDOM
    # an EDS push: its endpoints only (no Cluster resource), and not the unchanged ones
    state.handle(resp(rt.EDS, [istio.cla(R1, [("10.244.3.3", 9080)]),
                               istio.cla(R3, [("10.244.2.7", 9080)])], version="2"))
    assert calls == {"heads": 6, "endpoints": 4}
    assert rec.last.cluster(R1).endpoints == (Endpoint("10.244.3.3", 9080),)
    assert rec.last.cluster(R1).lb_policy == LbPolicy.RANDOM


def test_backoff_is_capped_and_jittered():
    import random

    from kmesh.xds.client import BACKOFF_CAP, backoff_delay

    r = random.Random(1)
    delays = [backoff_delay(a, rand=r) for a in range(20)]
    assert all(0 <= d <= BACKOFF_CAP for d in delays)
    assert len(set(delays)) == len(delays)


class Accepted:
    """The serialized resources the state accepted, recorded by the test
    itself (the state keeps only a fingerprint of each)."""

    def __init__(self, state):
        self.state = state
        self.raw = {t: {} for t in rt.ALL}

    def handle(self, r):
        reqs = self.state.handle(r)
        t = rt.BY_URL[r.type_url]
        if not reqs[0].HasField("error_detail"):
            got = {t.name_of(t.message.FromString(a.value)): a.value for a in r.resources}
            self.raw[t] = got if t.wildcard else {**self.raw[t], **got}
        for u in rt.ALL:   # names the state holds: EDS/RDS ones only while subscribed
            held = self.state.ts(u).resources
            self.raw[u] = {n: v for n, v in self.raw[u].items() if n in held}
            assert {n: fingerprint(v) for n, v in self.raw[u].items()} == held, u.short
        return reqs

    def full_translation(self):
        """What translating every accepted resource from scratch gives."""
        from kmesh.config.builder import translate

        res = {t.short: {n: (f"{t.short}[{n}]", t.message.FromString(raw)) for n, raw in self.raw[t].items()}
               for t in rt.ALL}
        return translate("xDS", list(res["LDS"].values()), list(res["CDS"].values()),
                         endpoints=res["EDS"], routes=res["RDS"], lenient=True,
                         cluster_origin="CDS or static_resources.clusters")


def test_incremental_equals_full_translation_over_random_pushes():
    import random

    rnd = random.Random(7)
    hosts = [f"svc{i}.default.svc.cluster.local" for i in range(8)]
    names = [istio.outbound(9080, h) for h in hosts]
    state, rec = new_state()
    accepted = Accepted(state)
    for step in range(60):
        kind = rnd.choice(["CDS", "EDS", "LDS", "RDS"])
        if kind == "CDS":
            chosen = rnd.sample(names, rnd.randint(0, len(names)))
            accepted.handle(resp(rt.CDS, [istio.eds_cluster(n, lb=rnd.choice(["ROUND_ROBIN", "RANDOM"]))
                                          for n in chosen], version=str(step), nonce=str(step)))
        elif kind == "EDS":
            subs = sorted(state.ts(rt.EDS).subscribed)
            if subs:
                chosen = rnd.sample(subs, rnd.randint(1, len(subs)))
                accepted.handle(resp(rt.EDS, [istio.cla(n, [(f"10.244.0.{rnd.randint(1, 9)}", 9080)
                                                            for _ in range(rnd.randint(0, 3))]) for n in chosen],
                                     version=str(step), nonce=str(step)))
        elif kind == "LDS":
            ls = [istio.http_listener(9080)] if rnd.random() < 0.8 else []
            ls += [istio.tcp_listener(f"10.96.1.{i}", 3306, rnd.choice(names)) for i in range(rnd.randint(0, 3))]
            accepted.handle(resp(rt.LDS, ls, version=str(step), nonce=str(step)))
        else:
            vh = [{"host": h, "vip": f"10.96.0.{i}", "port": 9080, "cluster": rnd.choice(names)}
                  for i, h in enumerate(hosts) if rnd.random() < 0.6]
            accepted.handle(resp(rt.RDS, [istio.route_config("9080", vh)], version=str(step), nonce=str(step)))
        got, want = state.mesh(), accepted.full_translation()
        assert sorted(got.listeners, key=lambda l: (l.ip, l.port)) == \
            sorted(want.listeners, key=lambda l: (l.ip, l.port)), step
        assert sorted(got.clusters, key=lambda c: c.name) == sorted(want.clusters, key=lambda c: c.name), step
        assert state.counts() == {"listeners": len(got.listeners), "clusters": len(got.clusters),
                                  "warnings": len(got.warnings), "skipped": len(got.skipped)}, step


def test_example_ads_bootstrap_names_istiod(monkeypatch):
    from kmesh.config import bootstrap
    from kmesh.xds.node import resolve_target

    monkeypatch.delenv("XDS_ADDRESS", raising=False)
    cfg = bootstrap.load_file("config/examples/ads.yaml")
    t = resolve_target("", cfg.bootstrap)
    assert (t.address, t.origin, t.tls) == ("istiod.istio-system.svc:15010", "bootstrap", False)
    monkeypatch.setenv("XDS_ADDRESS", "10.0.0.1:15012")
    assert resolve_target("", cfg.bootstrap).origin == "environment"
    assert resolve_target("127.0.0.1:1", cfg.bootstrap).address == "127.0.0.1:1"
    # its static xds-grpc cluster (DNS) is skipped with a reason in ADS mode, not refused
    state, rec = new_state()
    assert state.check_static(cfg) == []
    state.replace_static(cfg, lambda change: rec(change, None) or types.SimpleNamespace(ok=True))
    assert any("static_resources.clusters[0].type" in n and "DNS clusters" in n for n in state.mesh().skipped)
