"""Envoy's traffic policy fields -> what kmesh enforces at L4 (pure functions).

A cluster's ``circuit_breakers`` (max_connections), ``connect_timeout`` and
``outlier_detection`` become a ClusterPolicy; a listener's network
``local_ratelimit`` filter becomes a RateLimit. What is set and cannot be
enforced per connection gets a note naming the field (docs/policies.md).
The kernel side is bpf/include/policy.h.
"""
from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as http_rl_pb2
from envoy.extensions.filters.network.local_ratelimit.v3 import local_rate_limit_pb2
from google.protobuf import duration_pb2

from kmesh.bpf.records import NO_POLICY, ClusterPolicy, RateLimit

LOCAL_RATELIMIT_TYPE = local_rate_limit_pb2.LocalRateLimit.DESCRIPTOR.full_name
HTTP_LOCAL_RATELIMIT_TYPE = http_rl_pb2.LocalRateLimit.DESCRIPTOR.full_name
MAX_U32 = 2**32 - 1
# Envoy's defaults (outlier_detection.proto)
DEFAULT_CONSECUTIVE = 5
DEFAULT_BASE_EJECTION_MS = 30_000
DEFAULT_MAX_EJECTION_MS = 300_000
DEFAULT_MAX_EJECTION_PERCENT = 10
MIN_FILL_INTERVAL_MS = 50   # Envoy's network local_ratelimit refuses less

_PER_REQUEST = "a per-request limit: not enforced at L4 (kmesh sees connections, not requests)"
_THRESHOLD_NOTES = {"max_pending_requests": _PER_REQUEST, "max_requests": _PER_REQUEST,
                    "max_retries": "kmesh does not retry: not enforced",
                    "retry_budget": "kmesh does not retry: not enforced",
                    "max_connection_pools": "connection pools belong to a proxy: not enforced",
                    "track_remaining": "remaining-capacity gauges are not kept by kmesh"}
_OUTLIER_APPLIED = {"consecutive_5xx", "enforcing_consecutive_5xx", "split_external_local_origin_errors",
                    "consecutive_local_origin_failure", "enforcing_consecutive_local_origin_failure",
                    "base_ejection_time", "max_ejection_time", "max_ejection_percent",
                    "interval"}   # kmesh ejects at the failure itself; un-ejects exactly when the time is up
_OUTLIER_NOT_L4 = "not enforced: kmesh sees connect failures only (no responses, no success rates)"
_LOCAL_RATELIMIT_APPLIED = {"stat_prefix", "token_bucket"}


def _ms(d: duration_pb2.Duration) -> int:
    """A Duration in whole milliseconds, rounded up (a timeout is never shortened)."""
    ns = d.seconds * 1_000_000_000 + d.nanos
    return min(MAX_U32, -(-ns // 1_000_000))


def _u32(msg, name: str, default: int) -> int:
    return getattr(msg, name).value if msg.HasField(name) else default


class _Recorder:
    """Stands in for the translator's context: keeps what was said, with
    paths relative to the cluster, to say it again for another cluster."""

    def __init__(self, lenient: bool):
        self.lenient = lenient
        self.said: list[tuple[str, str, str]] = []

    def error(self, path, reason):
        self.said.append(("error", path, reason))

    def warn(self, path, reason):
        self.said.append(("warn", path, reason))


# Every cluster of a big mesh tends to carry the same policy fields (istiod:
# the same circuit breakers and connect timeout on all 10 000): translate
# each distinct set once.
_MEMO: dict[tuple, tuple[ClusterPolicy, tuple]] = {}
_MEMO_MAX = 1024


def cluster_policy(ctx, path: str, pb: cluster_pb2.Cluster) -> ClusterPolicy:
    """The policies of the cluster at ``path``; notes and errors go to ``ctx``."""
    if not (pb.HasField("circuit_breakers") or pb.HasField("connect_timeout") or pb.HasField("outlier_detection")):
        return NO_POLICY
    key = (ctx.lenient, pb.circuit_breakers.SerializeToString(deterministic=True),
           pb.connect_timeout.seconds, pb.connect_timeout.nanos, pb.HasField("connect_timeout"),
           pb.outlier_detection.SerializeToString(deterministic=True), pb.HasField("outlier_detection"))
    got = _MEMO.get(key)
    if got is None:
        rec = _Recorder(ctx.lenient)
        got = (_cluster_policy(rec, "", pb), tuple(rec.said))
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = got
    policy, said = got
    for kind, rel, reason in said:
        getattr(ctx, kind)(path + rel, reason)
    return policy


def _cluster_policy(ctx, path: str, pb: cluster_pb2.Cluster) -> ClusterPolicy:
    max_conn = _max_connections(ctx, f"{path}.circuit_breakers", pb.circuit_breakers)
    timeout = 0
    if pb.HasField("connect_timeout"):
        timeout = _ms(pb.connect_timeout)
        if timeout == 0:
            ctx.error(f"{path}.connect_timeout", "must be greater than 0")
    outlier = (0, 0, 0, 0)
    if pb.HasField("outlier_detection"):
        outlier = _outlier(ctx, f"{path}.outlier_detection", pb.outlier_detection)
    return ClusterPolicy(max_conn, timeout, *outlier)


def _max_connections(ctx, path: str, cb: circuit_breaker_pb2.CircuitBreakers) -> int:
    """The DEFAULT priority's max_connections; 0: no limit. Envoy's implicit
    default (1024 per proxy) is not applied: kmesh governs a whole host, where
    a per-sidecar default would be far too tight."""
    limit = 0
    for i, t in enumerate(cb.thresholds):
        tpath = f"{path}.thresholds[{i}]"
        if t.priority != base_pb2.DEFAULT:
            ctx.warn(f"{tpath}.priority", "kmesh has no priority routing: only DEFAULT thresholds apply")
            continue
        set_names = {f.name for f, _ in t.ListFields()}
        for name, note in _THRESHOLD_NOTES.items():
            # unlimited (istiod sends max uint32 everywhere): nothing to enforce
            if name in set_names and getattr(getattr(t, name), "value", None) != MAX_U32:
                ctx.warn(f"{tpath}.{name}", note)
        if not t.HasField("max_connections"):
            continue
        value = t.max_connections.value
        if value == 0:
            if ctx.lenient:
                ctx.warn(f"{tpath}.max_connections", "0 would refuse every connection; not enforced")
            else:
                ctx.error(f"{tpath}.max_connections", "0 would refuse every connection; remove the cluster "
                          "from the routes instead")
            continue
        limit = 0 if value >= MAX_U32 else value
    if cb.per_host_thresholds:
        ctx.warn(f"{path}.per_host_thresholds", "per-endpoint limits are not enforced by kmesh")
    return limit


def _outlier(ctx, path: str, od: outlier_detection_pb2.OutlierDetection) -> tuple[int, int, int, int]:
    """(failures, base ms, max ms, max percent); failures 0: off. At L4 a
    failure is a failed connect: Envoy's local-origin failures when
    ``split_external_local_origin_errors`` is set, else what it counts in
    ``consecutive_5xx`` (where connect failures count as 503s)."""
    if od.split_external_local_origin_errors:
        failures = _u32(od, "consecutive_local_origin_failure", DEFAULT_CONSECUTIVE)
        enforcing = _u32(od, "enforcing_consecutive_local_origin_failure", 100)
        field = "enforcing_consecutive_local_origin_failure"
    else:
        failures = _u32(od, "consecutive_5xx", DEFAULT_CONSECUTIVE)
        enforcing = _u32(od, "enforcing_consecutive_5xx", 100)
        field = "enforcing_consecutive_5xx"
    for f, _ in od.ListFields():
        if f.name not in _OUTLIER_APPLIED:
            ctx.warn(f"{path}.{f.name}", _OUTLIER_NOT_L4)
    if enforcing == 0 or failures == 0:
        return 0, 0, 0, 0
    if enforcing < 100:
        ctx.warn(f"{path}.{field}", f"{enforcing}% enforcement is not supported: kmesh ejects every time (100%)")
    base = _ms(od.base_ejection_time) if od.HasField("base_ejection_time") else DEFAULT_BASE_EJECTION_MS
    top = _ms(od.max_ejection_time) if od.HasField("max_ejection_time") else DEFAULT_MAX_EJECTION_MS
    percent = min(100, _u32(od, "max_ejection_percent", DEFAULT_MAX_EJECTION_PERCENT))
    return failures, max(base, 1), max(top, base, 1), percent


def rate_limit(ctx, path: str, typed_config) -> RateLimit | None:
    """A network local_ratelimit filter's token bucket (None: invalid)."""
    msg = local_rate_limit_pb2.LocalRateLimit()
    typed_config.Unpack(msg)
    tb = msg.token_bucket
    bpath = f"{path}.token_bucket"
    for f, _ in msg.ListFields():
        if f.name not in _LOCAL_RATELIMIT_APPLIED:
            ctx.warn(f"{path}.{f.name}", "not applied by kmesh: the bucket is always on and per listener")
    if not msg.HasField("token_bucket") or tb.max_tokens == 0:
        ctx.error(f"{bpath}.max_tokens", "must be greater than 0")
        return None
    interval = _ms(tb.fill_interval)
    if interval < MIN_FILL_INTERVAL_MS:
        ctx.error(f"{bpath}.fill_interval", f"must be at least {MIN_FILL_INTERVAL_MS} ms, as Envoy requires")
        return None
    return RateLimit(tb.max_tokens, _u32(tb, "tokens_per_fill", 1), interval)


@dataclass(frozen=True)
class HttpRateLimit:
    """An HTTP local_ratelimit filter as the L7 hand-off listener applies it:
    one token per request it routes (the first on a connection)."""

    bucket: RateLimit
    status: int = 429
    enabled_percent: float = 100.0
    enforced_percent: float = 100.0


_HTTP_RL_APPLIED = {"stat_prefix", "status", "token_bucket", "filter_enabled", "filter_enforced"}
_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}


def _runtime_percent(msg, name: str) -> float:
    """A RuntimeFractionalPercent's default, in percent; unset: 0 (Envoy)."""
    if not msg.HasField(name):
        return 0.0
    fp = getattr(msg, name).default_value
    return 100.0 * fp.numerator / _DENOMINATORS.get(fp.denominator, 100)


def http_rate_limit(ctx, path: str, typed_config) -> HttpRateLimit | None:
    """The HTTP filter envoy.filters.http.local_ratelimit at ``path`` (None:
    does nothing, as Envoy with filter_enabled unset, or invalid)."""
    msg = http_rl_pb2.LocalRateLimit()
    typed_config.Unpack(msg)
    for f, _ in msg.ListFields():
        if f.name not in _HTTP_RL_APPLIED:
            ctx.warn(f"{path}.{f.name}", "not applied by kmesh: one bucket per listener, every request counts")
    enabled = _runtime_percent(msg, "filter_enabled")
    if not msg.HasField("token_bucket") or enabled == 0:
        ctx.warn(f"{path}.filter_enabled", "0% (Envoy's default when unset): the filter limits nothing")
        return None
    tb = msg.token_bucket
    if tb.max_tokens == 0:
        ctx.error(f"{path}.token_bucket.max_tokens", "must be greater than 0")
        return None
    interval = _ms(tb.fill_interval)
    if interval == 0:
        ctx.error(f"{path}.token_bucket.fill_interval", "must be greater than 0")
        return None
    status = msg.status.code if msg.HasField("status") and msg.status.code else 429
    return HttpRateLimit(RateLimit(tb.max_tokens, _u32(tb, "tokens_per_fill", 1), interval), status, enabled,
                         _runtime_percent(msg, "filter_enforced"))
