"""Bookinfo in pods (tests/support/bookinfo.py), driven once from a standalone
config and once over ADS with istiod-shaped resources, checked from inside
the pods: every call crosses a ClusterIP that is unroutable in every pod."""
from __future__ import annotations

import collections

import pytest

from tests.support import bookinfo, pods

# P(reviews-v2 share of 200 draws at p = 0.2 falls outside [0.07, 0.35]) < 1e-6
# (binomial tails: P(X <= 13) + P(X >= 71) = 3.2e-7).
N, LOW, HIGH = 200, 0.07, 0.35


@pytest.fixture
def mesh(cgroup):
    with pods.Topology() as topo:
        yield bookinfo.start(topo, cgroup)


def page(mesh, *headers: str) -> str:
    r = mesh.pods["client"].run(["curl", "-sS", "--max-time", "10", "-H", "Host: productpage:9080", *headers,
                                 f"http://{bookinfo.VIPS['productpage']}:{bookinfo.PORT}/"])
    return r.stdout.strip()


def check_routing(k, mesh) -> None:
    for pod in bookinfo.clients(mesh):
        status, body = k.post(f"/workloads/enroll?netns=/run/netns/{pod.netns}")
        assert status == 200, body
    got = collections.Counter(page(mesh) for _ in range(N))
    ok = "productpage-v1 (details-v1) (reviews-v1)", \
        "productpage-v1 (details-v1) (reviews-v2 (ratings-v1))"
    assert set(got) == set(ok), got
    assert LOW <= got[ok[1]] / N <= HIGH, got
    # jason: reviews v2, whose call to ratings the fault aborts
    assert {page(mesh, "-H", "end-user: jason") for _ in range(5)} == {
        "productpage-v1 (details-v1) (reviews-v2 (ratings 500))"}
    # Every call is routed per request: istiod puts a retry policy and the
    # attempt count header on every route, which no connect-time decision can
    # apply (docs/l7.md, "L4 or L7"). A page is productpage, details, reviews
    # and (v2) ratings.
    l7 = k.get("/l7")
    assert 3 * (N + 5) <= l7["accepted"] <= 4 * (N + 5), l7


def test_bookinfo_standalone(kmesh, cgroup, mesh):
    check_routing(kmesh(mesh.standalone()), mesh)


def test_bookinfo_over_ads(kmesh, cgroup, mesh, xds):
    mesh.push(xds)
    k = kmesh({}, ads=xds.address)
    assert k.get("/controller/envoy")["xds"]["synced"]
    check_routing(k, mesh)
