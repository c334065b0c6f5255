"""The conformance suite's backend: a threaded HTTP/1.1 echo server on
127.0.0.1 that answers every request with a JSON body saying who answered and
what arrived: its name, the method, the request target and the headers
(lowercased names, the values of each name in arrival order). Keep-alive
capable; responses always carry Content-Length.

Request headers steer it: ``x-echo-status: N`` answers N instead of 200,
``x-echo-fail-once: TOKEN`` answers 503 the first time the server sees TOKEN
(``reset()`` forgets the tokens), ``x-echo-delay-ms: N`` answers N ms late. Every request is
logged (``log``) with its ``x-case`` header, so that a case can compare how
many requests each backend got (retries, mirrors)."""
from __future__ import annotations

import json
import socket
import threading
import time

MAX_HEAD = 256 * 1024


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def until(self, sep: bytes) -> bytes | None:
        while sep not in self.buf:
            if len(self.buf) > MAX_HEAD or not self.fill():
                return None
        got, _, self.buf = self.buf.partition(sep)
        return got

    def take(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self.fill():
                return None
        got, self.buf = self.buf[:n], self.buf[n:]
        return got


def _body(conn: _Conn, headers: dict[str, list[str]]) -> bytes | None:
    if any("chunked" in v.lower() for v in headers.get("transfer-encoding", [])):
        out = b""
        while True:
            line = conn.until(b"\r\n")
            if line is None:
                return None
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := conn.until(b"\r\n")) not in (b"", None):
                    pass
                return out
            data = conn.take(size + 2)
            if data is None:
                return None
            out += data[:-2]
    n = int((headers.get("content-length") or ["0"])[0])
    return conn.take(n)


def serve_connection(server: "EchoServer", sock: socket.socket) -> None:
    name = server.name
    conn = _Conn(sock)
    try:
        while True:
            head = conn.until(b"\r\n\r\n")
            if not head:
                return
            line, *fields = head.decode("latin-1").split("\r\n")
            method, target, version = (line.split(" ", 2) + ["", ""])[:3]
            headers: dict[str, list[str]] = {}
            for f in fields:
                k, _, v = f.partition(":")
                headers.setdefault(k.strip().lower(), []).append(v.strip())
            body = _body(conn, headers)
            if body is None:
                return
            tokens = {t.strip().lower() for v in headers.get("connection", []) for t in v.split(",")}
            close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
            status = int((headers.get("x-echo-status") or ["200"])[0])
            with server.lock:
                server.log.append({"case": (headers.get("x-case") or [""])[0], "backend": name, "method": method,
                                   "path": target, "host": (headers.get("host") or [""])[0]})
                for token in headers.get("x-echo-fail-once", []):
                    if token not in server.tokens:
                        server.tokens.add(token)
                        status = 503
            time.sleep(int((headers.get("x-echo-delay-ms") or ["0"])[0]) / 1000)
            payload = json.dumps({"backend": name, "method": method, "path": target, "headers": headers,
                                  "body": body.decode("latin-1")}, sort_keys=True).encode()
            resp = (b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
                    % (status, len(payload), b"connection: close\r\n" if close else b""))
            if method != "HEAD":
                resp += payload
            sock.sendall(resp)
            if close:
                return
    except OSError:
        return
    finally:
        sock.close()


class EchoServer:
    """One named backend; ``stop()`` closes the listener (connections end
    with their clients)."""

    def __init__(self, name: str):
        self.name = name
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.tokens: set[str] = set()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True, name=f"echo-{name}")
        self.thread.start()

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=serve_connection, args=(self, s), daemon=True).start()

    def reset(self) -> list[dict]:
        """The log so far; forget it and the fail-once tokens."""
        with self.lock:
            got, self.log, self.tokens = self.log, [], set()
        return got

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
