"""A "pods" topology for end-to-end tests, shaped like a node's workloads:
each pod is a network namespace with its own loopback and one veth on a
bridge that lives inside a test-made node namespace, and runs in a cgroup of
its own. Pod addresses are in 10.77.0.0/24, which only exists inside the
topology; nothing in it has a default route, so a connection kmesh fails to
redirect (to a service VIP) fails inside the topology and never leaves the
host.

    with pods.Topology() as topo:
        web = topo.pod("web")                          # not governed
        client = topo.pod("client", parent=governed)   # under the daemon's cgroup
        a = web.backend("A", 8080)
        client.run(["curl", f"http://{vip}/"])
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

from tests.support import harness

SUBNET = "10.77.0"


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
        code = ("import errno, socket, sys; s = socket.socket(); s.settimeout(5)\n"
                "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('ok')\n"
                "except OSError as e:\n    print(errno.errorcode.get(e.errno, e))")
        return self.run([sys.executable, "-c", code, host, str(port)]).stdout.strip()

    def backend(self, name: str, port: int) -> tuple[str, int]:
        """examples/backend.py answering ``name`` on this pod's address."""
        p = self.popen([sys.executable, str(harness.BACKEND), name, str(port), self.ip], stdout=subprocess.PIPE)
        line = p.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"backend {name} in pod {self.name} did not start: {line!r}")
        return self.ip, port

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
        netns, ip = f"kmp{self.tag}{i}", f"{SUBNET}.{i}"
        cg = self.group(parent)
        _ip("netns", "add", netns)
        pod = Pod(name, netns, ip, cg)
        self.pods.append(pod)
        _ip("link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", netns, netns=self.node)
        _ip("link", "set", f"v{i}", "master", "br0", "up", netns=self.node)
        _ip("addr", "add", f"{ip}/24", "dev", "eth0", netns=netns)
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
