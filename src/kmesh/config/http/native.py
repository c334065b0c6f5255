"""A route table as the native L7 engine decides with it (src/native/l7route.h
has the layout): the routes, virtual hosts and clusters whose every decision
the engine can make exactly as kmesh.l7.handoff would. What it cannot make
is written as "the Python side's": a route it cannot evaluate (regex and
query matchers, gRPC), an action other than a plain forward (a rewrite,
header mutations, mirrors, retries beyond failed connects, a direct response
or redirect), a cluster the daemon's balancer must choose for (least
request, outlier detection). A pure function of the compiled table."""
from __future__ import annotations

import struct
from collections.abc import Mapping

from kmesh.bpf import records
from kmesh.config.http import match as m
from kmesh.config.http import routes as rt
from kmesh.config.model import Cluster

MAGIC = 0x4B525431
F_IGNORE_PORT, F_IGNORE_PATH_PARAMS = 1, 2
LB = {records.LbPolicy.ROUND_ROBIN: 0, records.LbPolicy.RANDOM: 1}
H_EXACT, H_SUFFIX, H_PREFIX = 0, 1, 2
P_PREFIX, P_EXACT, P_SEPARATED, P_PYTHON = 0, 1, 2, 3
C_KINDS = {"exact": 0, "prefix": 1, "suffix": 2, "contains": 3}
C_ANY, C_PRESENCE = 4, 5
A_PYTHON, A_FORWARD = 0, 1


def _str(text: str) -> bytes:
    """Length and bytes; UnicodeEncodeError for text that is not ASCII (the
    engine reads ASCII heads only: such text is the Python side's)."""
    raw = text.encode("ascii")
    return struct.pack("=I", len(raw)) + raw


def _cluster(c: Cluster, connect_timeout_ms: int) -> bytes | None:
    """A cluster the engine balances itself, else None."""
    if c.lb_policy not in LB or c.policy.outlier_failures or not c.endpoints:
        return None
    eps = []
    for e in c.endpoints:
        try:
            ip = records.ipv4_field(e.ip)
        except (ValueError, OSError):
            return None   # not an IPv4 address: the daemon's path
        eps.append(struct.pack("=III", ip, e.port, max(1, e.weight)))
    return struct.pack("=BII", LB[c.lb_policy], c.policy.connect_timeout_ms or connect_timeout_ms,
                       len(eps)) + b"".join(eps)


def _path(p: m.PathMatch) -> bytes | None:
    if isinstance(p, m.Prefix):
        return struct.pack("=BB", P_PREFIX, p.ignore_case) + _str(p.prefix)
    if isinstance(p, m.Exact):
        return struct.pack("=BB", P_EXACT, p.ignore_case) + _str(p.path)
    if isinstance(p, m.SeparatedPrefix):
        return struct.pack("=BB", P_SEPARATED, p.prefix.ignore_case) + _str(p.prefix.prefix)
    return None


def _cond(c) -> bytes | None:
    if not isinstance(c, m.HeaderCond):
        return None   # query parameters, gRPC
    if c.test is None:
        kind, value, ignore_case = C_PRESENCE, "", False
    elif c.test is m.any_value:
        kind, value, ignore_case = C_ANY, "", False
    elif isinstance(c.test, m.TextTest):
        kind, value, ignore_case = C_KINDS[c.test.kind], c.test.value, c.test.ignore_case
    else:
        return None   # regex, range
    return struct.pack("=BBBBB", kind, ignore_case, c.present, c.invert, c.missing_as_empty) + \
        _str(c.name) + _str(value)


def _plain(f: rt._Forward, faults: bool, filter_fault) -> bool:
    """A forward that only picks a cluster: the head goes up and the
    response comes back as they are, nothing retried but a failed connect,
    no fault (``faults``: the fault filter is in the chain; ``filter_fault``:
    its own config, where no level of the route configuration sets one)."""
    b = f.base
    if faults and (f.fault.fault is not None if f.fault is not None else filter_fault is not None):
        return False
    return (f.rewrite is None and b.rewrite_host is None and not b.request_headers and not b.response_headers
            and not b.cluster_headers and not b.mirrors and not b.attempt_count_request
            and not b.attempt_count_response and (b.retry is None or b.retry.connect_only))


def _action(action, cluster_index: Mapping[str, int], faults: bool, filter_fault) -> bytes:
    if not isinstance(action, rt._Forward) or not _plain(action, faults, filter_fault):
        return struct.pack("=B", A_PYTHON)
    picks = [(n, w) for n, w in action.base.clusters if w > 0]   # pick_weighted never draws the others
    if any(name not in cluster_index for name, _ in picks):
        return struct.pack("=B", A_PYTHON)   # every cluster or none: the draw stays the Python side's
    out = struct.pack("=BII", A_FORWARD, action.base.timeout_ms or 0, len(picks))
    return out + b"".join(struct.pack("=II", cluster_index[n], w) for n, w in picks)


def _route(r: rt._Route, cluster_index: Mapping[str, int], faults: bool, filter_fault) -> bytes:
    try:
        path = _path(r.path)
        conds = [_cond(c) for c in r.conditions]
    except UnicodeEncodeError:
        path = None
    if path is None or None in conds:
        return struct.pack("=B", P_PYTHON)
    return path + struct.pack("=I", len(conds)) + b"".join(conds) + _action(r.action, cluster_index, faults, filter_fault)


def _host(kind: int, domain: str, vhost: int) -> bytes:
    """A domain; b"" for one no ASCII Host can match."""
    try:
        return struct.pack("=B", kind) + _str(domain) + struct.pack("=I", vhost)
    except UnicodeEncodeError:
        return b""


def table(routes: rt.RouteTable, clusters: Mapping[str, Cluster], connect_timeout_ms: int,
          faults: bool = False, filter_fault: rt.FilterFault | None = None) -> bytes:
    """The table the engine decides ``routes`` with (clusters by name;
    ``faults``, ``filter_fault``: as Target.route_faults, filter_fault)."""
    names, written = [], []
    for name in sorted({n for vh in routes.vhosts for r in vh.routes if isinstance(r.action, rt._Forward)
                        for n, _ in r.action.base.clusters}):
        c = clusters.get(name)
        raw = _cluster(c, connect_timeout_ms) if c is not None else None
        if raw is not None:
            names.append(name)
            written.append(raw)
    cluster_index = {n: i for i, n in enumerate(names)}
    vindex = {id(vh): i for i, vh in enumerate(routes.vhosts)}
    idx = routes.hosts
    hosts = [(H_EXACT, d, vh) for d, vh in sorted(idx.exact.items(), key=lambda kv: kv[0].encode())]   # halved
    hosts += [(H_SUFFIX, d, vh) for _, t in idx.suffixes for d, vh in t.items()]
    hosts += [(H_PREFIX, d, vh) for _, t in idx.prefixes for d, vh in t.items()]
    host_entries = [h for h in (_host(kind, d, vindex[id(vh)]) for kind, d, vh in hosts) if h]
    default = vindex[id(idx.default)] if idx.default is not None else -1
    flags = (F_IGNORE_PORT if idx.ignore_port else 0) | (F_IGNORE_PATH_PARAMS if routes.ignore_path_parameters else 0)
    out = [struct.pack("=IIIIIi", MAGIC, flags, len(written), len(host_entries), len(routes.vhosts), default)]
    out += written
    out += host_entries
    for vh in routes.vhosts:
        out.append(struct.pack("=BI", bool(vh.require_tls), len(vh.routes)))
        out += [_route(r, cluster_index, faults, filter_fault) for r in vh.routes]
    return b"".join(out)
