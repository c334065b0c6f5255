"""A "pods" topology for end-to-end tests, shaped like a node's workloads:
each pod is a network namespace with its own loopback and one veth on a
bridge that lives inside a test-made node namespace, and runs in a cgroup of
its own. Pod addresses are in 10.77.0.0/24, which only exists inside the
topology; nothing in it has a default route, so a connection kmesh fails to
redirect (to a service VIP) fails inside the topology and never leaves the
host. Each pod also has an IPv6 address (``Pod.ip6``) in the topology's own
fd77:<x>::/64 (``Topology.subnet6``, <x> from the topology's tag), again with
no other route: a connect to any other IPv6 address fails with ENETUNREACH.

    with pods.Topology() as topo:
        web = topo.pod("web")                          # not governed
        client = topo.pod("client", parent=governed)   # under the daemon's cgroup
        a = web.backend("A", 8080)
        a6 = web.backend("A", 8080, host=web.ip6)      # on the pod's IPv6 address
        client.run(["curl", f"http://{vip}/"])
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass, field

from tests.support import harness

SUBNET = "10.77.0"
SUBNET6 = "fd77"      # each topology's pods are in fd77:<x>::/64, <x> from its tag
_groups6: set[int] = set()   # the <x> taken in this process, so topologies differ


def _group6(tag: str) -> int:
    """A 16-bit group from ``tag``, one no other topology of this process has."""
    salt = 0
    while True:
        g = int.from_bytes(hashlib.sha256(f"{tag}/{salt}".encode()).digest()[:2], "big")
        if g not in _groups6:
            _groups6.add(g)
            return g
        salt += 1


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(("-n", netns) if netns else ()), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


@dataclass
class Pod(harness.Runner):
    name: str
    netns: str
    ip: str
    cgroup: harness.Cgroup
    procs: list[subprocess.Popen] = field(default_factory=list)
    ip6: str = ""      # the pod's IPv6 address (fd77:<x>::<i>), "" if it has none

    def _wrap(self, argv: list[str]) -> list[str]:
        # Into the cgroup first: `ip netns exec` remounts /sys, which hides
        # the cgroup2 mount from what it runs.
        return self.cgroup._wrap(["ip", "netns", "exec", self.netns, *argv])

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        p = super().popen(argv, **kw)
        self.procs.append(p)
        return p

    def connect(self, host: str, port: int) -> str:
        """One connect: "ok" or the errno's name."""
        code = ("import errno, socket, sys\n"
                "try:\n"
                "    fam, typ, proto, _, addr = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]),\n"
                "                                                  type=socket.SOCK_STREAM)[0]\n"
                "    s = socket.socket(fam, typ, proto); s.settimeout(5)\n"
                "    s.connect(addr); print('ok')\n"
                "except OSError as e:\n    print(errno.errorcode.get(e.errno, e))")
        return self.run([sys.executable, "-c", code, host, str(port)]).stdout.strip()

    def backend(self, name: str, port: int, host: str | None = None) -> tuple[str, int]:
        """examples/backend.py answering ``name`` on ``host``: this pod's
        address by default, e.g. ``self.ip6`` for its IPv6 one."""
        host = host or self.ip
        p = self.popen([sys.executable, str(harness.BACKEND), name, str(port), host], stdout=subprocess.PIPE)
        line = p.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"backend {name} in pod {self.name} did not start: {line!r}")
        return host, port

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs.clear()


class Topology:
    """A node namespace with a bridge, and pods on it (a context manager:
    everything it made is removed on exit, also after a failure)."""

    def __init__(self):
        tag = harness.unique("")[-10:].replace("-", "")
        self.tag = tag
        self.subnet6 = f"{SUBNET6}:{_group6(tag):x}::"   # the pods' IPv6 /64, e.g. "fd77:3a9c::"
        self.node = f"kmn{tag}"
        self.pods: list[Pod] = []
        self._cgroups: list[harness.Cgroup] = []

    def __enter__(self) -> "Topology":
        _ip("netns", "add", self.node)
        try:
            _ip("link", "add", "br0", "type", "bridge", netns=self.node)
            _ip("link", "set", "br0", "up", netns=self.node)
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def group(self, parent: harness.Cgroup | None = None) -> harness.Cgroup:
        """A cgroup to put pods under (a namespace's, a slice), removed
        after them."""
        cg = harness.Cgroup(parent=parent.path if parent else None)
        self._cgroups.append(cg)
        return cg

    def pod(self, name: str, parent: harness.Cgroup | None = None) -> Pod:
        """A new pod; its cgroup is a child of ``parent`` (e.g. the cgroup a
        daemon governs) or of the test cgroup root."""
        i = len(self.pods) + 2
        netns, ip, ip6 = f"kmp{self.tag}{i}", f"{SUBNET}.{i}", f"{self.subnet6}{i}"
        cg = self.group(parent)
        _ip("netns", "add", netns)
        pod = Pod(name, netns, ip, cg, ip6=ip6)
        self.pods.append(pod)
        _ip("link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", netns, netns=self.node)
        _ip("link", "set", f"v{i}", "master", "br0", "up", netns=self.node)
        _ip("addr", "add", f"{ip}/24", "dev", "eth0", netns=netns)
        # nodad: usable at once. The /64's on-link route is the only IPv6 route.
        _ip("addr", "add", f"{ip6}/64", "dev", "eth0", "nodad", netns=netns)
        _ip("link", "set", "eth0", "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        return pod

    def delete(self, pod: Pod) -> None:
        """What deleting a pod does: its processes end, its namespace goes."""
        pod.stop()
        pod.cgroup.remove()
        self._cgroups.remove(pod.cgroup)
        subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True, check=True)
        self.pods.remove(pod)

    def close(self) -> None:
        for pod in self.pods:
            pod.stop()
        for cg in reversed(self._cgroups):   # children before parents
            cg.remove()
        for pod in self.pods:
            subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.node], capture_output=True)
        self.pods.clear()
        self._cgroups.clear()
