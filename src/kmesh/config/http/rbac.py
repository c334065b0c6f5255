"""Envoy's HTTP RBAC filter (``envoy.filters.http.rbac``) as the L7 hand-off
listener applies it to every request (pure functions).

A policy matches when any of its permissions and any of its principals
match; ALLOW lets a request through only when some policy matches, DENY
refuses it when some policy matches (403, body ``RBAC: access denied``, as
Envoy). Supported matchers are the ones a request on a plaintext connection
can answer: permissions ``any``, ``header``, ``url_path``, ``destination_ip``,
``destination_port(_range)``, ``and_rules``/``or_rules``/``not_rule``;
principals ``any``, ``header``, ``url_path``, ``direct_remote_ip``/
``remote_ip``/``source_ip`` (the client's own address: no proxy sits in
between), ``and_ids``/``or_ids``/``not_id``. Anything else (mTLS identities,
metadata, CEL conditions, matcher trees) is a problem: the caller rejects the
configuration instead of letting requests through that Envoy would refuse.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2

from kmesh.config import fields
from kmesh.config.http import match

DENIED = b"RBAC: access denied"
ALLOW, DENY, LOG = 0, 1, 2   # envoy.config.rbac.v3.RBAC.Action
NOT_APPLIED = "not applied by kmesh (no per-policy stats or audit log yet)"


@dataclass(frozen=True, slots=True)
class Subject:
    """What one request is matched on."""
    view: match.View
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int


Matcher = Callable[[Subject], bool]


@dataclass(frozen=True)
class Rbac:
    action: int
    policies: tuple[tuple[str, Matcher], ...]

    def allows(self, req: match.Request, source: str, destination: tuple[str, int]) -> bool:
        s = Subject(match.View(req, False), _addr(source), _addr(destination[0]), destination[1])
        matched = any(m(s) for _, m in self.policies)
        return matched if self.action == ALLOW else not matched


def _addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as a range matches it: an IPv4-mapped one as IPv4."""
    a = ipaddress.ip_address(text)
    return a.ipv4_mapped or a if a.version == 6 else a


def _net(sink: match.Sink, path: str, c) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A CidrRange; without prefix_len the single address (Envoy: /32 or /128)."""
    try:
        a = ipaddress.ip_address(c.address_prefix)
        net = ipaddress.ip_network(f"{a}/{c.prefix_len.value if c.HasField('prefix_len') else a.max_prefixlen}",
                                   strict=False)
    except ValueError as e:
        sink.problem(path, f"not a CIDR range: {e}")
        return None
    return net


def _any_of(ms: list[Matcher]) -> Matcher:
    return lambda s: any(m(s) for m in ms)


def _all_of(ms: list[Matcher]) -> Matcher:
    return lambda s: all(m(s) for m in ms)


def _list(sink: match.Sink, path: str, items, one) -> list[Matcher] | None:
    got = [one(sink, f"{path}[{i}]", x) for i, x in enumerate(items)]
    return None if any(m is None for m in got) else got


# and/or over a list field, per kind
_SETS = {"and_rules": ("rules", True), "or_rules": ("rules", False), "and_ids": ("ids", True), "or_ids": ("ids", False)}
_NOTS = ("not_rule", "not_id")
_SHARED = ("any", "header", "url_path", *_SETS, *_NOTS)


def _shared(sink: match.Sink, path: str, msg, kind: str, one) -> Matcher | None:
    """The matchers permissions and principals share: the leaves they have
    in common and and/or/not over ``one`` (the permission or principal
    compiler)."""
    value = getattr(msg, kind)
    if kind == "any":
        if not value:
            sink.problem(f"{path}.any", "must be true")
            return None
        return lambda s: True
    if kind == "header":
        hc = match.header_cond(sink, f"{path}.header", value)
        return (lambda s: hc(s.view)) if hc else None
    if kind == "url_path":
        match.check_fields(sink, f"{path}.url_path", value, ("path",), strict=True)
        test = match.string_matcher(sink, f"{path}.url_path.path", value.path)
        return (lambda s: test(s.view.path)) if test else None
    if kind in _SETS:
        field, every = _SETS[kind]
        ms = _list(sink, f"{path}.{kind}.{field}", getattr(value, field), one)
        return None if ms is None else (_all_of(ms) if every else _any_of(ms))
    m = one(sink, f"{path}.{kind}", value)   # not_rule / not_id
    return None if m is None else (lambda s: not m(s))


def _permission(sink: match.Sink, path: str, p) -> Matcher | None:
    kind = p.WhichOneof("rule")
    if kind in _SHARED:
        return _shared(sink, path, p, kind, _permission)
    if kind == "destination_ip":
        net = _net(sink, f"{path}.destination_ip", p.destination_ip)
        return None if net is None else (lambda s: s.destination in net)
    if kind == "destination_port":
        port = p.destination_port
        return lambda s: s.port == port
    if kind == "destination_port_range":
        lo, hi = p.destination_port_range.start, p.destination_port_range.end
        return lambda s: lo <= s.port < hi
    sink.problem(f"{path}.{kind or 'rule'}", "this RBAC permission is not supported by kmesh" if kind
                 else "a permission needs a rule")
    return None


def _principal(sink: match.Sink, path: str, p) -> Matcher | None:
    kind = p.WhichOneof("identifier")
    if kind in _SHARED:
        return _shared(sink, path, p, kind, _principal)
    if kind in ("direct_remote_ip", "remote_ip", "source_ip"):
        net = _net(sink, f"{path}.{kind}", getattr(p, kind))
        return None if net is None else (lambda s: s.source in net)
    sink.problem(f"{path}.{kind or 'identifier'}", "this RBAC principal is not supported by kmesh (no mTLS "
                 "identities, metadata or filter state on a plaintext hand-off)" if kind
                 else "a principal needs an identifier")
    return None


def _policy(sink: match.Sink, path: str, pol) -> Matcher | None:
    match.check_fields(sink, path, pol, ("permissions", "principals"), strict=True)
    if not pol.permissions or not pol.principals:
        sink.problem(path, "a policy needs at least one permission and one principal")
        return None
    perms = _list(sink, f"{path}.permissions", pol.permissions, _permission)
    princ = _list(sink, f"{path}.principals", pol.principals, _principal)
    if perms is None or princ is None:
        return None
    p, q = _any_of(perms), _any_of(princ)
    return lambda s: p(s) and q(s)


DENY_ALL = Rbac(ALLOW, ())


def compile_rbac(typed_config, path: str, problem: match.Report, note: match.Report,
                 fail_closed: bool = False) -> Rbac | None:
    """The filter's config at ``path``: an Rbac, or None when it lets every
    request through (no rules, or LOG). A config with a problem (reported)
    gives None, or DENY_ALL with ``fail_closed`` (from a control plane, where
    the rest of the listener is still applied: a policy that cannot be
    enforced must not turn into no policy)."""
    sink = match.Sink(problem, note)
    msg = http_rbac_pb2.RBAC()
    typed_config.Unpack(msg)
    fields.check(msg, path, sink.problem, sink.note)
    if sink.failed:
        return _failed(sink, path, fail_closed)
    if not msg.HasField("rules"):
        return None
    rules = msg.rules
    match.check_fields(sink, f"{path}.rules", rules, ("action", "policies"),
                    notes={"audit_logging_options": NOT_APPLIED})
    if rules.action == LOG:
        sink.note(f"{path}.rules.action", "LOG only logs in Envoy: every request goes through")
        return None
    pols = []
    for name in sorted(rules.policies):
        m = _policy(sink, f"{path}.rules.policies[{name}]", rules.policies[name])
        if m is not None:
            pols.append((name, m))
    if sink.failed:
        return _failed(sink, path, fail_closed)
    return Rbac(rules.action, tuple(pols))


def _failed(sink: match.Sink, path: str, fail_closed: bool) -> Rbac | None:
    if not fail_closed:
        return None
    sink.note(path, "this RBAC filter cannot be enforced as written: the listener denies every request (403)")
    return DENY_ALL

