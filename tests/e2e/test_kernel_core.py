"""What every kernel kmesh supports must carry, checked against one daemon.

The kernel matrix (tests/kernels) runs this module in a VM per kernel, where
each daemon start costs tens of seconds under TCG; on the host it runs with
the rest. Each check is the short form of a longer test elsewhere (named
beside it), aimed at what differs between kernels: the legacy objects'
counters (round robin, LEAST_REQUEST, max_connections, outlier ejection),
the errno of a refusal, the connect timeout read through BTF, the ring
buffer, the L7 hand-off (spliced or relayed), sk_msg attached with or without
a link, takeover and upgrade of the pins. The checks run in file order and
the last two restart the daemon.
"""
from __future__ import annotations

import collections
import contextlib
import json
import signal
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmesh.bpf import records
from tests.e2e.test_l4 import vip
from tests.e2e.test_l7 import DEFAULT, JASON, curl
from tests.e2e.test_observability import _lines, ep_labels, metrics
from tests.e2e.test_policies import CYCLES, _picks, connect, policies
from tests.e2e.test_sockmap import PEER, MiB, send, sk_msg_runs, wait_for
from tests.support import harness
from tests.support.envoy import bootstrap, cluster, hcm_listener, lb_ep, tcp_listener


@dataclass
class Core:
    k: harness.Kmesh
    cg: harness.Cgroup
    v: str
    a: harness.Backend
    b: harness.Backend
    access_log: Path
    a6: harness.Backend      # on [::1]
    v6_ports: tuple[int, int]   # [::1] VIPs: to a6's cluster, to A's (IPv4 only)


def _config(v: str, a, b, hole: str, a6=None, v6_ports=()) -> dict:
    wrr = cluster("wrr", lb_ep(*a.addr, weight=3), lb_ep(*b.addr, weight=1))
    busy = cluster("busy", lb_ep(*a.addr), lb="LEAST_REQUEST")
    lr = cluster("lr", lb_ep(*a.addr), lb_ep(*b.addr), lb="LEAST_REQUEST")
    cap = cluster("cap", lb_ep(*a.addr))
    cap["circuit_breakers"] = {"thresholds": [{"max_connections": 3}]}
    out = cluster("outlier", lb_ep("127.0.0.1", harness.dead_port()), lb_ep("127.0.0.1", harness.dead_port()),
                  lb_ep(*a.addr), lb_ep(*a.addr))
    out["outlier_detection"] = {"consecutive_5xx": 1, "base_ejection_time": "600s", "max_ejection_percent": 25}
    black = cluster("hole", lb_ep(hole, 80))
    live = cluster("live", lb_ep(*a.addr))
    black["connect_timeout"] = live["connect_timeout"] = "0.3s"
    v1, v2 = cluster("reviews-v1", lb_ep(*a.addr)), cluster("reviews-v2", lb_ep(*b.addr))
    listeners = [tcp_listener(name, v, port, name) for port, name in
                 ((80, "wrr"), (81, "busy"), (82, "lr"), (83, "cap"), (84, "outlier"), (85, "hole"), (86, "live"))]
    six = [cluster("six", lb_ep(*a6.addr))] if a6 else []
    listeners += [tcp_listener(n, "::1", p, c) for p, n, c in zip(v6_ports, ("six", "six-mapped"), ("six", "live"))]
    return bootstrap([*listeners, hcm_listener("reviews", v, 87, [JASON, DEFAULT])],
                     [wrr, busy, lr, cap, out, black, live, v1, v2, *six])


@pytest.fixture(scope="module")
def core(tmp_path_factory, bpf_object):
    with contextlib.ExitStack() as stack:
        cg = harness.Cgroup()
        stack.callback(cg.remove)
        a, b, a6 = harness.start_backend("A"), harness.start_backend("B"), harness.start_backend("A6", host="::1")
        for be in (a, b, a6):
            stack.callback(be.proc.wait)
            stack.callback(be.proc.kill)
        hole = stack.enter_context(harness.blackhole())
        tmp = tmp_path_factory.mktemp("core")
        log = tmp / "access.log"
        k = harness.Kmesh(cg, tmp / "kmesh.yaml", extra_args=("-access-log", f"-access-log-file={log}"))
        stack.callback(k.teardown)
        v = vip()
        v6_ports = (harness.free_port("::1"), harness.free_port("::1"))
        k.write_config(_config(v, a, b, hole, a6, v6_ports))
        k.start()
        yield Core(k, cg, v, a, b, log, a6, v6_ports)


def test_weighted_round_robin(core):
    """test_l4.py::test_endpoint_weights: smooth weighted round robin is exact."""
    got = core.cg.curl(f"http://{core.v}:80/[1-8]")
    assert collections.Counter(got) == {"A": 6, "B": 2}, got


def test_a_dual_stack_client_is_governed_through_the_mapped_address(core):
    """test_dual_stack.py: connect6 takes an AF_INET6 socket's connect to
    ::ffff:VIP as connect4 takes the VIP (nothing listens on the VIP)."""
    assert core.cg.curl(f"http://[::ffff:{core.v}]:86/[1-3]") == ["A"] * 3


def test_an_ipv6_vip_is_governed_by_connect6(core):
    """test_ipv6.py: an IPv6 VIP ([::1] on a port nothing listens on) to an
    IPv6 endpoint (the cluster's IPv6 view), and to an IPv4 one, reached
    mapped; sockops counts both with their own addresses."""
    six, mapped = core.v6_ports
    assert core.cg.curl(f"http://[::1]:{six}/[1-3]") == ["A6"] * 3
    assert core.cg.curl(f"http://[::1]:{mapped}/[1-3]") == ["A"] * 3
    labels = (("destination_cluster", "six"), ("destination_service", "six"), ("endpoint", f"[::1]:{core.a6.port}"))
    assert wait_for(lambda: metrics(core.k).get(("kmesh_tcp_connections_closed_total", labels)) == 3)


def test_least_request_counts_and_gives_back(core):
    """test_l4.py::test_least_request_prefers_idle_endpoint."""
    k, a = core.k, core.a
    holder = core.cg.popen([sys.executable, str(harness.CLIENT), "hold", core.v, "81", "3"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert json.loads(holder.stdout.readline())["bodies"] == {"A": 3}
        assert k.get("/bpf/kmesh/maps")["km_ep_active"][f"127.0.0.1:{a.port}"] == 3
        assert core.cg.curl(f"http://{core.v}:82/[1-6]") == ["B"] * 6
    finally:
        holder.stdin.close()
        holder.wait(10 * harness.SLOW)
    assert wait_for(lambda: all(n == 0 for n in k.get("/bpf/kmesh/maps")["km_ep_active"].values()))


def test_max_connections_refuses_with_the_kernels_errno(core):
    """test_policies.py::test_max_connections."""
    k, v = core.k, core.v
    holder = core.cg.popen([sys.executable, str(harness.CLIENT), "hold", v, "83", "3"],
                           stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        assert json.loads(holder.stdout.readline())["held"] == 3
        got = connect(core.cg, v, 83)   # the 4th: refused at once (ECONNREFUSED, EPERM before 5.18)
        assert got["errno"] == k.refused_errno() and got["seconds"] < 0.5, got
    finally:
        holder.stdin.close()
        holder.wait(10 * harness.SLOW)
    # 300 open/close cycles, half of them reset: no slot leaks
    r = core.cg.run([sys.executable, "-c", CYCLES, v, "83", "300"])
    assert r.returncode == 0 and json.loads(r.stdout)["refused"] == 0, r.stdout + r.stderr
    st = policies(k)["clusters"]["cap"]
    assert (st["active"], st["overflow"]) == (0, 1), st


def test_outlier_ejection_stops_at_max_percent(core):
    """test_policies.py::test_outlier_never_ejects_beyond_max_percent."""
    _picks(core.cg, core.v + ":84", 16)
    st = policies(core.k)["clusters"]["outlier"]
    assert len(st["ejected"]) == 1 and st["ejections"] == 1, st   # 25% of 4


def test_connect_timeout(core):
    """test_policies.py::test_connect_timeout (the user timeout is read through BTF)."""
    got = connect(core.cg, core.v, 85)
    # without the kernel config the first SYN retransmission (1 s) ends it
    lo, hi = (0.25, 1.0) if core.k.kernel_feature("connect_timeout_subsecond") else (0.9, 2.0)
    assert got["errno"] == "ETIMEDOUT" and lo <= got["seconds"] < hi, got
    got = connect(core.cg, core.v, 86)
    assert (got["errno"], got["user_timeout"]) == (0, 0), got


def test_l7_routes_by_header(core):
    """test_l7.py::test_route_by_header, spliced or relayed as the kernel allows."""
    url = f"http://{core.v}:87/reviews/0"
    once = ("-H", "Connection: close")   # one request per connection: spliced whole where the kernel can
    assert [curl(core.cg, url, *once, "-H", "end-user: jason") for _ in range(3)] == [(200, "B")] * 3
    assert [curl(core.cg, url, *once) for _ in range(3)] == [(200, "A")] * 3
    assert metrics(core.k)[("kmesh_connects_total", (("decision", "l7_handoff"),))] == 6
    splice = core.k.get("/l7")["splice"]   # None: relayed by the daemon
    assert (splice or {}).get("spliced", 0) == (6 if core.k.kernel_feature("l7_splice") else 0), splice


def test_counters_and_access_log_through_the_ring_buffer(core):
    """test_observability.py: per-endpoint counters and the access log."""
    k, v = core.k, core.v
    assert core.cg.curl(f"http://{v}:80/[1-4]").count("A") == 3

    def wrr() -> list[dict]:
        return [r for r in _lines(core.access_log, 0) if r["upstream_cluster"] == "wrr"]

    assert wait_for(lambda: len(wrr()) == 12), wrr()   # these 4 and test_weighted_round_robin's 8
    assert all(r["downstream_local_address"] == f"{v}:80" for r in wrr())
    m = metrics(k)
    labels = ep_labels("wrr", core.b.port)
    assert m[("kmesh_tcp_connections_opened_total", labels)] == 3   # 2 of the first 8, 1 of these 4
    assert m[("kmesh_tcp_connections_active", labels)] == 0


def test_sockmap_switched_on_and_off_at_runtime(core):
    """test_sockmap.py: sk_msg attached (with a link or bpf_prog_attach) carries the bytes."""
    from kmesh.bpf import libbpf

    k = core.k
    status, body = k.post("/sockmap/on")
    assert status == 200 and body["state"] == "on", body
    port = harness.free_port()
    srv = core.cg.popen([sys.executable, str(PEER), "serve", str(port)], stdout=subprocess.PIPE)
    stats = libbpf.enable_stats()
    try:
        assert srv.stdout.readline().startswith("listening")
        runs = sk_msg_runs(k)
        assert send(core.cg, port, 4 * MiB, 4 * MiB, 1)["ok"]
        assert sk_msg_runs(k) > runs
        assert wait_for(lambda: k.get("/sockmap")["sockets"] == 0), "stale entries after close"
    finally:
        os.close(stats)
        srv.kill()
        srv.wait()
    status, body = k.post("/sockmap/off")
    assert status == 200 and wait_for(lambda: k.get("/sockmap")["state"] == "off", timeout=15)
    assert "kmesh_sockops" not in k.attached_programs()


def test_sigkill_then_restart_takes_over(core):
    """test_lifecycle.py::test_sigkill_then_restart_keeps_traffic."""
    k, v = core.k, core.v
    with _load(core, 80) as report:
        k.stop(signal.SIGKILL)
        assert sorted(k.attached_programs()) == harness.PROGRAMS   # pinned links hold
        assert set(core.cg.curl(f"http://{v}:80/[1-4]")) <= {"A", "B"}
        k.start()
        assert "takeover=True" in k.log()
    assert report["failed"] == 0 and set(report["bodies"]) == {"A", "B"}, report
    assert sorted(k.attached_programs()) == harness.PROGRAMS


def test_upgrade_with_another_record_layout_migrates(core):
    """test_lifecycle.py::test_upgrade_with_another_record_layout_migrates_without_a_gap."""
    k, v = core.k, core.v
    k.stop(signal.SIGTERM)
    k.stamp_layout(0)   # "written by an older kmesh"
    with _load(core, 80) as report:
        k.start()
    assert report["failed"] == 0 and report["ok"] > 0, report
    assert "pinned maps migrated" in k.log()
    assert k.pinned_layout() == records.KMESH_LAYOUT_VERSION
    assert collections.Counter(core.cg.curl(f"http://{v}:80/[1-4]")) == {"A": 3, "B": 1}
    assert [curl(core.cg, f"http://{v}:87/", "-H", "end-user: jason")] == [(200, "B")]


@contextlib.contextmanager
def _load(core: Core, port: int):
    """A client looping on the VIP while the block runs; yields its report,
    filled in when the block ends (also when it fails: no client outlives it)."""
    load, report = core.cg.load(core.v, port), {}
    try:
        yield report
    except BaseException:
        load.proc.kill()
        load.proc.wait()
        raise
    report.update(load.report())
