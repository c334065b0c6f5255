"""Real podman for end-to-end tests: a per-run CNI network with kmesh-cni
chained in, containers in a test cgroup, and a tiny busybox image.

Each ``Podman`` has its own containers.conf (CNI backend, runc, its own CNI
config and plugin dirs), its own bridge and subnet in 10.202.0.0/16, and
no gateway: containers reach each other and nothing else, so a connection
kmesh fails to redirect to a VIP fails inside the network. Containers run
under ``--cgroup-parent`` = the test's cgroup (cgroupfs makes the same path
in the v1 hierarchies too; all of it is removed at exit).

This machine's quirks, answered in containers.conf: the cgroup2 hierarchy
has a controller (hybrid mode), which crun refuses, so runc runs the
containers; the hard RLIMIT_NPROC/NOFILE are below podman's defaults, so the
defaults are lowered.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import harness

BUSYBOX = f"localhost/kmesh-test-busybox:{harness.RUN_ID}"
V1_ROOT = Path("/sys/fs/cgroup")


def available() -> str:
    """Why podman tests cannot run here, or ''."""
    for tool in ("podman", "buildah", "runc", "busybox"):
        if not shutil.which(tool):
            return f"{tool} is not installed (./build.sh setup installs it)"
    if not Path("/usr/lib/cni/bridge").exists():
        return "containernetworking-plugins is not installed (./build.sh setup installs it)"
    return ""


def build_busybox() -> str:
    """A one-file image: static busybox and its applets (wget, httpd, nc)."""
    c = _out(["buildah", "from", "scratch"])
    try:
        _out(["buildah", "copy", c, shutil.which("busybox"), "/bin/busybox"])
        _out(["buildah", "run", "--isolation", "chroot", c, "--", "/bin/busybox", "--install", "-s", "/bin"])
        _out(["buildah", "config", "--cmd", '["/bin/sh"]', c])
        _out(["buildah", "commit", "-q", c, BUSYBOX])
    finally:
        subprocess.run(["buildah", "rm", c], capture_output=True)
    return BUSYBOX


def remove_image(name: str) -> None:
    subprocess.run(["podman", "rmi", "-f", name], capture_output=True)


def _out(argv: list[str], env: dict | None = None, timeout: float = 120) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r.stdout.strip()


class Podman:
    """podman with a CNI network of its own; containers under ``cgroup``."""

    def __init__(self, tmp: Path, cgroup: harness.Cgroup, cni_settings: dict | None = None):
        self.tmp, self.cgroup = tmp, cgroup
        tag = hashlib.sha256(harness.unique("kc").encode()).hexdigest()[:6]
        self.network, self.bridge = f"kmesh-test-{tag}", f"kmt{tag}"
        self.subnet = f"10.202.{int(tag, 16) % 250 + 1}"
        self.bin_dir, self.net_dir = tmp / "cni-bin", tmp / "cni-net"
        self.bin_dir.mkdir(parents=True)
        self.net_dir.mkdir()
        self.cni_log = tmp / "kmesh-cni.log"
        self.cni_state = tmp / "kmesh-cni-state"
        self.names: list[str] = []
        conf = tmp / "containers.conf"
        conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=16384:16384", "nproc=32768:32768"]\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f'cni_plugin_dirs = ["{self.bin_dir}", "/usr/lib/cni"]\n'
            f'network_config_dir = "{self.net_dir}"\n'
            "[engine]\n"
            'runtime = "runc"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        (self.net_dir / f"10-{self.network}.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": self.network,
            "plugins": [{"type": "bridge", "bridge": self.bridge, "isGateway": False, "ipMasq": False,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{self.subnet}.0/24"}]]}}]}))
        if cni_settings is not None:
            self.install_cni(cni_settings)

    def install_cni(self, settings: dict) -> None:
        """``kmesh-cni install`` into this network, as a node's installer would."""
        sets = [f"--set={k}={json.dumps(v)}" for k, v in
                {"state_dir": str(self.cni_state), "log_file": str(self.cni_log), **settings}.items()]
        _out([str(harness.BIN / "kmesh-cni"), "install", f"--bin-dir={self.bin_dir}",
              f"--conf-dir={self.net_dir}", f"--network={self.network}", f"--python={sys.executable}", *sets])

    def ip(self, n: int) -> str:
        return f"{self.subnet}.{n}"

    def podman(self, *args: str, env: dict | None = None, timeout: float = 120) -> str:
        return _out(["podman", *args], env={**self.env, **(env or {})}, timeout=timeout)

    def run(self, name: str, image: str, *cmd: str, ip: str | None = None, cni_args: str = "",
            opts: tuple[str, ...] = ()) -> str:
        """Start a detached container on the network; returns its name."""
        full = f"{self.network}-{name}"
        self.names.append(full)
        self.podman("run", "-d", "--name", full, "--network", self.network, *(("--ip", ip) if ip else ()),
                    f"--cgroup-parent=/{self.cgroup.path.relative_to(harness.CGROUP2_ROOT)}", *opts, image, *cmd,
                    env={"CNI_ARGS": cni_args} if cni_args else None)
        return full

    def exec(self, name: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["podman", "exec", name, *cmd], capture_output=True, text=True, env=self.env,
                           timeout=60)
        if check and r.returncode:
            raise AssertionError(f"podman exec {name} {' '.join(cmd)}: exit {r.returncode}: {r.stderr}")
        return r

    def netns(self, name: str) -> str:
        """The container's network namespace as the runtime named it to CNI."""
        return self.podman("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", name)

    def rm(self, name: str) -> None:
        subprocess.run(["podman", "rm", "-f", "-t", "1", name], capture_output=True, env=self.env, timeout=60)
        if name in self.names:
            self.names.remove(name)

    def close(self) -> None:
        for name in list(self.names):
            self.rm(name)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(f"/var/lib/cni/networks/{self.network}", ignore_errors=True)
        for f in Path("/var/lib/cni/results").glob(f"{self.network}-*"):
            f.unlink(missing_ok=True)
        remove_cgroup_dirs(self.cgroup.path.name)


def remove_cgroup_dirs(name: str, whole: bool = False) -> None:
    """What cgroupfs made for containers under /<name>: its subdirs in the
    cgroup2 tree (the test's own dir is the harness's to remove, unless
    ``whole``) and the whole dir in each v1 hierarchy."""
    tops = [harness.CGROUP2_ROOT / name] + [d / name for d in V1_ROOT.iterdir()
                                           if d != harness.CGROUP2_ROOT and (d / name).is_dir()]
    for top in tops:
        for _ in range(50):
            subdirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) \
                if top.exists() else []
            try:
                for d in subdirs:
                    d.rmdir()
                if (whole or top.parent != harness.CGROUP2_ROOT) and top.exists():
                    top.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@contextlib.contextmanager
def podman(tmp: Path, cgroup: harness.Cgroup, cni_settings: dict | None = None):
    p = Podman(tmp, cgroup, cni_settings)
    try:
        yield p
    finally:
        p.close()


# -- kmesh itself in a container, as a DaemonSet pod runs it ---------------------
IMAGE_TAG = f"localhost/kmesh-test:{harness.RUN_ID}"
# What the daemon needs of the host (the same list as deploy/kmesh.yaml):
# bpf() and perf events (BPF, PERFMON; SYS_ADMIN on kernels before 5.8 and
# for setns into workloads' namespaces), its sockets' options and the
# hand-off listeners' namespaces (NET_ADMIN), other processes' /proc/PID/ns
# (SYS_PTRACE), the memlock limit on kernels before 5.11 (SYS_RESOURCE).
CAPS = ("SYS_ADMIN", "BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "SYS_RESOURCE")


def build_image(tag: str = IMAGE_TAG, archive: Path | None = None) -> str:
    """``./build.sh image TAG [ARCHIVE]`` from this tree (the test of the README's command)."""
    r = subprocess.run([str(harness.ROOT / "build.sh"), "image", tag, *([str(archive)] if archive else [])],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode:
        raise RuntimeError(f"./build.sh image: exit {r.returncode}:\n{r.stderr[-4000:]}")
    return tag


@dataclass
class ContainerKmesh(harness.Kmesh):
    """The daemon from the kmesh image under podman: host network, PID and
    cgroup namespaces, the host's bpffs, cgroup tree and /run/netns, the
    capabilities in CAPS, not --privileged. ``podman run`` stays in the
    foreground, so ``proc`` is its client (signals are proxied)."""

    image: str = IMAGE_TAG
    pm: "Podman | None" = None
    name: str = ""

    def argv(self, *extra: str) -> list[str]:
        self.admin_socket.parent.mkdir(parents=True, exist_ok=True)
        cfg_dir = self.config_path.parent
        flags = super().argv(*extra)[1:]
        return ["podman", "run", "--rm", "--name", self.name, "--read-only", "--network", "host", "--pid", "host",
                "--cgroupns", "host", "--cap-drop", "all", *(f"--cap-add={c}" for c in CAPS),
                f"--cgroup-parent={self.cgroup_parent}",
                "-v", "/sys/fs/bpf:/sys/fs/bpf", "-v", "/sys/fs/cgroup:/sys/fs/cgroup",
                "-v", "/run/netns:/run/netns:rslave", "-v", f"{cfg_dir}:{cfg_dir}:ro",
                "-v", f"{self.admin_socket.parent}:{self.admin_socket.parent}",
                self.image, *flags]

    @property
    def cgroup_parent(self) -> str:
        """Beside the governed cgroup, not in it (removed at teardown)."""
        return f"/{self.pm.cgroup.path.relative_to(harness.CGROUP2_ROOT)}-daemon"

    def start(self, wait: bool = True) -> "ContainerKmesh":
        self.env = {"CONTAINERS_CONF": self.pm.env["CONTAINERS_CONF"]}
        return super().start(wait)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        code = super().stop(sig, timeout)
        if sig == signal.SIGKILL:
            subprocess.run(["podman", "rm", "-f", "-t", "0", self.name], capture_output=True, env=self.pm.env)
        return code

    def teardown(self) -> None:
        subprocess.run(["podman", "rm", "-f", "-t", "0", self.name], capture_output=True, env=self.pm.env)
        super().teardown()
        remove_cgroup_dirs(self.pm.cgroup.path.name + "-daemon", whole=True)
