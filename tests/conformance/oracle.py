"""Envoy as the oracle: run listener configs on Envoy and on kmesh, send both
the same raw HTTP/1.1 bytes, normalise what came back and compare.

A batch of cases shares one kmesh start and one Envoy start: every case is
one listener in both bootstraps (its own loopback VIP, port 80, on kmesh;
its own free port on 127.0.0.1 on Envoy) and the same clusters c0..c3, each
one echo backend (``echo.py``). The raw client (``rawclient.py``) runs all
of a side's connections in one process: in the test's child cgroup for
kmesh, on the host for Envoy.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tests.conformance.echo import EchoServer
from tests.e2e.test_l4 import vip
from tests.support import envoy_proc, harness
from tests.support.envoy import ROUTER, bootstrap, cluster, http_listener, lb_ep

CLIENT = Path(__file__).with_name("rawclient.py")
CLUSTERS = ("c0", "c1", "c2", "c3")
DEAD = "dead"   # one more cluster: an endpoint that refuses every connect


# --------------------------------------------------------------------------
# Cases as data
# --------------------------------------------------------------------------

def req(path: str = "/", host: str | None = "x", headers=(), method: str = "GET", version: str = "HTTP/1.1",
        body: str = "") -> str:
    """One raw request. ``headers``: (name, value) pairs or "name: value"
    lines, sent in this order, repeated names included; ``host`` None sends
    no Host header."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [h if isinstance(h, str) else f"{h[0]}: {h[1]}" for h in headers]
    if body:
        lines.append(f"Content-Length: {len(body.encode('latin-1'))}")
    return "\r\n".join(lines) + "\r\n\r\n" + body


@dataclass
class Seq:
    """Requests on one connection: each after the previous response
    (keep-alive), or all written at once (pipelined)."""
    requests: list[str]
    pipelined: bool = False


@dataclass
class Case:
    name: str
    virtual_hosts: list[dict]
    sequences: list[Seq]
    http_filters: list[dict] = field(default_factory=list)   # before the router
    hcm: dict = field(default_factory=dict)                   # other HttpConnectionManager fields
    route_config: dict = field(default_factory=dict)          # other RouteConfiguration fields
    xfail: str | None = None   # a difference kmesh has and does not warn about: the exact difference

    def listener(self, name: str, ip: str, port: int) -> dict:
        lst = http_listener(name, ip, port, self.virtual_hosts)
        hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [*self.http_filters, ROUTER]
        hcm.update(self.hcm)
        hcm["route_config"].update(self.route_config)
        return lst


def seqs(*requests: str, pipelined: bool = False) -> list[Seq]:
    """Each request on its own connection, or (pipelined) all on one."""
    return [Seq(list(requests), True)] if pipelined else [Seq([r]) for r in requests]


def vh(routes: list[dict], domains=("*",), name: str = "vh", **kw) -> dict:
    return {"name": name, "domains": list(domains), "routes": routes, **kw}


def to(cluster_name: str, match: dict | None = None, **route) -> dict:
    return {"match": match if match is not None else {"prefix": "/"}, "route": {"cluster": cluster_name, **route}}


# --------------------------------------------------------------------------
# Running a batch
# --------------------------------------------------------------------------

@dataclass
class Outcome:
    case: Case
    index: int               # the case's listener: static_resources.listeners[index] on both sides
    kmesh: list[list[dict]]  # per sequence, per request: what the client got
    envoy: list[list[dict]]
    warnings: list[str]      # kmesh's warnings for the whole bootstrap
    kmesh_log: list[dict] = field(default_factory=list)   # what the backends got for this case (sorted)
    envoy_log: list[dict] = field(default_factory=list)


class _Host(harness.Runner):
    """Clients on the host, outside any governed cgroup (Envoy's side)."""

    def _wrap(self, argv: list[str]) -> list[str]:
        return argv


HOST = _Host()


def _vips(n: int) -> list[str]:
    got: list[str] = []
    while len(got) < n:
        v = vip()
        if v not in got:
            got.append(v)
    return got


def _client(runner: harness.Runner, jobs: list[dict]) -> list[list[dict]]:
    r = runner.run([sys.executable, str(CLIENT)], input=json.dumps(jobs), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


@contextlib.contextmanager
def echo_backends():
    started = [EchoServer(n) for n in CLUSTERS]
    try:
        yield started, [*(cluster(n, lb_ep(*b.addr)) for n, b in zip(CLUSTERS, started)),
                        cluster(DEAD, lb_ep("127.0.0.1", harness.dead_port()))]
    finally:
        for b in started:
            b.stop()


def tagged(raw: str, tag: str) -> str:
    """The request with ``x-case: CASE.SEQUENCE.REQUEST`` after its request
    line: the backends log it, so each request's share of their log is known."""
    line, sep, rest = raw.partition("\r\n")
    return f"{line}{sep}x-case: {tag}\r\n{rest}" if sep else raw


# Mirrored requests are sent beside the response: time for them to land
# before the backends' log is read.
SETTLE = 0.5


def _logs(servers: list[EchoServer], settle: bool) -> dict[str, list[dict]]:
    if settle:
        time.sleep(SETTLE)
    by_case: dict[str, list[dict]] = {}
    for s in servers:
        for e in s.reset():
            by_case.setdefault(e["case"].split(".")[0], []).append(e)
    return {k: sorted(v, key=lambda e: json.dumps(e, sort_keys=True)) for k, v in by_case.items()}


@contextlib.contextmanager
def _envoy(cases: list[Case], clusters: list[dict], tmp: Path):
    """Envoy with case i's listener on 127.0.0.1:ports[i]; yields ports. A
    free port can be taken by some connection's local port before Envoy binds
    it: then again with other ports."""
    for attempt in range(5):
        ports = [harness.free_port() for _ in cases]
        cfg = bootstrap([c.listener(f"case{i}", "127.0.0.1", ports[i]) for i, c in enumerate(cases)], clusters)
        try:
            ctx = envoy_proc.envoy(cfg, tmp)
            ctx.__enter__()
        except RuntimeError as e:
            if "Address already in use" in str(e) and attempt < 4:
                continue
            raise
        try:
            yield ports
        finally:
            ctx.__exit__(None, None, None)
        return


def run_batch_own_daemon(cases: list[Case], cgroup: harness.Cgroup, tmp: Path,
                         daemon_args: tuple[str, ...] = ()) -> list[Outcome]:
    """run_batch with a daemon of its own on ``cgroup`` (a child cgroup),
    torn down before this returns, as the kmesh fixture does."""
    made: list[harness.Kmesh] = []

    def start(cfg):
        k = harness.Kmesh(cgroup, tmp / "kmesh.yaml", extra_args=daemon_args)
        made.append(k)
        k.write_config(cfg)
        return k.start()
    try:
        return run_batch(cases, start, cgroup, tmp)
    finally:
        for k in made:
            k.teardown()


def run_batch(cases: list[Case], start_kmesh, cgroup: harness.Runner, tmp: Path) -> list[Outcome]:
    """``start_kmesh(bootstrap_dict)`` starts a daemon governing ``cgroup``
    and returns it (the ``kmesh`` fixture, or a daemon the caller tears
    down)."""
    with echo_backends() as (servers, clusters):
        vips = _vips(len(cases))

        def jobs(hosts: list[str], port) -> list[dict]:
            return [{"host": hosts[i], "port": port(i), "requests": [tagged(q, f"{i}.{si}.{ri}")
                                                                     for ri, q in enumerate(s.requests)],
                     "pipelined": s.pipelined} for i, c in enumerate(cases) for si, s in enumerate(c.sequences)]

        settle = "mirror" in json.dumps([c.virtual_hosts for c in cases])

        k = start_kmesh(bootstrap([c.listener(f"case{i}", vips[i], 80) for i, c in enumerate(cases)], clusters))
        notes = list((k.get("/status").get("last_update") or {}).get("warnings") or [])
        ours = _client(cgroup, jobs(vips, lambda i: 80))
        ours_log = _logs(servers, settle)
        with _envoy(cases, clusters, tmp) as ports:
            theirs = _client(HOST, jobs(["127.0.0.1"] * len(cases), lambda i: ports[i]))
            theirs_log = _logs(servers, settle)
    out, at = [], 0
    for i, c in enumerate(cases):
        n = len(c.sequences)
        out.append(Outcome(c, i, ours[at:at + n], theirs[at:at + n], notes,
                           ours_log.get(str(i), []), theirs_log.get(str(i), [])))
        at += n
    return out


# --------------------------------------------------------------------------
# Normalising and comparing
# --------------------------------------------------------------------------

# Headers a proxy adds or changes by itself, whatever the config says: not
# compared. Everything else either side shows is compared.
REQUEST_HEADERS_DROPPED = {
    "x-request-id",           # Envoy's generated id
    "x-forwarded-proto",      # Envoy sets it (http) on every request
    "x-forwarded-for",        # Envoy appends the peer (use_remote_address)
    "content-length",         # framing: Envoy may re-frame the body; the body itself is compared
    "transfer-encoding",
    "connection",             # hop-by-hop: Envoy strips it and speaks keep-alive to the upstream
    "keep-alive",
}
REQUEST_HEADER_PREFIXES_DROPPED = ("x-envoy-",)   # x-envoy-expected-rq-timeout-ms, x-envoy-original-path, ...
RESPONSE_HEADERS_DROPPED = {
    "date", "server",                     # each side's own
    "x-envoy-upstream-service-time",      # Envoy's timing
    "via",
    "content-length", "transfer-encoding",   # framing: the body is compared
    "connection",                         # hop-by-hop: whether each side keeps the connection
}


def _keep(name: str, dropped: set[str]) -> bool:
    return name not in dropped and not name.startswith(REQUEST_HEADER_PREFIXES_DROPPED)


def normalise(got: dict) -> dict:
    """What a config decides about one response, comparable across the two
    proxies: the status, the config-settable response headers, and either the
    backend's view of the request (who answered, method, path, headers, body)
    or the local reply's body."""
    if "error" in got:
        return got
    headers: dict[str, list[str]] = {}
    for k, v in got["headers"]:
        if _keep(k, RESPONSE_HEADERS_DROPPED):
            headers.setdefault(k, []).append(v)
    out = {"status": got["status"], "headers": headers}
    try:
        seen = json.loads(got["body"])
    except ValueError:
        seen = None
    if isinstance(seen, dict) and "backend" in seen:
        seen["headers"] = {k: v for k, v in seen["headers"].items() if _keep(k, REQUEST_HEADERS_DROPPED)}
        out["upstream"] = seen
    else:
        out["body"] = got["body"]
    return out


def listener_path(index: int) -> str:
    return f"static_resources.listeners[{index}]"


def excusing_warnings(outcome: Outcome) -> list[str]:
    """The one rule for differences: kmesh may differ from Envoy on a case
    only when it warned about a field of that case's listener (a warning is
    'SOURCE: PATH: REASON'; PATH under static_resources.listeners[i]).
    Warnings that say kmesh does as Envoy does excuse nothing."""
    base = listener_path(outcome.index)
    got = []
    for w in outcome.warnings:
        parts = w.split(": ", 2)
        path = parts[1] if len(parts) == 3 else ""
        if (path == base or path.startswith((base + ".", base + "["))) and "as in Envoy" not in w:
            got.append(w)
    return got


def _envoy_closed_pipelined(seq: Seq, ours: list[dict], theirs: list[dict]) -> int | None:
    """Envoy 1.40 answers pipelined requests up to its second local reply or
    the local reply after a forwarded request, then closes the connection
    without answering the rest (cases.PIPELINED_AFTER_LOCAL_REPLY, an
    xfail). The number of requests Envoy answered there, else None."""
    if not seq.pipelined:
        return None
    n = next((i for i, r in enumerate(theirs) if "error" in r), None)
    if not n or any("error" not in r for r in theirs[n:]) or "upstream" in normalise(theirs[n - 1]):
        return None
    if any(k == "connection" for k, _ in theirs[n - 1]["headers"]):
        return None   # a close Envoy announced is compared as any response
    return n


def _trace(got: list[dict]) -> list[str]:
    """Status and Connection header of each response, for context."""
    return [r.get("error") or f"{r['status']}" + "".join(f" connection: {v}" for k, v in r["headers"]
                                                        if k == "connection") for r in got]


def differences(outcome: Outcome, known_pipelined_close: bool = False) -> list[str]:
    """Every request whose normalised responses differ, as text.
    ``known_pipelined_close``: the pipelined requests Envoy closed the
    connection on after a local reply (``_envoy_closed_pipelined``) are not
    compared (generated cases; the hand-written case is an xfail)."""
    diffs, skipped = [], set()
    for si, (ours, theirs) in enumerate(zip(outcome.kmesh, outcome.envoy)):
        cut = _envoy_closed_pipelined(outcome.case.sequences[si], ours, theirs) if known_pipelined_close else None
        if cut is not None:
            skipped |= {f"{outcome.index}.{si}.{ri}" for ri in range(cut, len(ours))}
            ours, theirs = ours[:cut], theirs[:cut]
        for ri, (a, b) in enumerate(zip(ours, theirs)):
            na, nb = normalise(a), normalise(b)
            if na != nb and ri:
                diffs.append(f"sequence {si} ({'pipelined' if outcome.case.sequences[si].pipelined else 'keep-alive'})"
                             f" before request {ri}: kmesh {_trace(ours[:ri])}, envoy {_trace(theirs[:ri])}")
            if na != nb:
                q = outcome.case.sequences[si].requests[ri]
                diffs.append(f"sequence {si} request {ri} {q!r}:\n  kmesh: {json.dumps(na, sort_keys=True)}"
                             f"\n  envoy: {json.dumps(nb, sort_keys=True)}")
    ours_log = [e for e in outcome.kmesh_log if e["case"] not in skipped]
    theirs_log = [e for e in outcome.envoy_log if e["case"] not in skipped]
    if ours_log != theirs_log:
        diffs.append(f"requests the backends got (x-case: case.sequence.request):\n  kmesh: {json.dumps(ours_log)}"
                     f"\n  envoy: {json.dumps(theirs_log)}")
    return diffs


def check(outcome: Outcome, known_pipelined_close: bool = False) -> None:
    """Fail on any difference kmesh did not warn about; a difference a
    warning excuses is shown as a Python warning."""
    if all("error" in r for rs in outcome.envoy for r in rs):
        raise AssertionError(f"case {outcome.case.name!r}: Envoy answered no request (a broken case): {outcome.envoy}")
    diffs = differences(outcome, known_pipelined_close)
    if not diffs:
        return
    excuses = excusing_warnings(outcome)
    if not excuses:
        raise AssertionError(f"case {outcome.case.name!r} (listener {outcome.index}): kmesh differs from Envoy "
                             f"and warned about none of the case's fields:\n" + "\n".join(diffs))
    warnings.warn(f"case {outcome.case.name!r}: differences excused by kmesh's warnings {excuses}:\n"
                  + "\n".join(diffs), stacklevel=2)
