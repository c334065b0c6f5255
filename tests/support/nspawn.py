"""A real systemd to test the RPM and kmesh.service against: a Debian
minbase rootfs (debootstrap, cached between runs on the same machine) booted
with systemd-nspawn, driven with nsenter.

Isolation: the container has its own network namespace (only its loopback),
an overlay over the cached rootfs (the cache is never written), and runs in
a cgroup made for it (``kmesh-nspawn-<id>``, in both the cgroup2 and the
name=systemd hierarchy), which it sees as its cgroup root. kmesh inside it
is pointed at a child of that (``kmesh-clients``) and at a bpffs it mounts
for itself, so nothing it attaches or pins is visible outside the container.
Everything is removed on close, also after a failure.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

CACHE = Path(os.environ.get("KMESH_TEST_CACHE", "/var/cache/kmesh-tests"))
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
PACKAGES = ["systemd", "systemd-sysv", "dbus", "rpm", "python3", "python3-pip", "libbpf1", "curl", "procps",
            "iproute2", "ca-certificates", "gawk"]
# Runtime Python packages the RPM Requires, from PyPI (Debian 12's are too old).
WHEELS = ["protobuf>=6.31.1", "grpcio>=1.74", "click>=8.1", "PyYAML>=6.0", "sdnotify>=0.3", "prometheus-client>=0.14",
          "httptools>=0.6", "pyroute2>=0.7", "google-re2>=1.1"]
CGROUP2 = Path("/sys/fs/cgroup/unified")
CGROUP_SYSTEMD = Path("/sys/fs/cgroup/systemd")


def log(msg: str) -> None:
    print(f"[nspawn] {msg}", file=sys.stderr, flush=True)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def rootfs() -> Path:
    """The cached rootfs, made on first use (about a minute)."""
    stamp = hashlib.sha256(repr((SUITE, PACKAGES, WHEELS)).encode()).hexdigest()[:12]
    path = CACHE / f"rootfs-{SUITE}-{stamp}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / ".kmesh-ready").exists():
            return path
        tmp = CACHE / f"{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            log(f"debootstrap {SUITE} into {tmp} (cached for later runs)")
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tmp), MIRROR])
            wheels = tmp / "tmp" / "wheels"
            log("Python wheels for the RPM's runtime dependencies")
            _run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), *WHEELS])
            _run(["chroot", str(tmp), "python3", "-m", "pip", "install", "-q", "--break-system-packages",
                  "--no-index", "--find-links", "/tmp/wheels", *[w.split(">")[0] for w in WHEELS]])
            shutil.rmtree(wheels)
            # rpm keeps its database where openEuler's does (Debian's default is ~/.rpmdb).
            (tmp / "etc" / "rpm").mkdir(parents=True, exist_ok=True)
            (tmp / "etc" / "rpm" / "macros.dbpath").write_text("%_dbpath /var/lib/rpm\n")
            _run(["chroot", str(tmp), "rpm", "--initdb"])
            (tmp / ".kmesh-ready").touch()
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


class Container:
    """A booted systemd container; ``run`` executes inside it as root."""

    def __init__(self, share: Path):
        self.id = uuid.uuid4().hex[:10]
        self.share = share            # bind-mounted read-only at /mnt/kmesh-test
        self.dir = Path(f"/tmp/kmesh-nspawn-{self.id}")
        self.root = self.dir / "root"
        self.cgroups = [CGROUP2 / f"kmesh-nspawn-{self.id}", CGROUP_SYSTEMD / f"kmesh-nspawn-{self.id}"]
        self.proc: subprocess.Popen | None = None
        self.init_pid = 0

    # -- lifecycle --------------------------------------------------------
    def start(self) -> "Container":
        lower = rootfs()
        for d in ("upper", "work", "root"):
            (self.dir / d).mkdir(parents=True)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={lower},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}", str(self.root)])
        for cg in self.cgroups:
            if cg.parent.is_dir():
                cg.mkdir()
        cgroups = [cg for cg in self.cgroups if cg.is_dir()]

        def enter_cgroup():
            for cg in cgroups:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "--boot", "--register=no", "--keep-unit", "--console=pipe",
             "--private-network", f"--machine=kmesh-{self.id}", "--system-call-filter=bpf perf_event_open",
             f"--bind-ro={self.share}:/mnt/kmesh-test"],
            stdin=subprocess.DEVNULL, stdout=open(self.dir / "console.log", "w"), stderr=subprocess.STDOUT,
            preexec_fn=enter_cgroup)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {(self.dir / 'console.log').read_text()[-2000:]}")
            kids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
            if kids.stdout.strip():
                self.init_pid = int(kids.stdout.split()[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return self
            time.sleep(0.2)
        raise RuntimeError("the container did not boot in 60 s")

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()     # nspawn shuts the container down
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.root.is_mount():
            subprocess.run(["umount", "-R", str(self.root)], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        for cg in self.cgroups:
            for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                d.rmdir()
            if cg.is_dir():
                cg.rmdir()

    # -- inside -----------------------------------------------------------
    @property
    def host_cgroup(self) -> Path:
        """The container's cgroup root, as the host's cgroup2 tree has it."""
        line = next(x for x in Path(f"/proc/{self.init_pid}/cgroup").read_text().splitlines() if x.startswith("0::"))
        return CGROUP2 / Path(line[3:]).parent.relative_to("/")

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.init_pid), "-a", "--", *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        res = subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"in the container: {' '.join(cmd)} -> {res.returncode}\n{res.stdout}{res.stderr}")
        return res

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*cmd), **kw)

    def write(self, path: str, text: str) -> None:
        subprocess.run(self.argv("sh", "-c", f"mkdir -p \"$(dirname '{path}')\" && cat > '{path}'"),
                       input=text, text=True, check=True, capture_output=True)

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-P", prop, unit).stdout.strip()
