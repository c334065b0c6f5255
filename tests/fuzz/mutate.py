"""A seeded mutator for Envoy configs, and the checks a mutated config must
pass: parsed, compiled and planned, it is accepted or refused with a
ConfigError naming its source and field path, never anything else.

    python -m tests.fuzz.mutate [--cases N] [--seed S]    a long run

The unit test (tests/unit/test_fuzz.py) runs a few thousand cases of the
same generator on every CI run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import sys
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "fuzz.yaml"
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

ODD_VALUES = [
    None, "", "\x00", "a\x00b", "\udcff"[:0] + "\u202e", "💥", "x" * 70000, " ", "*", "/", "%00", "..", "a" * 300,
    -1, 0, 1, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30, 1e308, -1e308, 0.5, float("inf"),
    float("nan"), True, False, [], {}, [None], {"": ""}, {"@type": ""}, {"@type": "x"},
    {"@type": "type.googleapis.com/"}, {"@type": "type.googleapis.com/google.protobuf.Empty"},
    "type.googleapis.com/", "0s", "-1s", "1.5ns", "99999999999999s", "315576000001s", "1e9s", "::1", "::",
    "256.1.1.1", "1.2.3.4:5", "0.0.0.0", "255.255.255.255", "10.0.0.1/8", "fe80::1%eth0", "STATIC", "EDS",
    "ROUND_ROBIN", "MAGLEV", "ORIGINAL_DST", "HIGH", 99, -99,
]
KNOWN_TYPES = [
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit",
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
    "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/google.protobuf.Struct",
]


def seeds() -> list[tuple[str, dict]]:
    """(name, bootstrap dict): the bundled configs and a few that reach
    every part of the compiler (L7 routes, policies, RBAC, fault)."""
    out = [(str(p.relative_to(ROOT)), yaml.safe_load(p.read_text()))
           for p in sorted((ROOT / "config").rglob("*.yaml"))]
    out.append(("rich", _rich()))
    out.append(("bookinfo", _bookinfo()))
    return out


def _rich() -> dict:
    from tests.support.envoy import bootstrap, cluster, hcm_listener, lb_ep, rate_limited, tcp_listener

    routes = [
        {"match": {"safe_regex": {"regex": "/api/v[0-9]+/.*"}, "headers": [
            {"name": "x-user", "string_match": {"prefix": "j", "ignore_case": True}},
            {"name": "x-id", "range_match": {"start": 1, "end": 9}}],
            "query_parameters": [{"name": "debug", "present_match": True}]},
         "route": {"cluster": "b", "timeout": "2s", "prefix_rewrite": "/", "retry_policy": {
             "retry_on": "connect-failure", "num_retries": 2}}},
        {"match": {"path": "/healthz"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}},
        {"match": {"prefix": "/old"}, "redirect": {"path_redirect": "/new", "response_code": "FOUND"}},
        {"match": {"prefix": "/f"}, "route": {"cluster": "a"}, "typed_per_filter_config": {
            "envoy.filters.http.fault": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                "abort": {"http_status": 503, "percentage": {"numerator": 50}}}}},
        {"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
            {"name": "a", "weight": 3}, {"name": "b", "weight": 1}]},
            "regex_rewrite": {"pattern": {"regex": "^/x/(.*)$"}, "substitution": "/\\1"}}},
    ]
    web = hcm_listener("web", "10.0.0.10", 80, routes)
    hcm = web["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [
        {"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {"no-admin": {
                "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
                "principals": [{"remote_ip": {"address_prefix": "10.1.0.0", "prefix_len": 16}}]}}}}},
        {"name": "envoy.filters.http.fault", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    a = cluster("a", lb_ep("10.0.1.1", 8080, 3), lb_ep("10.0.1.2", 8080), lb="LEAST_REQUEST")
    a["circuit_breakers"] = {"thresholds": [{"max_connections": 100, "max_requests": 10}]}
    a["outlier_detection"] = {"consecutive_5xx": 3, "base_ejection_time": "10s", "max_ejection_percent": 50}
    a["connect_timeout"] = "0.25s"
    b = cluster("b", lb_ep("10.0.2.1", 9090), lb="RANDOM")
    return bootstrap([web, rate_limited(tcp_listener("db", "10.0.0.11", 5432, "b"), 100, 10, "1s")], [a, b])


def _bookinfo() -> dict:
    from tests.support import bookinfo

    m = bookinfo.Mesh(topo=None, pods={}, endpoints={f"{svc}-{v}": f"10.77.{i}.{j}"
                                                      for i, (svc, versions) in enumerate(bookinfo.CALLS.items())
                                                      for j, v in enumerate(versions, 2)})
    return m.standalone()


# -- mutations ----------------------------------------------------------------

def _nodes(doc, max_depth: int = 40):
    """Every (path, container, key) in ``doc``, down to ``max_depth``."""
    todo = [((), doc)]
    while todo:
        path, node = todo.pop()
        if len(path) >= max_depth:
            continue
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            yield path + (k,), node, k
            todo.append((path + (k,), v))


def _deep(depth: int, leaf) -> object:
    for _ in range(depth):
        leaf = [leaf] if depth % 2 else {"x": leaf}
    return leaf


def _wrong_type(v, rng: random.Random):
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return rng.choice([str(v), [v], {"value": v}])
    if isinstance(v, str):
        if v.isupper():   # an enum: a number it has no name for (proto3 enums are open)
            return rng.choice([99, -1, 2 ** 31 - 1, 7])
        return rng.choice([len(v), [v], {v: v}, v.encode().hex()])
    if isinstance(v, list):
        return rng.choice([{"items": v}, v[0] if v else None, f"{type(v).__name__} of {len(v)}"])
    if isinstance(v, dict):
        return rng.choice([list(v.values()), list(v), f"{type(v).__name__} of {len(v)}"])
    return rng.choice(ODD_VALUES)


def mutate_once(doc, rng: random.Random) -> str:
    """Change ``doc`` in place in one random way; what was done."""
    nodes = list(_nodes(doc))
    if not nodes:
        doc["static_resources"] = rng.choice(ODD_VALUES)
        return "static_resources = odd"
    path, parent, key = rng.choice(nodes)
    where = ".".join(map(str, path))
    op = rng.randrange(9)
    if op == 0:
        del parent[key]
        return f"drop {where}"
    if op == 1:
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        return f"{where} = {str(parent[key])[:40]!r}"
    if op == 2:
        parent[key] = _wrong_type(parent[key], rng)
        return f"{where}: wrong type"
    if op == 3 and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))   # a duplicate name, listener, endpoint...
        return f"duplicate {where}"
    if op == 4:
        parent[key] = _deep(rng.choice([50, 200, 1000]), parent[key])
        return f"{where}: nested deep"
    if op == 5 and isinstance(parent, dict):
        parent[rng.choice(["bogus_field", "@type", "name", "typed_config", "value", "port_value"])] = parent.pop(key)
        return f"rename {where}"
    if op == 6:
        typed = [(p, c, k) for p, c, k in nodes if k == "@type"]
        if typed:
            p, c, k = rng.choice(typed)
            c[k] = rng.choice(KNOWN_TYPES + ["", "x", "type.googleapis.com/", "type.googleapis.com/os.system"])
            return f"{'.'.join(map(str, p))} = {c[k]!r}"
    if op == 7 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = rng.choice([-1, 0, 2 ** 32, 2 ** 64, -(2 ** 64), 1e300])
        return f"{where} = {parent[key]}"
    if op == 8 and isinstance(parent[key], str):
        s = parent[key]
        i = rng.randrange(len(s) + 1)
        parent[key] = s[:i] + rng.choice(["\x00", "\n", "'", '"', "{", "\\", "é", "\u0663", "*"]) + s[i:]
        return f"{where}: odd character"
    parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    return f"{where} = odd"


def text_of(doc, rng: random.Random) -> tuple[str, str]:
    """The mutated document as YAML or JSON text, sometimes damaged as text."""
    with _deep_ok():
        try:
            text = json.dumps(doc) if rng.random() < 0.5 else yaml.dump(doc, Dumper=_DUMPER, allow_unicode=True)
        except (ValueError, RecursionError):
            text = json.dumps(doc, allow_nan=True, default=str)
    r = rng.random()
    if r < 0.05:
        return text[:rng.randrange(len(text) + 1)], "truncated"
    if r < 0.10:
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        return b.decode("utf-8", errors="replace"), "bytes flipped"
    if r < 0.12:
        return "[" * 100000 + "]" * 100000, "deep brackets"
    return text, ""


@contextlib.contextmanager
def _deep_ok():
    """Room for the generator's own recursion over deeply nested documents
    (copying, writing them): not the code under test, which runs with
    Python's default limit."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 50000))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def case(seed_doc: dict, rng: random.Random) -> tuple[str, list[str]]:
    doc = copy.deepcopy(seed_doc)
    with _deep_ok():
        what = [mutate_once(doc, rng) for _ in range(rng.randint(1, 3))]
    text, damage = text_of(doc, rng)
    return text, what + ([damage] if damage else [])


# -- the checks -------------------------------------------------------------------

def check(text: str) -> str:
    """Parse, compile and plan ``text``: "accepted" or "refused"; raises
    AssertionError for anything but a well-formed refusal."""
    from kmesh.config import bootstrap
    from kmesh.config.errors import ConfigError
    from kmesh.config.builder import translate_bootstrap
    from kmesh.dataplane.plan import CapacityError, MapState, plan

    try:
        mesh = translate_bootstrap(bootstrap.parse_text(text, SOURCE))
    except ConfigError as e:
        assert e.problems, "a ConfigError without problems"
        for p in e.problems:
            assert p.source == SOURCE and p.reason, p
            assert "\n" not in p.path, p
        return "refused"
    try:
        plan(MapState(), mesh)
    except CapacityError:
        return "refused"
    return "accepted"


# -- over xDS ------------------------------------------------------------------------

def xds_seeds() -> list[tuple[object, list[dict]]]:
    """(resource type, resources as JSON) as istiod sent them for Bookinfo."""
    from kmesh.xds import resources as rt

    from kmesh.config import schema

    d = ROOT / "tests" / "fixtures" / "istio"
    out = [(t, json.loads((d / f"bookinfo_{t.short.lower()}.json").read_text()))
           for t in (rt.CDS, rt.EDS, rt.LDS, rt.RDS)]
    for _, docs in out:
        schema.import_types(docs)   # the typed_config types they name
    return out


def _response(t, resources: list, version: str, nonce: str):
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf import any_pb2

    anys = []
    for r in resources:
        a = any_pb2.Any()
        if isinstance(r, bytes):   # damaged on the wire
            a.type_url, a.value = t.url, r
        else:
            a.Pack(r)
        anys.append(a)
    return discovery_pb2.DiscoveryResponse(type_url=t.url, version_info=version, resources=anys, nonce=nonce)


def xds_case(t, seed_resources: list[dict], rng: random.Random) -> tuple[list, list[str]]:
    """The resources of one mutated response: parsed protos, or (when the
    mutation makes no proto of them) valid bytes damaged."""
    from google.protobuf import json_format

    docs = copy.deepcopy(seed_resources)
    with _deep_ok():
        what = [mutate_once({"resources": docs}, rng) for _ in range(rng.randint(1, 3))]
    out = []
    for d in docs:
        msg = t.message()
        try:
            with _deep_ok():
                json_format.ParseDict(d, msg, ignore_unknown_fields=False)
            out.append(msg)
        except Exception:   # noqa: BLE001 - the mutation made it no proto: damage bytes instead
            good = t.message()
            json_format.ParseDict(seed_resources[0], good)
            raw = bytearray(good.SerializeToString())
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            out.append(bytes(raw))
            what.append("bytes damaged")
    return out, what


def check_xds(state, t, resources: list, good: list, n: int) -> str:
    """Push ``resources`` (type ``t``): exactly one ACK or NACK comes back
    for it; after a NACK the previous ``good`` set is ACKed again."""
    reqs = state.handle(_response(t, resources, f"fuzz-{n}", f"n{n}"))
    mine = [r for r in reqs if r.type_url == t.url and r.response_nonce == f"n{n}"]
    assert len(mine) == 1, f"{len(mine)} answers to one {t.short} response"
    if not mine[0].HasField("error_detail"):
        return "accepted"
    assert mine[0].error_detail.message, "a NACK without a reason"
    assert not mine[0].error_detail.message.startswith("internal error"), mine[0].error_detail.message
    again = state.handle(_response(t, good, f"good-{n}", f"g{n}"))
    back = [r for r in again if r.type_url == t.url and r.response_nonce == f"g{n}"]
    assert len(back) == 1 and not back[0].HasField("error_detail"), \
        f"the last good {t.short} set is refused after a NACK: {back[0].error_detail.message if back else None}"
    return "refused"


def run_xds(cases: int, seed: int) -> dict:
    """Mutated Bookinfo pushes into one ADS state, every type in turn."""
    import logging

    from google.protobuf import json_format

    from kmesh.xds.node import NodeIdentity
    from kmesh.xds.state import AdsState

    logging.getLogger("kmesh").setLevel(logging.CRITICAL)   # thousands of NACKs
    state = AdsState(NodeIdentity("", "", "pod", "ns", "10.0.0.5").to_proto(), lambda change, full: None)
    goods = {}
    for t, docs in xds_seeds():
        goods[t] = [json_format.ParseDict(d, t.message()) for d in docs]
        state.handle(_response(t, goods[t], "seed", f"seed-{t.short}"))
    counts = {"accepted": 0, "refused": 0, "failed": 0}
    failures = []
    seed_list = xds_seeds()
    for i in range(cases):
        rng = random.Random(f"xds:{seed}:{i}")
        t, docs = seed_list[i % len(seed_list)]
        resources, what = xds_case(t, docs, rng)
        try:
            got = check_xds(state, t, resources, goods[t], i)
            counts[got] += 1
            if got == "accepted":   # put the good set back for the next case
                check_xds(state, t, goods[t], goods[t], i + 10 ** 9)
        except Exception as e:   # noqa: BLE001
            counts["failed"] += 1
            if len(failures) < 10:
                failures.append(f"xds case {seed}:{i} on {t.short} ({'; '.join(what)}): "
                                f"{''.join(traceback.format_exception_only(e)).strip()[:2000]}")
    return {"counts": counts, "failures": failures}


def run(cases: int, seed: int, budget_s: float | None = None) -> dict:
    """Run ``cases`` cases (or until ``budget_s``); the outcome counts, and
    the first failures with what reproduces them."""
    seed_docs = seeds()
    counts = {"accepted": 0, "refused": 0, "failed": 0}
    failures = []
    start = time.monotonic()
    for i in range(cases):
        if budget_s and time.monotonic() - start > budget_s:
            break
        rng = random.Random(f"{seed}:{i}")
        name, doc = seed_docs[i % len(seed_docs)]
        text, what = case(doc, rng)
        try:
            counts[check(text)] += 1
        except Exception as e:   # noqa: BLE001 - what the fuzzer is for
            counts["failed"] += 1
            if len(failures) < 10:
                failures.append(f"case {seed}:{i} on {name} ({'; '.join(what)}): "
                                f"{''.join(traceback.format_exception_only(e)).strip()[:2000]}")
    counts["seconds"] = round(time.monotonic() - start, 1)
    return {"counts": counts, "failures": failures}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    sys.setrecursionlimit(10000)
    got = {"config": run(args.cases, args.seed), "xds": run_xds(args.cases // 4, args.seed)}
    print(json.dumps(got, indent=2))
    return 1 if got["config"]["failures"] or got["xds"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
