"""The L4 data path on the real kernel: connect4 load balancing through a VIP."""
from __future__ import annotations

import collections
import json
import random
import subprocess
import time

from tests.support import harness
from tests.support.envoy import bootstrap, cluster, hcm_listener, lb_ep, tcp_listener


_VIPS: set[str] = set()


def vip() -> str:
    """A loopback VIP (127.100.0.0/16) no other test of this run got."""
    while (v := f"127.100.{random.randint(1, 254)}.{random.randint(1, 254)}") in _VIPS:
        pass
    _VIPS.add(v)
    return v


def test_single_endpoint_via_vip(kmesh, cgroup, backends):
    (a,) = backends("A")
    kmesh(bootstrap([tcp_listener("vip", "127.0.0.1", 23333, "c1")], [cluster("c1", lb_ep(*a.addr))]))
    assert cgroup.curl("http://127.0.0.1:23333/[1-3]") == ["A"] * 3


def test_round_robin_alternates(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v = vip()
    kmesh(bootstrap([tcp_listener("vip", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr), lb_ep(*b.addr))]))
    got = cgroup.curl(f"http://{v}/[1-20]")
    assert all(x != y for x, y in zip(got, got[1:])), got
    assert collections.Counter(got) == {"A": 10, "B": 10}


def test_endpoint_weights(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v = vip()
    kmesh(bootstrap([tcp_listener("vip", v, 80, "c1")],
                    [cluster("c1", lb_ep(*a.addr, weight=3), lb_ep(*b.addr, weight=1))]))
    got = collections.Counter(cgroup.curl(f"http://{v}/[1-400]"))
    assert got == {"A": 300, "B": 100}  # round robin over the weighted schedule is exact


def test_random_honours_weights(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v = vip()
    kmesh(bootstrap([tcp_listener("vip", v, 80, "c1")],
                    [cluster("c1", lb_ep(*a.addr, weight=4), lb_ep(*b.addr, weight=1), lb="RANDOM")]))
    got = collections.Counter(cgroup.curl(f"http://{v}/[1-1000]"))
    assert abs(got["A"] / 1000 - 0.8) <= 0.065, got   # binomial, n=1000: P(fail) < 5e-7


def test_weighted_clusters_80_20(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v = vip()
    kmesh(bootstrap([hcm_listener("canary", v, 80, [{"match": {"prefix": "/"}, "route": {"weighted_clusters": {
        "clusters": [{"name": "v1", "weight": 80}, {"name": "v2", "weight": 20}]}}}])],
                    [cluster("v1", lb_ep(*a.addr)), cluster("v2", lb_ep(*b.addr))]))
    got = collections.Counter(cgroup.curl(f"http://{v}/[1-1000]"))
    assert sum(got.values()) == 1000
    assert abs(got["A"] / 1000 - 0.80) <= 0.065, got   # binomial, n=1000: P(fail) < 5e-7


def test_least_request_prefers_idle_endpoint(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    busy_vip, lr_vip = vip(), vip()
    k = kmesh(bootstrap(
        [tcp_listener("busy", busy_vip, 80, "only-a"), tcp_listener("lr", lr_vip, 80, "both")],
        [cluster("only-a", lb_ep(*a.addr), lb="LEAST_REQUEST"),
         cluster("both", lb_ep(*a.addr), lb_ep(*b.addr), lb="LEAST_REQUEST")]))
    holder = cgroup.popen([harness.sys.executable, str(harness.CLIENT), "hold", busy_vip, "80", "5"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert json.loads(holder.stdout.readline())["bodies"] == {"A": 5}
        active = k.get("/bpf/kmesh/maps")["km_ep_active"]
        assert active[f"127.0.0.1:{a.port}"] == 5
        got = collections.Counter(cgroup.curl(f"http://{lr_vip}/[1-20]"))
        assert got == {"B": 20}, got
    finally:
        holder.stdin.close()
        holder.wait(10)
    # Closed sockets give their count back (cgroup/sock_release).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        active = k.get("/bpf/kmesh/maps")["km_ep_active"]
        if all(v == 0 for v in active.values()):
            break
        time.sleep(0.05)
    assert all(v == 0 for v in active.values()), active
    got = collections.Counter(cgroup.curl(f"http://{lr_vip}/[1-20]"))
    assert got == {"A": 10, "B": 10}, got  # idle again: ties alternate


def test_wildcard_listener(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    exact = vip()
    port = 20000 + random.randint(0, 9999)
    kmesh(bootstrap([tcp_listener("any", "0.0.0.0", port, "ca"), tcp_listener("exact", exact, port, "cb")],
                    [cluster("ca", lb_ep(*a.addr)), cluster("cb", lb_ep(*b.addr))]))
    assert cgroup.curl(f"http://{vip()}:{port}/") == ["A"]
    assert cgroup.curl(f"http://127.0.0.1:{port}/") == ["A"]
    assert cgroup.curl(f"http://{exact}:{port}/") == ["B"]  # exact beats wildcard


def test_processes_outside_cgroup_untouched(kmesh, cgroup, backends):
    (a,) = backends("A")
    v = vip()
    kmesh(bootstrap([tcp_listener("vip", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr))]))
    assert cgroup.curl(f"http://{v}/") == ["A"]
    r = subprocess.run(["curl", "-sS", "--max-time", "5", f"http://{v}/"], capture_output=True, text=True)
    assert r.returncode == 7, "outside the cgroup nothing listens on the VIP: connection refused"


def test_unmatched_and_udp_untouched(kmesh, cgroup, backends):
    (a,) = backends("A")
    v = vip()
    kmesh(bootstrap([tcp_listener("vip", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr))]))
    r = cgroup.run(["curl", "-sS", "--max-time", "5", f"http://{v}:81/"])
    assert r.returncode == 7  # other port: no listener, connection untouched
    r = cgroup.client("udp", v, 80)
    assert r.stdout.strip() == f"{v}:80", r.stderr  # UDP connect keeps its destination


def test_cluster_without_endpoints_leaves_connection_alone(kmesh, cgroup):
    v = vip()
    kmesh(bootstrap([tcp_listener("vip", v, 80, "empty")], [cluster("empty")]))
    r = cgroup.run(["curl", "-sS", "--max-time", "5", f"http://{v}/"])
    assert r.returncode == 7
