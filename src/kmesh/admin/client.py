"""Talking to kmesh-daemon's admin API, for kmeshctl and kmesh-cmd.

Reads go to the loopback TCP address. Changes go to the daemon's Unix
socket (where root and the admin group are allowed), which the daemon at
that address names in GET /options; given explicitly, the socket carries
everything. Without a usable socket a change goes over TCP, which takes
it from root and answers 403 to anyone else.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
from dataclasses import dataclass


class Unreachable(OSError):
    """Nothing answers at the admin address."""


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)

    def error(self) -> str:
        """What the daemon said went wrong."""
        text = self.body.decode(errors="replace").strip()
        try:
            got = json.loads(text)
        except ValueError:
            return text
        if isinstance(got, dict):
            return got.get("error") or "; ".join(got.get("errors", [])) or text
        return text


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Admin:
    def __init__(self, address: str, socket_path: str | None = None, timeout: float = 30.0):
        self.address = address
        self.socket_path = socket_path      # None: asked of the daemon for changes
        self.timeout = timeout

    def where(self, method: str) -> str:
        return self._socket_for(method) or self.address

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
        sock = self._socket_for(method)
        if sock:
            conn = _UnixConnection(sock, self.timeout)
        else:
            host, _, port = self.address.rpartition(":")
            conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.timeout)
        try:
            conn.request(method, path, body=body if body is not None else (b"" if method == "POST" else None),
                         headers=headers or {})
            r = conn.getresponse()
            return Reply(r.status, r.read())
        except OSError as e:
            raise Unreachable(e.errno, f"cannot reach kmesh-daemon's admin API at {sock or self.address} ({e})") \
                from None
        finally:
            conn.close()

    def _socket_for(self, method: str) -> str:
        if self.socket_path is not None:
            return self.socket_path
        if method == "GET":
            return ""
        try:
            sock = self.request("GET", "/options").json().get("admin_socket", "")
        except (Unreachable, ValueError, AttributeError):
            return ""
        if not sock or not os.access(sock, os.R_OK | os.W_OK):
            return ""   # not ours to use: TCP says why (403) if we may not change things
        self.socket_path = sock
        return sock
