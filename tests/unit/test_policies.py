"""Traffic policy fields -> ClusterPolicy / RateLimit, with notes for what is
not enforced at L4 and exact field paths for what is refused."""
from __future__ import annotations

import pytest

from kmesh.bpf import records
from kmesh.bpf.records import ClusterPolicy, RateLimit
from kmesh.config.errors import ConfigError
from tests.support.envoy import rate_limited, tcp_listener
from tests.unit.test_translate import base, translate

C0 = "static_resources.clusters[0]"


def with_cluster(**fields):
    d = base()
    d["static_resources"]["clusters"][0].update(fields)
    return d


def test_no_policy_by_default():
    assert translate(base()).clusters[0].policy == records.NO_POLICY


def test_max_connections_and_per_request_notes():
    m = translate(with_cluster(circuit_breakers={"thresholds": [
        {"max_connections": 5, "max_requests": 10, "max_pending_requests": 4294967295}]}))
    assert m.clusters[0].policy == ClusterPolicy(max_connections=5)
    assert [w for w in m.warnings if "circuit_breakers" in w] == [
        f"test.yaml: {C0}.circuit_breakers.thresholds[0].max_requests: a per-request limit: not enforced at L4 "
        "(kmesh sees connections, not requests)"]


def test_istio_unlimited_thresholds_mean_no_limit_and_no_notes():
    unlimited = {k: 4294967295 for k in ("max_connections", "max_pending_requests", "max_requests", "max_retries")}
    m = translate(with_cluster(circuit_breakers={"thresholds": [unlimited]}))
    assert m.clusters[0].policy == records.NO_POLICY and m.warnings == ()


def test_high_priority_thresholds_are_noted_not_applied():
    m = translate(with_cluster(circuit_breakers={"thresholds": [{"priority": "HIGH", "max_connections": 1}]}))
    assert m.clusters[0].policy.max_connections == 0
    assert any(f"{C0}.circuit_breakers.thresholds[0].priority" in w for w in m.warnings)


def test_max_connections_zero_is_refused():
    with pytest.raises(ConfigError) as e:
        translate(with_cluster(circuit_breakers={"thresholds": [{"max_connections": 0}]}))
    assert f"{C0}.circuit_breakers.thresholds[0].max_connections: 0 would refuse every connection" in str(e.value)


def test_connect_timeout_in_ms_rounded_up():
    assert translate(with_cluster(connect_timeout="0.25s")).clusters[0].policy.connect_timeout_ms == 250
    assert translate(with_cluster(connect_timeout="0.0001s")).clusters[0].policy.connect_timeout_ms == 1


def test_outlier_detection_envoy_defaults():
    m = translate(with_cluster(outlier_detection={}))
    assert m.clusters[0].policy == ClusterPolicy(0, 0, 5, 30_000, 300_000, 10)


def test_outlier_detection_fields():
    m = translate(with_cluster(outlier_detection={
        "consecutive_5xx": 3, "base_ejection_time": "2s", "max_ejection_time": "1s", "max_ejection_percent": 150,
        "interval": "1s", "success_rate_stdev_factor": 1900}))
    # max below base: the base stands; percent capped at 100
    assert m.clusters[0].policy == ClusterPolicy(0, 0, 3, 2000, 2000, 100)
    assert [w.split(": ")[1] for w in m.warnings] == [f"{C0}.outlier_detection.success_rate_stdev_factor"]


def test_outlier_local_origin_split_and_disabled():
    m = translate(with_cluster(outlier_detection={"split_external_local_origin_errors": True,
                                                  "consecutive_local_origin_failure": 2}))
    assert m.clusters[0].policy.outlier_failures == 2
    m = translate(with_cluster(outlier_detection={"enforcing_consecutive_5xx": 0}))
    assert m.clusters[0].policy == records.NO_POLICY


def test_listener_local_rate_limit():
    d = base()
    d["static_resources"]["listeners"][0] = rate_limited(tcp_listener("l1", "127.0.0.1", 23333), 10, 2, "0.5s")
    m = translate(d)
    assert m.listeners[0].rate_limit == RateLimit(10, 2, 500)
    assert m.warnings == ()


@pytest.mark.parametrize("bucket,path,reason", [
    ({"max_tokens": 5, "fill_interval": "0.01s"}, "token_bucket.fill_interval", "must be at least 50 ms"),
    ({"fill_interval": "1s"}, "token_bucket.max_tokens", "must be greater than 0"),
])
def test_bad_rate_limits_are_refused(bucket, path, reason):
    d = base()
    lst = rate_limited(tcp_listener("l1", "127.0.0.1", 23333), 1)
    lst["filter_chains"][0]["filters"][0]["typed_config"]["token_bucket"] = bucket
    d["static_resources"]["listeners"][0] = lst
    with pytest.raises(ConfigError) as e:
        translate(d)
    assert f"static_resources.listeners[0].filter_chains[0].filters[0].typed_config.{path}: {reason}" in str(e.value)


def test_policies_survive_the_record_round_trip():
    policy = ClusterPolicy(5, 250, 3, 2000, 8000, 50)
    rec = records.cluster_record(records.LbPolicy.RANDOM, [("127.0.0.1", 80, 1)], policy)
    spec = records.cluster_spec_of(rec)
    assert spec[2] == policy
    assert records.cluster_fingerprint(spec) == records.cluster_fingerprint(
        (records.LbPolicy.RANDOM, (("127.0.0.1", 80, 1),), policy))
    assert records.cluster_fingerprint(spec) != records.cluster_fingerprint(
        (records.LbPolicy.RANDOM, (("127.0.0.1", 80, 1),), records.NO_POLICY))
    lrec = records.listener_record([(1, 1)], RateLimit(10, 2, 500))
    assert records.listener_spec_of(lrec) == (((1, 1),), RateLimit(10, 2, 500), 0)
    assert records.decode_listener(lrec)["rate_limit"] == {"max_tokens": 10, "tokens_per_fill": 2,
                                                           "fill_interval_ms": 500}


def test_http_local_rate_limit_filter():
    from google.protobuf import any_pb2, json_format
    from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as m
    from kmesh.config import policies
    from kmesh.config.translate import Ctx

    def translate_rl(d):
        a = any_pb2.Any()
        a.Pack(json_format.ParseDict(d, m.LocalRateLimit()))
        ctx = Ctx("t.yaml", "static_resources", False)
        return policies.http_rate_limit(ctx, "f", a), ctx

    bucket = {"max_tokens": 10, "tokens_per_fill": 2, "fill_interval": "1s"}
    got, ctx = translate_rl({"stat_prefix": "x", "token_bucket": bucket,
                             "filter_enabled": {"default_value": {"numerator": 50, "denominator": "HUNDRED"}},
                             "status": {"code": 503}})
    assert got == policies.HttpRateLimit(RateLimit(10, 2, 1000), 503, 50.0, 0.0)
    got, ctx = translate_rl({"stat_prefix": "x", "token_bucket": bucket})   # Envoy: enabled 0% by default
    assert got is None and any("filter_enabled" in p for p, _ in ctx.warnings)


def test_handoff_token_bucket_fills_by_whole_intervals():
    from kmesh.l7.handoff import TokenBucket

    now = [0.0]
    b = TokenBucket(3, 2, 1000, clock=lambda: now[0])
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.9
    assert not b.take()
    now[0] = 2.5   # two whole intervals: 4 tokens, capped at 3
    assert [b.take() for _ in range(4)] == [True, True, True, False]
