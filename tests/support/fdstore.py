"""A stand-in for systemd's file descriptor store: an AF_UNIX datagram
NOTIFY_SOCKET that keeps the descriptors sent with ``FDSTORE=1`` by their
``FDNAME`` and drops them on ``FDSTOREREMOVE=1``; ``listen_fds()`` gives them
back in the order systemd passes them (for harness.Kmesh.listen_fds)."""
from __future__ import annotations

import array
import os
import socket
import threading


class FdStore:
    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.fds: dict[str, int] = {}
        self.removed: list[str] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        fd_size = array.array("i").itemsize
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * fd_size))
            except socket.timeout:
                continue
            fds = array.array("i")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fd_size])
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            name = fields.get("FDNAME", "stored")
            with self.lock:
                if fields.get("FDSTORE") == "1":
                    for fd in fds:
                        self.fds[name] = fd
                elif fields.get("FDSTOREREMOVE") == "1":
                    self.removed.append(name)
                    fd = self.fds.pop(name, None)
                    if fd is not None:
                        os.close(fd)
                else:
                    for fd in fds:
                        os.close(fd)

    def listen_fds(self) -> tuple[tuple[str, int], ...]:
        with self.lock:
            return tuple(self.fds.items())

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
