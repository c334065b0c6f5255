"""The HTTP RBAC filter as the L7 hand-off listener applies it (pure)."""
from __future__ import annotations

import pytest
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from google.protobuf import any_pb2, json_format

from kmesh.config.http import rbac
from kmesh.config.http.match import Request


def compile_(cfg: dict, fail_closed: bool = False):
    msg = json_format.ParseDict(cfg, rbac_pb2.RBAC())
    any_ = any_pb2.Any()
    any_.Pack(msg)
    problems, notes = [], []
    got = rbac.compile_rbac(any_, "f", lambda p, r: problems.append((p, r)), lambda p, r: notes.append((p, r)),
                            fail_closed=fail_closed)
    return got, problems, notes


def req(path="/", host="h", **headers) -> Request:
    return Request("GET", path, host, tuple((k.replace("_", "-"), v) for k, v in headers.items()))


def policy(permissions, principals=({"any": True},)):
    return {"permissions": list(permissions), "principals": list(principals)}


DST = ("127.100.0.1", 80)


def test_deny_by_header():
    r, problems, _ = compile_({"rules": {"action": "DENY", "policies": {"no-bots": policy(
        [{"header": {"name": "user-agent", "string_match": {"prefix": "bot"}}}])}}})
    assert not problems
    assert not r.allows(req(user_agent="bot/1.0"), "127.0.0.1", DST)
    assert r.allows(req(user_agent="curl/8"), "127.0.0.1", DST)
    assert r.allows(req(), "127.0.0.1", DST)


def test_allow_needs_a_matching_policy_and_principal():
    r, problems, _ = compile_({"rules": {"action": "ALLOW", "policies": {
        "admin": policy([{"url_path": {"path": {"prefix": "/admin"}}}],
                        [{"direct_remote_ip": {"address_prefix": "127.0.0.0", "prefix_len": 24}}]),
        "public": policy([{"and_rules": {"rules": [{"url_path": {"path": {"prefix": "/pub"}}},
                                                   {"not_rule": {"header": {"name": "x-block"}}}]}}])}}})
    assert not problems
    assert r.allows(req("/admin/x"), "127.0.0.9", DST)
    assert not r.allows(req("/admin/x"), "127.0.1.9", DST)
    assert r.allows(req("/pub?q=1"), "10.0.0.1", DST)          # url_path ignores the query
    assert not r.allows(req("/pub", x_block="1"), "10.0.0.1", DST)
    assert not r.allows(req("/other"), "127.0.0.9", DST)


def test_destination_port_and_ip():
    r, problems, _ = compile_({"rules": {"action": "DENY", "policies": {"p": policy(
        [{"or_rules": {"rules": [{"destination_port": 81},
                                 {"destination_ip": {"address_prefix": "127.100.0.2", "prefix_len": 32}}]}}])}}})
    assert not problems
    assert not r.allows(req(), "127.0.0.1", ("127.100.0.1", 81))
    assert not r.allows(req(), "127.0.0.1", ("127.100.0.2", 80))
    assert r.allows(req(), "127.0.0.1", ("127.100.0.1", 80))


def test_ipv6_ranges_match_ipv6_addresses_and_mapped_ones_as_ipv4():
    r, problems, _ = compile_({"rules": {"action": "DENY", "policies": {"p": policy(
        [{"or_rules": {"rules": [{"destination_ip": {"address_prefix": "fd96::", "prefix_len": 64}},
                                 {"destination_ip": {"address_prefix": "fd97::7"}}]}}],
        [{"direct_remote_ip": {"address_prefix": "fd77::", "prefix_len": 16}},
         {"direct_remote_ip": {"address_prefix": "10.77.0.0", "prefix_len": 24}}])}}})
    assert not problems
    assert not r.allows(req(), "fd77:1::2", ("fd96::1", 80))
    assert not r.allows(req(), "fd77:1::2", ("fd97::7", 80))
    assert r.allows(req(), "fd77:1::2", ("fd97::8", 80))                # /128 without prefix_len
    assert not r.allows(req(), "::ffff:10.77.0.3", ("fd96::1", 80))     # mapped: the IPv4 range
    assert r.allows(req(), "fd78::2", ("fd96::1", 80))
    assert r.allows(req(), "10.77.0.3", ("10.96.0.1", 80))             # families never cross


def test_no_rules_and_log_let_everything_through():
    assert compile_({})[0] is None
    r, problems, notes = compile_({"rules": {"action": "LOG", "policies": {"p": policy([{"any": True}])}}})
    assert r is None and not problems and notes


@pytest.mark.parametrize("cfg, where", [
    ({"rules": {"policies": {"p": policy([{"any": True}], [{"authenticated": {}}])}}}, "authenticated"),
    ({"rules": {"policies": {"p": policy([{"metadata": {}}])}}}, "metadata"),
    ({"rules": {"policies": {"p": {**policy([{"any": True}]), "condition": {}}}}}, "condition"),
    ({"rules": {"policies": {"p": {"permissions": [{"any": True}]}}}}, "p]"),
    ({"rules": {"policies": {"p": policy([{"header": {"name": "x", "safe_regex_match": {"regex": "("}}}])}}},
     "safe_regex_match"),
])
def test_what_cannot_be_enforced_is_a_problem(cfg, where):
    r, problems, _ = compile_(cfg)
    assert r is None and problems and where in problems[0][0], problems


def test_from_a_control_plane_what_cannot_be_enforced_denies_everything():
    cfg = {"rules": {"action": "DENY", "policies": {"p": policy([{"any": True}], [{"authenticated": {}}])}}}
    r, problems, notes = compile_(cfg, fail_closed=True)
    assert problems and r is rbac.DENY_ALL and "denies every request" in notes[-1][1]
    assert not r.allows(req(), "127.0.0.1", DST)
