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

from kmesh.bpf import records
from tests.e2e.test_l7 import DEFAULT, FAULT, JASON, RBAC, curl
from tests.e2e.test_observability import KMESHCTL
from tests.support import pods
from tests.support.harness import free_port
from tests.support.envoy import ROUTER, bootstrap, cluster, hcm_listener, lb_ep, tcp_listener

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


def test_only_enrolled_workloads_are_governed_and_a_bypass_wins(kmesh, cgroup, topo):
    """-workloads=enrolled: pods enrolled by cgroup (a parent one, as a
    namespace label would), by network namespace and by PID are governed; a
    pod bypassed by cgroup or by namespace inside the enrolled cgroup is not,
    nor is one nobody enrolled."""
    a = topo.pod("web").backend("A", 8080)
    team = topo.group(parent=cgroup)
    member, by_cgroup, by_netns = (topo.pod(n, parent=team) for n in ("member", "bypass-cg", "bypass-ns"))
    own_netns, by_pid, other = (topo.pod(n, parent=cgroup) for n in ("own-netns", "by-pid", "other"))
    k = kmesh(bootstrap([tcp_listener("rr", VIP, 80, "rr")], [cluster("rr", lb_ep(*a))]),
              extra_args=("-workloads=enrolled",))
    assert member.connect(VIP, 80) == "ENETUNREACH"   # nothing enrolled yet
    sleeper = by_pid.popen(["sleep", "600"])
    in_pod = os.stat(f"/run/netns/{by_pid.netns}").st_ino
    deadline = time.monotonic() + 10   # until `ip netns exec` has moved it in
    while os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino != in_pod and time.monotonic() < deadline:
        time.sleep(0.01)
    for action, query in (("enroll", f"cgroup={team.path}"), ("bypass", f"cgroup={by_cgroup.cgroup.path}"),
                          ("bypass", f"netns=/run/netns/{by_netns.netns}"),
                          ("enroll", f"netns=/run/netns/{own_netns.netns}"), ("enroll", f"pid={sleeper.pid}")):
        status, body = k.post(f"/workloads/{action}?{query}")
        assert status == 200 and body["changed"], body
    assert body["workload"]["kind"] == "netns"   # a PID in a namespace of its own names the namespace
    got = {p.name: p.connect(VIP, 80) for p in (member, by_cgroup, by_netns, own_netns, by_pid, other)}
    assert got == {"member": "ok", "bypass-cg": "ENETUNREACH", "bypass-ns": "ENETUNREACH", "own-netns": "ok",
                   "by-pid": "ok", "other": "ENETUNREACH"}
    r = subprocess.run([str(KMESHCTL), "--admin", f"127.0.0.1:{k.admin_port}", "list"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.startswith("governed: enrolled workloads, less the bypassed ones"), r.stdout
    assert r.stdout.count("\nbypass ") == 2 and r.stdout.count("\nenrolled ") == 3, r.stdout
    m = k.get("/metrics", raw=True)[1].decode()
    assert 'kmesh_connects_total{decision="ungoverned"} 4.0' in m, m   # 1 before enrolling, 3 after

    # A connection made while enrolled goes on after its workload is unenrolled.
    held = member.popen([sys.executable, "-c", HELD, VIP], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert held.stdout.readline().strip() == "connected"
    status, body = k.post(f"/workloads/unenroll?cgroup={team.path}")
    assert status == 200 and body["changed"], body
    assert member.connect(VIP, 80) == "ENETUNREACH"   # new ones are not governed
    held.stdin.write("go\n")
    held.stdin.flush()
    assert held.stdout.readline().strip() == "A"


HELD = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
print("connected", flush=True)
sys.stdin.readline()
s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip(), flush=True)
"""


def test_a_bypass_inside_the_governed_cgroup(kmesh, cgroup, topo):
    """-workloads=all (the default): everything under -cgroup2-path is
    enrolled; a bypassed pod is not governed until the bypass is lifted."""
    a = topo.pod("web").backend("A", 8080)
    pod = topo.pod("pod", parent=cgroup)
    k = kmesh(bootstrap([tcp_listener("rr", VIP, 80, "rr")], [cluster("rr", lb_ep(*a))]))
    assert pod.connect(VIP, 80) == "ok"
    r = subprocess.run([str(KMESHCTL), "--admin", f"127.0.0.1:{k.admin_port}", "bypass", "--cgroup",
                        str(pod.cgroup.path)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"bypassed cgroup {pod.cgroup.path}"), r.stdout + r.stderr
    assert pod.connect(VIP, 80) == "ENETUNREACH"
    assert k.post(f"/workloads/unenroll?cgroup={pod.cgroup.path}")[0] == 200
    assert pod.connect(VIP, 80) == "ok"
    # A restart with -workloads=enrolled drops the scope's enrollment.
    k.stop(signal.SIGTERM)
    k.extra_args = ("-workloads=enrolled",)
    k.start()
    assert pod.connect(VIP, 80) == "ENETUNREACH"
    assert k.get("/workloads")["workloads"] == []


def test_a_workload_enrolled_while_the_daemon_is_down_is_picked_up(kmesh, cgroup, topo):
    """kmeshctl writes the pinned map when no daemon answers: the kernel
    governs the workload at once, and the next daemon opens its namespace's
    hand-off listener."""
    v1, v2 = topo.pod("v1").backend("v1", 8080), topo.pod("v2").backend("v2", 8080)
    client = topo.pod("client", parent=cgroup)
    k = kmesh(bootstrap([hcm_listener("reviews", VIP, 80, [JASON, DEFAULT]), tcp_listener("l4", VIP, 81, "reviews-v1")],
                        [cluster("reviews-v1", lb_ep(*v1)), cluster("reviews-v2", lb_ep(*v2))]),
              extra_args=("-workloads=enrolled",))
    assert client.connect(VIP, 81) == "ENETUNREACH"   # not enrolled (and remembered so in the kernel)
    ctl = [str(KMESHCTL), "--admin", f"127.0.0.1:{k.admin_port}"]
    enroll = ["enroll", "--netns", f"/run/netns/{client.netns}", "--bpf-fs-path", str(k.bpf_fs_path)]
    # With a daemon holding the pins, a wrong admin address is only that.
    r = subprocess.run([str(KMESHCTL), "--admin", f"127.0.0.1:{free_port()}", *enroll], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "cannot reach" in r.stderr, r.stdout + r.stderr
    k.stop(signal.SIGKILL)
    r = subprocess.run([*ctl, *enroll], capture_output=True, text=True)
    assert r.returncode == 0 and "no daemon: written to the pinned map" in r.stdout, r.stdout + r.stderr
    assert client.connect(VIP, 81) == "ok"   # governed by the kernel, no daemon running
    k.start()
    assert "hand-off listeners opened in enrolled namespaces" in k.log()
    assert curl(client, f"http://{VIP}/", "-H", "end-user: jason") == (200, "v2")


def test_l7_routes_requests_from_an_enrolled_pod(kmesh, cgroup, topo):
    """The hand-off listener opens inside the pod's namespace; the upstream
    connection leaves from the pod's own address."""
    v1, v2 = topo.pod("v1").backend("v1", 8080), topo.pod("v2").backend("v2", 8080)
    client = topo.pod("client", parent=cgroup)
    k = kmesh(bootstrap([hcm_listener("reviews", VIP, 80, [JASON, DEFAULT])],
                        [cluster("reviews-v1", lb_ep(*v1)), cluster("reviews-v2", lb_ep(*v2))]))
    status, body = k.post(f"/workloads/enroll?netns=/run/netns/{client.netns}")
    assert status == 200 and body["changed"], body
    assert [curl(client, f"http://{VIP}/", "-H", "end-user: jason") for _ in range(3)] == [(200, "v2")] * 3
    assert [curl(client, f"http://{VIP}/") for _ in range(3)] == [(200, "v1")] * 3
    assert k.get("/workloads")["namespaces"] == [{"netns": f"/run/netns/{client.netns}",
                                                  "inode": body["workload"]["id"]}]
    # Unenrolled, its namespace has no hand-off listener; its cgroup is still
    # governed: the listener's catch-all route takes it at L4 (headers unread).
    status, body = k.post(f"/workloads/unenroll?netns=/run/netns/{client.netns}")
    assert status == 200 and body["changed"] and body["namespaces"] == [], body
    assert curl(client, f"http://{VIP}/", "-H", "end-user: jason") == (200, "v1")
    assert 'kmesh_connects_total{decision="l7_no_netns"} 1.0' in k.get("/metrics", raw=True)[1].decode()


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
    return [(k.netns, records.port_of(k.addr.port)) for k in map(records.KmeshHandoffKey.from_buffer_copy, keys)]


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
    assert "hand-off listeners opened in enrolled namespaces" in k.log()
    assert [w["netns"] for w in k.get("/workloads")["namespaces"]] == [f"/run/netns/{client.netns}"]
    assert curl(client, f"http://{VIP}/", "-H", "end-user: jason") == (200, "v2")
    k.stop(signal.SIGTERM)
    k.start()
    assert curl(client, f"http://{VIP}/") == (200, "v1")
    r = subprocess.run([str(KMESHCTL), "--admin", f"127.0.0.1:{k.admin_port}", "-o", "json", "list"],
                       capture_output=True, text=True, check=True)
    got = json.loads(r.stdout)
    assert len(got["namespaces"]) == 1
    assert [(w["kind"], w["mode"], w["path"]) for w in got["workloads"]] == [
        ("cgroup", "enrolled", str(cgroup.path)), ("netns", "enrolled", f"/run/netns/{client.netns}")]


def test_a_deleted_pod_leaves_nothing_behind(kmesh, cgroup, topo):
    """Deleted with a spliced L7 connection open: its processes end, its
    namespace goes; the daemon keeps no socket, listener, map entry or
    record of it (nothing keeps the namespace alive)."""
    k = _reviews(kmesh, topo)
    client = topo.pod("client", parent=cgroup)
    time.sleep(0.3)   # the admin requests so far have let their sockets go
    sockets_before = _sockets(k.proc.pid)
    _, body = k.post(f"/workloads/enroll?netns=/run/netns/{client.netns}")
    inode = body["workload"]["id"]
    held = client.popen([sys.executable, "-c", KEEP_ALIVE, VIP], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert held.stdout.readline().strip() == "v1"
    assert k.get("/l7")["splice"]["active"] == 1
    assert inode in {ns for ns, _ in orig_dst_keys(k)}
    assert _sockets_soon(k.proc.pid, sockets_before + 3) == sockets_before + 3   # the pod's listener, the pair
    topo.delete(client)
    deadline = time.monotonic() + 15   # the daemon looks every 5 s
    while (k.get("/workloads")["namespaces"] or k.get("/l7")["splice"]["active"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert k.get("/workloads")["namespaces"] == []
    assert k.get("/l7")["splice"]["active"] == 0
    assert inode not in {ns for ns, _ in orig_dst_keys(k)}
    assert workload_entries(k) == 1   # the governed cgroup's (-workloads=all)
    assert map_entries(k, "km_splice_dir") == 0
    assert _sockets_soon(k.proc.pid, sockets_before) == sockets_before
    assert inode not in _netns_held(k.proc.pid)
    assert "an enrolled workload is gone" in k.log()


KEEP_ALIVE = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: reviews\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while not (b"\\r\\n\\r\\n" in data and data.split(b"\\r\\n\\r\\n", 1)[1].endswith(b"\\n")):
    data += s.recv(4096)   # the head and the body may come apart
print(data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip(), flush=True)
sys.stdin.readline()
"""


def _sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def _sockets_soon(pid: int, want: int, timeout: float = 3.0) -> int:
    """The daemon's socket count once it is ``want``, else the last count
    after ``timeout``: an admin request just answered may hold its socket a
    moment longer (a socket that stays is still counted)."""
    end = time.monotonic() + timeout
    while (n := _sockets(pid)) != want and time.monotonic() < end:
        time.sleep(0.05)
    return n


def _netns_held(pid: int) -> set[int]:
    """Namespaces the daemon's fds and threads hold."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("net:["):
            out.add(int(link[5:-1]))
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(os.stat(f"/proc/{pid}/task/{tid}/ns/net").st_ino)
        except OSError:
            pass
    return out


def map_entries(k, name: str) -> int:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(k.pin_root / "map" / name)],
                         capture_output=True, text=True, check=True).stdout
    return len(json.loads(out))


def test_l7_policies_from_a_pod(kmesh, cgroup, topo):
    """From a client pod to a pod: RBAC deny, fault delay and abort, each
    answered as on the host."""
    a = topo.pod("web").backend("A", 8080)
    client = topo.pod("client", parent=cgroup)
    routes = [{"match": {"prefix": "/slow"}, "route": {"cluster": "a"}, "typed_per_filter_config": {
                  "envoy.filters.http.fault": {"@type": FAULT, "delay": {
                      "fixed_delay": "0.25s", "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}}},
              {"match": {"prefix": "/broken"}, "route": {"cluster": "a"}, "typed_per_filter_config": {
                  "envoy.filters.http.fault": {"@type": FAULT, "abort": {
                      "http_status": 503, "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}}},
              {"match": {"prefix": "/"}, "route": {"cluster": "a"}}]
    lst = hcm_listener("guarded", VIP, 80, routes)
    lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"] = [
        {"name": "envoy.filters.http.rbac", "typed_config": {"@type": RBAC, "rules": {"action": "DENY", "policies": {
            "deny-bots": {"permissions": [{"header": {"name": "user-agent", "string_match": {"prefix": "bot"}}}],
                          "principals": [{"any": True}]}}}}},
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT}},   # per-route faults need it
        ROUTER]
    k = kmesh(bootstrap([lst], [cluster("a", lb_ep(*a))]))
    assert k.post(f"/workloads/enroll?netns=/run/netns/{client.netns}")[0] == 200
    assert curl(client, f"http://{VIP}/", "-A", "bot/2.0") == (403, "RBAC: access denied")
    assert curl(client, f"http://{VIP}/broken") == (503, "fault filter abort")
    assert curl(client, f"http://{VIP}/") == (200, "A")
    r = client.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", f"http://{VIP}/slow"])
    code, t = r.stdout.split()
    assert code == "200" and 0.25 <= float(t) < 0.25 + 0.5, r.stdout


def workload_entries(k) -> int:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(k.pin_root / "map" / "km_workloads")],
                         capture_output=True, text=True, check=True).stdout
    return len(json.loads(out))


def test_an_upgrade_carries_enrolled_namespaces_over():
    """Layout 7's km_workloads (namespace inode -> path) reads as enrolled
    namespaces: what a daemon migrating those pins puts in its new map."""
    from kmesh.dataplane import workloads as wl
    from tests.support import harness

    d = harness.BPFFS / harness.unique("kmesh-test")
    d.mkdir()
    pin = d / "km_workloads"
    try:
        subprocess.run(["bpftool", "map", "create", str(pin), "type", "hash", "key", "4", "value", "128",
                        "entries", "16", "name", "km_workloads"], check=True, capture_output=True)
        inode = os.stat("/proc/self/ns/net").st_ino
        value = b"/proc/self/ns/net".ljust(128, b"\0")
        subprocess.run(["bpftool", "map", "update", "pinned", str(pin), "key", *map(str, inode.to_bytes(4, "little")),
                        "value", *map(str, value)], check=True, capture_output=True)
        assert wl.carried_over(d) == [wl.Workload(wl.Kind.NETNS, inode, "/proc/self/ns/net")]
    finally:
        pin.unlink(missing_ok=True)
        d.rmdir()
