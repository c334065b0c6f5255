"""Workloads in network namespaces of their own ("pods", tests/support/pods.py):
a client pod under the governed cgroup reaches endpoints in other pods
through a service VIP that is unroutable in every pod."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.test_l7 import DEFAULT, JASON, curl
from tests.e2e.test_observability import KMESHCTL
from tests.support import pods
from tests.support.envoy import bootstrap, cluster, hcm_listener, lb_ep, tcp_listener

VIP, VIP2 = "10.96.0.10", "10.96.0.11"   # ClusterIPs: no route to them anywhere in the topology


@pytest.fixture
def topo():
    with pods.Topology() as t:
        yield t


def test_l4_round_robin_and_weights_from_a_pod_to_pods(kmesh, cgroup, topo):
    a, b = topo.pod("web-a").backend("A", 8080), topo.pod("web-b").backend("B", 8080)
    client = topo.pod("client", parent=cgroup)
    kmesh(bootstrap([tcp_listener("rr", VIP, 80, "rr"), tcp_listener("w", VIP, 81, "w")],
                    [cluster("rr", lb_ep(*a), lb_ep(*b)),
                     cluster("w", lb_ep(*a, weight=3), lb_ep(*b, weight=1))]))
    got = client.curl(f"http://{VIP}/[1-6]")
    assert collections.Counter(got) == {"A": 3, "B": 3} and all(x != y for x, y in zip(got, got[1:])), got
    assert collections.Counter(client.curl(f"http://{VIP}:81/[1-8]")) == {"A": 6, "B": 2}


def test_only_pods_under_the_governed_cgroup_are_redirected(kmesh, cgroup, topo):
    a = topo.pod("web").backend("A", 8080)
    governed, other = topo.pod("governed", parent=cgroup), topo.pod("other")
    kmesh(bootstrap([tcp_listener("rr", VIP, 80, "rr")], [cluster("rr", lb_ep(*a))]))
    assert governed.connect(VIP, 80) == "ok"
    # not redirected: the VIP is unroutable in the pod, the connect fails there
    assert other.connect(VIP, 80) == "ENETUNREACH"
    assert other.connect(*a) == "ok"   # the pod network itself works


def test_l7_routes_requests_from_an_enrolled_pod(kmesh, cgroup, topo):
    """The hand-off listener opens inside the pod's namespace; the upstream
    connection leaves from the pod's own address."""
    v1, v2 = topo.pod("v1").backend("v1", 8080), topo.pod("v2").backend("v2", 8080)
    client = topo.pod("client", parent=cgroup)
    k = kmesh(bootstrap([hcm_listener("reviews", VIP, 80, [JASON, DEFAULT])],
                        [cluster("reviews-v1", lb_ep(*v1)), cluster("reviews-v2", lb_ep(*v2))]))
    status, body = k.post(f"/workloads/enroll?netns=/run/netns/{client.netns}")
    assert status == 200 and body["added"], body
    assert [curl(client, f"http://{VIP}/", "-H", "end-user: jason") for _ in range(3)] == [(200, "v2")] * 3
    assert [curl(client, f"http://{VIP}/") for _ in range(3)] == [(200, "v1")] * 3
    assert k.get("/workloads")["namespaces"] == [{"netns": f"/run/netns/{client.netns}",
                                                  "inode": body["inode"]}]
    # unenrolled: its connections to the L7 listener have nowhere to go
    status, body = k.post(f"/workloads/unenroll?netns=/run/netns/{client.netns}")
    assert status == 200 and body["removed"] and body["namespaces"] == [], body
    assert curl(client, f"http://{VIP}/")[0] == 0


def test_two_pods_on_the_same_source_port_are_each_routed_by_their_own_destination(kmesh, cgroup, topo):
    """km_orig_dst is keyed by namespace too: two pods connecting from
    127.0.0.1:P at once to two L7 VIPs each get their own VIP's routes."""
    v1, v2 = topo.pod("v1").backend("v1", 8080), topo.pod("v2").backend("v2", 8080)
    first, second = topo.pod("first", parent=cgroup), topo.pod("second", parent=cgroup)
    swapped = [{**JASON, "route": {"cluster": "reviews-v1"}}, {**DEFAULT, "route": {"cluster": "reviews-v2"}}]
    k = kmesh(bootstrap([hcm_listener("reviews", VIP, 80, [JASON, DEFAULT]),
                         hcm_listener("swapped", VIP2, 80, swapped)],
                        [cluster("reviews-v1", lb_ep(*v1)), cluster("reviews-v2", lb_ep(*v2))]))
    for pod in (first, second):
        assert k.post(f"/workloads/enroll?netns=/run/netns/{pod.netns}")[0] == 200
    # Both connect from the same address and port (each in its own
    # namespace), one after the other; then both send.
    port = 40000 + os.getpid() % 20000
    held = [pod.popen([sys.executable, "-c", SAME_PORT, vip, str(port)], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE) for pod, vip in ((first, VIP), (second, VIP2))]
    for p in held:
        assert p.stdout.readline().strip() == "connected"
    inodes = {os.stat(f"/run/netns/{pod.netns}").st_ino for pod in (first, second)}
    assert {ns for ns, p in orig_dst_keys(k) if p == port} == inodes   # one entry each
    for p in held:
        p.stdin.write("go\n")
        p.stdin.flush()
    assert [p.stdout.readline().strip() for p in held] == ["v1", "v2"]


def orig_dst_keys(k) -> list[tuple[int, int]]:
    """(netns inode, source port) of each km_orig_dst entry."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(k.pin_root / "map" / "km_orig_dst")],
                         capture_output=True, text=True, check=True).stdout
    keys = [bytes(int(b, 16) for b in e["key"]) for e in json.loads(out)]
    return [(int.from_bytes(b[0:4], "little"), int.from_bytes(b[8:10], "big")) for b in keys]


SAME_PORT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[2])))
s.connect((sys.argv[1], 80))
print("connected", flush=True)
sys.stdin.readline()
s.sendall(b"GET / HTTP/1.1\\r\\nHost: reviews\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip(), flush=True)
"""


def _reviews(kmesh, topo):
    v1, v2 = topo.pod("v1").backend("v1", 8080), topo.pod("v2").backend("v2", 8080)
    return kmesh(bootstrap([hcm_listener("reviews", VIP, 80, [JASON, DEFAULT])],
                           [cluster("reviews-v1", lb_ep(*v1)), cluster("reviews-v2", lb_ep(*v2))]))


def test_enrollment_survives_sigkill_and_restart(kmesh, cgroup, topo):
    k = _reviews(kmesh, topo)
    client = topo.pod("client", parent=cgroup)
    r = subprocess.run([str(KMESHCTL), "--admin", f"127.0.0.1:{k.admin_port}", "enroll", "--netns",
                        f"/run/netns/{client.netns}"], capture_output=True, text=True)
    assert r.returncode == 0 and "enrolled" in r.stdout, r.stdout + r.stderr
    k.stop(signal.SIGKILL)
    k.start()
    assert "enrolled workloads restored" in k.log()
    assert [w["netns"] for w in k.get("/workloads")["namespaces"]] == [f"/run/netns/{client.netns}"]
    assert curl(client, f"http://{VIP}/", "-H", "end-user: jason") == (200, "v2")
    k.stop(signal.SIGTERM)
    k.start()
    assert curl(client, f"http://{VIP}/") == (200, "v1")
    r = subprocess.run([str(KMESHCTL), "--admin", f"127.0.0.1:{k.admin_port}", "-o", "json", "list"],
                       capture_output=True, text=True, check=True)
    assert len(json.loads(r.stdout)["namespaces"]) == 1


def test_a_deleted_pod_leaves_nothing_behind(kmesh, cgroup, topo):
    k = _reviews(kmesh, topo)
    client = topo.pod("client", parent=cgroup)
    _, body = k.post(f"/workloads/enroll?netns=/run/netns/{client.netns}")
    inode = body["inode"]
    assert curl(client, f"http://{VIP}/") == (200, "v1")
    assert inode in {ns for ns, _ in orig_dst_keys(k)}
    topo.delete(client)
    deadline = time.monotonic() + 15   # the daemon looks every 5 s
    while k.get("/workloads")["namespaces"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert k.get("/workloads")["namespaces"] == []
    assert inode not in {ns for ns, _ in orig_dst_keys(k)}
    assert workload_entries(k) == 0
    assert "network namespace is gone" in k.log()


def workload_entries(k) -> int:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(k.pin_root / "map" / "km_workloads")],
                         capture_output=True, text=True, check=True).stdout
    return len(json.loads(out))
