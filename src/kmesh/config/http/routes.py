"""Envoy RouteConfiguration -> a per-request route decision (pure functions).

``compile_routes`` checks a RouteConfiguration once and turns it into a
``RouteTable``; ``RouteTable.match`` then decides one HTTP/1.1 request the way
Envoy's router does:

* the virtual host by the Host header (lowercased): exact domain, then the
  longest suffix wildcard (``*.foo.com``, ``*-bar.foo.com``), then the longest
  prefix wildcard (``foo.*``), then ``*``. The port is part of the host unless
  ``ignore_port_in_host_matching`` is set (Istio sets it); Envoy does not retry
  without the port, so neither does kmesh;
* the first route whose path specifier, headers, query parameters and gRPC
  condition all match; paths are matched without the query and fragment;
* its action: forward (clusters, timeout, retries, fault, rewrites), a direct
  response, or a redirect whose Location is built as Envoy builds it.

Every field that is set is either applied, or reported: ``problem`` for what
Envoy would refuse or kmesh cannot do safely (the table is then not built),
``note`` for what is accepted but not enforced. Nothing is ignored silently,
except ``name`` and ``metadata``, which change no behaviour.

What the caller owns: the HTTP connection manager's own settings (path
normalisation, port stripping, which HTTP filters run: a per-route fault only
takes effect when the fault filter is in the chain, and that filter's own
config applies where no level of the route configuration sets one), the
absolute-form request target, and the ``x-forwarded-proto`` header (``http``
when absent, as Envoy sets it on a plaintext connection).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from google.protobuf import any_pb2
import re2

from kmesh.config import fields
from kmesh.config.http import headers as hdr
from kmesh.config.http import match as m
from kmesh.config.http.headers import HeaderOps

DEFAULT_TIMEOUT_MS = 15_000            # RouteAction.timeout when unset
DEFAULT_MAX_BODY = 4096                # RouteConfiguration.max_direct_response_body_size_bytes
FAULT_FILTER = "envoy.filters.http.fault"

_FAULT_TYPE = fault_pb2.HTTPFault.DESCRIPTOR.full_name
_FILTER_CONFIG_TYPE = route_components_pb2.FilterConfig.DESCRIPTOR.full_name
_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}
_TLS_NONE, _TLS_EXTERNAL_ONLY, _TLS_ALL = 0, 1, 2


# --------------------------------------------------------------------------
# What the caller sees
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Fault:
    """An HTTP fault to inject; percents are 0..100."""
    abort_status: int | None
    abort_percent: float
    delay_ms: int | None
    delay_percent: float


@dataclass(frozen=True, slots=True)
class Mirror:
    """A request_mirror_policy: a copy of the request goes to ``cluster``
    (its answer is dropped), for ``percent`` of requests."""
    cluster: str
    percent: float = 100.0
    shadow_suffix: bool = True      # the copy's Host gets '-shadow' (before a port)

    def host(self, host: str) -> str:
        """The Host of the copy (Envoy's shadowAppendedHost)."""
        if not self.shadow_suffix:
            return host
        p = _port_start(host)
        return f"{host}-shadow" if p < 0 else f"{host[:p]}-shadow{host[p:]}"


@dataclass(frozen=True, slots=True)
class RouteTo:
    """Forward upstream. ``clusters`` are (name, weight): draw one with
    ``pick_weighted``. ``timeout_ms`` None: no timeout. ``retries`` counts
    retries after a failed connect (``retry``: the whole policy)."""
    clusters: tuple[tuple[str, int], ...]
    timeout_ms: int | None
    retries: int
    fault: Fault | None
    route_name: str
    vhost_name: str
    rewrite_path: str | None = None     # the new request target (query kept)
    rewrite_host: str | None = None     # the new Host header
    # Some level of the route configuration configures the fault filter:
    # then ``fault`` is the fault, and the filter's own config does not apply.
    fault_set: bool = False
    # Header mutations of the route, virtual host and route configuration,
    # in the order they apply; a weighted cluster's own, by cluster name,
    # come first whatever most_specific_header_mutations_wins says (Envoy
    # evaluates them before the route's chain).
    request_headers: tuple[HeaderOps, ...] = ()
    response_headers: tuple[HeaderOps, ...] = ()
    # (cluster, request ops, response ops, host_rewrite_literal): a weighted
    # cluster's own.
    cluster_headers: tuple[tuple[str, HeaderOps | None, HeaderOps | None, str | None], ...] = ()
    most_specific_last: bool = False
    retry: "Retry | None" = None
    attempt_count_request: bool = False     # include_request_attempt_count
    attempt_count_response: bool = False    # include_attempt_count_in_response
    buffer_limit: int | None = None         # per_request_buffer_limit_bytes: a body held for retries
    mirrors: tuple[Mirror, ...] = ()

    def _levels(self, cluster: str, mine: tuple[HeaderOps, ...], which: int) -> tuple[HeaderOps, ...]:
        own = next((c[which] for c in self.cluster_headers if c[0] == cluster), None)
        if own is None:
            return mine
        return (own,) + mine

    def host_for(self, cluster: str) -> str | None:
        """The Host to send to ``cluster``: the route's host_rewrite_literal,
        else the weighted cluster's (Envoy sets the cluster's first and the
        route's over it), else None (the request's)."""
        if self.rewrite_host is not None:
            return self.rewrite_host
        return next((c[3] for c in self.cluster_headers if c[0] == cluster), None)

    def request_levels(self, cluster: str) -> tuple[HeaderOps, ...]:
        """The request header mutations for a request sent to ``cluster``."""
        return self._levels(cluster, self.request_headers, 1)

    def response_levels(self, cluster: str) -> tuple[HeaderOps, ...]:
        """The response header mutations (also on the hand-off's own
        answers to the request: Envoy applies them to local replies)."""
        return self._levels(cluster, self.response_headers, 2)


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes
    response_headers: tuple[HeaderOps, ...] = ()
    # A level of the route configuration configures the fault filter: kmesh
    # injects no fault here (warned), and the filter's own does not apply.
    fault_set: bool = False
    location: bool = False      # a Location header with the request's URL


@dataclass(frozen=True, slots=True)
class Redirect:
    status: int
    location: str
    response_headers: tuple[HeaderOps, ...] = ()
    fault_set: bool = False     # as DirectResponse's


Decision = RouteTo | DirectResponse | Redirect


@dataclass(frozen=True, slots=True)
class TableOptions:
    """RouteConfiguration-wide settings that shape matching."""
    ignore_port_in_host_matching: bool = False
    ignore_path_parameters: bool = False
    max_direct_response_body_size: int = DEFAULT_MAX_BODY
    most_specific_last: bool = False       # most_specific_header_mutations_wins


# --------------------------------------------------------------------------
# Drawing a weighted cluster
# --------------------------------------------------------------------------
def pick_weighted(clusters: Sequence[tuple[str, int]], rnd: float) -> str:
    """The cluster that ``rnd`` (in [0, 1)) falls on, each cluster owning a
    share of [0, 1) in proportion to its weight, in order (as Envoy does with
    its random value modulo the total weight)."""
    total = sum(w for _, w in clusters)
    if total <= 0:
        raise ValueError("no cluster has a weight")
    target, acc, last = rnd * total, 0, None
    for name, weight in clusters:
        if weight > 0:
            acc += weight
            last = name
            if target < acc:
                return name
    return last     # rnd * total rounded up to total


# --------------------------------------------------------------------------
# Faults (typed_per_filter_config)
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _FaultRule:
    """The fault filter's setting at one level (route, virtual host, route
    configuration); the most specific level wins whole, as in Envoy.
    ``fault`` None: the filter is disabled there or configures nothing."""
    fault: Fault | None
    headers: tuple[m.HeaderCond, ...] = ()

    def applies(self, view: m.View) -> bool:
        return all(h(view) for h in self.headers)


def _fault_abort(sink: m.Sink, path: str, a) -> tuple[int | None, float]:
    m.check_fields(sink, path, a, ("http_status", "percentage"),
                  {"grpc_status": "gRPC aborts need HTTP/2; kmesh routes HTTP/1.1"},
                  {"header_abort": f"aborts asked for by a request header are {fields.NOT_ENFORCED}"})
    kind = a.WhichOneof("error_type")
    if kind is None:
        sink.problem(path, "an abort needs http_status, grpc_status or header_abort")
    if kind != "http_status":
        return None, 0.0
    if not 200 <= a.http_status < 600:
        sink.problem(f"{path}.http_status", "must be in [200, 600)")
    return a.http_status, m.percent(sink, f"{path}.percentage", a.percentage)


def _fault_delay(sink: m.Sink, path: str, d) -> tuple[int | None, float]:
    m.check_fields(sink, path, d, ("fixed_delay", "percentage"),
                  notes={"header_delay": f"delays asked for by a request header are {fields.NOT_ENFORCED}"})
    kind = d.WhichOneof(d.DESCRIPTOR.oneofs[0].name)
    if kind is None:
        sink.problem(path, "a delay needs fixed_delay or header_delay")
    if kind != "fixed_delay":
        return None, 0.0
    ms = m.duration_ms(sink, f"{path}.fixed_delay", d.fixed_delay)
    if ms is not None and d.fixed_delay.seconds == d.fixed_delay.nanos == 0:
        sink.problem(f"{path}.fixed_delay", "must be greater than 0")
    return ms, m.percent(sink, f"{path}.percentage", d.percentage)


def _fault_rule(sink: m.Sink, path: str, hf: fault_pb2.HTTPFault) -> _FaultRule:
    fields.check(hf, path, sink.problem, sink.note)
    status, abort_pct = _fault_abort(sink, f"{path}.abort", hf.abort) if hf.HasField("abort") else (None, 0.0)
    delay, delay_pct = _fault_delay(sink, f"{path}.delay", hf.delay) if hf.HasField("delay") else (None, 0.0)
    headers = tuple(c for i, h in enumerate(hf.headers) if (c := m.header_cond(sink, f"{path}.headers[{i}]", h)))
    if status is None and delay is None:
        return _FaultRule(None)
    return _FaultRule(Fault(status, abort_pct, delay, delay_pct), headers)


def _unwrap_filter_config(any_: any_pb2.Any) -> tuple[any_pb2.Any, bool]:
    """(the filter's own config, whether the filter is disabled here): an
    envoy.config.route.v3.FilterConfig wraps a config with flags."""
    if any_.TypeName() != _FILTER_CONFIG_TYPE:
        return any_, False
    fc = route_components_pb2.FilterConfig()
    any_.Unpack(fc)
    return fc.config, fc.disabled


def _per_filter(sink: m.Sink, path: str, configs: Mapping[str, any_pb2.Any]) -> _FaultRule | None:
    """The fault rule of one level's typed_per_filter_config (None: none at
    this level); every other filter's config is noted."""
    rule = None
    for key in sorted(configs):
        kpath = f'{path}["{key}"]'
        wrapped = configs[key].TypeName() == _FILTER_CONFIG_TYPE
        config, disabled = _unwrap_filter_config(configs[key])
        is_fault = config.TypeName() == _FAULT_TYPE
        if not is_fault and not (disabled and key == FAULT_FILTER):
            sink.note(kpath, f"per-route config of filter '{key}' ({config.TypeName() or 'no type'}): {fields.NOT_ENFORCED}")
            continue
        if rule is not None:
            sink.problem(kpath, "more than one fault filter config: kmesh applies one fault filter")
            continue
        if disabled:
            rule = _FaultRule(None)
            continue
        hf = fault_pb2.HTTPFault()
        if not config.Unpack(hf):
            sink.problem(kpath, "cannot decode the HTTPFault config")
            continue
        if wrapped:
            kpath += ".config"
        rule = _fault_rule(sink, kpath, hf)
    return rule


@dataclass(frozen=True, slots=True)
class FilterFault:
    """The fault filter's own config in an HTTP connection manager: the fault
    for requests whose route configuration sets none at any level."""
    rule: _FaultRule

    def for_request(self, req: m.Request) -> Fault | None:
        rule = self.rule
        return rule.fault if not rule.headers or rule.applies(m.View(req, False)) else None


def filter_fault(config: any_pb2.Any, path: str, problem: m.Report, note: m.Report) -> FilterFault | None:
    """The fault filter's own config (``config``: its typed_config), or None
    when it injects nothing."""
    sink = m.Sink(problem, note)
    hf = fault_pb2.HTTPFault()
    if not config.Unpack(hf):
        sink.problem(path, "cannot decode the HTTPFault config")
        return None
    rule = _fault_rule(sink, path, hf)
    return FilterFault(rule) if rule.fault is not None else None


def _has_fault(configs: Mapping[str, any_pb2.Any]) -> bool:
    if not configs:
        return False   # the common case, checked per virtual host of big meshes
    for any_ in configs.values():
        config, disabled = _unwrap_filter_config(any_)
        if not disabled and config.TypeName() == _FAULT_TYPE:
            return True
    return False


# --------------------------------------------------------------------------
# Retries, rewrites
# --------------------------------------------------------------------------

# retry_on conditions (Envoy's router, RetryStateImpl). A failed connect is
# retried by all of the first group; a reset or close before the response
# head, and a per-try timeout, by 5xx, gateway-error and reset.
_RETRY_CONNECT = {"connect-failure", "5xx", "gateway-error", "reset", "reset-before-request"}
_RETRY_RESET = {"5xx", "gateway-error", "reset"}
# Conditions that cannot happen on an HTTP/1.1 upstream: nothing to do.
_RETRY_NEVER = {"refused-stream", "http3-post-connect-failure"}
# gRPC status names (in a trailers-only response head) -> codes.
_RETRY_GRPC = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13, "unavailable": 14}
_RETRY_KNOWN = _RETRY_CONNECT | _RETRY_NEVER | set(_RETRY_GRPC) | {
    "retriable-4xx", "retriable-status-codes", "envoy-ratelimited", "retriable-headers"}
_RETRY_APPLIED = ("retry_on", "num_retries", "per_try_timeout", "retriable_status_codes", "retry_back_off",
                  "retry_host_predicate", "host_selection_retry_max_attempts", "retriable_headers",
                  "retriable_request_headers")
_PREVIOUS_HOSTS = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
DEFAULT_RETRY_BASE_MS = 25          # Envoy's retry back-off base interval


@dataclass(frozen=True, slots=True)
class Retry:
    """A route's retry policy, as Envoy's router applies it to one request."""
    num_retries: int
    on_connect_failure: bool                # a connect that failed or timed out
    on_reset: bool                          # reset/closed before the response head; a per-try timeout
    on_5xx: bool
    on_gateway_error: bool                  # 502, 503, 504
    statuses: frozenset[int] = frozenset()  # retriable-status-codes, retriable-4xx (409)
    grpc: frozenset[int] = frozenset()      # grpc-status values
    on_ratelimited: bool = False            # x-envoy-ratelimited in the response
    retriable_headers: tuple = ()           # m.HeaderCond over the response (retriable-headers)
    request_headers: tuple = ()             # m.HeaderCond: only requests matching one are retried
    per_try_timeout_ms: int | None = None
    base_ms: int = DEFAULT_RETRY_BASE_MS
    max_ms: int = 10 * DEFAULT_RETRY_BASE_MS
    other_hosts: bool = False               # previous_hosts: a retry goes to another endpoint

    def applies(self, req: m.Request) -> bool:
        """Whether this request may be retried at all."""
        if not self.request_headers:
            return True
        view = m.View(req, False)
        return any(c(view) for c in self.request_headers)

    def on_response(self, status: int, headers: Sequence[tuple[str, str]]) -> bool:
        """Whether a response with this head is retried."""
        if self.on_5xx and status >= 500 or self.on_gateway_error and status in (502, 503, 504) \
                or status in self.statuses:
            return True
        if self.grpc or self.on_ratelimited or self.retriable_headers:
            lower = [(n.lower(), v) for n, v in headers]
            if self.on_ratelimited and any(n == "x-envoy-ratelimited" for n, _ in lower):
                return True
            if self.grpc and any(n == "grpc-status" and v.strip().isdigit() and int(v) in self.grpc
                                 for n, v in lower):
                return True
            if self.retriable_headers:
                view = m.View(m.Request("", "/", "", tuple(lower)), False)
                return any(c(view) for c in self.retriable_headers)
        return False

    @property
    def connect_only(self) -> bool:
        """Only failed connects are retried (what a spliced connection does
        too: kmesh.l7.handoff)."""
        return not (self.on_reset or self.on_5xx or self.on_gateway_error or self.statuses or self.grpc
                    or self.on_ratelimited or self.retriable_headers or self.per_try_timeout_ms)

    def back_off(self, attempt: int, rnd: float) -> float:
        """Seconds to wait before retry ``attempt`` (1, 2, ...): Envoy's fully
        jittered exponential back-off."""
        return rnd * min(self.base_ms * (1 << (attempt - 1)), self.max_ms) / 1000


class _Recorder:
    """A m.Sink that records what is reported, relative to a path."""
    __slots__ = ("said", "failed")

    def __init__(self):
        self.said: list[tuple[bool, str, str]] = []
        self.failed = False

    def problem(self, path: str, reason: str) -> None:
        self.failed = True
        self.said.append((True, path, reason))

    def note(self, path: str, reason: str) -> None:
        self.said.append((False, path, reason))


# istiod puts the same retry policy on every route: compiled once per text.
_RETRY_MEMO: dict[bytes, tuple[Retry | None, tuple]] = {}
_RETRY_MEMO_MAX = 256


def _retry(sink: m.Sink, path: str, rp) -> Retry | None:
    """The retry policy (compiled once per distinct policy); None when no
    condition of it can ever fire."""
    key = rp.SerializeToString(deterministic=True)
    got = _RETRY_MEMO.get(key)
    if got is None:
        rec = _Recorder()
        got = _retry_uncached(rec, "", rp), tuple(rec.said)
        if len(_RETRY_MEMO) >= _RETRY_MEMO_MAX:
            _RETRY_MEMO.clear()
        _RETRY_MEMO[key] = got
    for is_problem, rel, reason in got[1]:
        (sink.problem if is_problem else sink.note)(path + rel, reason)
    return got[0]


def _retry_uncached(sink, path: str, rp) -> Retry | None:
    m.check_fields(sink, path, rp, _RETRY_APPLIED)
    conds = {c.strip() for c in rp.retry_on.split(",") if c.strip()}
    for cond in sorted(conds - _RETRY_KNOWN):
        sink.note(f"{path}.retry_on", f"'{cond}': unknown retry condition (Envoy ignores it)")
    statuses = set()
    if "retriable-4xx" in conds:
        statuses.add(409)
    if "retriable-status-codes" in conds:
        statuses.update(rp.retriable_status_codes)
    elif rp.retriable_status_codes:
        sink.note(f"{path}.retriable_status_codes", "set without 'retriable-status-codes' in retry_on: "
                  "not used (as in Envoy)")
    conds_hdr = ()
    if "retriable-headers" in conds:
        conds_hdr = tuple(m.header_cond(sink, f"{path}.retriable_headers[{i}]", h)
                          for i, h in enumerate(rp.retriable_headers))
    req_hdr = tuple(m.header_cond(sink, f"{path}.retriable_request_headers[{i}]", h)
                    for i, h in enumerate(rp.retriable_request_headers))
    other_hosts = False
    for i, pred in enumerate(rp.retry_host_predicate):
        tname = pred.typed_config.TypeName() if pred.HasField("typed_config") else ""
        if tname == _PREVIOUS_HOSTS or pred.name == "envoy.retry_host_predicates.previous_hosts":
            other_hosts = True
        else:
            sink.note(f"{path}.retry_host_predicate[{i}]", fields.NOT_ENFORCED)
    per_try = m.duration_ms(sink, f"{path}.per_try_timeout", rp.per_try_timeout) \
        if rp.HasField("per_try_timeout") else None
    base, top = DEFAULT_RETRY_BASE_MS, None
    if rp.HasField("retry_back_off"):
        bo = rp.retry_back_off
        m.check_fields(sink, f"{path}.retry_back_off", bo, ("base_interval", "max_interval"))
        base = m.duration_ms(sink, f"{path}.retry_back_off.base_interval", bo.base_interval) or 0
        if base <= 0:
            sink.problem(f"{path}.retry_back_off.base_interval", "must be greater than 0 (as in Envoy)")
        if bo.HasField("max_interval"):
            top = m.duration_ms(sink, f"{path}.retry_back_off.max_interval", bo.max_interval) or 0
            if top < base:
                sink.problem(f"{path}.retry_back_off.max_interval", "must be at least base_interval (as in Envoy)")
    num = rp.num_retries.value if rp.HasField("num_retries") else 1
    grpc = frozenset(code for name, code in _RETRY_GRPC.items() if name in conds)
    retry = Retry(num, bool(conds & _RETRY_CONNECT), bool(conds & _RETRY_RESET), "5xx" in conds,
                  "gateway-error" in conds, frozenset(statuses), grpc, "envoy-ratelimited" in conds,
                  tuple(c for c in conds_hdr if c is not None), tuple(c for c in req_hdr if c is not None),
                  per_try or None, base, top if top is not None else 10 * base, other_hosts)
    fires = retry.on_connect_failure or retry.on_reset or retry.on_5xx or retry.on_gateway_error or statuses \
        or grpc or retry.on_ratelimited or retry.retriable_headers
    return retry if num > 0 and fires else None


@dataclass(frozen=True, slots=True)
class _PathRewrite:
    """prefix_rewrite (the matched prefix, or the whole path of a regex route,
    is replaced) or regex_rewrite (over the path; the query is kept)."""
    prefix: str
    rx: re2._Regexp | None = None
    substitution: tuple[str | int, ...] = ()

    def apply(self, target: str, matched_len: int) -> str:
        if self.rx is None:
            return self.prefix + target[matched_len:]
        end = m.query_start(target)
        return m.replace_all(self.rx, self.substitution, target[:end]) + target[end:]


def _path_rewrite(sink: m.Sink, path: str, prefix: str, msg, has_regex: bool) -> _PathRewrite | None:
    """The path rewrite of a RouteAction or RedirectAction (``msg``); None: none."""
    if prefix and has_regex:
        sink.problem(path, "specify only one of prefix_rewrite, regex_rewrite or path_rewrite_policy")
        return None
    if prefix:
        return _PathRewrite(prefix)
    if not has_regex:
        return None
    rpath = f"{path}.regex_rewrite"
    m.check_fields(sink, rpath, msg.regex_rewrite, ("pattern", "substitution"))
    if not msg.regex_rewrite.HasField("pattern"):
        sink.problem(f"{rpath}.pattern", "required")
        return None
    rx = m.regex(sink, f"{rpath}.pattern", msg.regex_rewrite.pattern)
    if rx is None:
        return None
    parts, why = m.substitution(msg.regex_rewrite.substitution, rx.groups)
    if parts is None:
        sink.problem(f"{rpath}.substitution", why)
        return None
    return _PathRewrite("", rx, parts)


# --------------------------------------------------------------------------
# Header mutations
# --------------------------------------------------------------------------


def _mutations(sink: m.Sink, path: str, msg) -> tuple[HeaderOps | None, HeaderOps | None]:
    """The request and response header mutations ``msg`` (a route, virtual
    host, route configuration or weighted cluster) sets at its own level."""
    if not (msg.request_headers_to_add or msg.request_headers_to_remove or msg.response_headers_to_add
            or msg.response_headers_to_remove):
        return None, None
    return (hdr.compile_ops(msg.request_headers_to_add, msg.request_headers_to_remove, path,
                            "request_headers_to_add", "request_headers_to_remove", sink.problem, sink.note),
            hdr.compile_ops(msg.response_headers_to_add, msg.response_headers_to_remove, path,
                            "response_headers_to_add", "response_headers_to_remove", sink.problem, sink.note))


def _outer(level: HeaderOps | None, outer: tuple[HeaderOps, ...], most_specific_last: bool) -> tuple[HeaderOps, ...]:
    """A level's mutations with those of the levels around it, in the order
    Envoy applies them: the most specific first, unless
    most_specific_header_mutations_wins puts it last."""
    if level is None:
        return outer
    return outer + (level,) if most_specific_last else (level,) + outer


# --------------------------------------------------------------------------
# m.Request mirroring
# --------------------------------------------------------------------------

_MIRROR_APPLIED = ("cluster", "runtime_fraction", "disable_shadow_host_suffix_append",
                   "trace_sampled")   # trace_sampled: only tracing would see it, and kmesh does not trace
_MIRROR_PROBLEMS = {"cluster_header": "choosing the mirror cluster from a request header is not supported by kmesh"}


def _mirrors(sink: m.Sink, path: str, policies) -> tuple[Mirror, ...] | None:
    """request_mirror_policies at ``path``; None when none is set (the level
    around applies: Envoy takes the most specific non-empty list)."""
    if not policies:
        return None
    out = []
    for i, mp in enumerate(policies):
        mpath = f"{path}[{i}]"
        m.check_fields(sink, mpath, mp, _MIRROR_APPLIED, _MIRROR_PROBLEMS)
        if mp.cluster_header:
            continue
        if not mp.cluster:
            sink.problem(f"{mpath}.cluster", "a mirror policy needs a cluster")
            continue
        percent = 100.0
        if mp.HasField("runtime_fraction"):
            rf = mp.runtime_fraction
            if rf.runtime_key:
                sink.note(f"{mpath}.runtime_fraction.runtime_key", "runtime overrides are not enforced by kmesh; "
                          "default_value applies")
            percent = m.percent(sink, f"{mpath}.runtime_fraction.default_value", rf.default_value)
        out.append(Mirror(mp.cluster, percent, not mp.disable_shadow_host_suffix_append))
    return tuple(out)


# --------------------------------------------------------------------------
# Route actions
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _VHostCtx:
    """What a virtual host (and the route configuration) hands its routes."""
    name: str
    retry: Retry | None
    fault: _FaultRule | None
    max_body: int
    request_headers: tuple[HeaderOps, ...] = ()     # the virtual host's and route configuration's
    response_headers: tuple[HeaderOps, ...] = ()
    most_specific_last: bool = False
    attempt_count_request: bool = False
    attempt_count_response: bool = False
    buffer_limit: int | None = None
    mirrors: tuple[Mirror, ...] = ()       # the virtual host's, else the route configuration's


@dataclass(frozen=True, slots=True)
class _Forward:
    base: RouteTo
    rewrite: _PathRewrite | None
    fault: _FaultRule | None
    explicit_timeout: bool = False      # a non-zero timeout the config sets

    def per_request(self) -> bool:
        """Whether anything but the choice of cluster applies to each request
        (what a connection decided at connect() could not do)."""
        b = self.base
        return bool(self.rewrite is not None or self.fault is not None or self.explicit_timeout
                    or b.rewrite_host is not None or b.request_headers or b.response_headers or b.cluster_headers
                    or b.retry is not None or b.mirrors or b.attempt_count_request or b.attempt_count_response)

    def decide(self, view: m.View, pm: m.PathMatch) -> RouteTo:
        changes = {}
        if self.rewrite is not None:
            target = view.req.path
            changes["rewrite_path"] = self.rewrite.apply(target, pm.matched_len(target))
        if self.fault is not None and self.fault.headers and not self.fault.applies(view):
            changes["fault"] = None
        return replace(self.base, **changes) if changes else self.base


@dataclass(frozen=True, slots=True)
class _Fixed:
    decision: DirectResponse | Redirect

    def decide(self, view: m.View, pm: m.PathMatch) -> DirectResponse | Redirect:
        return self.decision


def _redirect_host(host: str, scheme: str, port: str, forwarded_proto: str) -> str:
    """The request's host for a Location (Envoy's processRequestHost): without
    its port when a new port is set, or when the scheme changes and the port
    is the old scheme's default."""
    if not host:
        return host
    if host[0] == "[":
        end = host.rfind("]:")
        end = end + 1 if end >= 0 else -1
    else:
        end = host.rfind(":")
    if end < 0:
        return host
    old_port = host[end:]
    remove = bool(port) or (scheme != forwarded_proto and (
        (forwarded_proto == "https" and old_port == ":443") or (forwarded_proto == "http" and old_port == ":80")))
    return host[:end] if remove else host


@dataclass(frozen=True, slots=True)
class _Redirect:
    status: int
    response_headers: tuple[HeaderOps, ...]
    scheme: str             # "" keeps the request's
    host: str               # "" keeps the request's
    port: str               # ":8080" or ""
    path: str               # path_redirect
    rewrite: _PathRewrite | None
    strip_query: bool
    fault_set: bool = False

    def decide(self, view: m.View, pm: m.PathMatch) -> Redirect:
        target = view.req.path
        if self.rewrite is not None:
            target = self.rewrite.apply(target, pm.matched_len(target))
        scheme = self.scheme or "http"
        host = self.host or _redirect_host(view.req.host, scheme, self.port, view.headers["x-forwarded-proto"])
        path_has_query = "?" in self.path
        if self.path:
            q = target.find("?")
            final = self.path if path_has_query or q < 0 else self.path + target[q:]
        else:
            final = target
        if not final.startswith("/"):
            final = "/" + final
        if self.strip_query and not path_has_query:
            final = final.split("?", 1)[0]
        return Redirect(self.status, f"{scheme}://{host}{self.port}{final}", self.response_headers, self.fault_set)


def _weighted(sink: m.Sink, path: str, wc, own: dict | None = None) -> tuple[tuple[str, int], ...] | None:
    """The (name, weight) of each cluster; ``own``: gets each one's header
    mutations by name."""
    fields.check(wc, path, sink.problem, sink.note)
    if not wc.clusters:
        sink.problem(f"{path}.clusters", "needs at least one cluster")
        return None
    out = []
    for i, cw in enumerate(wc.clusters):
        cpath = f"{path}.clusters[{i}]"
        fields.check(cw, cpath, sink.problem, sink.note)
        mutations = _mutations(sink, cpath, cw)
        if own is not None and (mutations != (None, None) or cw.host_rewrite_literal):
            own[cw.name] = (*mutations, cw.host_rewrite_literal or None)
        if not cw.name and not cw.cluster_header:
            sink.problem(f"{cpath}.name", "a weighted cluster needs a name")
        elif not cw.HasField("weight"):
            sink.problem(f"{cpath}.weight", "required")
        elif cw.name:
            out.append((cw.name, cw.weight.value))
    if len(out) != len(wc.clusters):
        return None
    if sum(w for _, w in out) == 0:
        sink.problem(f"{path}.clusters", "the sum of the weights must be greater than 0")
        return None
    return tuple(out)


def _clusters(sink: m.Sink, path: str, ra, own: dict) -> tuple[tuple[str, int], ...] | None:
    which = ra.WhichOneof("cluster_specifier")
    if which == "cluster":
        if ra.cluster:
            return ((ra.cluster, 1),)
        sink.problem(f"{path}.cluster", "must not be empty")
    elif which == "weighted_clusters":
        return _weighted(sink, f"{path}.weighted_clusters", ra.weighted_clusters, own)
    elif which is None:
        sink.problem(path, "a route action needs cluster or weighted_clusters")
    return None     # the other specifiers are reported with the other fields


def _forward(sink: m.Sink, path: str, ra, route_name: str, vh: _VHostCtx, fault: _FaultRule | None,
             mutations: tuple[HeaderOps | None, HeaderOps | None], buffer_limit: int | None) -> _Forward | None:
    fields.check(ra, path, sink.problem, sink.note)
    own: dict = {}
    clusters = _clusters(sink, path, ra, own)
    timeout = m.duration_ms(sink, f"{path}.timeout", ra.timeout) if ra.HasField("timeout") else DEFAULT_TIMEOUT_MS
    retry = _retry(sink, f"{path}.retry_policy", ra.retry_policy) if ra.HasField("retry_policy") else vh.retry
    mirrors = _mirrors(sink, f"{path}.request_mirror_policies", ra.request_mirror_policies)
    retries = retry.num_retries if retry is not None and retry.on_connect_failure else 0
    rewrite = _path_rewrite(sink, path, ra.prefix_rewrite, ra, ra.HasField("regex_rewrite"))
    if clusters is None:
        return None
    base = RouteTo(clusters, timeout or None, retries, fault.fault if fault else None, route_name, vh.name,
                   rewrite_host=ra.host_rewrite_literal or None, fault_set=fault is not None,
                   request_headers=_outer(mutations[0], vh.request_headers, vh.most_specific_last),
                   response_headers=_outer(mutations[1], vh.response_headers, vh.most_specific_last),
                   cluster_headers=tuple((name, *m) for name, m in own.items()),
                   most_specific_last=vh.most_specific_last, retry=retry,
                   attempt_count_request=vh.attempt_count_request, attempt_count_response=vh.attempt_count_response,
                   buffer_limit=buffer_limit if buffer_limit is not None else vh.buffer_limit,
                   mirrors=mirrors if mirrors is not None else vh.mirrors)
    return _Forward(base, rewrite, fault, bool(ra.HasField("timeout") and timeout))


_REDIRECT_APPLIED = ("https_redirect", "scheme_redirect", "host_redirect", "port_redirect", "path_redirect",
                     "prefix_rewrite", "regex_rewrite", "response_code", "strip_query")


def _redirect(sink: m.Sink, path: str, ra, response_headers: tuple[HeaderOps, ...]) -> _Redirect | None:
    m.check_fields(sink, path, ra, _REDIRECT_APPLIED)
    status = _REDIRECT_CODES.get(ra.response_code)
    if status is None:
        sink.problem(f"{path}.response_code", f"unknown response code {ra.response_code}")
        return None
    rewrite = _path_rewrite(sink, path, ra.prefix_rewrite, ra, ra.HasField("regex_rewrite"))
    scheme = ra.scheme_redirect or ("https" if ra.https_redirect else "")
    return _Redirect(status, response_headers, scheme, ra.host_redirect, f":{ra.port_redirect}" if ra.port_redirect else "",
                     ra.path_redirect, rewrite, ra.strip_query)


def _body(sink: m.Sink, path: str, ds, max_body: int) -> bytes | None:
    m.check_fields(sink, path, ds, ("inline_string", "inline_bytes"), {
        "filename": "response bodies from files are not supported by kmesh; use inline_string or inline_bytes",
        "environment_variable": "response bodies from the environment are not supported by kmesh; "
                                "use inline_string or inline_bytes",
    })
    kind = ds.WhichOneof("specifier")
    if kind not in ("inline_string", "inline_bytes"):
        return None
    body = ds.inline_bytes if kind == "inline_bytes" else ds.inline_string.encode()
    if len(body) > max_body:
        sink.problem(path, f"response body size is {len(body)} bytes; maximum is {max_body} "
                           "(max_direct_response_body_size_bytes)")
        return None
    return body


def _direct(sink: m.Sink, path: str, dr, max_body: int, response_headers: tuple[HeaderOps, ...]) -> _Fixed | None:
    m.check_fields(sink, path, dr, ("status", "body"))
    if not 200 <= dr.status < 600:
        sink.problem(f"{path}.status", "must be in [200, 600)")
        return None
    body = _body(sink, f"{path}.body", dr.body, max_body) if dr.HasField("body") else b""
    if body is None:
        return None
    # Envoy names the request's URL in a Location for 201 and 3xx (RFC 9110 10.2.2).
    return _Fixed(DirectResponse(dr.status, body, response_headers, location=dr.status == 201 or 300 <= dr.status < 400))


# --------------------------------------------------------------------------
# Routes and virtual hosts
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class _Route:
    path: m.PathMatch
    conditions: tuple[Callable[[m.View], bool], ...]
    action: _Forward | _Fixed | _Redirect

    def decide(self, view: m.View) -> Decision | None:
        if self.path.matches(view.path) and all(c(view) for c in self.conditions):
            return self.action.decide(view, self.path)
        return None


def _action(sink: m.Sink, rpath: str, route, vh: _VHostCtx, fault: _FaultRule | None):
    mutations = _mutations(sink, rpath, route)
    kind = route.WhichOneof("action")
    if kind is None:
        sink.problem(rpath, "a route needs route, redirect or direct_response")
        return None
    if kind != "route" and fault is not None and fault.fault is not None:
        sink.note(f"{rpath}.{kind}", "fault injection is not applied to redirects and direct responses by kmesh")
    if kind == "route":
        return _forward(sink, f"{rpath}.route", route.route, route.name, vh, fault, mutations,
                        route.per_request_buffer_limit_bytes.value if route.HasField("per_request_buffer_limit_bytes")
                        else None)
    response_headers = _outer(mutations[1], vh.response_headers, vh.most_specific_last)
    if kind == "redirect":
        redirect = _redirect(sink, f"{rpath}.redirect", route.redirect, response_headers)
        return replace(redirect, fault_set=True) if redirect is not None and fault is not None else redirect
    if kind == "direct_response":
        direct = _direct(sink, f"{rpath}.direct_response", route.direct_response, vh.max_body, response_headers)
        if direct is not None and fault is not None:
            return _Fixed(replace(direct.decision, fault_set=True))
        return direct
    return None     # filter_action, non_forwarding_action: reported with the other fields


def _route(sink: m.Sink, rpath: str, route, vh: _VHostCtx) -> _Route | None:
    fields.check(route, rpath, sink.problem, sink.note)
    mpath = f"{rpath}.match"
    m.check_fields(sink, mpath, route.match, m.MATCH_APPLIED, m.MATCH_PROBLEMS, strict=True)
    pm = m.path_match(sink, mpath, route.match)
    conditions = m.conditions(sink, mpath, route.match)
    fault = _per_filter(sink, f"{rpath}.typed_per_filter_config", route.typed_per_filter_config)
    action = _action(sink, rpath, route, vh, fault if fault is not None else vh.fault)
    if pm is None or action is None:
        return None
    return _Route(pm, conditions, action)


@dataclass(frozen=True, slots=True, eq=False)
class _VHost:
    name: str
    routes: tuple[_Route, ...]
    require_tls: int

    def decided_at_connect(self) -> bool:
        """Whether every request gets what its first route gives a whole
        connection: that route takes every request (prefix '/' or '', no
        condition) and does nothing to a request but pick its cluster."""
        if self.require_tls or not self.routes:
            return False
        first = self.routes[0]
        return (isinstance(first.path, m.Prefix) and first.path.prefix in ("", "/") and not first.conditions
                and isinstance(first.action, _Forward) and not first.action.per_request())

    def decide(self, view: m.View) -> Decision | None:
        if self.require_tls and view.headers["x-forwarded-proto"] != "https" and (
                self.require_tls == _TLS_ALL or view.headers.get("x-envoy-internal") != "true"):
            req = view.req
            return Redirect(301, f"https://{req.host}{req.path}")
        for route in self.routes:
            decision = route.decide(view)
            if decision is not None:
                return decision
        return None


def _vhost(sink: m.Sink, vpath: str, vh, options: TableOptions, rc_fault: _FaultRule | None,
           rc_mutations: tuple[HeaderOps | None, HeaderOps | None], rc_mirrors: tuple[Mirror, ...]) -> _VHost | None:
    fields.check(vh, vpath, sink.problem, sink.note)
    if not vh.name:
        sink.problem(f"{vpath}.name", "a virtual host needs a name")
    if not vh.domains:
        sink.problem(f"{vpath}.domains", "a virtual host needs at least one domain")
    fault = _per_filter(sink, f"{vpath}.typed_per_filter_config", vh.typed_per_filter_config)
    retry = _retry(sink, f"{vpath}.retry_policy", vh.retry_policy) if vh.HasField("retry_policy") else None
    last = options.most_specific_last
    mine = _mutations(sink, vpath, vh)
    ctx = _VHostCtx(vh.name, retry, fault if fault is not None else rc_fault, options.max_direct_response_body_size,
                    _outer(mine[0], _outer(rc_mutations[0], (), last), last),
                    _outer(mine[1], _outer(rc_mutations[1], (), last), last), last,
                    vh.include_request_attempt_count, vh.include_attempt_count_in_response,
                    vh.per_request_buffer_limit_bytes.value if vh.HasField("per_request_buffer_limit_bytes") else None,
                    _mirrors(sink, f"{vpath}.request_mirror_policies", vh.request_mirror_policies) or rc_mirrors)
    routes = [_route(sink, f"{vpath}.routes[{i}]", r, ctx) for i, r in enumerate(vh.routes)]
    if None in routes:
        return None
    return _VHost(vh.name, tuple(routes), vh.require_tls)


# --------------------------------------------------------------------------
# Host index
# --------------------------------------------------------------------------

def _port_start(host: str) -> int:
    """Where ':port' starts (Envoy's getPortStart), -1 if none; an IPv6
    literal is bracketed."""
    colon = host.rfind(":")
    return colon if colon >= 0 and host.rfind("]") < colon else -1


@dataclass(frozen=True, slots=True, eq=False)
class _HostIndex:
    exact: dict[str, _VHost]
    suffixes: tuple[tuple[int, dict[str, _VHost]], ...]     # longest first
    prefixes: tuple[tuple[int, dict[str, _VHost]], ...]     # longest first
    default: _VHost | None
    ignore_port: bool

    def find(self, host: str) -> _VHost | None:
        if not (self.exact or self.suffixes or self.prefixes):
            return self.default
        if self.ignore_port and (p := _port_start(host)) >= 0:
            host = host[:p]
        host = m.lower(host)
        vhost = self.exact.get(host)
        if vhost is not None:
            return vhost
        n = len(host)
        # A wildcard matches one character or more: "*.foo.com" not ".foo.com".
        for length, table in self.suffixes:
            if length < n and (vhost := table.get(host[n - length:])) is not None:
                return vhost
        for length, table in self.prefixes:
            if length < n and (vhost := table.get(host[:length])) is not None:
                return vhost
        return self.default


def _host_index(sink: m.Sink, path: str, vhosts: Sequence, compiled: Sequence[_VHost | None],
                ignore_port: bool) -> _HostIndex:
    exact: dict[str, _VHost] = {}
    suffixes: dict[int, dict[str, _VHost]] = {}
    prefixes: dict[int, dict[str, _VHost]] = {}
    default, seen = None, {}
    for i, (pb, vhost) in enumerate(zip(vhosts, compiled)):
        for j, domain in enumerate(pb.domains):
            d = m.lower(domain)
            if d in seen:
                first = "{}[{}].domains[{}]".format(path, *seen[d])
                sink.problem(f"{path}[{i}].domains[{j}]", f"duplicate domain '{domain}' (also at {first}): Envoy "
                             "requires unique domains" if d != "*" else
                             "only one virtual host may have the wildcard domain '*'")
                continue
            seen[d] = (i, j)
            if d == "*":
                default = vhost
            elif d.startswith("*"):
                suffixes.setdefault(len(d) - 1, {})[d[1:]] = vhost
            elif d.endswith("*"):
                prefixes.setdefault(len(d) - 1, {})[d[:-1]] = vhost
            else:
                exact[d] = vhost

    def longest_first(tables: dict) -> tuple:
        return tuple(sorted(tables.items(), key=lambda kv: -kv[0]))
    return _HostIndex(exact, longest_first(suffixes), longest_first(prefixes), default, ignore_port)


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class RouteTable:
    hosts: _HostIndex
    ignore_path_parameters: bool
    vhosts: tuple[_VHost, ...] = ()     # in configuration order

    def needs_request(self, vhost: int) -> bool:
        """Whether connections that address virtual host ``vhost`` (by its
        domains naming their VIP, or as the '*' one) need each request read:
        False only when its first route gives every request exactly what a
        connection decided at connect() gets (docs/l7.md, "L4 or L7"). Its
        domains do not count: at L4 the virtual host is chosen by address."""
        return not self.vhosts[vhost].decided_at_connect()

    def match(self, req: m.Request) -> Decision | None:
        """The decision for ``req``; None when no virtual host or no route
        matches (Envoy answers 404)."""
        if req.method == "CONNECT":
            return None     # only connect_matcher routes take CONNECT; kmesh refuses those
        vhost = self.hosts.find(req.host)
        if vhost is None:
            return None
        return vhost.decide(m.View(req, self.ignore_path_parameters))


def _compile(sink: m.Sink, vhosts: Sequence, path: str, options: TableOptions,
             rc_fault: _FaultRule | None, rc_mutations: tuple = (None, None),
             rc_mirrors: tuple[Mirror, ...] = ()) -> RouteTable | None:
    compiled = [_vhost(sink, f"{path}[{i}]", vh, options, rc_fault, rc_mutations, rc_mirrors)
                for i, vh in enumerate(vhosts)]
    hosts = _host_index(sink, path, vhosts, compiled, options.ignore_port_in_host_matching)
    return None if sink.failed else RouteTable(hosts, options.ignore_path_parameters, tuple(compiled))


def compile_virtual_hosts(vhosts: Sequence[route_components_pb2.VirtualHost], path: str, problem: m.Report,
                          note: m.Report, options: TableOptions = TableOptions()) -> RouteTable | None:
    """A table for virtual hosts alone; ``path`` names the list of them (e.g.
    ``...route_config.virtual_hosts``). None if a problem was reported."""
    return _compile(m.Sink(problem, note), vhosts, path, options, None)


def compile_routes(rc: route_pb2.RouteConfiguration, path: str, problem: m.Report, note: m.Report) -> RouteTable | None:
    """A table for ``rc`` (at field path ``path`` in its source). Each problem
    and note names the field; None if a problem was reported."""
    sink = m.Sink(problem, note)
    fields.check(rc, path, sink.problem, sink.note)
    if rc.validate_clusters.value:
        sink.note(f"{path}.validate_clusters", "cluster references are checked by kmesh's translator, not here")
    options = TableOptions(
        rc.ignore_port_in_host_matching, rc.ignore_path_parameters_in_path_matching,
        rc.max_direct_response_body_size_bytes.value if rc.HasField("max_direct_response_body_size_bytes")
        else DEFAULT_MAX_BODY, rc.most_specific_header_mutations_wins)
    rc_fault = _per_filter(sink, f"{path}.typed_per_filter_config", rc.typed_per_filter_config)
    return _compile(sink, rc.virtual_hosts, f"{path}.virtual_hosts", options, rc_fault, _mutations(sink, path, rc),
                    _mirrors(sink, f"{path}.request_mirror_policies", rc.request_mirror_policies) or ())


# --------------------------------------------------------------------------
# Fast-path test
# --------------------------------------------------------------------------

def needs_l7(rc: route_pb2.RouteConfiguration, vhost: int = 0) -> bool | None:
    """RouteTable.needs_request of ``rc`` compiled (None: it does not compile)."""
    table = compile_routes(rc, "", lambda p, r: None, lambda p, r: None)
    return None if table is None else table.needs_request(vhost)


# Shared with the HTTP filters the hand-off listener applies (kmesh.config.http.rbac).
View = m.View
Sink = m.Sink
check_fields = m.check_fields
header_cond = m.header_cond
string_matcher = m.string_matcher
