"""Network namespaces of workloads, for the L7 hand-off (docs/l7.md).

A workload in a namespace of its own reaches the hand-off listener at the
same loopback address as on the host, so the daemon opens one there, and
opens the upstream connection there too: the backend then sees the
workload's own address. A socket belongs to the namespace of the thread
that made it, so ``Netns.socket()`` switches the calling thread in and back
(setns(2) changes only that thread)."""
from __future__ import annotations

import ctypes
import os
import socket

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def own_inode() -> int:
    """The inode naming the daemon's own network namespace."""
    return os.stat("/proc/self/ns/net").st_ino


def path_of(netns: str | None = None, pid: int | None = None) -> str:
    """A namespace named by its path (/run/netns/NAME, /proc/PID/ns/net, a
    bind mount a CNI made) or by a process in it."""
    if (netns is None) == (pid is None):
        raise ValueError("name a workload's network namespace by path (netns) or by a process in it (pid)")
    return f"/proc/{int(pid)}/ns/net" if pid is not None else netns


class Netns:
    """An open network namespace (the open file keeps it alive until close())."""

    def __init__(self, path: str):
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"network namespace {path}: {e.strerror}") from None
        self.path, self.inode = path, os.fstat(self.fd).st_ino

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket in this namespace."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(self.fd)
            except OSError as e:
                raise OSError(e.errno, f"{self.path} is not a network namespace ({e.strerror})") from None
            try:
                return socket.socket(family, kind)
            finally:
                _setns(own)
        finally:
            os.close(own)

    def close(self) -> None:
        os.close(self.fd)
