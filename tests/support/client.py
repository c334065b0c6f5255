#!/usr/bin/env python3
"""Test client, run inside a test cgroup so that kmesh governs its sockets.

    client.py loop HOST PORT SECONDS   connect/GET/read/close until SECONDS pass
                                       or SIGTERM; prints JSON {"ok", "failed", "errors", "bodies"}
    client.py hold HOST PORT N         open N keep-alive connections, GET once on each,
                                       print "held", keep them until stdin closes
    client.py udp HOST PORT            connect() a UDP socket, print getpeername()
    client.py keepalive HOST PORT PATH one connection; per stdin line "get": GET PATH on it,
                                       print the body; "close": half-close, print "eof" once
                                       the other side has closed too
"""
import collections
import json
import signal
import socket
import sys
import time

# Host as curl sends it: an L7 route (Istio's vhosts list "VIP:PORT") picks by it.
REQUEST = "GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: {conn}\r\n\r\n"


def fetch(host: str, port: int, keep: bool = False):
    s = socket.create_connection((host, port), timeout=5)
    body = request(s, REQUEST.format(host=host, port=port, conn="keep-alive" if keep else "close").encode())
    if keep:
        return s, body
    s.close()
    return None, body


def request(s: socket.socket, req: bytes) -> str:
    """Send one request on s, read its response (by Content-Length, else to
    EOF): the body, stripped."""
    s.sendall(req)
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                break
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\r\n\r\n")[2].decode().strip()


def loop(host: str, port: int, seconds: float) -> None:
    ok, failed = 0, 0
    errors: collections.Counter = collections.Counter()
    bodies: collections.Counter = collections.Counter()
    end = time.monotonic() + seconds
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while time.monotonic() < end and not stop:
        try:
            _, body = fetch(host, port)
            if not body:
                raise OSError("empty response")
            ok += 1
            bodies[body] += 1
        except OSError as e:
            failed += 1
            errors[type(e).__name__ + ": " + str(e)] += 1
    print(json.dumps({"ok": ok, "failed": failed, "errors": errors, "bodies": bodies}), flush=True)


def hold(host: str, port: int, n: int) -> None:
    socks, bodies = [], collections.Counter()
    for _ in range(n):
        s, body = fetch(host, port, keep=True)
        socks.append(s)
        bodies[body] += 1
    print(json.dumps({"held": n, "bodies": bodies}), flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()


def keepalive(host: str, port: int, path: str, spliced: bool = False) -> None:
    """Requests on one connection, one per "get" line. ``spliced``: the
    first says Connection: close, so kmesh splices the whole connection and
    the later ones ride in it as bytes."""
    s = socket.create_connection((host, port), timeout=10)
    req = b"GET %s HTTP/1.1\r\nHost: vip\r\n\r\n" % path.encode()
    first = req.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") if spliced else req
    for line in sys.stdin:
        if first:
            line_req, first = first, None
            if line.strip() != "close":
                print(request(s, line_req), flush=True)
                continue
        if line.strip() == "close":
            s.shutdown(socket.SHUT_WR)
            print("eof" if s.recv(4096) == b"" else "data", flush=True)
            return
        print(request(s, req), flush=True)


def udp(host: str, port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    print("%s:%d" % s.getpeername(), flush=True)


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "loop":
        loop(host, port, float(sys.argv[4]))
    elif mode == "hold":
        hold(host, port, int(sys.argv[4]))
    elif mode == "keepalive":
        keepalive(host, port, sys.argv[4], spliced=sys.argv[5:6] == ["spliced"])
    elif mode == "udp":
        udp(host, port)
    else:
        sys.exit(f"unknown mode {mode}")
