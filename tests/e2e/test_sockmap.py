"""Same-host acceleration (sockops + sk_msg, -enable-sockmap) on the real
kernel: what is enrolled, data integrity, blocking sockets left alone, and
turning it off without breaking connections. Client and server both run in
the test's cgroup (a passive socket is enrolled by its listener's cgroup);
everything is on 127.0.0.1."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT
from tests.support import harness
from tests.support.envoy import bootstrap

PEER = ROOT / "tests" / "support" / "sockpeer.py"
MiB = 1 << 20


@pytest.fixture
def server(cgroup):
    started = []

    def start(host: str = "127.0.0.1"):
        for _ in range(5):
            port = harness.free_port(host)
            p = cgroup.popen([sys.executable, str(PEER), "serve", str(port), host], stdout=subprocess.PIPE)
            if p.stdout.readline().startswith("listening"):
                started.append(p)
                return port, p
            p.kill()
            p.wait()
        raise RuntimeError("sockpeer server did not start")

    yield start
    for p in started:
        p.kill()
        p.wait()


def send(cgroup, port, up, down, seed, *extra) -> dict:
    r = cgroup.run([sys.executable, str(PEER), "send", str(port), str(up), str(down), str(seed), *extra])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def sockets(k) -> int:
    return k.get("/sockmap")["sockets"]


def wait_for(pred, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def sk_msg_runs(k) -> int:
    """How often kmesh_sk_msg ran (bpf_stats must be on)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show", "name", "kmesh_sk_msg"], capture_output=True, text=True)
    progs = json.loads(out.stdout or "[]")
    progs = progs if isinstance(progs, list) else [progs]
    return sum(p.get("run_cnt", 0) for p in progs)


@pytest.fixture
def bpf_stats():
    from kmesh.bpf import libbpf
    import os

    fd = libbpf.enable_stats()
    yield
    os.close(fd)


def test_off_by_default_and_nothing_attached(kmesh, cgroup):
    k = kmesh(bootstrap([], []))
    assert k.get("/sockmap") == {"state": "off", "sockets": 0}
    assert sorted(k.attached_programs()) == harness.PROGRAMS


def test_integrity_both_ways_with_half_close(kmesh, cgroup, server, bpf_stats):
    k = kmesh(bootstrap([], []), extra_args=("-enable-sockmap",))
    assert k.get("/sockmap")["state"] == "on"
    assert sorted(k.attached_programs()) == sorted([*harness.PROGRAMS, "kmesh_sockops"])
    port, srv = server()
    runs = sk_msg_runs(k)
    results = []
    # 1 GiB in all: 4 connections of 128 MiB each way, mixed message sizes.
    threads = [threading.Thread(target=lambda s=s: results.append(send(cgroup, port, 128 * MiB, 128 * MiB, s)))
               for s in range(4)]
    for t in threads:
        t.start()
    assert wait_for(lambda: sockets(k) >= 2), "no connection was enrolled"
    for t in threads:
        t.join(300)
    assert len(results) == 4 and all(r["ok"] for r in results), results
    assert sk_msg_runs(k) - runs > 1000          # the bytes went through sk_msg
    server_lines = [json.loads(srv.stdout.readline()) for _ in range(4)]   # it reports each connection
    assert [x.get("ok") for x in server_lines] == [True] * 4, server_lines
    assert wait_for(lambda: sockets(k) == 0), "stale entries after close"


def test_ipv6_and_mapped_connections_are_accelerated(kmesh, cgroup, server, bpf_stats):
    """[::1] on both ends, and an AF_INET6 client of an IPv4 server by its
    mapped address (its key is mapped, as the accepted socket's is)."""
    k = kmesh(bootstrap([], []), extra_args=("-enable-sockmap",))
    for host, dest in (("::1", "[::1]"), ("127.0.0.1", "[::ffff:127.0.0.1]")):
        port, srv = server(host)
        runs = sk_msg_runs(k)
        results = []
        t = threading.Thread(target=lambda: results.append(send(cgroup, f"{dest}:{port}", 32 * MiB, 32 * MiB, 7)))
        t.start()
        assert wait_for(lambda: sockets(k) >= 2), f"{dest}: no connection was enrolled"
        t.join(120)
        assert results and results[0]["ok"], (dest, results)
        assert json.loads(srv.stdout.readline()).get("ok") is True, dest
        assert sk_msg_runs(k) - runs > 100, dest      # the bytes went through sk_msg
        assert wait_for(lambda: sockets(k) == 0), f"{dest}: stale entries after close"


def test_abrupt_close_mid_stream(kmesh, cgroup, server):
    k = kmesh(bootstrap([], []), extra_args=("-enable-sockmap",))
    port, _ = server()
    for seed in range(5):
        r = send(cgroup, port, 8 * MiB, 8 * MiB, seed, "abort")
        assert r["aborted"]
    assert wait_for(lambda: sockets(k) == 0)


ACCEPT_AND_CLOSE = ("import socket,sys,selectors\n"
                    "l=socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                    "l.setblocking(False); l.bind(('127.0.0.1',int(sys.argv[1]))); l.listen(1024)\n"
                    "sel=selectors.DefaultSelector(); sel.register(l, selectors.EVENT_READ); print('listening',flush=True)\n"
                    "while True:\n"
                    "    sel.select()\n"
                    "    try:\n"
                    "        c,_=l.accept(); c.close()\n"
                    "    except BlockingIOError: pass\n")


def test_only_local_nonblocking_connections_are_enrolled_and_removed(kmesh, cgroup, server):
    k = kmesh(bootstrap([], []), extra_args=("-enable-sockmap",))
    port = harness.free_port()
    closer = cgroup.popen([sys.executable, "-c", ACCEPT_AND_CLOSE, str(port)], stdout=subprocess.PIPE)
    try:
        assert closer.stdout.readline().strip() == "listening"
        # 10 000 short connections leave nothing behind
        code = ("import socket,sys,selectors\n"
            "for i in range(10000):\n"
            "    s=socket.socket(); s.setblocking(False); s.connect_ex(('127.0.0.1',int(sys.argv[1])))\n"
            "    sel=selectors.DefaultSelector(); sel.register(s, selectors.EVENT_WRITE); sel.select(5); sel.close()\n"
            "    s.close()\n")
        r = cgroup.run([sys.executable, "-c", code, str(port)])
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: sockets(k) == 0), sockets(k)
    finally:
        closer.kill()
        closer.wait()
    port, _ = server()
    # a blocking client is not enrolled (its server side alone is)
    code = ("import socket,sys,time\n"
            "s=socket.create_connection(('127.0.0.1',int(sys.argv[1]))); print('up',flush=True); time.sleep(2)\n")
    p = cgroup.popen([sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == "up"
    time.sleep(0.2)
    assert sockets(k) == 1
    p.wait(10)
    assert wait_for(lambda: sockets(k) == 0)


def test_blocking_reader_with_signals_sees_no_spurious_error(kmesh, cgroup, server):
    """The kernel trap: a blocking recv() on an enrolled socket returns
    EAGAIN when a signal interrupts it. Blocking sockets are not enrolled,
    so a blocking client with a busy signal handler reads normally."""
    kmesh(bootstrap([], []), extra_args=("-enable-sockmap",))
    port, _ = server()
    code = ("import signal,socket,struct,sys,time\n"
            "signal.signal(signal.SIGALRM, lambda *a: None)\n"
            "signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)\n"
            "s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n"
            "s.sendall(struct.pack('!QQQ',0,1<<20,7)); s.shutdown(socket.SHUT_WR)\n"
            "n=0\n"
            "while True:\n"
            "    d=s.recv(65536)\n"
            "    if not d: break\n"
            "    n+=len(d)\n"
            "signal.setitimer(signal.ITIMER_REAL, 0)\n"
            "print(n)\n")
    r = cgroup.run([sys.executable, "-c", code, str(port)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(1 << 20)


def enrolled_transfer(kmesh, cgroup, server, seed: int):
    """A daemon with the acceleration on and a 256 MiB transfer each way
    running through it: (daemon, port, thread, results)."""
    k = kmesh(bootstrap([], []), extra_args=("-enable-sockmap",))
    port, _ = server()
    results = []
    t = threading.Thread(target=lambda: results.append(send(cgroup, port, 256 * MiB, 256 * MiB, seed)))
    t.start()
    assert wait_for(lambda: sockets(k) >= 2)
    return k, port, t, results


def test_turning_off_at_runtime_keeps_connections_working(kmesh, cgroup, server):
    k, port, t, results = enrolled_transfer(kmesh, cgroup, server, 3)
    status, body = k.post("/sockmap/off")
    assert status == 200 and body["state"] in ("draining", "off"), body
    assert "kmesh_sockops" not in k.attached_programs()      # no new enrollments
    t.join(300)
    assert results and results[0]["ok"], results
    assert wait_for(lambda: k.get("/sockmap")["state"] == "off", timeout=15)
    assert not (k.pin_root / "map" / "km_sock_hash").exists()
    assert not (k.pin_root / "link" / "kmesh_sk_msg").exists()
    # and on again
    status, body = k.post("/sockmap/on")
    assert status == 200 and body["state"] == "on"
    assert send(cgroup, port, 4 * MiB, 4 * MiB, 9)["ok"]


def test_restart_without_it_keeps_connections_working(kmesh, cgroup, server):
    k, _, t, results = enrolled_transfer(kmesh, cgroup, server, 5)
    k.stop(signal.SIGTERM)
    k.extra_args = ()
    k.start()
    assert k.get("/sockmap")["state"] in ("draining", "off")
    t.join(300)
    assert results and results[0]["ok"], results
    assert wait_for(lambda: k.get("/sockmap")["state"] == "off", timeout=15)
    assert sorted(k.attached_programs()) == harness.PROGRAMS
