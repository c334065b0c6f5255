"""Diff planning: ordering, id stability, takeover by content."""
from __future__ import annotations

from kmesh.bpf.records import NO_POLICY, LbPolicy
from kmesh.config.model import Cluster, Endpoint, Listener, MeshConfig, WeightedCluster
from kmesh.dataplane.plan import MapState, plan


def cfg(clusters: dict[str, list[int]], listeners: dict[tuple[str, int], list[tuple[str, int]]]) -> MeshConfig:
    return MeshConfig(
        listeners=tuple(Listener(f"l{p}", ip, p, tuple(WeightedCluster(c, w) for c, w in t))
                        for (ip, p), t in listeners.items()),
        clusters=tuple(Cluster(n, LbPolicy.ROUND_ROBIN, tuple(Endpoint("127.0.0.1", port) for port in ports))
                       for n, ports in clusters.items()),
    )


def test_first_apply_writes_everything():
    p = plan(MapState(), cfg({"a": [1], "b": [2]}, {("127.0.0.1", 80): [("a", 1)]}))
    assert len(p.cluster_upserts) == 2 and len(p.listener_upserts) == 1
    assert not p.listener_deletes and not p.cluster_deletes
    assert set(p.new_state.cluster_ids) == {"a", "b"}


def test_same_config_twice_writes_nothing():
    c = cfg({"a": [1]}, {("127.0.0.1", 80): [("a", 1)]})
    p1 = plan(MapState(), c)
    assert plan(p1.new_state, c).empty


def test_endpoint_change_updates_cluster_in_place():
    p1 = plan(MapState(), cfg({"a": [1]}, {("127.0.0.1", 80): [("a", 1)]}))
    p2 = plan(p1.new_state, cfg({"a": [1, 2]}, {("127.0.0.1", 80): [("a", 1)]}))
    assert [cid for cid, _ in p2.cluster_upserts] == [p1.new_state.cluster_ids["a"]]
    assert not p2.listener_upserts and not p2.cluster_deletes


def test_switching_clusters_adds_before_it_deletes():
    p1 = plan(MapState(), cfg({"a": [1]}, {("127.0.0.1", 80): [("a", 1)]}))
    p2 = plan(p1.new_state, cfg({"b": [2]}, {("127.0.0.1", 80): [("b", 1)]}))
    new_id = p2.new_state.cluster_ids["b"]
    assert new_id != p1.new_state.cluster_ids["a"], "a new cluster never reuses a live id"
    assert [cid for cid, _ in p2.cluster_upserts] == [new_id]
    clusters, _rate_limit, _flags = p2.listener_upserts[0][1]
    assert clusters[0][0] == new_id
    assert p2.cluster_deletes == [p1.new_state.cluster_ids["a"]]


def test_removed_listener_deleted():
    p1 = plan(MapState(), cfg({"a": [1]}, {("127.0.0.1", 80): [("a", 1)], ("0.0.0.0", 81): [("a", 1)]}))
    p2 = plan(p1.new_state, cfg({"a": [1]}, {("127.0.0.1", 80): [("a", 1)]}))
    assert p2.listener_deletes == [("0.0.0.0", 81)]
    assert not p2.cluster_deletes


def test_takeover_reuses_identical_records():
    """A restarted daemon knows no names; identical records are adopted."""
    c = cfg({"a": [1], "b": [2]}, {("127.0.0.1", 80): [("a", 1), ("b", 3)]})
    before = plan(MapState(), c).new_state
    pinned = MapState(clusters=dict(before.clusters), listeners=dict(before.listeners))  # names lost
    p = plan(pinned, c)
    assert p.empty
    assert p.new_state.cluster_ids == before.cluster_ids


def test_takeover_with_changed_config_keeps_vip_mapped():
    before = plan(MapState(), cfg({"a": [1]}, {("127.0.0.1", 80): [("a", 1)]})).new_state
    pinned = MapState(clusters=dict(before.clusters), listeners=dict(before.listeners))
    p = plan(pinned, cfg({"a": [1, 2]}, {("127.0.0.1", 80): [("a", 1)]}))
    # The changed cluster gets a fresh id; the listener is rewritten to it and
    # only then is the old record deleted.
    new_id = p.new_state.cluster_ids["a"]
    assert new_id not in pinned.clusters
    assert [k for k, _ in p.listener_upserts] == [("127.0.0.1", 80)]
    assert p.cluster_deletes == list(pinned.clusters)


def test_capacity_checked_including_transition():
    import pytest

    from kmesh.dataplane.plan import CapacityError

    p1 = plan(MapState(), cfg({"a": [1], "b": [2]}, {}))
    with pytest.raises(CapacityError):
        plan(p1.new_state, cfg({"c": [3], "d": [4]}, {}), max_clusters=3)


# --- IPv6 views ----------------------------------------------------------------

def _mesh(eps: tuple[Endpoint, ...], keys=(("10.96.0.1", 80), ("fd96::1", 80))) -> MeshConfig:
    return MeshConfig(listeners=tuple(Listener(f"l{i}", ip, p, (WeightedCluster("svc", 1),))
                                      for i, (ip, p) in enumerate(keys)),
                      clusters=(Cluster("svc", LbPolicy.ROUND_ROBIN, eps),))


def test_ipv6_listeners_name_the_ipv6_view_written_only_where_it_differs():
    from kmesh.bpf.records import CLUSTER_V6
    from kmesh.dataplane.plan import plan_changes

    v4 = (Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80))
    p1 = plan(MapState(), _mesh(v4))
    cid = p1.new_state.cluster_ids["svc"]
    assert [c for c, _ in p1.cluster_upserts] == [cid]   # IPv6 clients reach these mapped: one record
    specs = dict(p1.listener_upserts)
    assert specs[("10.96.0.1", 80)][0] == ((cid, 1),) and specs[("fd96::1", 80)][0] == ((cid | CLUSTER_V6, 1),)
    dual = (Endpoint("10.0.0.1", 80, 1, "fd00::1"), Endpoint("10.0.0.2", 80, 1, "fd00::2"))
    p2 = plan(p1.new_state, _mesh(dual))
    assert dict(p2.cluster_upserts) == {cid | CLUSTER_V6: (LbPolicy.ROUND_ROBIN, (("fd00::1", 80, 1),
                                                                                  ("fd00::2", 80, 1)), NO_POLICY)}
    assert not p2.listener_upserts and not p2.cluster_deletes   # listeners never change with the view
    assert plan(p2.new_state, _mesh(dual)).empty
    # an endpoint push that drops the IPv6 addresses drops the view (delta too)
    st = p2.new_state
    p3 = plan_changes(st, {"svc": _mesh(v4).clusters[0]}, {})
    assert p3.cluster_deletes == [cid | CLUSTER_V6] and not p3.cluster_upserts
    assert cid | CLUSTER_V6 not in p3.commit(st).clusters
    # IPv6-only endpoints: the IPv4 record is empty, the view holds them
    p4 = plan(MapState(), _mesh((Endpoint("fd00::1", 80),), keys=(("fd96::1", 80),)))
    got = dict(p4.cluster_upserts)
    assert got[cid][1] == () and got[cid | CLUSTER_V6][1] == (("fd00::1", 80, 1),)
