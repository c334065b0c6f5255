"""IPv6 VIPs and endpoints, from pods: cgroup/connect6 balances, weighs and
polices connects to IPv6 service addresses as connect4 does IPv4 ones;
sockops counts their bytes and closes; an endpoint with addresses of both
families is reached over the client's own; the state is taken over at a
restart. The pods have IPv6 addresses in a test-made /64 and no other
route, and the VIPs are in fd96::/16: a connect kmesh does not redirect
fails inside the pod (ENETUNREACH)."""
from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.test_dual_stack import three_held_then_freed
from tests.e2e.test_observability import metrics, wait_metrics
from tests.support import pods
from tests.support.envoy import bootstrap, cluster, hcm_listener, lb_ep, rate_limited, sock, tcp_listener

_VIPS: set[str] = set()


def vip6() -> str:
    """An IPv6 VIP no other test of this run got; unroutable in the pods."""
    while (v := f"fd96::{random.randint(1, 0xffff):x}:{random.randint(1, 0xffff):x}") in _VIPS:
        pass
    _VIPS.add(v)
    return v


def url(ip: str, port: int = 80, path: str = "/") -> str:
    return f"http://[{ip}]:{port}{path}" if ":" in ip else f"http://{ip}:{port}{path}"


def dual_ep(ip: str, ip6: str, port: int) -> dict:
    """An endpoint with an address of each family (Envoy's additional_addresses)."""
    ep = lb_ep(ip, port)
    ep["endpoint"]["additional_addresses"] = [{"address": sock(ip6, port)}]
    return ep


@pytest.fixture
def topo():
    with pods.Topology() as t:
        yield t


def test_ipv6_vips_are_balanced_and_weighed_between_pods(kmesh, cgroup, topo):
    a_pod, b_pod = topo.pod("web-a"), topo.pod("web-b")
    a, b = a_pod.backend("A", 8080, a_pod.ip6), b_pod.backend("B", 8080, b_pod.ip6)
    client, other = topo.pod("client", parent=cgroup), topo.pod("other")
    v, w, x = vip6(), vip6(), vip6()
    kmesh(bootstrap([tcp_listener("rr", v, 80, "rr"), tcp_listener("w", v, 81, "w"),
                     tcp_listener("any6", "::", 82, "rr"), tcp_listener("any4", "0.0.0.0", 83, "four"),
                     tcp_listener("exact", w, 82, "w")],
                    [cluster("rr", lb_ep(*a), lb_ep(*b)),
                     cluster("w", lb_ep(*a, weight=3), lb_ep(*b, weight=1)),
                     cluster("four", lb_ep(a_pod.ip, 8080))]))
    got = client.curl(url(v, 80, "/[1-10]"))
    assert collections.Counter(got) == {"A": 5, "B": 5} and all(x != y for x, y in zip(got, got[1:])), got
    assert collections.Counter(client.curl(url(v, 81, "/[1-8]"))) == {"A": 6, "B": 2}
    # [::]:82 takes an IPv6 VIP no listener names; the exact one wins for its own
    assert set(client.curl(url(x, 82, "/[1-4]"))) == {"A", "B"}
    assert collections.Counter(client.curl(url(w, 82, "/[1-4]"))) == {"A": 3, "B": 1}
    # the IPv4 wildcard takes no IPv6 connect: the VIP is unroutable in the pod
    assert client.connect(x, 83) == "ENETUNREACH"
    # a pod outside the governed cgroup is left alone
    assert other.connect(v, 80) == "ENETUNREACH"
    assert other.connect(*a) == "ok"


def test_each_client_reaches_an_endpoint_over_its_own_family(kmesh, cgroup, topo):
    """An Istio-shaped dual-stack service: one listener with an IPv4 VIP
    and an IPv6 additional address, endpoints with an address of each
    family. IPv4 clients go to the IPv4 addresses, IPv6 clients to the IPv6
    ones; a cluster with IPv4 endpoints only is reached mapped."""
    a_pod, b_pod = topo.pod("web-a"), topo.pod("web-b")
    a_pod.backend("A4", 8080), a_pod.backend("A6", 8080, a_pod.ip6)
    b_pod.backend("B4", 8080), b_pod.backend("B6", 8080, b_pod.ip6)
    client = topo.pod("client", parent=cgroup)
    v4, v6, only4 = "10.96.7.7", vip6(), vip6()
    svc = tcp_listener("svc", v4, 80, "svc")
    svc["additional_addresses"] = [{"address": sock(v6, 80)}]
    k = kmesh(bootstrap([svc, tcp_listener("only4", only4, 80, "only4")],
                        [cluster("svc", dual_ep(a_pod.ip, a_pod.ip6, 8080), dual_ep(b_pod.ip, b_pod.ip6, 8080)),
                         cluster("only4", lb_ep(a_pod.ip, 8080))]))
    assert collections.Counter(client.curl(url(v4, 80, "/[1-4]"))) == {"A4": 2, "B4": 2}
    assert collections.Counter(client.curl(url(v6, 80, "/[1-4]"))) == {"A6": 2, "B6": 2}
    assert client.curl(url(only4, 80, "/[1-2]")) == ["A4", "A4"]
    # one cluster, two records: what the maps hold for each family
    maps = k.get("/bpf/kmesh/maps")
    eps = sorted(e["address"] for c in maps["km_cluster"].values() for e in c["endpoints"])
    assert eps == sorted([f"{a_pod.ip}:8080", f"{b_pod.ip}:8080", f"[{a_pod.ip6}]:8080", f"[{b_pod.ip6}]:8080",
                          f"{a_pod.ip}:8080"]), maps["km_cluster"]
    m = metrics(k)
    for ep in (f"{a_pod.ip}:8080", f"[{a_pod.ip6}]:8080"):
        assert m[("kmesh_tcp_connections_opened_total", (("destination_cluster", "svc"),
                                                         ("destination_service", "svc"), ("endpoint", ep)))] == 2


TIMED = """
import errno, json, socket, sys, time
s = socket.socket(socket.AF_INET6)
t = time.monotonic()
rc = s.connect_ex((sys.argv[1], int(sys.argv[2])))
print(json.dumps({"errno": errno.errorcode.get(rc, rc) if rc else 0, "seconds": time.monotonic() - t}))
"""


def test_traffic_policies_on_ipv6(kmesh, cgroup, topo):
    """max_connections counts and releases IPv6 connections; the listener's
    rate limit, outlier ejection of a dead IPv6 endpoint and the connect
    timeout of a silent one, as for IPv4."""
    web_pod = topo.pod("web")
    a = web_pod.backend("A", 8080, web_pod.ip6)
    dead = (web_pod.ip6, 8081)   # nothing listens: refused
    client = topo.pod("client", parent=cgroup)
    hole = f"{topo.subnet6}ee"   # no such host: a neighbour entry that leads nowhere
    pods._ip("-6", "neigh", "replace", hole, "lladdr", "02:00:00:00:00:01", "dev", "eth0", "nud", "permanent",
             netns=client.netns)
    v = vip6()
    web = cluster("web", lb_ep(*a))
    web["circuit_breakers"] = {"thresholds": [{"max_connections": 3}]}
    flaky = cluster("flaky", lb_ep(*a), lb_ep(*dead))
    flaky["outlier_detection"] = {"consecutive_5xx": 2, "base_ejection_time": "30s", "max_ejection_percent": 50}
    silent = cluster("silent", lb_ep(hole, 80))
    silent["connect_timeout"] = "0.3s"
    k = kmesh(bootstrap([tcp_listener("web", v, 80, "web"),
                         rate_limited(tcp_listener("limited", v, 81, "web"), max_tokens=3, tokens_per_fill=1,
                                      fill_interval="3600s"),
                         tcp_listener("flaky", v, 82, "flaky"), tcp_listener("silent", v, 83, "silent")],
                        [web, flaky, silent]))
    three_held_then_freed(k, client, v, "web", url(v, 80, "/[1-3]"))

    assert [client.connect(v, 81) for _ in range(5)] == ["ok"] * 3 + [k.refused_errno()] * 2
    assert metrics(k)[("kmesh_listener_rate_limited_total", (("listener", f"[{v}]:81"),))] == 2

    picks = []
    for _ in range(8):
        r = client.run(["curl", "-sS", "--max-time", "5", url(v, 82)])
        picks.append(r.stdout.strip() if r.returncode == 0 else "refused")
    # round robin: the dead one fails twice in a row of its turns, then is ejected
    assert picks == ["A", "refused", "A", "refused"] + ["A"] * 4, picks
    st = k.get("/policies")["clusters"]["flaky"]
    assert st["ejected"] == [f"[{dead[0]}]:{dead[1]}"] and st["ejections"] == 1, st

    got = json.loads(client.run([sys.executable, "-c", TIMED, v, "83"]).stdout)
    # ETIMEDOUT after the cluster's 0.3 s (the kernel alone: minutes of SYN retries)
    assert got["errno"] == "ETIMEDOUT" and 0.25 <= got["seconds"] < 1.0, got


def test_ipv6_bytes_and_access_log(kmesh, cgroup, topo, tmp_path):
    """The bytes of an exchange as curl counts them, under the VIP's and the
    endpoint's IPv6 labels, and the client's own IPv6 address in the log."""
    web_pod = topo.pod("web")
    a = web_pod.backend("A", 8080, web_pod.ip6)
    client = topo.pod("client", parent=cgroup)
    v = vip6()
    log = tmp_path / "access.log"
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "web")], [cluster("web", lb_ep(*a))]),
              extra_args=("-access-log", f"-access-log-file={log}"))
    r = client.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_request} %{size_header} %{size_download}",
                    url(v)])
    req, head, body = map(int, r.stdout.split())
    labels = (("destination_cluster", "web"), ("destination_service", "web"), ("endpoint", f"[{a[0]}]:8080"))
    m = wait_metrics(k, lambda m: m.get(("kmesh_tcp_connections_closed_total", labels)) == 1)
    assert (m[("kmesh_tcp_received_bytes_total", labels)], m[("kmesh_tcp_sent_bytes_total", labels)]) == \
        (req, head + body)
    listener = (("listener", f"[{v}]:80"),)
    assert m[("kmesh_listener_sent_bytes_total", listener)] == head + body
    deadline = time.monotonic() + 10
    while not log.exists() or not log.read_text().strip():
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.1)
    rec = json.loads(log.read_text().splitlines()[0])
    assert rec["downstream_local_address"] == f"[{v}]:80" and rec["upstream_host"] == f"[{a[0]}]:8080", rec
    assert rec["downstream_remote_address"].startswith(f"[{client.ip6}]:"), rec
    assert (rec["bytes_received"], rec["bytes_sent"], rec["result"]) == (req, head + body, "closed"), rec


def test_a_restart_takes_the_ipv6_state_over(kmesh, cgroup, topo):
    """Killed and started again on the same pins, the daemon finds its IPv6
    listeners and both records of a dual-stack cluster as it wrote them:
    nothing is rewritten, and a client looping meanwhile never fails."""
    a_pod, b_pod = topo.pod("web-a"), topo.pod("web-b")
    for p, n in ((a_pod, "A"), (b_pod, "B")):
        p.backend(n, 8080), p.backend(n, 8080, p.ip6)
    client = topo.pod("client", parent=cgroup)
    v = vip6()
    svc = tcp_listener("svc", "10.96.8.8", 80, "svc")
    svc["additional_addresses"] = [{"address": sock(v, 80)}]
    k = kmesh(bootstrap([svc], [cluster("svc", dual_ep(a_pod.ip, a_pod.ip6, 8080),
                                        dual_ep(b_pod.ip, b_pod.ip6, 8080))]))
    load = client.load(v, 80, 8)
    k.stop(signal.SIGKILL)
    assert set(client.curl(url(v, 80, "/[1-2]"))) <= {"A", "B"}
    k.start()
    assert "takeover=True" in k.log() and "kmesh_connect6:replaced" in k.log()
    assert k.get("/status")["last_update"]["changes"] == {
        "clusters_written": 0, "listeners_written": 0, "listeners_deleted": 0, "clusters_deleted": 0}
    report = load.report(stop=False)
    assert report["failed"] == 0 and set(report["bodies"]) == {"A", "B"}, report


ROUTES = [{"match": {"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]},
           "route": {"cluster": "b"}},
          {"match": {"prefix": "/"}, "route": {"cluster": "a"}}]


def test_an_ipv6_vip_is_routed_per_request_from_a_pod(kmesh, cgroup, topo):
    """The hand-off: connect6 sends the pod's connection to the daemon's
    listener in the pod (its IPv4 address, mapped), sockops publishes the
    IPv6 VIP it asked for, and every request is routed by its header to
    IPv6 endpoints."""
    a_pod, b_pod = topo.pod("web-a"), topo.pod("web-b")
    a, b = a_pod.backend("A", 8080, a_pod.ip6), b_pod.backend("B", 8080, b_pod.ip6)
    client = topo.pod("client", parent=cgroup)
    v = vip6()
    k = kmesh(bootstrap([hcm_listener("web", v, 80, ROUTES)], [cluster("a", lb_ep(*a)), cluster("b", lb_ep(*b))]))
    assert k.post(f"/workloads/enroll?netns=/run/netns/{client.netns}")[0] == 200
    assert client.curl(url(v, 80, "/[1-3]"), ("-H", "end-user: jason")) == ["B"] * 3
    assert client.curl(url(v, 80, "/[1-3]")) == ["A"] * 3
    m = metrics(k)
    assert m[("kmesh_connects_total", (("decision", "l7_handoff"),))] == 6, m


def test_an_ipv6_vip_is_routed_per_request_by_either_engine(engine_kmesh, cgroup, backends):
    """On the host's own loopback ([::1] on a port nothing listens on is
    the VIP); the native engine hands an IPv6 VIP's connection to the
    daemon's path, which serves it."""
    from tests.support.harness import free_port

    a, b = backends("A", "B", host="::1")
    port = free_port("::1")
    engine_kmesh(bootstrap([hcm_listener("web", "::1", port, ROUTES)],
                           [cluster("a", lb_ep(*a.addr)), cluster("b", lb_ep(*b.addr))]))
    assert cgroup.curl(url("::1", port, "/[1-4]"), ("-H", "end-user: jason")) == ["B"] * 4
    assert cgroup.curl(url("::1", port, "/[1-4]")) == ["A"] * 4
    # outside the cgroup nothing listens there
    r = subprocess.run(["curl", "-sS", "--max-time", "5", url("::1", port)], capture_output=True, text=True)
    assert r.returncode == 7, r.stderr
