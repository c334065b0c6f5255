"""Workloads in network namespaces of their own ("pods", tests/support/pods.py):
a client pod under the governed cgroup reaches endpoints in other pods
through a service VIP that is unroutable in every pod."""
from __future__ import annotations

import collections

import pytest

from tests.support import pods
from tests.support.envoy import bootstrap, cluster, lb_ep, tcp_listener

VIP = "10.96.0.10"   # a ClusterIP: no route to it anywhere in the topology


@pytest.fixture
def topo():
    with pods.Topology() as t:
        yield t


def test_l4_round_robin_and_weights_from_a_pod_to_pods(kmesh, cgroup, topo):
    a, b = topo.pod("web-a").backend("A", 8080), topo.pod("web-b").backend("B", 8080)
    client = topo.pod("client", parent=cgroup)
    kmesh(bootstrap([tcp_listener("rr", VIP, 80, "rr"), tcp_listener("w", VIP, 81, "w")],
                    [cluster("rr", lb_ep(*a), lb_ep(*b)),
                     cluster("w", lb_ep(*a, weight=3), lb_ep(*b, weight=1))]))
    got = client.curl(f"http://{VIP}/[1-6]")
    assert collections.Counter(got) == {"A": 3, "B": 3} and all(x != y for x, y in zip(got, got[1:])), got
    assert collections.Counter(client.curl(f"http://{VIP}:81/[1-8]")) == {"A": 6, "B": 2}


def test_only_pods_under_the_governed_cgroup_are_redirected(kmesh, cgroup, topo):
    a = topo.pod("web").backend("A", 8080)
    governed, other = topo.pod("governed", parent=cgroup), topo.pod("other")
    kmesh(bootstrap([tcp_listener("rr", VIP, 80, "rr")], [cluster("rr", lb_ep(*a))]))
    assert governed.connect(VIP, 80) == "ok"
    # not redirected: the VIP is unroutable in the pod, the connect fails there
    assert other.connect(VIP, 80) == "ENETUNREACH"
    assert other.connect(*a) == "ok"   # the pod network itself works
