"""The hand-off's endpoint choice: the kernel's LB rules over the daemon's
own connections (pure; a fake clock and a seeded random source)."""
from __future__ import annotations

import random
from collections import Counter

from kmesh.bpf.records import ClusterPolicy, LbPolicy
from kmesh.config.model import Cluster, Endpoint
from kmesh.l7.balancer import Balancer

A, B, C = ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)


def cluster(lb=LbPolicy.ROUND_ROBIN, weights=(1, 1, 1), **policy) -> Cluster:
    return Cluster("c", lb, tuple(Endpoint(ip, port, w) for (ip, port), w in zip((A, B, C), weights)),
                   ClusterPolicy(**policy))


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_round_robin_by_weight_and_retries_take_the_others():
    b = Balancer(rng=random.Random(1))
    c = cluster(weights=(2, 1, 1))
    firsts = Counter(b.order(c)[0] for _ in range(400))
    assert firsts == {A: 200, B: 100, C: 100}
    assert sorted(b.order(c)) == sorted([A, B, C])   # each endpoint once


def test_random_by_weight():
    b = Balancer(rng=random.Random(7))
    firsts = Counter(b.order(cluster(LbPolicy.RANDOM, (3, 1, 0)))[0] for _ in range(4000))
    assert abs(firsts[A] / 4000 - 0.6) < 0.03 and abs(firsts[B] / 4000 - 0.2) < 0.03   # weight 0 counts as 1


def test_least_request_takes_the_fewest_active_relative_to_weight():
    b = Balancer()
    c = cluster(LbPolicy.LEAST_REQUEST, (1, 1, 2))
    for _ in range(2):
        b.opened(c, A)
    b.opened(c, B)
    b.opened(c, C)
    # loads: A (2+1)/1 = 3, B (1+1)/1 = 2, C (1+1)/2 = 1
    assert b.order(c) == [C, B, A]
    b.closed(c, B)
    b.closed(c, B)   # more closes than opens stay at 0
    assert b.order(c)[0] in (B, C)


def test_least_request_spreads_ties():
    b = Balancer()
    c = cluster(LbPolicy.LEAST_REQUEST)
    assert Counter(b.order(c)[0] for _ in range(30)) == {A: 10, B: 10, C: 10}


def test_consecutive_failures_eject_for_base_times_ejections_capped():
    clock = Clock()
    b = Balancer(clock=clock)
    c = cluster(outlier_failures=2, outlier_base_ms=1000, outlier_max_ms=1500, outlier_max_percent=100)
    b.failed(c, A)
    assert b.ejected(c) == []
    b.failed(c, A)
    assert b.ejected(c) == [A] and A not in b.order(c)
    clock.t += 1.01
    assert b.ejected(c) == [] and A in b.order(c)
    b.failed(c, A)
    b.failed(c, A)   # second ejection: 2 x 1000 ms, capped at 1500
    clock.t += 1.49
    assert b.ejected(c) == [A]
    clock.t += 0.02
    assert b.ejected(c) == []


def test_a_success_resets_the_run_and_the_ejection_count():
    b = Balancer(clock=Clock())
    c = cluster(outlier_failures=2, outlier_base_ms=1000, outlier_max_ms=10_000, outlier_max_percent=100)
    b.failed(c, A)
    b.succeeded(c, A)
    b.failed(c, A)
    assert b.ejected(c) == []


def test_max_ejection_percent_and_panic_routing():
    b = Balancer(clock=Clock())
    c = cluster(outlier_failures=1, outlier_base_ms=1000, outlier_max_ms=1000, outlier_max_percent=50)
    for ep in (A, B, C):
        b.failed(c, ep)
    assert b.ejected(c) == [A]                  # 50% of 3 rounds down to 1
    c2 = cluster(outlier_failures=1, outlier_base_ms=1000, outlier_max_ms=1000, outlier_max_percent=100)
    for ep in (A, B, C):
        b.failed(c2, ep)
    assert len(b.ejected(c2)) == 3 and sorted(b.order(c2)) == sorted([A, B, C])   # all ejected: panic


def test_without_outlier_detection_failures_change_nothing():
    b = Balancer(clock=Clock())
    c = cluster()
    for _ in range(10):
        b.failed(c, A)
    assert b.ejected(c) == []


def test_first_is_orders_first_with_the_same_draws():
    """first() (the native engine's one try) draws and steps exactly as
    order()[0]: two balancers fed the same seeds agree request by request."""
    for lb in (LbPolicy.ROUND_ROBIN, LbPolicy.RANDOM, LbPolicy.LEAST_REQUEST):
        for weights in ((1, 1, 1), (3, 1, 0), (1, 5, 2)):
            c = cluster(lb, weights)
            one, other = Balancer(rng=random.Random(3)), Balancer(rng=random.Random(3))
            assert [one.first(c) for _ in range(50)] == [other.order(c)[0] for _ in range(50)], (lb, weights)
    assert Balancer().first(Cluster("empty", LbPolicy.ROUND_ROBIN, (), ClusterPolicy())) is None
