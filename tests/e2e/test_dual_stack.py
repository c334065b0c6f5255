"""Dual-stack clients: an AF_INET6 socket reaches an IPv4 VIP through its
IPv4-mapped address (::ffff:a.b.c.d, what Java and other dual-stack
runtimes use for IPv4), and kmesh governs it as connect4 governs an AF_INET
socket (cgroup/connect6): load balancing, policies with their close
accounting, metrics, and the L7 hand-off with either engine. Real kernel,
a child cgroup, loopback VIPs."""
from __future__ import annotations

import collections
import json
import subprocess
import sys

from tests.e2e.test_l4 import vip
from tests.e2e.test_observability import metrics
from tests.support.envoy import bootstrap, cluster, hcm_listener, lb_ep, tcp_listener


def mapped(v: str) -> str:
    return f"::ffff:{v}"


def test_a_mapped_connect_is_balanced_as_ipv4(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("vip", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr), lb_ep(*b.addr))]))
    got = cgroup.curl(f"http://[{mapped(v)}]/[1-20]")   # curl: an AF_INET6 socket for a mapped literal
    assert all(x != y for x, y in zip(got, got[1:])), got
    assert collections.Counter(got) == {"A": 10, "B": 10}
    assert cgroup.curl(f"http://{v}/[1-2]") == ["A", "B"]   # one round robin for both families
    m = metrics(k)
    assert m[("kmesh_connects_total", (("decision", "redirect"),))] == 22, m
    # Outside the cgroup the mapped VIP is not touched: nothing listens there.
    r = subprocess.run(["curl", "-sS", "--max-time", "5", f"http://[{mapped(v)}]/"], capture_output=True, text=True)
    assert r.returncode == 7, r.stderr


def test_an_ipv6_destination_is_left_alone(kmesh, cgroup, backends):
    """The IPv4 wildcard takes no IPv6 destination: a connect to a real
    IPv6 address keeps it (::1 on a port nothing listens on: refused)."""
    (a,) = backends("A")
    v = vip()
    kmesh(bootstrap([tcp_listener("vip", v, 80, "c1"), tcp_listener("any", "0.0.0.0", 80, "c1")],
                    [cluster("c1", lb_ep(*a.addr))]))
    r = cgroup.run(["curl", "-sS", "--max-time", "5", "http://[::1]:80/"])
    assert r.returncode == 7, r.stderr


HOLD = """
import errno, json, socket, sys
v, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    s = socket.socket(socket.AF_INET6)
    s.connect((v, port))
    held.append(s)
s = socket.socket(socket.AF_INET6)
rc = s.connect_ex((v, port))
print(json.dumps({"held": len(held), "next": errno.errorcode.get(rc, rc)}), flush=True)
sys.stdin.readline()
"""


def three_held_then_freed(k, runner, host: str, cluster: str, url: str) -> None:
    """With max_connections 3: three AF_INET6 connections to host:80 held
    take every slot (the 4th is refused with the kernel's errno); closed,
    they give them back (curling ``url`` gets three "A" answers)."""
    holder = runner.popen([sys.executable, "-c", HOLD, host, "80", "3"], stdout=subprocess.PIPE,
                          stdin=subprocess.PIPE)
    try:
        got = json.loads(holder.stdout.readline())
        assert got == {"held": 3, "next": k.refused_errno()}, got
        assert k.get("/policies")["clusters"][cluster]["active"] == 3
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert runner.curl(url) == ["A"] * 3   # the slots are free again


def test_policies_count_and_release_mapped_connections(kmesh, cgroup, backends):
    """max_connections counts a mapped connection when it connects and
    gives its slot back when it closes (sockops sees it as IPv4)."""
    (a,) = backends("A")
    v = vip()
    web = cluster("web", lb_ep(*a.addr))
    web["circuit_breakers"] = {"thresholds": [{"max_connections": 3}]}
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "web")], [web]))
    three_held_then_freed(k, cgroup, mapped(v), "web", f"http://[{mapped(v)}]/[1-3]")
    st = k.get("/policies")["clusters"]["web"]
    assert (st["active"], st["overflow"]) == (0, 1), st


def test_a_mapped_client_is_routed_at_l7(engine_kmesh, cgroup, backends):
    """The hand-off finds a mapped client's original destination (its
    socket is IPv4 underneath) and routes every request by its header."""
    a, b = backends("A", "B")
    v = vip()
    k = engine_kmesh(bootstrap([hcm_listener("web", v, 80, [
        {"match": {"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]},
         "route": {"cluster": "b"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "a"}}])],
        [cluster("a", lb_ep(*a.addr)), cluster("b", lb_ep(*b.addr))]))
    url = f"http://[{mapped(v)}]/[1-4]"
    assert cgroup.curl(url, ("-H", "end-user: jason")) == ["B"] * 4
    assert cgroup.curl(url) == ["A"] * 4
    m = metrics(k)
    assert m[("kmesh_connects_total", (("decision", "l7_handoff"),))] == 8, m


def test_an_l7_route_of_an_ipv4_vip_reaches_ipv6_endpoints(engine_kmesh, cgroup, backends):
    """Requests go up from the daemon's own socket, so a route may lead to
    a cluster of IPv6 endpoints (the native engine hands such a forward to
    the daemon's path)."""
    a, b = backends("A", "B", host="::1")
    v = vip()
    engine_kmesh(bootstrap([hcm_listener("web", v, 80, [
        {"match": {"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]},
         "route": {"cluster": "b"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "a"}}])],
        [cluster("a", lb_ep(*a.addr)), cluster("b", lb_ep(*b.addr))]))
    assert cgroup.curl(f"http://{v}/[1-3]", ("-H", "end-user: jason")) == ["B"] * 3
    assert cgroup.curl(f"http://[{mapped(v)}]/[1-3]") == ["A"] * 3
