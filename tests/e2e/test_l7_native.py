"""The native L7 engine (-l7-engine=native, kmesh.l7.engine): every test of
test_l7.py again with the engine carrying the connections, and what only
the engine does: message framings carried byte for byte on keep-alive
connections, its own failure answers, hand-backs to the Python side, and
parking at a restart. Real kernel, a child cgroup, loopback VIPs."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.e2e import test_l7
from tests.e2e.conftest import daemons
from tests.e2e.test_l4 import vip
from tests.e2e.test_l7 import *  # noqa: F401,F403 - test_l7's tests, collected again with the engine on
from tests.support import harness
from tests.support.envoy import bootstrap, cluster, hcm_listener, lb_ep

NATIVE = ("-l7-engine=native",)
RAWCLIENT = harness.ROOT / "tests" / "conformance" / "rawclient.py"


@pytest.fixture
def kmesh(cgroup, tmp_path, bpf_object):
    """conftest's kmesh, with the native engine."""
    with daemons(cgroup, tmp_path, NATIVE) as start:
        yield start


# -- a backend that answers in every framing ------------------------------------
class Shapes:
    """HTTP/1.1 on 127.0.0.1, keep-alive, answering by path: /len/N (N bytes,
    Content-Length), /chunked (chunked with an extension and a trailer),
    /close (no length: until close), /204, /304, /continue (a 100 first),
    /reset (closes without an answer), /slow/MS, /blob (BLOB, Content-Length),
    /blobclose (BLOB until close); a request body is answered with its length
    and sha256. Counts the connections it accepted."""

    BLOB = os.urandom(8 << 20)

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.addr = self.sock.getsockname()
        self.accepted = 0
        self.connection_headers: list[str] = []   # the Connection values requests came with
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_body(f, headers: dict) -> bytes:
        if "chunked" in headers.get("transfer-encoding", ""):
            out = []
            while True:
                size = int(f.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while f.readline() not in (b"\r\n", b""):
                        pass
                    return b"".join(out)
                out.append(f.read(size))
                f.read(2)
        return f.read(int(headers.get("content-length", "0")))

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            for n in range(1, 1 << 30):
                line = f.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := f.readline()) not in (b"\r\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                if "connection" in headers:
                    self.connection_headers.append(headers["connection"])
                body = self._read_body(f, headers)
                out = self._answer(method, path, body)
                if out is None or path == "/once" and n > 1:   # /once: only a connection's first request
                    return
                conn.sendall(out)
                if path in ("/close", "/blobclose"):
                    return
        except (OSError, ValueError):
            return
        finally:
            f.close()
            conn.close()

    @staticmethod
    def _answer(method: str, path: str, body: bytes) -> bytes | None:
        if body:
            text = json.dumps({"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
            return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(text), text)
        if path.startswith("/len/"):
            n = int(path[5:])
            data = b"x" * n if method != "HEAD" else b""
            return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (n, data)
        if path == "/chunked":
            return (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n")
        if path == "/close":
            return b"HTTP/1.1 200 OK\r\n\r\nuntil the end"
        if path == "/blob":
            return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(Shapes.BLOB), Shapes.BLOB)
        if path == "/blobclose":
            return b"HTTP/1.1 200 OK\r\n\r\n" + Shapes.BLOB
        if path in ("/204", "/304"):
            return b"HTTP/1.1 %s X\r\n\r\n" % path[1:].encode()
        if path == "/continue":
            return b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        if path.startswith("/slow/"):
            time.sleep(int(path[6:]) / 1000)
            return b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow"
        if path == "/reset":
            return None
        if path == "/once":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nonce"
        return b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def shapes():
    s = Shapes()
    yield s
    s.close()


def raw(cgroup, v: str, requests: list[str], pipelined: bool = False, port: int = 80) -> list[dict]:
    jobs = [{"host": v, "port": port, "requests": requests, "pipelined": pipelined}]
    r = cgroup.run([sys.executable, str(RAWCLIENT)], input=json.dumps(jobs))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


def get(path: str, method: str = "GET", extra: str = "") -> str:
    return f"{method} {path} HTTP/1.1\r\nHost: shapes\r\n{extra}\r\n"


def routed(shapes, v: str, timeout: str | None = None) -> dict:
    """Shapes behind VIP v; a request with x-python is mirrored (which the engine leaves to Python)."""
    route = {"cluster": "shapes", **({"timeout": timeout} if timeout else {})}
    return bootstrap([hcm_listener("shapes", v, 80, [
        {"match": {"prefix": "/", "headers": [{"name": "x-python", "present_match": True}]},
         "route": {**route, "request_mirror_policies": [{"cluster": "shapes"}]}},
        {"match": {"prefix": "/"}, "route": route}])], [cluster("shapes", lb_ep(*shapes.addr))])


def start(kmesh, shapes, timeout: str | None = None) -> tuple[harness.Kmesh, str]:
    v = vip()
    return kmesh(routed(shapes, v, timeout)), v


def test_every_framing_on_one_keep_alive_connection(kmesh, cgroup, shapes):
    k, v = start(kmesh, shapes)
    chunked = "POST /up HTTP/1.1\r\nHost: shapes\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    sized = "POST /up HTTP/1.1\r\nHost: shapes\r\ncontent-length: 5\r\n\r\nabcde"
    got = raw(cgroup, v, [get("/len/10"), get("/chunked"), get("/len/7", "HEAD"), get("/204"), get("/304"),
                          get("/continue"), chunked, sized, get("/len/0"), get("/close")])
    want_body = json.dumps({"len": 5, "sha256": hashlib.sha256(b"abcde").hexdigest()})
    assert [(r["status"], r["body"]) for r in got] == [
        (200, "x" * 10), (200, "hello world"), (200, ""), (204, ""), (304, ""), (200, "ok"),
        (200, want_body), (200, want_body), (200, ""), (200, "until the end")], got
    st = k.get("/l7")
    assert st["engine"] == "native" and st["native"]["handed_off"] == 0, st
    assert st["native"]["routed"] == 10 and shapes.accepted == 1, (st, shapes.accepted)   # one pooled upstream
    # The first head went to Python, which gave the engine the VIP's route
    # table; the engine decided the other nine itself.
    assert st["native"]["tables"] == 1 and st["native"]["decided"] == 9, st


def test_pipelined_and_large_bodies_both_ways(kmesh, cgroup, shapes):
    k, v = start(kmesh, shapes)
    assert [r["body"] for r in raw(cgroup, v, [get("/len/3"), get("/chunked"), get("/len/4")], pipelined=True)] \
        == ["xxx", "hello world", "xxxx"]
    # 64 MiB up (curl's body, chunked) and down (Content-Length): nothing lost or repeated
    size = 64 << 20
    r = cgroup.run(["sh", "-c", f"head -c {size} /dev/urandom | tee /tmp/kmesh-native-$$ | "
                    f"curl -sS --max-time 60 -H 'Expect:' -H 'transfer-encoding: chunked' --data-binary @- http://{v}/up "
                    f"&& sha256sum /tmp/kmesh-native-$$; rm -f /tmp/kmesh-native-$$"])
    assert r.returncode == 0, r.stderr
    assert "}" in r.stdout, (r.stdout[:2000], r.stderr, k.get("/l7"))
    answer, digest = r.stdout.split("}", 1)
    assert json.loads(answer + "}") == {"len": size, "sha256": digest.split()[0]}
    r = cgroup.run(["sh", "-c", f"curl -sS --max-time 60 http://{v}/len/{size} | wc -c"])
    assert r.stdout.strip() == str(size), r.stderr
    assert k.get("/l7")["native"]["handed_off"] == 0


def test_large_response_bodies_are_spliced_not_copied(kmesh, cgroup, shapes, tmp_path):
    """A body of 64 KiB or more (or one read to the upstream's close) moves
    upstream -> pipe -> client with splice(2): the same bytes, a slow reader
    held back by the pipe, and the keep-alive connection goes on after it."""
    k, v = start(kmesh, shapes)
    r = cgroup.run(["sh", "-c", f"cd {tmp_path} && curl -sS --max-time 60 --limit-rate 16M "
                    f"-o a http://{v}/blob -o b http://{v}/len/10 -o c http://{v}/blobclose && sha256sum a c && cat b"])
    assert r.returncode == 0, r.stderr
    want = hashlib.sha256(Shapes.BLOB).hexdigest()
    assert r.stdout.split() == [want, "a", want, "c", "x" * 10], r.stdout
    st = k.get("/l7")["native"]
    assert st["routed"] == 3 and st["handed_off"] == 0 and shapes.accepted == 1, st   # one client connection
    # Copied, not spliced: what came with the head and what the buffers held
    # when the body started (at most OUT_HIGH + 2 * READ_CHUNK = 384 KiB each).
    assert 2 * len(Shapes.BLOB) - 2 * (384 << 10) <= st["spliced"] <= 2 * len(Shapes.BLOB), st


def test_failures_answered_by_the_engine(kmesh, cgroup, shapes):
    k, v = start(kmesh, shapes, timeout="0.3s")
    got = raw(cgroup, v, [get("/reset"), get("/slow/1000"), get("/len/2")])
    assert [r.get("status") for r in got] == [503, 504, 200], got
    assert "connection termination" in got[0]["body"] and got[1]["body"] == "upstream request timeout"
    n = k.get("/l7")["native"]
    assert n["upstream_failures"] == 1 and n["timeouts"] == 1 and n["handed_off"] == 0, n


def test_what_the_engine_does_not_carry_goes_to_python(kmesh, cgroup, shapes, backends):
    k, v = start(kmesh, shapes)
    # a mirror (the first route, by header), Expect and HTTP/1.0: the Python side, from that request on
    got = raw(cgroup, v, [get("/len/1"), get("/len/2", extra="x-python: 1\r\n"), get("/len/3")])
    assert [r["body"] for r in got] == ["x", "xx", "xxx"], got
    expect = "POST /up HTTP/1.1\r\nHost: shapes\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\nhi"
    got = raw(cgroup, v, [expect])
    assert got[0]["status"] == 200 and json.loads(got[0]["body"])["len"] == 2, got
    n = k.get("/l7")["native"]
    assert n["handed_off"] == 2, n
    # no endpoint that connects: handed back, and Python answers as the route says
    dead = vip()
    port = harness.dead_port()   # (a header route: the listener is L7)
    status, body = k.post_config(bootstrap([hcm_listener("dead", dead, 80, [test_l7.JASON, test_l7.DEFAULT])],
                                           [cluster(c, lb_ep("127.0.0.1", port)) for c in ("reviews-v1", "reviews-v2")]))
    assert status == 200, body
    got = raw(cgroup, dead, [get("/")])
    assert got[0]["status"] == 503 and "remote connection failure" in got[0]["body"], got
    n = k.get("/l7")["native"]
    assert n["connect_failures"] == 1 and n["handed_off"] == 3, n


def test_idle_connections_are_parked_for_the_next_daemon(kmesh, cgroup, shapes):
    """At a restart the engine gives its idle keep-alive connections back to
    be parked in the fd store (test_lifecycle has the systemd side): here,
    without one, they close cleanly and a new connection is served."""
    k, v = start(kmesh, shapes)
    client = cgroup.popen([sys.executable, "-c", KEEP_OPEN, v], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert client.stdout.readline().strip() == "xx"
    assert k.get("/l7")["native"]["active"] == 1
    k.stop()
    assert client.stdout.readline().strip() == "closed"
    client.wait(10)
    assert "idle keep-alive L7 connections" in k.log(), k.log()[-2000:]


def test_upstream_connections_outlive_the_clients_that_close(kmesh, cgroup, shapes):
    """As Envoy's connection pool: a client that sends Connection: close is
    answered with connection: close and its connection ends, but the
    request went up without that line, so the upstream connection is kept
    for the next client; one the upstream closed meanwhile costs no
    request: it goes again over a new connection."""
    k, v = start(kmesh, shapes)
    close = "Connection: close\r\n"
    for i in range(6):
        got = raw(cgroup, v, [get("/len/3", extra=close)])[0]
        assert (got["status"], got["body"]) == (200, "xxx"), got
        assert ["connection", "close"] in got["headers"], got
    n = k.get("/l7")["native"]
    # the first request went to Python (the VIP's table came with it) and up
    # as sent (this backend keeps its connections all the same); the next
    # five went up without the line, all six over one upstream connection
    assert shapes.accepted == 1 and n["pooled"] == 5 and n["spares"] == 1, (shapes.accepted, n)
    assert shapes.connection_headers == ["close"], shapes.connection_headers
    # /once: the pooled connection's next request is closed unanswered
    got = raw(cgroup, v, [get("/once", extra=close)])[0]
    assert (got["status"], got["body"]) == (200, "once"), got
    n = k.get("/l7")["native"]
    assert n["replayed"] == 1 and n["upstream_failures"] == 0 and shapes.accepted == 2, n


def test_a_deleted_pods_spare_upstream_connections_go_with_it(kmesh, cgroup):
    """An enrolled pod's upstream connections are made in its namespace and
    kept as spares for its next clients; when the pod is deleted they are
    closed, so that nothing of the daemon keeps its namespace alive."""
    from tests.e2e import test_pods
    from tests.support import pods

    with pods.Topology() as topo:
        k = test_pods._reviews(kmesh, topo)
        client = topo.pod("client", parent=cgroup)
        time.sleep(0.3)   # the admin requests so far have let their sockets go
        sockets_before = test_pods._sockets(k.proc.pid)
        _, body = k.post(f"/workloads/enroll?netns=/run/netns/{client.netns}")
        inode = body["workload"]["id"]
        for _ in range(3):
            assert test_l7.curl(client, f"http://{test_pods.VIP}/", "-H", "Connection: close") == (200, "v1")
        n = k.get("/l7")["native"]
        assert n["spares"] == 1 and n["pooled"] >= 1 and n["decided"] == 2, n
        # the pod's listener and the spare (a socket in the pod's namespace)
        assert test_pods._sockets_soon(k.proc.pid, sockets_before + 2) == sockets_before + 2
        topo.delete(client)
        deadline = time.monotonic() + 15   # the daemon looks every 5 s
        while (k.get("/workloads")["namespaces"] or k.get("/l7")["native"]["spares"]) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert k.get("/l7")["native"]["spares"] == 0
        assert test_pods._sockets_soon(k.proc.pid, sockets_before) == sockets_before
        assert inode not in test_pods._netns_held(k.proc.pid)


def test_a_config_update_reaches_the_engines_own_decisions(kmesh, cgroup, shapes):
    """The engine decides with a table of the config in force: after an
    update the next request on the same keep-alive connection follows the
    new routes (here a direct response, which the Python side answers), and
    the one after the update back follows the table made from it."""
    k, v = start(kmesh, shapes)
    client = cgroup.popen([sys.executable, "-c", STEPPED, v], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert [client.stdout.readline().strip() for _ in range(2)] == ["x", "xx"]
        status, body = k.post_config(bootstrap([hcm_listener("shapes", v, 80, [
            {"match": {"prefix": "/len/1"}, "direct_response": {"status": 200, "body": {"inline_string": "new"}}},
            {"match": {"prefix": "/"}, "route": {"cluster": "shapes"}}])], [cluster("shapes", lb_ep(*shapes.addr))]))
        assert status == 200, body
        client.stdin.write("go\n")
        client.stdin.flush()
        assert [client.stdout.readline().strip() for _ in range(2)] == ["new", "xx"]
        client.wait(10)
    finally:
        client.kill()
    n = k.get("/l7")["native"]
    # one table per config; of the four requests the engine decided the
    # second and the fourth; the one connection was never handed back
    assert n["tables"] == 2 and n["decided"] == 2 and n["handed_off"] == 0, n


STEPPED = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
def get(n):
    s.sendall(b"GET /len/%d HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" % n)
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += s.recv(1000)
    head, body = data.split(b"\\r\\n\\r\\n", 1)
    size = int([l.split(b":")[1] for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < size:
        body += s.recv(1000)
    print(body.decode(), flush=True)
get(1)
get(2)
sys.stdin.readline()
get(1)
get(2)
"""


KEEP_OPEN = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.sendall(b"GET /len/2 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
data = b""
while not data.endswith(b"xx"):
    data += s.recv(100)
print("xx", flush=True)
print("closed" if s.recv(100) == b"" else "more", flush=True)
"""
