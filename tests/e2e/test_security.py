"""Who may change kmesh: root (any admin listener) and -admin-group (the admin
socket); every other local user reads at most, and its changes change
nothing. The limits that keep a misbehaving admin client from exhausting the
daemon. (Real daemon, real kernel; unprivileged callers via runuser.)"""
from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml

from tests.e2e.test_l4 import vip
from tests.support import harness
from tests.support.envoy import bootstrap, cluster, lb_ep, tcp_listener

NOBODY = "nobody"
CHANGES = ["/logging?level=debug", "/accesslog/on", "/accesslog/off", "/sockmap/on", "/sockmap/off",
           "/workloads/enroll?cgroup={cg}", "/workloads/bypass?cgroup={cg}", "/workloads/unenroll?cgroup={cg}",
           "/controller/envoy"]


def curl_as(user: str, url: str, *extra: str, group: str | None = None) -> tuple[int, str]:
    """(HTTP status, body) of curl run as ``user`` (0: no answer), with
    ``group`` as a supplementary group (its primary group stays its own)."""
    primary = subprocess.run(["id", "-gn", user], capture_output=True, text=True, check=True).stdout.strip()
    argv = ["runuser", "-u", user, *(("-g", primary, "-G", group) if group else ()), "--",
            "curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10", *extra, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def state(k: harness.Kmesh) -> dict:
    """What a change could have changed."""
    st = k.get("/status")
    return {"maps": k.get("/bpf/kmesh/maps"), "workloads": k.get("/workloads"), "version": st["config_version"],
            "accesslog": k.get("/accesslog").get("enabled"), "sockmap": k.get("/sockmap")["state"],
            "config": k.get("/controller/envoy")}


@pytest.fixture
def mesh(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("vip", v, 80, "good")], [cluster("good", lb_ep(*a.addr))]))
    hijack = yaml.safe_dump(bootstrap([tcp_listener("vip", v, 80, "evil")], [cluster("evil", lb_ep(*b.addr))]))
    return k, v, hijack


def test_an_unprivileged_user_reads_but_changes_nothing(mesh, cgroup, tmp_path):
    k, v, hijack = mesh
    (tmp_path / "evil.yaml").write_text(hijack)
    (tmp_path / "evil.yaml").chmod(0o644)
    tmp_path.chmod(0o755)
    before = state(k)
    for path in CHANGES:
        url = k.admin + path.format(cg=cgroup.path)
        code, body = curl_as(NOBODY, url, "-X", "POST", "--data-binary", f"@{tmp_path / 'evil.yaml'}")
        assert code == 403, (path, code, body)
        assert "may not change kmesh" in json.loads(body)["error"], body
    assert state(k) == before
    assert cgroup.curl(f"http://{v}/[1-3]") == ["A"] * 3
    assert "log level changed" not in k.log()
    # Reading stays open (what the admin API is for), and the socket is closed to it.
    code, body = curl_as(NOBODY, k.admin + "/status")
    assert code == 200 and json.loads(body)["config_version"] == before["version"]
    code, _ = curl_as(NOBODY, "http://kmesh/status", "--unix-socket", str(k.admin_socket))
    assert code == 0
    metrics = curl_as(NOBODY, f"http://127.0.0.1:{k.metrics_port}/metrics")[1]
    assert "kmesh_config_version 1.0" in metrics


def test_root_changes_over_tcp_and_the_socket(mesh, cgroup):
    k, v, hijack = mesh
    code, body = curl_as("root", k.admin + "/controller/envoy", "-X", "POST", "--data-binary", hijack)
    assert code == 200, body
    assert cgroup.curl(f"http://{v}/[1-2]") == ["B"] * 2
    code, body = curl_as("root", "http://kmesh/accesslog/on", "-X", "POST", "--unix-socket", str(k.admin_socket))
    assert code == 200 and json.loads(body)["enabled"], body
    # kmeshctl finds the socket through the daemon's options.
    r = subprocess.run([str(harness.BIN / "kmeshctl"), "--admin", f"127.0.0.1:{k.admin_port}", "accesslog", "off"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "access log off" in r.stdout, r.stdout + r.stderr


@pytest.fixture
def admin_group():
    name = harness.unique("kmadm")[:32]
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    yield name
    subprocess.run(["groupdel", name], capture_output=True)


def test_the_admin_group_changes_over_the_socket_only(kmesh, cgroup, backends, admin_group):
    (a,) = backends("A")
    k = kmesh(bootstrap([tcp_listener("vip", vip(), 80, "c")], [cluster("c", lb_ep(*a.addr))]),
              extra_args=(f"-admin-group={admin_group}",))
    sock = str(k.admin_socket)
    code, body = curl_as(NOBODY, "http://kmesh/accesslog/on", "-X", "POST", "--unix-socket", sock, group=admin_group)
    assert code == 200 and json.loads(body)["enabled"], body
    # Over TCP the kernel names only the socket's owner: root alone.
    code, body = curl_as(NOBODY, k.admin + "/accesslog/off", "-X", "POST", group=admin_group)
    assert code == 403, body
    assert k.get("/accesslog")["enabled"]
    # Without the group the socket stays shut.
    code, _ = curl_as(NOBODY, "http://kmesh/accesslog/off", "-X", "POST", "--unix-socket", sock)
    assert code == 0
    assert k.get("/accesslog")["enabled"]


def test_metrics_listener_serves_metrics_only(mesh):
    k, _, _ = mesh
    with urllib.request.urlopen(f"http://127.0.0.1:{k.metrics_port}/metrics", timeout=10) as r:
        assert b"kmesh_ready 1.0" in r.read()
    code, body = curl_as("root", f"http://127.0.0.1:{k.metrics_port}/controller/envoy", "-X", "POST",
                         "--data-binary", "x")
    assert code == 501, body   # no POST here at all
    code, _ = curl_as("root", f"http://127.0.0.1:{k.metrics_port}/status")
    assert code == 404


def limit_hits(k: harness.Kmesh, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = k.get("/metrics", raw=True)[1].decode()
    for fam in text_string_to_metric_families(text):
        if fam.name == "kmesh_limit_hits":
            return sum(s.value for s in fam.samples if s.labels.get("limit") == name and s.name.endswith("_total"))
    raise AssertionError("no kmesh_limit_hits in /metrics")


def test_admin_limits_bite_and_are_counted(mesh):
    from kmesh import limits

    k, _, _ = mesh
    # A body over the limit is refused before it is read.
    with socket.create_connection(("127.0.0.1", k.admin_port)) as s:
        s.sendall(b"POST /controller/envoy HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % (limits.ADMIN_BODY.value + 1))
        assert s.recv(4096).startswith(b"HTTP/1.0 400")
    assert limit_hits(k, "admin_body_bytes") == 1
    # Clients that open a connection and say nothing hold at most the TCP
    # listener's slots: one more is answered 503 at once, and the admin
    # socket (root's way in) is not affected.
    held = [socket.create_connection(("127.0.0.1", k.admin_port)) for _ in range(limits.ADMIN_CONCURRENT.value)]
    try:
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", k.admin_port)) as s:
            s.settimeout(5)
            assert s.recv(4096).startswith(b"HTTP/1.0 503")
        code, body = curl_as("root", "http://kmesh/ready", "--unix-socket", str(k.admin_socket))
        assert code == 200, body
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            assert k.get("/ready", raw=True)[0] == 200
            break
        except (OSError, AssertionError):
            time.sleep(0.1)
    assert limit_hits(k, "admin_concurrent_requests") >= 1


def test_the_pins_and_the_admin_socket_are_root_only(mesh):
    import stat

    k, _, _ = mesh
    pins = [p for p in k.pin_root.rglob("*") if not p.is_dir()]
    assert pins
    for p in pins:
        st = p.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), p   # a local user cannot open a map
    st = k.admin_socket.stat()
    assert stat.S_ISSOCK(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o660)
