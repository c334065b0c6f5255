"""The connect4 decision logic, run in the kernel with BPF_PROG_TEST_RUN.

bpf/tests/lb_test.bpf.c runs the same decision as kmesh_connect4 (decision.h)
from a syscall program, which BPF_PROG_TEST_RUN supports (the
cgroup/connect4 type does not). Records are built by the daemon's own code.
"""
from __future__ import annotations

import collections
import ctypes
import os

import pytest

from kmesh.bpf import libbpf, records
from kmesh.bpf.records import LbPolicy
from tests.conftest import BUILD_BPF

OBJECT = BUILD_BPF / "tests" / "lb_test.bpf.o"
NO_LISTENER, NO_CLUSTER, NO_ENDPOINT, REDIRECT = 1, 2, 3, 4


class Ctx(ctypes.Structure):
    """struct lb_test_ctx (bpf/tests/lb_test.bpf.c)."""

    _fields_ = [("dst", records.KmeshAddr), ("result", ctypes.c_uint32), ("lb_policy", ctypes.c_uint32),
                ("ep", records.KmeshAddr)]


class LbHarness:
    def __init__(self):
        self.obj = libbpf.BpfObject(str(OBJECT))
        self.obj.load()
        handles = self.obj.maps()
        self.listener = libbpf.Map("km_listener", libbpf.bpf_map__fd(handles["km_listener"]),
                                   records.KmeshAddr, records.KmeshListener)
        self.port_map = libbpf.Map("km_listener_ports", libbpf.bpf_map__fd(handles["km_listener_ports"]),
                                ctypes.c_uint32, ctypes.c_uint32)
        self.cluster = libbpf.Map("km_cluster", libbpf.bpf_map__fd(handles["km_cluster"]),
                                  records.ClusterId, records.KmeshCluster)
        self.active = libbpf.Map("km_ep_active", libbpf.bpf_map__fd(handles["km_ep_active"]),
                                 records.KmeshAddr, records.KmeshEpStats)
        self.prog_fd = libbpf.bpf_program__fd(self.obj.programs()["lb_decide"])

    def add_cluster(self, cid: int, policy: LbPolicy, eps: list[tuple[int, int]], ip: str = "127.0.0.1") -> None:
        """eps: (port, weight) on ``ip``."""
        self.cluster.update(records.ClusterId(cid), records.cluster_record(policy, [(ip, p, w) for p, w in eps]))

    def add_listener(self, ip: str, port: int, clusters: list[tuple[int, int]]) -> None:
        self.port_map.update(ctypes.c_uint32(records.port_key(port)), ctypes.c_uint32(1))
        self.listener.update(records.addr_key(ip, port), records.listener_record(clusters))

    def decide_at(self, ip: str, port: int) -> tuple[int, str | None]:
        """The decision and the endpoint's "ip:port" text."""
        ctx = Ctx(dst=records.addr_key(ip, port))
        assert libbpf.prog_test_run_syscall(self.prog_fd, ctx) == 0
        return ctx.result, (records.addr_text(ctx.ep) if ctx.result == REDIRECT else None)

    def decide(self, ip: str, port: int) -> tuple[int, int | None]:
        result, ep = self.decide_at(ip, port)
        return result, (int(ep.rpartition(":")[2]) if ep else None)

    def ports(self, ip: str, port: int, n: int) -> list[int]:
        return [self.decide(ip, port)[1] for _ in range(n)]


@pytest.fixture
def lb():
    if os.geteuid() != 0:
        pytest.fail("loading BPF programs needs root")
    if not OBJECT.exists():
        pytest.fail(f"{OBJECT} missing: run ./build.sh -b")
    h = LbHarness()
    yield h
    h.obj.close()


def test_no_listener(lb):
    assert lb.decide("127.0.0.1", 80) == (NO_LISTENER, None)


def test_exact_then_wildcard(lb):
    lb.add_cluster(1, LbPolicy.ROUND_ROBIN, [(1001, 1)])
    lb.add_cluster(2, LbPolicy.ROUND_ROBIN, [(1002, 1)])
    lb.add_listener("0.0.0.0", 80, [(1, 1)])
    lb.add_listener("127.100.0.1", 80, [(2, 1)])
    assert lb.decide("127.100.0.1", 80) == (REDIRECT, 1002)
    assert lb.decide("127.100.0.2", 80) == (REDIRECT, 1001)
    assert lb.decide("127.100.0.1", 81) == (NO_LISTENER, None)


def test_each_family_falls_back_to_its_own_wildcard(lb):
    """IPv6 keys are 16 bytes like the mapped IPv4 ones: [::]:port catches
    IPv6 destinations only, 0.0.0.0:port IPv4 (and mapped) ones only."""
    lb.add_cluster(1, LbPolicy.ROUND_ROBIN, [(1001, 1)])
    lb.add_cluster(2, LbPolicy.ROUND_ROBIN, [(1002, 1)], ip="::1")
    lb.add_cluster(3, LbPolicy.ROUND_ROBIN, [(1003, 1)], ip="::1")
    lb.add_listener("0.0.0.0", 80, [(1, 1)])
    lb.add_listener("::", 80, [(2, 1)])
    lb.add_listener("fd00::7", 80, [(3, 1)])
    assert lb.decide_at("fd00::7", 80) == (REDIRECT, "[::1]:1003")
    assert lb.decide_at("fd00::8", 80) == (REDIRECT, "[::1]:1002")
    assert lb.decide_at("10.0.0.1", 80) == (REDIRECT, "127.0.0.1:1001")
    assert lb.decide_at("::ffff:10.0.0.1", 80) == (REDIRECT, "127.0.0.1:1001")
    assert lb.decide_at("::", 81) == (NO_LISTENER, None)
    lb.listener.delete(records.addr_key("0.0.0.0", 80))
    assert lb.decide_at("10.0.0.1", 80) == (NO_LISTENER, None)   # never the IPv6 wildcard


def test_an_ipv6_listener_takes_the_ipv6_view_else_the_cluster(lb):
    """IPv6 listeners name id | CLUSTER_V6; a cluster without IPv6
    endpoints has no such record, and its one record serves both."""
    v6 = records.CLUSTER_V6
    lb.add_cluster(4, LbPolicy.ROUND_ROBIN, [(1004, 1)])
    lb.add_listener("fd00::4", 80, [(4 | v6, 1)])
    assert lb.decide_at("fd00::4", 80) == (REDIRECT, "127.0.0.1:1004")
    lb.add_cluster(4 | v6, LbPolicy.ROUND_ROBIN, [(1005, 1)], ip="fd00::99")
    assert lb.decide_at("fd00::4", 80) == (REDIRECT, "[fd00::99]:1005")


def test_missing_cluster_and_empty_cluster(lb):
    lb.add_listener("127.0.0.1", 80, [(7, 1)])
    assert lb.decide("127.0.0.1", 80)[0] == NO_CLUSTER
    lb.add_cluster(7, LbPolicy.ROUND_ROBIN, [])
    assert lb.decide("127.0.0.1", 80)[0] == NO_ENDPOINT


def test_round_robin_follows_smooth_wrr_exactly(lb):
    lb.add_cluster(1, LbPolicy.ROUND_ROBIN, [(1001, 5), (1002, 1), (1003, 1)])
    lb.add_listener("127.0.0.1", 80, [(1, 1)])
    expected = [1001 + i for i in records.smooth_wrr_slots([5, 1, 1])]
    assert lb.ports("127.0.0.1", 80, 14) == expected * 2


def test_random_is_weighted(lb):
    lb.add_cluster(1, LbPolicy.RANDOM, [(1001, 9), (1002, 1)])
    lb.add_listener("127.0.0.1", 80, [(1, 1)])
    got = collections.Counter(lb.ports("127.0.0.1", 80, 5000))
    assert abs(got[1001] / 5000 - 0.9) < 0.03, got


def test_weighted_clusters(lb):
    lb.add_cluster(1, LbPolicy.ROUND_ROBIN, [(1001, 1)])
    lb.add_cluster(2, LbPolicy.ROUND_ROBIN, [(1002, 1)])
    lb.add_cluster(3, LbPolicy.ROUND_ROBIN, [(1003, 1)])
    lb.add_listener("127.0.0.1", 80, [(1, 70), (2, 20), (3, 10)])
    got = collections.Counter(lb.ports("127.0.0.1", 80, 10000))
    for port, share in ((1001, 0.7), (1002, 0.2), (1003, 0.1)):
        assert abs(got[port] / 10000 - share) < 0.025, got   # multinomial, n=10000: P(any fails) < 5e-8


def test_least_request_uses_counts_and_weights(lb):
    lb.add_cluster(1, LbPolicy.LEAST_REQUEST, [(1001, 1), (1002, 1), (1003, 2)])
    lb.add_listener("127.0.0.1", 80, [(1, 1)])

    def set_active(port, n):
        lb.active.update(records.addr_key("127.0.0.1", port), records.KmeshEpStats(n))

    set_active(1001, 4)
    set_active(1002, 1)
    set_active(1003, 3)
    # loads (active+1)/weight: 5, 2, 2 -> a tie between 1002 and 1003; both are chosen, 1001 never
    got = collections.Counter(lb.ports("127.0.0.1", 80, 30))
    assert set(got) == {1002, 1003}, got
    set_active(1002, 9)
    assert set(lb.ports("127.0.0.1", 80, 10)) == {1003}


def test_cluster_replacement_is_seen_whole(lb):
    lb.add_cluster(1, LbPolicy.ROUND_ROBIN, [(1001, 1), (1002, 1)])
    lb.add_listener("127.0.0.1", 80, [(1, 1)])
    assert set(lb.ports("127.0.0.1", 80, 4)) == {1001, 1002}
    lb.add_cluster(1, LbPolicy.ROUND_ROBIN, [(2001, 1), (2002, 1), (2003, 1)])
    assert sorted(lb.ports("127.0.0.1", 80, 3)) == [2001, 2002, 2003]
