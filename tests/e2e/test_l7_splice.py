"""Routed L7 connections spliced in the kernel (km_splice's stream verdict):
a connection whose one request says ``Connection: close`` is the route's
whole (see test_l7.py for keep-alive connections, routed per request);
integrity, half-close and reset propagation, the byte budget against slow
and never-reading peers, the fallback when the kernel will not splice, and
the route timeout (real kernel; child cgroup; loopback VIPs and backends)."""
from __future__ import annotations

import hashlib
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from tests.e2e.test_ipv6 import vip6
from tests.e2e.test_l4 import vip
from tests.support import harness, pods
from tests.support.envoy import bootstrap, cluster, hcm_listener, lb_ep



def l7_route(extra: dict | None = None) -> list[dict]:
    """One route that needs L7 (a path match), to cluster b."""
    return [{"match": {"prefix": "/x"}, "route": {"cluster": "b", **(extra or {})}}]


class Backend:
    """A loopback TCP backend whose behaviour per connection is a function
    of the accepted socket (run in its own thread)."""

    def __init__(self, handler, site: "Site | None" = None):
        self.ip = site.backend_ip if site else "127.0.0.1"
        family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        self.lsock = site.backend_ns.socket(family) if site and site.backend_ns else socket.socket(family)
        self.lsock.bind((self.ip, 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.handler = handler
        self.results: list = []
        self.conns: list[socket.socket] = []
        self.peers: list[tuple[str, int]] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                conn, peer = self.lsock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.peers.append(peer)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            self.results.append(self.handler(conn))
        except Exception as e:   # noqa: BLE001 - the test reads it
            self.results.append(e)

    def close(self):
        self.lsock.close()
        for c in self.conns:
            c.close()


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data


@dataclass
class Site:
    """Where a test's client and backend run: on the host (the governed
    cgroup, loopback) or in pods (tests/support/pods.py: the client in an
    enrolled pod under the governed cgroup, the backend in another pod)."""

    client: object                 # harness.Cgroup or pods.Pod (run, popen)
    backend_ip: str = "127.0.0.1"
    backend_ns: object = None      # kmesh.l7.netns.Netns of the backend's pod
    client_netns: str | None = None
    client_ip: str = "127.0.0.1"   # where the backend sees the connection come from

    def enroll(self, k) -> None:
        if self.client_netns:
            status, body = k.post(f"/workloads/enroll?netns={self.client_netns}")
            assert status == 200, body


@pytest.fixture
def site(request, cgroup):
    """The host (default), or pods for a test parametrized with "pod", or
    with "pod6": pods over IPv6 (an IPv6 VIP, the backend on the pod's IPv6
    address)."""
    param = getattr(request, "param", "host")
    if param == "host":
        yield Site(cgroup)
        return
    from kmesh.l7 import netns

    with pods.Topology() as topo:
        server, client = topo.pod("server"), topo.pod("client", parent=cgroup)
        ns = netns.Netns(f"/run/netns/{server.netns}")
        try:
            if param == "pod6":
                yield Site(client, server.ip6, ns, f"/run/netns/{client.netns}", client.ip6)
            else:
                yield Site(client, server.ip, ns, f"/run/netns/{client.netns}", client.ip)
        finally:
            ns.close()


ON_HOST_AND_IN_PODS = pytest.mark.parametrize("site", ["host", "pod", "pod6"], indirect=True)


@pytest.fixture
def splice_env(kmesh, site):
    """start(handler, routes=None, args=()) -> (kmesh, vip, backend)."""
    made = []

    def start(handler, routes=None, args=()):
        b = Backend(handler, site)
        made.append(b)
        v = vip6() if ":" in b.ip else vip()
        k = kmesh(bootstrap([hcm_listener("s", v, 80, routes or l7_route())],
                            [cluster("b", lb_ep(b.ip, b.port))]), extra_args=args)
        site.enroll(k)
        return k, v, b

    yield start
    for b in made:
        b.close()


def wait_while(cond, timeout: float) -> None:
    """Poll until cond() is false or timeout seconds pass (the caller asserts)."""
    end = time.time() + timeout
    while cond() and time.time() < end:
        time.sleep(0.05)


def run_client(cgroup, script: str, *args, timeout: float = 120) -> str:
    r = cgroup.run([sys.executable, "-c", script, *map(str, args)], timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


# --- integrity ----------------------------------------------------------------

# echo_sha answers only after the whole upload: with Envoy's default 15 s
# route timeout a busy machine's 1 GiB upload would end in a 504; these
# tests measure integrity, not timeouts (0s: none, as in Envoy).
NO_TIMEOUT = l7_route({"timeout": "0s"})


def echo_sha(conn):
    """Read head + N bytes (N from the path), answer with N bytes back and the sha256 of what came."""
    data = read_head(conn)
    head, _, body = data.partition(b"\r\n\r\n")
    n = int(head.split(b" ")[1].split(b"/")[2])
    h = hashlib.sha256(body)
    got = len(body)
    while got < n:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        h.update(chunk)
        got += len(chunk)
    conn.sendall(h.hexdigest().encode())
    block = bytes(range(256)) * 4096
    left = n
    while left:
        left -= conn.send(block[:min(left, len(block))])
    conn.shutdown(socket.SHUT_WR)
    return got


BOTH_WAYS = r"""
import hashlib, socket, sys, threading
host, n = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, 80))
s.sendall(b"POST /x/%d HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % n)
block = bytes(range(256)) * 4096
sent = hashlib.sha256()
def up():
    left = n
    while left:
        chunk = block[:min(left, len(block))]
        s.sendall(chunk)
        sent.update(chunk)
        left -= len(chunk)
t = threading.Thread(target=up)
t.start()
got, h = b"", hashlib.sha256()
digest = b""
total = 0
while True:
    chunk = s.recv(1 << 20)
    if not chunk:
        break
    if len(digest) < 64:
        need = 64 - len(digest)
        digest += chunk[:need]
        chunk = chunk[need:]
    h.update(chunk)
    total += len(chunk)
t.join()
expect = hashlib.sha256()
left = n
while left:
    expect.update(block[:min(left, len(block))])
    left -= min(left, len(block))
print(digest.decode() == sent.hexdigest(), total == n, h.hexdigest() == expect.hexdigest())
print("received", total, "digest", digest[:64], file=sys.stderr)
"""


@pytest.mark.parametrize("budget, site", [(64 * 1024, "host"), (4 << 20, "host"), (4 << 20, "pod"),
                                          (4 << 20, "pod6")], indirect=["site"])
def test_one_gib_each_way_is_intact_and_spliced(splice_env, site, budget):
    """Full-duplex bulk: both directions keep switching between the kernel
    and the daemon (the budget is small next to what a bulk sender puts in
    flight); every byte arrives once and in order."""
    k, v, b = splice_env(echo_sha, routes=NO_TIMEOUT, args=(f"-l7-splice-budget={budget}",))
    r = site.client.run([sys.executable, "-c", BOTH_WAYS, v, str(1 << 30)], timeout=300)
    assert r.stdout.strip() == "True True True", \
        f"{r.stdout}{r.stderr}\nbackend: {b.results}\n/l7: {k.get('/l7')}\ndaemon log:\n{k.log()[-5000:]}"
    st = k.get("/l7")["splice"]
    assert st["spliced"] == 1 and st["not_spliceable"] == 0, st
    assert b.peers[0][0] == site.client_ip   # the upstream leaves from the client's namespace


# --- end of stream ------------------------------------------------------------

def half_close_server(conn):
    """Answer once the client's half-close arrives: proves the FIN went through after its data."""
    data = read_head(conn)
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    conn.sendall(b"got %d" % len(data))
    conn.close()
    return len(data)


HALF_CLOSE = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 80))
s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
if sys.argv[2] == "late":
    time.sleep(0.3)                   # spliced by now
    s.sendall(b"z" * 200000)
# early: FIN before the daemon splices: the kernel refuses the socket
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode())
"""


@ON_HOST_AND_IN_PODS
def test_half_close_passes_after_the_data(splice_env, site):
    k, v, b = splice_env(half_close_server)
    head = len(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    for _ in range(5):
        assert run_client(site.client, HALF_CLOSE, v, "late") == f"got {head + 200000}"
    assert k.get("/l7")["splice"]["spliced"] == 5


def reset_server(conn):
    read_head(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.3)
    conn.close()
    return "reset"


RESET_SEEN = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 80))
s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
try:
    print(s.recv(10) or "eof")
except ConnectionResetError:
    print("reset")
"""


@ON_HOST_AND_IN_PODS
def test_backend_reset_resets_the_client(splice_env, site):
    k, v, b = splice_env(reset_server)
    assert run_client(site.client, RESET_SEEN, v) == "reset"


def wait_for_reset(conn):
    """Read the head, answer nothing, report how the connection ended."""
    read_head(conn)
    conn.settimeout(10)
    try:
        return conn.recv(10) or "eof"
    except ConnectionResetError:
        return "reset"


CLIENT_RESETS = r"""
import socket, struct, sys, time
s = socket.create_connection((sys.argv[1], 80))
s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
time.sleep(0.3)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"""


@ON_HOST_AND_IN_PODS
def test_client_reset_resets_the_backend(splice_env, site):
    k, v, b = splice_env(wait_for_reset)
    run_client(site.client, CLIENT_RESETS, v)
    wait_while(lambda: not b.results, 10)
    assert b.results == ["reset"]
    wait_while(lambda: k.get("/l7")["splice"]["active"], 5)
    assert k.get("/l7")["splice"]["active"] == 0


def test_client_done_before_the_splice_is_relayed(splice_env, cgroup):
    k, v, b = splice_env(half_close_server)
    head = len(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert run_client(cgroup, HALF_CLOSE, v, "early") == f"got {head}"
    st = k.get("/l7")["splice"]
    assert st["spliced"] + st["not_spliceable"] == 1, st


# --- the byte budget ----------------------------------------------------------

def never_reads(conn):
    read_head(conn)
    time.sleep(30)


UPLOAD_UNTIL_BLOCKED = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 80))
s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
time.sleep(0.3)
s.setblocking(False)
block = b"u" * (1 << 20)
total, last = 0, time.time()
while time.time() - last < 2:         # until nothing more is taken for 2 s
    try:
        total += s.send(block)
        last = time.time()
    except BlockingIOError:
        time.sleep(0.01)
    if total > (2 << 30):
        break
print(total)
"""


@pytest.mark.parametrize("budget", [256 * 1024])
def test_a_backend_that_never_reads_bounds_what_the_client_can_send(splice_env, cgroup, budget):
    k, v, b = splice_env(never_reads, args=(f"-l7-splice-budget={budget}",))
    taken = int(run_client(cgroup, UPLOAD_UNTIL_BLOCKED, v))
    # The client's send buffer, the daemon's two sockets' buffers, the
    # backend's receive buffer and the budget: TCP's own limits (tcp_wmem /
    # tcp_rmem maxima), nowhere near the unbounded queue of a plain redirect.
    bound = budget + 2 * tcp_max("tcp_wmem") + 2 * tcp_max("tcp_rmem")
    assert taken <= bound, (taken, bound)
    assert k.get("/l7")["splice"]["passed_bytes"] > 0


def tcp_max(name: str) -> int:
    with open(f"/proc/sys/net/ipv4/{name}") as f:
        return int(f.read().split()[2])


BLOCK = bytes(range(256)) * 4096   # 1 MiB


def sender(mib: int):
    """A backend that answers any head with ``mib`` MiB of BLOCKs, then FIN."""
    def send(conn):
        read_head(conn)
        for _ in range(mib):
            conn.sendall(BLOCK)
        conn.shutdown(socket.SHUT_WR)
        return mib
    return send


SLOW_READER = r"""
import hashlib, socket, sys, time
s = socket.create_connection((sys.argv[1], 80))
s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
rate = int(sys.argv[2])
h, total, start = hashlib.sha256(), 0, time.time()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    h.update(chunk)
    total += len(chunk)
    ahead = total / rate - (time.time() - start)
    if ahead > 0:
        time.sleep(ahead)
print(total, h.hexdigest())
"""


def digest_of(mib: int) -> str:
    h = hashlib.sha256()
    for _ in range(mib):
        h.update(BLOCK)
    return h.hexdigest()


def test_a_slow_reader_gets_every_byte_within_the_bound(splice_env, cgroup):
    """256 MiB read at 20 MB/s (~13 s): without back-pressure the backend
    would be done at once, ~13 s ahead of the reader, against a bound of ~1 s."""
    sent_at = {}
    mib = 256
    send = sender(mib)

    def backend(conn):
        send(conn)
        sent_at["done"] = time.time()

    k, v, b = splice_env(backend)
    n = mib << 20
    rate = 20_000_000
    start = time.time()
    total, digest = run_client(cgroup, SLOW_READER, v, rate).split()
    assert int(total) == n and digest == digest_of(mib)
    assert time.time() - start >= n / rate * 0.9
    # The backend could not run ahead by more than the bound: it finished
    # sending only near the end of the slow read.
    bound = 256 * 1024 + 2 * tcp_max("tcp_wmem") + 2 * tcp_max("tcp_rmem")
    ahead_s = time.time() - sent_at["done"]
    assert ahead_s * rate <= bound + rate * 0.5, (ahead_s, bound)
    assert k.get("/l7")["splice"]["passed_bytes"] > 0


# --- route timeout ------------------------------------------------------------

def test_route_timeout_answers_504_on_a_spliced_connection(splice_env, cgroup):
    k, v, b = splice_env(wait_for_reset, routes=l7_route({"timeout": "0.3s"}))
    r = cgroup.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10", "-H", "Connection: close",
                    f"http://{v}/x"])
    assert r.stdout.rsplit("\n", 1)[1] == "504", r.stdout + r.stderr
    wait_while(lambda: not b.results, 5)
    assert b.results == ["reset"]


# --- restart ------------------------------------------------------------------

def numbered_responses(conn):
    """Answer each request head with r1, r2, ... (keep-alive); at EOF close."""
    n, data = 0, b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return f"eof after {n}"
            data += chunk
        _, _, data = data.partition(b"\r\n\r\n")
        n += 1
        body = b"r%d" % n
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


@ON_HOST_AND_IN_PODS
def test_spliced_connections_survive_a_daemon_restart(kmesh, site, tmp_path):
    """The stopping daemon hands the spliced sockets to the service
    manager's fd store; meanwhile the kernel keeps carrying the bytes; the
    next daemon takes them back and carries the end of the connection."""
    from tests.support.fdstore import FdStore

    store = FdStore(tmp_path / "notify")
    b = Backend(numbered_responses, site)
    client = None
    try:
        v = vip6() if ":" in b.ip else vip()
        k = kmesh(bootstrap([hcm_listener("s", v, 80, l7_route())], [cluster("b", lb_ep(b.ip, b.port))]),
                  env={"NOTIFY_SOCKET": store.path})
        site.enroll(k)
        client = site.client.popen([sys.executable, str(harness.CLIENT), "keepalive", v, "80", "/x", "spliced"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def ask(line: str = "get") -> str:
            client.stdin.write(line + "\n")
            client.stdin.flush()
            return client.stdout.readline().strip()

        assert ask() == "r1"
        assert k.get("/l7")["splice"]["active"] == 1
        assert k.stop() == 0
        names = [n for n, _ in store.listen_fds()]
        assert len(names) == 2 and all(n.startswith("kmesh-l7.") for n in names), names
        assert ask() == "r2"                       # no daemon: the kernel carries it
        k.listen_fds = store.listen_fds()
        k.start()
        st = k.get("/l7")["splice"]
        assert st["adopted"] == 1 and st["active"] == 1, st
        assert sorted(store.removed) == sorted(names)
        assert ask() == "r3"
        assert ask("close") == "eof"               # the new daemon passed the FIN on, and back
        wait_while(lambda: not b.results, 5)
        assert b.results == ["eof after 3"]
        wait_while(lambda: k.get("/l7")["splice"]["active"], 5)
        assert k.get("/l7")["splice"]["active"] == 0
    finally:
        if client:
            client.kill()
            client.wait()
        b.close()
        store.close()


def body_sizes(conn):
    """Keep-alive: answer each request with the size and digest of its body
    (Content-Length or chunked); 100 Continue when asked."""
    buf = b""

    def need(n):
        nonlocal buf
        while len(buf) < n:
            chunk = conn.recv(1 << 20)
            if not chunk:
                raise EOFError
            buf += chunk

    def line():
        nonlocal buf
        while b"\r\n" not in buf:
            need(len(buf) + 1)
        got, _, buf = buf.partition(b"\r\n")
        return got

    served = 0
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                need(len(buf) + 1)
            head, _, buf = buf.partition(b"\r\n\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (x.partition(b":") for x in head.split(b"\r\n")[1:])}
            if fields.get(b"expect", b"").lower() == b"100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = hashlib.sha256()
            n = 0
            if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                while (size := int(line().split(b";")[0], 16)):
                    need(size + 2)
                    body.update(buf[:size])
                    n += size
                    buf = buf[size + 2:]
                while line():
                    pass
            else:
                size = int(fields.get(b"content-length", b"0"))
                need(size)
                body.update(buf[:size])
                n, buf = size, buf[size:]
            answer = f"{n}:{body.hexdigest()[:12]}".encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            served += 1
    except EOFError:
        return served


def test_bodies_on_a_keep_alive_connection_are_framed_per_request(splice_env, cgroup, tmp_path):
    """Sized, chunked and 100-continue uploads, one after the other on one
    connection: each reaches the backend whole and no more."""
    k, v, b = splice_env(body_sizes)
    data = tmp_path / "upload"
    data.write_bytes(bytes(range(256)) * 8192)   # 2 MiB: curl asks 100-continue
    data.chmod(0o644)
    want = f"{2 << 20}:{hashlib.sha256(data.read_bytes()).hexdigest()[:12]}"
    url = f"http://{v}/x"
    r = cgroup.run(["curl", "-sS", "--max-time", "60", "-w", "\n", "--data-binary", f"@{data}", url,
                    "--next", "-sS", "-w", "\n", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{data}", url,
                    "--next", "-sS", "-w", "\n", "-H", "Expect:", "--data-binary", f"@{data}", url,
                    "--next", "-sS", "-w", "\n", url])
    assert r.stdout.split() == [want, want, want, "0:e3b0c44298fc"], r.stdout + r.stderr
    st = k.get("/l7")
    assert st["per_request"] == 1 and st["routed"] == 4, st
    wait_while(lambda: not b.results, 5)
    assert b.results == [4]


def test_keep_alive_connections_survive_a_daemon_restart(kmesh, cgroup, tmp_path):
    """A keep-alive connection (routed per request) between two requests is
    handed to the fd store at stop; a request sent while no daemon runs
    waits in its socket and is answered by the next daemon."""
    from tests.support.fdstore import FdStore

    store = FdStore(tmp_path / "notify")
    b = Backend(numbered_responses)
    client = None
    try:
        v = vip()
        k = kmesh(bootstrap([hcm_listener("s", v, 80, l7_route())], [cluster("b", lb_ep("127.0.0.1", b.port))]),
                  env={"NOTIFY_SOCKET": store.path})
        client = cgroup.popen([sys.executable, str(harness.CLIENT), "keepalive", v, "80", "/x"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def send(line: str = "get") -> None:
            client.stdin.write(line + "\n")
            client.stdin.flush()

        send()
        assert client.stdout.readline().strip() == "r1"
        st = k.get("/l7")
        assert st["per_request"] == 1 and st["splice"]["active"] == 0, st
        assert k.stop() == 0
        names = [n for n, _ in store.listen_fds()]
        assert len(names) == 1 and names[0].startswith("kmesh-ka."), names
        send()                                    # no daemon: the request waits in the socket
        k.listen_fds = store.listen_fds()
        k.start()
        assert client.stdout.readline().strip() == "r1"   # a new upstream connection answers it
        assert k.get("/l7")["resumed"] == 1
        send()
        assert client.stdout.readline().strip() == "r2"
        send("close")
        assert client.stdout.readline().strip() == "eof"
        assert sorted(store.removed) == sorted(names)
    finally:
        if client:
            client.kill()
            client.wait()
        b.close()
        store.close()


STREAM_READER = r"""
import hashlib, socket, sys, time
s = socket.create_connection((sys.argv[1], 80))
s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
rate = int(sys.argv[2])
h, total, start = hashlib.sha256(), 0, time.time()
while True:
    chunk = s.recv(1 << 20)
    if not chunk:
        break
    h.update(chunk)
    total += len(chunk)
    if total >= (16 << 20) and total - len(chunk) < (16 << 20):
        print("started", flush=True)
    ahead = total / rate - (time.time() - start)
    if ahead > 0:
        time.sleep(ahead)
print(total, h.hexdigest(), flush=True)
"""


def test_a_stream_goes_on_across_a_daemon_restart(kmesh, cgroup, tmp_path):
    """256 MiB to a reader slower than the backend (so the daemon relays part
    of it) while the daemon stops and a new one takes the sockets over:
    every byte arrives once, in order, then the FIN."""
    from tests.support.fdstore import FdStore

    mib = 256
    store = FdStore(tmp_path / "notify")
    b = Backend(sender(mib))
    client = None
    try:
        v = vip()
        k = kmesh(bootstrap([hcm_listener("s", v, 80, l7_route())], [cluster("b", lb_ep("127.0.0.1", b.port))]),
                  env={"NOTIFY_SOCKET": store.path}, extra_args=("-l7-splice-budget=65536",))
        client = cgroup.popen([sys.executable, "-c", STREAM_READER, v, str(64 << 20)], stdout=subprocess.PIPE)
        assert client.stdout.readline().strip() == "started"
        assert k.stop() == 0
        assert len(store.listen_fds()) == 2
        time.sleep(0.5)                          # the kernel carries on alone, up to the budget
        k.listen_fds = store.listen_fds()
        k.start()
        assert k.get("/l7")["splice"]["adopted"] == 1
        out, _ = client.communicate(timeout=120)
        total, digest = out.split()
        assert int(total) == mib << 20 and digest == digest_of(mib)
    finally:
        if client and client.poll() is None:
            client.kill()
            client.wait()
        b.close()
        store.close()


def test_a_crashed_daemon_leaves_no_splice_state_behind(kmesh, cgroup):
    """SIGKILL ends its spliced connections (their sockets die with it); the
    next daemon drops their entries."""
    b = Backend(numbered_responses)
    client = None
    try:
        v = vip()
        k = kmesh(bootstrap([hcm_listener("s", v, 80, l7_route())], [cluster("b", lb_ep("127.0.0.1", b.port))]))
        client = cgroup.popen([sys.executable, str(harness.CLIENT), "keepalive", v, "80", "/x", "spliced"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        client.stdin.write("get\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "r1"
        k.stop(signal.SIGKILL)
        assert len(splice_entries(k)) == 2
        k.start()
        assert splice_entries(k) == []
    finally:
        if client:
            client.kill()
            client.wait()
        b.close()


def splice_entries(k) -> list:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(k.pin_root / "map" / "km_splice_dir")],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


# --- relayed by the daemon ------------------------------------------------------

def echo_head(conn):
    """Answer with the request line and the Host header as received."""
    head = read_head(conn).split(b"\r\n\r\n")[0].split(b"\r\n")
    host = next(line for line in head if line.lower().startswith(b"host:"))
    body = head[0] + b" | " + host
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return "answered"


def test_a_route_that_rewrites_is_relayed_with_the_new_head(splice_env, cgroup):
    k, v, b = splice_env(echo_head, routes=[{"match": {"prefix": "/old/"}, "route": {
        "cluster": "b", "prefix_rewrite": "/new/", "host_rewrite_literal": "backend.internal"}}])
    r = cgroup.run(["curl", "-sS", "--max-time", "5", f"http://{v}/old/x?q=1"])
    assert r.stdout == "GET /new/x?q=1 HTTP/1.1 | Host: backend.internal", r.stdout + r.stderr
    st = k.get("/l7")
    assert st["routed"] == 1 and st["splice"]["spliced"] == 0, st


def test_without_splicing_the_daemon_relays_both_ways_intact(splice_env, cgroup):
    k, v, b = splice_env(echo_sha, routes=NO_TIMEOUT, args=("-l7-splice-budget=0",))
    assert run_client(cgroup, BOTH_WAYS, v, 64 << 20) == "True True True"
    assert k.get("/l7")["splice"] is None
