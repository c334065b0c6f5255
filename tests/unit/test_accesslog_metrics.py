"""Pure parts of the access log and /metrics."""
from __future__ import annotations

from kmesh import accesslog, metrics
from kmesh.bpf import records


def _event(result: records.ConnResult, src=("127.0.0.1", 40000)) -> records.KmeshConnEvent:
    ev = records.KmeshConnEvent(opened_ns=1_000_000_000, closed_ns=1_002_500_000, bytes_to_ep=120,
                                bytes_from_ep=4096, cluster_id=7, result=int(result))
    ev.vip = records.addr_key("127.100.0.1", 80)
    ev.ep = records.addr_key("127.0.0.1", 8080)
    if src:
        ev.src = records.addr_key(*src)
    return ev


def test_line_has_envoy_fields():
    got = accesslog.line(_event(records.ConnResult.CLOSED), {7: "web"}, boot_offset=100.0)
    assert got == {"start_time": 101.0, "duration_ms": 2.5, "downstream_remote_address": "127.0.0.1:40000",
                   "downstream_local_address": "127.100.0.1:80", "upstream_host": "127.0.0.1:8080",
                   "upstream_cluster": "web", "bytes_received": 120, "bytes_sent": 4096,
                   "response_flags": "-", "result": "closed"}


def test_failed_connect_is_an_upstream_failure():
    got = accesslog.line(_event(records.ConnResult.FAILED, src=None), {}, boot_offset=0.0)
    assert (got["response_flags"], got["result"], got["upstream_cluster"]) == ("UF", "failed", "#7")
    assert got["downstream_remote_address"] is None   # no SYN went out: no address


def test_unknown_result_is_shown_not_dropped():
    ev = _event(records.ConnResult.CLOSED)
    ev.result = 9
    assert accesslog.line(ev, {}, 0.0)["result"] == "#9"


def test_destination_service_of_istio_cluster_names():
    assert metrics.destination_service("outbound|80||reviews.default.svc.cluster.local") == \
        "reviews.default.svc.cluster.local"
    assert metrics.destination_service("outbound|9080|v1|reviews.default.svc.cluster.local") == \
        "reviews.default.svc.cluster.local"
    assert metrics.destination_service("web") == "web"
    assert metrics.destination_service("a|b") == "a|b"


def test_kernel_bucket_for_the_access_log_rate():
    for rate in (1, 5, 15, 1000, 123_456):
        rl = accesslog.rate_limit(rate)
        assert rl.max_tokens == rate   # a second's worth at once
        assert abs(rl.tokens_per_fill * 1e9 / rl.fill_interval_ns - rate) / rate < 0.01, rate
        assert rl.fill_interval_ns >= 50_000   # not refilled for every record
    assert accesslog.rate_limit(0).max_tokens == 0   # no limit
