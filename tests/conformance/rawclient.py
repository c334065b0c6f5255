#!/usr/bin/env python3
"""Raw HTTP/1.1 client of the conformance suite, run as a subprocess (in the
test's cgroup for kmesh, on the host for Envoy).

    rawclient.py < JOBS

JOBS is a JSON list of {"host", "port", "requests": [raw request, ...]
(latin-1 text), "pipelined": bool}, run one after the other. All requests of
a job go on ONE connection: one after the other, each once the previous
response is complete (keep-alive), or all at once (pipelined). Prints a JSON
list with, per job, a list of one entry per request: {"status", "headers":
[[name, value], ...] (names lowercased, in order), "body"}, or {"error":
"closed" | "timeout" | "reset"} once the connection ended before that
response.
"""
import json
import socket
import sys

TIMEOUT = 5.0


class Reader:
    def __init__(self, sock):
        self.sock, self.buf, self.eof = sock, b"", False

    def fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.sock.recv(65536)
        if not chunk:
            self.eof = True
        self.buf += chunk
        return bool(chunk)

    def until(self, sep: bytes):
        while sep not in self.buf:
            if not self.fill():
                return None
        got, _, self.buf = self.buf.partition(sep)
        return got

    def take(self, n: int):
        while len(self.buf) < n:
            if not self.fill():
                return None
        got, self.buf = self.buf[:n], self.buf[n:]
        return got

    def rest(self) -> bytes:
        while self.fill():
            pass
        got, self.buf = self.buf, b""
        return got


def response(r: Reader, method: str) -> dict:
    while True:
        head = r.until(b"\r\n\r\n")
        if head is None:
            return {"error": "closed"}
        line, *fields = head.decode("latin-1").split("\r\n")
        status = int(line.split(" ", 2)[1])
        headers = []
        for f in fields:
            k, _, v = f.partition(":")
            headers.append([k.strip().lower(), v.strip()])
        if 100 <= status < 200 and status != 101:
            continue   # an interim response: the final one follows
        break
    get = {k: v for k, v in headers}
    closing = "close" in get.get("connection", "").lower()
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif "chunked" in get.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size_line = r.until(b"\r\n")
            if size_line is None:
                return {"error": "closed"}
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while r.until(b"\r\n") not in (b"", None):
                    pass
                break
            chunk = r.take(size + 2)
            if chunk is None:
                return {"error": "closed"}
            body += chunk[:-2]
    elif "content-length" in get:
        body = r.take(int(get["content-length"]))
        if body is None:
            return {"error": "closed"}
    else:
        body, closing = r.rest(), True
    return {"status": status, "headers": headers, "body": body.decode("latin-1"), "closing": closing}


def run(host: str, port: int, raw: list[str], pipelined: bool) -> list[dict]:
    reqs = [q.encode("latin-1") for q in raw]
    methods = [q.split(b" ", 1)[0].decode() for q in reqs]
    out: list[dict] = []
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        r = Reader(s)
        try:
            if pipelined:
                s.sendall(b"".join(reqs))
            for i, q in enumerate(reqs):
                if not pipelined:
                    try:
                        s.sendall(q)
                    except OSError:
                        break
                got = response(r, methods[i])
                out.append(got)
                if "error" in got or got.pop("closing"):
                    break
        except socket.timeout:
            out.append({"error": "timeout"})
        except ConnectionResetError:
            out.append({"error": "reset"})
    return out + [{"error": "closed"}] * (len(reqs) - len(out))


def main() -> None:
    jobs = json.load(sys.stdin)
    print(json.dumps([run(j["host"], j["port"], j["requests"], j.get("pipelined", False)) for j in jobs]))


if __name__ == "__main__":
    main()
