"""Counters, /metrics, the access log and kmeshctl on the real kernel: N
connections through a VIP show up as exactly N opened and N closed for the
right listener, cluster and endpoint, with the bytes the clients sent and
received; a refused endpoint shows as failed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_l4 import vip
from tests.support import harness
from tests.support.envoy import bootstrap, cluster, lb_ep, tcp_listener

KMESHCTL = harness.BIN / "kmeshctl"


def metrics(k) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value."""
    status, body = k.get("/metrics", raw=True)
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_metrics(k, pred, timeout: float = 10) -> dict[tuple, float]:
    """/metrics once ``pred`` holds for it: a connection is counted closed
    when TCP reaches CLOSE, a moment after the client process is done."""
    end = harness.time.monotonic() + timeout
    while True:
        m = metrics(k)
        if pred(m) or harness.time.monotonic() > end:
            return m
        harness.time.sleep(0.05)


def ep_labels(cluster: str, port: int) -> tuple:
    return (("destination_cluster", cluster), ("destination_service", cluster), ("endpoint", f"127.0.0.1:{port}"))


def ctl(k, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(KMESHCTL), "--admin", f"127.0.0.1:{k.admin_port}", *args],
                          capture_output=True, text=True, timeout=30)


TRACK = ()   # tracking closes is the default


def test_connections_are_counted_per_cluster_and_endpoint(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "web")], [cluster("web", lb_ep(*a.addr), lb_ep(*b.addr))]),
              extra_args=(*TRACK, "-bpf-stats"))
    assert cgroup.curl(f"http://{v}/[1-10]") == ["A", "B"] * 5
    cgroup.run(["curl", "-sS", "--max-time", "2", f"http://127.0.0.1:{harness.free_port()}/"])  # not a VIP
    listener = (("listener", f"{v}:80"),)
    m = wait_metrics(k, lambda m: m.get(("kmesh_listener_connections_closed_total", listener)) == 10)
    for ep in (a, b):
        labels = ep_labels("web", ep.port)
        assert m[("kmesh_tcp_connections_opened_total", labels)] == 5
        assert m[("kmesh_tcp_connections_closed_total", labels)] == 5
        assert m[("kmesh_tcp_connections_failed_total", labels)] == 0
        assert m[("kmesh_tcp_connections_active", labels)] == 0
    assert m[("kmesh_listener_connections_opened_total", listener)] == 10
    assert m[("kmesh_listener_connections_failed_total", listener)] == 0
    assert m[("kmesh_connects_total", (("decision", "redirect"),))] == 10
    assert m[("kmesh_connects_total", (("decision", "no_listener"),))] >= 1
    assert m[("kmesh_config_version", ())] == 1
    assert m[("kmesh_map_entries", (("map", "km_listener"),))] == 1
    assert m[("kmesh_bpf_program_attached", (("program", "kmesh_connect4"),))] == 1
    runs = ("kmesh_bpf_program_runs_total", (("program", "kmesh_connect4"),))
    assert m[runs] >= 11 and m[("kmesh_bpf_program_run_seconds_total", runs[1])] > 0
    assert m[("kmesh_bpf_program_runs_total", (("program", "kmesh_conn_ops"),))] >= 10


def test_opened_only_without_tracking(kmesh, cgroup, backends):
    (a,) = backends("A")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "web")], [cluster("web", lb_ep(*a.addr))]),
              extra_args=("-track-connections=false",))
    cgroup.curl(f"http://{v}/[1-4]")
    m = metrics(k)
    labels = ep_labels("web", a.port)
    assert m[("kmesh_tcp_connections_opened_total", labels)] == 4
    assert ("kmesh_tcp_connections_closed_total", labels) not in m
    assert ("kmesh_tcp_received_bytes_total", labels) not in m


def test_active_connections_while_open(kmesh, cgroup, backends):
    (a,) = backends("A")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "web")], [cluster("web", lb_ep(*a.addr))]), extra_args=TRACK)
    holder = cgroup.popen([harness.sys.executable, str(harness.CLIENT), "hold", v, "80", "3"],
                          stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        assert json.loads(holder.stdout.readline())["held"] == 3
        labels = ep_labels("web", a.port)
        assert metrics(k)[("kmesh_tcp_connections_active", labels)] == 3
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert wait_metrics(k, lambda m: m[("kmesh_tcp_connections_active", labels)] == 0)[
        ("kmesh_tcp_connections_active", labels)] == 0


def test_kmeshctl(kmesh, cgroup, backends):
    (a,) = backends("A")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "web")], [cluster("web", lb_ep(*a.addr))]), extra_args=TRACK)
    cgroup.curl(f"http://{v}/[1-3]")
    r = ctl(k, "version")
    assert r.returncode == 0 and "kmesh-daemon" in r.stdout, r.stderr
    r = ctl(k, "dump")
    assert r.returncode == 0 and f"{v}:80" in r.stdout and "web (100%)" in r.stdout, r.stdout + r.stderr
    r = ctl(k, "-o", "json", "dump")
    assert json.loads(r.stdout)["maps"]["km_listener"][f"{v}:80"]["clusters"][0]["weight"] == 1
    r = ctl(k, "stats", "--once")
    assert r.returncode == 0 and "web" in r.stdout, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("web"))
    assert line.split()[3] == "3"      # OPENED
    r = ctl(k, "-o", "json", "stats", "--once")
    assert json.loads(r.stdout)["web"]["opened"] == 3
    r = ctl(k, "log", "--level", "debug")
    assert r.returncode == 0 and "debug" in r.stdout
    assert "log level changed" in k.log()


PEER = harness.ROOT / "tests" / "support" / "sockpeer.py"
PEER_HEADER = 24   # sockpeer's request header: up, down, seed


@pytest.fixture
def peer_server():
    """A sockpeer server (outside the test cgroup) as the endpoint."""
    procs = []

    def start() -> int:
        port = harness.free_port()
        p = subprocess.Popen([sys.executable, str(PEER), "serve", str(port)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().startswith("listening")
        return port

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_bytes_results_and_client_address(kmesh, cgroup, peer_server, tmp_path):
    """Bytes each way per endpoint and listener and in the access log; an
    orderly close is "closed", a reset "reset"."""
    port = peer_server()
    v = vip()
    log = tmp_path / "access.log"
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "peer")], [cluster("peer", lb_ep("127.0.0.1", port))]),
              extra_args=("-access-log", f"-access-log-file={log}"))
    transfers = [(100_000, 50_000), (3, 1 << 20), (0, 0)]
    for i, (up, down) in enumerate(transfers):
        r = cgroup.run([sys.executable, str(PEER), "send", f"{v}:80", str(up), str(down), str(i)])
        assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout + r.stderr
    r = cgroup.run([sys.executable, str(PEER), "send", f"{v}:80", "4000000", "0", "9", "abort"])
    assert r.returncode == 0, r.stderr
    labels = ep_labels("peer", port)
    m = wait_metrics(k, lambda m: m.get(("kmesh_tcp_connections_closed_total", labels)) == 4)
    assert m[("kmesh_tcp_connections_closed_total", labels)] == 4
    sent_up = sum(up + PEER_HEADER for up, _ in transfers)
    got_up = m[("kmesh_tcp_received_bytes_total", labels)]
    assert sent_up < got_up <= sent_up + 4_000_000 + PEER_HEADER   # the aborted one sent part of its 4 MB
    assert m[("kmesh_tcp_sent_bytes_total", labels)] == sum(down for _, down in transfers)
    listener = (("listener", f"{v}:80"),)
    assert m[("kmesh_listener_received_bytes_total", listener)] == got_up
    assert m[("kmesh_listener_sent_bytes_total", listener)] == m[("kmesh_tcp_sent_bytes_total", labels)]

    got = _lines(log, 4)
    assert [(r["bytes_received"], r["bytes_sent"], r["result"]) for r in got[:3]] == [
        (up + PEER_HEADER, down, "closed") for up, down in transfers]
    assert got[3]["result"] == "reset" and got[3]["response_flags"] == "-"
    for rec in got:
        host, _, cport = rec["downstream_remote_address"].rpartition(":")
        assert host == "127.0.0.1" and 0 < int(cport) < 65536 and int(cport) != port, rec
        assert rec["upstream_host"] == f"127.0.0.1:{port}" and rec["downstream_local_address"] == f"{v}:80"


def test_http_bytes_match_curl(kmesh, cgroup, backends, tmp_path):
    """The bytes of an HTTP exchange as curl itself counts them."""
    (a,) = backends("A")
    v = vip()
    log = tmp_path / "access.log"
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "web")], [cluster("web", lb_ep(*a.addr))]),
              extra_args=("-access-log", f"-access-log-file={log}"))
    r = cgroup.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_request} %{size_header} %{size_download}",
                    f"http://{v}/"])
    req, head, body = map(int, r.stdout.split())
    (rec,) = _lines(log, 1)
    assert (rec["bytes_received"], rec["bytes_sent"], rec["result"]) == (req, head + body, "closed")
    m = wait_metrics(k, lambda m: m.get(("kmesh_tcp_sent_bytes_total", ep_labels("web", a.port))))
    assert m[("kmesh_tcp_sent_bytes_total", ep_labels("web", a.port))] == head + body


def test_refused_endpoint_counts_failed(kmesh, cgroup, tmp_path):
    dead = harness.dead_port()   # nothing listens there
    v = vip()
    log = tmp_path / "access.log"
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "dead")], [cluster("dead", lb_ep("127.0.0.1", dead))]),
              extra_args=("-access-log", f"-access-log-file={log}"))
    r = cgroup.run(["curl", "-sS", "--max-time", "5", f"http://{v}/"])
    assert r.returncode == 7, r.stderr   # couldn't connect
    labels = ep_labels("dead", dead)
    m = wait_metrics(k, lambda m: m.get(("kmesh_tcp_connections_failed_total", labels)) == 1)
    assert m[("kmesh_tcp_connections_failed_total", labels)] == 1
    assert m[("kmesh_tcp_connections_closed_total", labels)] == 1
    assert m[("kmesh_tcp_connections_active", labels)] == 0
    assert m[("kmesh_listener_connections_failed_total", (("listener", f"{v}:80"),))] == 1
    (rec,) = _lines(log, 1)
    assert (rec["result"], rec["response_flags"], rec["bytes_received"], rec["bytes_sent"]) == ("failed", "UF", 0, 0)


def test_kmeshctl_with_the_daemon_down():
    r = subprocess.run([str(KMESHCTL), "--admin", f"127.0.0.1:{harness.dead_port()}", "version"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "cannot reach kmesh-daemon's admin API" in r.stderr and "is it running?" in r.stderr


def _lines(path, n, timeout=10):
    end = harness.time.monotonic() + timeout
    while harness.time.monotonic() < end:
        got = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if len(got) >= n:
            return got
        harness.time.sleep(0.05)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_access_log_records_match_the_connections(kmesh, cgroup, backends, tmp_path):
    a, b = backends("A", "B")
    v = vip()
    log = tmp_path / "access.log"
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "web")], [cluster("web", lb_ep(*a.addr), lb_ep(*b.addr))]),
              extra_args=("-access-log", f"-access-log-file={log}"))
    cgroup.curl(f"http://{v}/[1-6]")
    got = _lines(log, 6)
    assert len(got) == 6, got
    assert {r["upstream_host"] for r in got} == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert all(r["upstream_cluster"] == "web" and r["downstream_local_address"] == f"{v}:80" for r in got)
    assert all(0 <= r["duration_ms"] < 10_000 for r in got), got
    assert all(abs(r["start_time"] - harness.time.time()) < 60 for r in got), got
    # off: no more lines
    r = ctl(k, "accesslog", "off")
    assert r.returncode == 0 and "access log off" in r.stdout, r.stderr
    cgroup.curl(f"http://{v}/[1-3]")
    harness.time.sleep(0.5)
    assert len(_lines(log, 7, timeout=1)) == 6
    r = ctl(k, "accesslog", "on")
    assert "access log on" in r.stdout
    cgroup.curl(f"http://{v}/")
    assert len(_lines(log, 7)) == 7


def test_access_log_storm_is_bounded(kmesh, cgroup, backends, tmp_path):
    (a,) = backends("A")
    v = vip()
    log = tmp_path / "access.log"
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "web")], [cluster("web", lb_ep(*a.addr))]),
              extra_args=("-access-log", f"-access-log-file={log}", "-access-log-rate=5"))
    t0 = harness.time.monotonic()
    cgroup.curl(f"http://{v}/[1-60]")
    elapsed = harness.time.monotonic() - t0
    harness.time.sleep(1)
    st = k.get("/accesslog")
    # a bucket of 5, refilled at 5/s while the 60 connections ran (however slow the machine)
    allowed = 5 + int(5 * elapsed) + 1
    assert st["written"] <= allowed and st["rate_dropped"] >= 60 - allowed, (st, elapsed)
    assert k.get("/ready", raw=True)[0] == 200
    m = metrics(k)
    assert m[("kmesh_access_log_dropped_total", (("reason", "rate_limit"),))] == st["rate_dropped"]


CONNECT_LOOP = """
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    s = socket.socket()
    s.connect_ex((host, port))
    s.close()
"""


def test_ring_buffer_overload_is_counted(kmesh, cgroup, tmp_path):
    """With the reader stopped, more closes than the ring buffer holds: the
    rest are dropped in the kernel and counted; every close is accounted
    for (written + rate-limited + ring buffer full) and the daemon recovers."""
    dead = harness.dead_port()   # refused: the quickest connection there is
    v = vip()
    log = tmp_path / "access.log"
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "dead")], [cluster("dead", lb_ep("127.0.0.1", dead))]),
              extra_args=("-access-log", f"-access-log-file={log}", "-access-log-rate=1000000"))
    n = 20_000   # a 1 MiB ring buffer holds ~14 500 records
    k.proc.send_signal(harness.signal.SIGSTOP)
    try:
        r = cgroup.run([sys.executable, "-c", CONNECT_LOOP, v, "80", str(n)])
    finally:
        k.proc.send_signal(harness.signal.SIGCONT)
    assert r.returncode == 0, r.stderr
    full = ("kmesh_access_log_dropped_total", (("reason", "ring_buffer_full"),))
    limited = ("kmesh_access_log_dropped_total", (("reason", "rate_limit"),))

    def settled(m):
        return m[("kmesh_access_log_lines_total", ())] + m[limited] + m[full] == n
    m = wait_metrics(k, settled, timeout=30)
    assert settled(m), m
    assert m[full] > 0 and m[("kmesh_tcp_connections_failed_total", ep_labels("dead", dead))] == n
    assert k.get("/ready", raw=True)[0] == 200
    before = m[("kmesh_access_log_lines_total", ())]
    harness.time.sleep(1.1)   # the rate limit refills
    cgroup.run(["curl", "-sS", "--max-time", "2", f"http://{v}/"])
    assert wait_metrics(k, lambda m: m[("kmesh_access_log_lines_total", ())] > before)[
        ("kmesh_access_log_lines_total", ())] == before + 1
