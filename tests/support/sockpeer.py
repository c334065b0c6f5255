#!/usr/bin/env python3
"""Both ends of a data-integrity transfer, with non-blocking sockets (what
kmesh's sockmap acceleration enrolls). Run inside a test cgroup.

    sockpeer.py serve PORT [HOST]               accept connections until killed; prints "listening"
    sockpeer.py send [HOST:]PORT UP DOWN SEED [abort]   (an IPv6 HOST in brackets)
                                                one connection (to 127.0.0.1 by default): send UP bytes,
                                                ask for DOWN bytes back; prints JSON with the checks

Each side writes a deterministic stream (from SEED) in messages of mixed
sizes, 1 B to 1 MiB, then half-closes (shutdown(SHUT_WR)) and reads the
other side's stream to EOF, hashing it; the hashes are compared with the
expected streams'. "abort" makes the client reset the connection halfway
(SO_LINGER 0) instead.
"""
import errno
import hashlib
import itertools
import json
import random
import selectors
import socket
import struct
import sys

MAX_MSG = 1 << 20
HEADER = struct.Struct("!QQQ")   # up, down, seed


def stream(size: int, seed: int):
    """(chunk) of a deterministic byte stream, in messages of mixed sizes."""
    rnd = random.Random(seed)
    left = size
    while left:
        n = min(left, int(2 ** rnd.uniform(0, 20)))   # log-uniform 1 B .. 1 MiB
        yield rnd.randbytes(n)
        left -= n


def expected_hash(size: int, seed: int) -> str:
    h = hashlib.sha256()
    for chunk in stream(size, seed):
        h.update(chunk)
    return h.hexdigest()


def pump(sock: socket.socket, out, abort_after: int | None = None) -> dict:
    """Send the ``out`` chunks (then half-close) and receive to EOF, both at
    once, non-blocking. A reset by the peer ends it with "reset"."""
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    h, got, sent, pending = hashlib.sha256(), 0, 0, b""
    reading = sending = True
    try:
        while reading or sending:
            sel.modify(sock, (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if sending else 0))
            ready = sel.select(timeout=30)
            if not ready:
                raise TimeoutError("no progress for 30 s")
            ev = ready[0][1]
            if ev & selectors.EVENT_READ:
                try:
                    data = sock.recv(MAX_MSG)
                except BlockingIOError:
                    data = None
                if data == b"":
                    reading = False
                elif data:
                    h.update(data)
                    got += len(data)
            if ev & selectors.EVENT_WRITE and sending:
                if not pending:
                    pending = next(out, None)
                    if pending is None:
                        sock.shutdown(socket.SHUT_WR)   # half-close: the peer may still send
                        sending = False
                        continue
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    n = 0
                pending, sent = pending[n:], sent + n
                if abort_after is not None and sent >= abort_after:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                    return {"sent": sent, "received": got, "aborted": True}
    except (ConnectionResetError, BrokenPipeError):
        return {"sent": sent, "received": got, "reset": True}
    finally:
        sel.close()
    return {"received": got, "sha256": h.hexdigest(), "sent": sent}


def wait(sock: socket.socket, events: int) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, events)
        if not sel.select(30):
            raise TimeoutError("no progress for 30 s")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        try:
            part = sock.recv(n - len(data))
        except BlockingIOError:
            wait(sock, selectors.EVENT_READ)
            continue
        if not part:
            raise ConnectionError("closed before the header")
        data += part
    return data


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(port: int, host: str = "127.0.0.1") -> None:
    lsock = socket.socket(_family(host))
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.setblocking(False)   # before listen(): kmesh reads the mode there
    lsock.bind((host, port))
    lsock.listen(128)
    print("listening", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    while True:
        sel.select()
        try:
            conn, _ = lsock.accept()
        except BlockingIOError:
            continue
        conn.setblocking(False)
        try:
            up, down, seed = HEADER.unpack(recv_exactly(conn, HEADER.size))
            res = pump(conn, stream(down, seed + 1))
            ok = res.get("sha256") == expected_hash(up, seed) if "sha256" in res else None
            print(json.dumps({"server": res, "ok": ok}), flush=True)
        except (OSError, TimeoutError) as e:
            print(json.dumps({"server_error": str(e)}), flush=True)
        finally:
            conn.close()


def send(dest: str, up: int, down: int, seed: int, abort: bool) -> None:
    host, _, port = dest.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    sock = socket.socket(_family(host))
    sock.setblocking(False)   # before connect(): kmesh reads the mode when it is established
    if sock.connect_ex((host, int(port))) not in (0, errno.EINPROGRESS):
        raise ConnectionError("connect failed")
    wait(sock, selectors.EVENT_WRITE)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, "connect")
    out = itertools.chain([HEADER.pack(up, down, seed)], stream(up, seed))
    res = pump(sock, out, abort_after=up // 2 if abort else None)
    if not abort:
        res["ok"] = res.get("sha256") == expected_hash(down, seed + 1) and res["sent"] == up + HEADER.size
        sock.close()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), *sys.argv[3:4])
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), "abort" in sys.argv[6:])
