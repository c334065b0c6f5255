"""Real-kernel test harness: child cgroups, backends, a kmesh-daemon per test.

Safety: programs are only ever attached to a child cgroup this harness made;
every cgroup, pin, process and port is unique to the test run and removed in
teardown, also when the test fails.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kmesh.bpf.loader import CGROUP_PROGRAMS

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")
BPFFS = Path("/sys/fs/bpf")
RUN_ID = uuid.uuid4().hex[:8]
CLIENT = ROOT / "tests" / "support" / "client.py"
BACKEND = ROOT / "examples" / "backend.py"
# Flags every test daemon gets, e.g. "-bpf-disable-features=atomic_fetch" to
# run a suite the way an older kernel runs it (tests/kernels/).
DAEMON_ARGS = tuple(os.environ.get("KMESH_TEST_DAEMON_ARGS", "").split())
# How much slower than this host the tests run (the kernel matrix's VMs run
# under TCG): scales the harness's waits for the daemon, never what a test
# asserts about kmesh's own timing.
SLOW = float(os.environ.get("KMESH_TEST_SLOW", "1"))
# What a daemon attaches to its cgroup (sorted), without same-host acceleration.
PROGRAMS = sorted(CGROUP_PROGRAMS)

_counter = 0

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def unique(prefix: str) -> str:
    global _counter
    _counter += 1
    return f"{prefix}-{RUN_ID}-{os.getpid()}-{_counter}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` (an IPv6 literal such as ::1 works too)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_HELD: list[socket.socket] = []


def dead_port() -> int:
    """A port on 127.0.0.1 that refuses every connect for the rest of the
    run: bound (so nothing else, e.g. a daemon's listener, can take it) but
    not listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]


def ensure_bpffs() -> None:
    BPFFS.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["findmnt", "-n", "-t", "bpf", str(BPFFS)], capture_output=True).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Runner:
    """Runs test clients where a subclass's ``_wrap`` puts them."""

    def _wrap(self, argv: list[str]) -> list[str]:
        raise NotImplementedError

    def run(self, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self._wrap(argv), capture_output=True, text=True, timeout=timeout, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self._wrap(argv), text=True, **kw)

    def curl(self, url: str, extra: tuple[str, ...] = ()) -> list[str]:
        """One curl process, a fresh connection per URL (URL globbing)."""
        r = self.run(["curl", "-sS", "--max-time", "10", "-H", "Connection: close", *extra, url])
        assert r.returncode == 0, f"curl {url} failed ({r.returncode}): {r.stderr}"
        return r.stdout.split()

    def load(self, host: str, port: int, seconds: float = 300) -> "LoadClient":
        """Connections in a loop until report()."""
        return LoadClient(self.popen([sys.executable, str(CLIENT), "loop", host, str(port), str(seconds)],
                                     stdout=subprocess.PIPE))

    def client(self, *args) -> subprocess.CompletedProcess:
        return self.run([sys.executable, str(CLIENT), *map(str, args)])


class Cgroup(Runner):
    """A child cgroup v2; only test clients are put in it."""

    def __init__(self, parent: Path | None = None):
        """A new cgroup below the test root, or below ``parent`` (itself a
        test cgroup: never the root)."""
        self.path = (parent or CGROUP2_ROOT) / unique("kmesh-test")
        assert self.path.is_relative_to(CGROUP2_ROOT) and self.path.parent.is_relative_to(CGROUP2_ROOT)
        self.path.mkdir()

    def _wrap(self, argv: list[str]) -> list[str]:
        """Join the cgroup, then exec: a shell does it, not a preexec_fn, because
        Python code between fork and exec is unsafe next to gRPC's threads."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *argv]

    def remove(self) -> None:
        for _ in range(50):
            try:
                pids = (self.path / "cgroup.procs").read_text().split()
            except FileNotFoundError:
                return
            for pid in pids:
                _kill(int(pid))
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"could not remove cgroup {self.path}")


@contextlib.contextmanager
def blackhole():
    """An address inside a netns made for it that silently drops every packet:
    the host sends to a neighbour entry with a MAC nobody has."""
    tag = unique("kbh")[-8:]
    ns, host_if, ns_if = f"kmt{tag}", f"kh{tag}", f"kn{tag}"
    octet = int(tag[-2:], 16) % 250 + 1
    host_ip, ns_ip = f"10.199.{octet}.1", f"10.199.{octet}.2"

    def ip(*args, netns=None):
        cmd = ["ip", *(("-n", netns) if netns else ()), *args]
        subprocess.run(cmd, check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", f"{ns_ip}/30", "dev", ns_if, netns=ns)
        ip("link", "set", ns_if, "up", netns=ns)
        ip("neigh", "replace", ns_ip, "lladdr", "02:00:00:00:00:01", "dev", host_if, "nud", "permanent")
        yield ns_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class LoadClient:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def report(self, stop: bool = True) -> dict:
        """Stop the loop (or let it run out) and return its counts:
        {"ok", "failed", "errors", "bodies"}."""
        if stop and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return json.loads(self.proc.communicate(timeout=30)[0])


@dataclass
class Backend:
    name: str
    port: int
    proc: subprocess.Popen
    host: str = "127.0.0.1"

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)


def start_backend(name: str, host: str = "127.0.0.1") -> Backend:
    """examples/backend.py answering ``name`` on ``host`` (IPv4 or an IPv6
    literal such as ::1) and a free port."""
    for _ in range(5):
        port = free_port(host)
        p = subprocess.Popen([sys.executable, str(BACKEND), name, str(port), host], stdout=subprocess.PIPE,
                             text=True)
        line = p.stdout.readline()
        if line.startswith("listening"):
            return Backend(name, port, p, host)
        p.kill()
        p.wait()
    raise RuntimeError("backend did not start")


@dataclass
class Kmesh:
    """A kmesh-daemon process with its own pins, cgroup and admin port."""

    cgroup: Cgroup
    config_path: Path
    bpf_fs_path: Path = field(default_factory=lambda: BPFFS / unique("kmesh-test"))
    admin_port: int = field(default_factory=free_port)
    l7_port: int = field(default_factory=free_port)   # the L7 hand-off listener, on 127.0.0.1
    metrics_port: int = field(default_factory=free_port)
    admin_socket: Path = field(default_factory=lambda: Path("/run") / unique("kmesh-admin") / "admin.sock")
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    ads: str | None = None          # None: standalone; "": ADS, address from the bootstrap; else -xds-address
    extra_args: tuple[str, ...] = ()
    env: dict | None = None           # extra environment for the daemon
    listen_fds: tuple[tuple[str, int], ...] = ()   # (name, fd) passed as systemd passes its fd store
    nofile: int | None = None          # RLIMIT_NOFILE (soft and hard) for the daemon
    die_with_parent: bool = False      # SIGTERM when the process that started it dies (benches)

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pin_root(self) -> Path:
        return self.bpf_fs_path / "bpf_kmesh"

    def argv(self, *extra: str) -> list[str]:
        mode = ["-enable-ads=false"] if self.ads is None else [f"-xds-address={self.ads}"] if self.ads else []
        return [str(BIN / "kmesh-daemon"), *mode, f"-config-file={self.config_path}",
                f"-bpf-fs-path={self.bpf_fs_path}", f"-cgroup2-path={self.cgroup.path}",
                f"-admin-address=127.0.0.1:{self.admin_port}", f"-l7-address=127.0.0.1:{self.l7_port}",
                f"-admin-socket={self.admin_socket}", f"-metrics-address=127.0.0.1:{self.metrics_port}",
                *DAEMON_ARGS, *self.extra_args, *extra]

    def write_config(self, cfg: dict | str) -> None:
        text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def start(self, wait: bool = True) -> "Kmesh":
        self.log_path = self.config_path.with_name(f"daemon-{int(time.time() * 1000)}.log")
        env = {**os.environ, **self.env} if self.env else None
        argv, fds = self.argv(), [fd for _, fd in self.listen_fds]
        if fds:
            argv = [sys.executable, str(ROOT / "tests" / "support" / "listen_fds.py"), ",".join(map(str, fds)),
                    ":".join(n for n, _ in self.listen_fds), "--", *argv]
        self.proc = subprocess.Popen(argv, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=env,
                                     pass_fds=fds, preexec_fn=self._preexec())
        if wait:
            self.wait_ready()
        return self

    def _preexec(self):
        """What runs between fork and exec, or None (the tests' usual case:
        Python there is unsafe next to gRPC's threads)."""
        if self.nofile is None and not self.die_with_parent:
            return None

        def preexec() -> None:
            if self.nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
            if self.die_with_parent:
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        return preexec

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 30) -> None:
        timeout *= SLOW
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"kmesh-daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/ready", raw=True)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"kmesh-daemon not ready after {timeout}s:\n{self.log()}")

    def get(self, path: str, raw: bool = False):
        try:
            with urllib.request.urlopen(self.admin + path, timeout=10) as r:
                body = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            body, status = e.read(), e.code
        return (status, body) if raw else json.loads(body)

    def post(self, path: str, body: bytes = b"") -> tuple[int, dict]:
        req = urllib.request.Request(self.admin + path, data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def post_config(self, cfg: dict | str) -> tuple[int, dict]:
        text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg)
        req = urllib.request.Request(self.admin + "/controller/envoy", data=text.encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def reload(self, timeout: float = 10) -> dict:
        """SIGHUP and wait until the daemon reports the outcome."""
        before = (self.get("/status").get("last_update") or {}).get("time")
        self.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + timeout * SLOW
        while time.monotonic() < end:
            last = self.get("/status").get("last_update") or {}
            if last.get("time") != before:
                return last
            time.sleep(0.02)
        raise AssertionError("reload did not finish")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout * SLOW)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kernel_feature(self, name: str) -> bool:
        """Whether the daemon runs with kernel feature ``name`` (/status)."""
        return self.get("/status")["kernel"]["features"][name]["on"]

    def refused_errno(self) -> str:
        """How a connect a policy refuses fails on this kernel."""
        return "ECONNREFUSED" if self.kernel_feature("econnrefused") else "EPERM"

    def attached_programs(self) -> list[str]:
        from kmesh.bpf import libbpf, loader

        # The kernel keeps 15 characters of a program's name.
        full = {n[:15]: n for n in (*loader.CORE_PROGRAMS, *loader.SOCKMAP_PROGRAMS)}
        return [full.get(n, n) for n in libbpf.cgroup_programs(str(self.cgroup.path))]

    def pinned_layout(self) -> int:
        """The layout version in the pinned km_meta."""
        out = subprocess.run(["bpftool", "-j", "map", "lookup", "pinned", str(self.pin_root / "map" / "km_meta"),
                              "key", "0", "0", "0", "0"], capture_output=True, text=True, check=True).stdout
        value = json.loads(out)["value"]
        return int.from_bytes(bytes(int(b, 16) for b in value[:4]), "little")

    def stamp_layout(self, version: int) -> None:
        """Make the pins look like another kmesh version's."""
        subprocess.run(["bpftool", "map", "update", "pinned", str(self.pin_root / "map" / "km_meta"),
                        "key", "0", "0", "0", "0", "value", *version.to_bytes(4, "little").hex(" ").split(),
                        "0", "0", "0", "0"], check=True)

    def teardown(self) -> None:
        self.stop(signal.SIGKILL) if self.proc and self.proc.poll() is None else None
        # Safety net: detach and unpin whatever is left, even after a crash.
        subprocess.run([str(BIN / "kmesh-daemon"), f"-bpf-fs-path={self.bpf_fs_path}", "cleanup", "--force"],
                       capture_output=True)
        self.admin_socket.unlink(missing_ok=True)   # left by a daemon that was killed
        for d in (self.pin_root / "link", self.pin_root / "map", self.pin_root, self.bpf_fs_path,
                  self.admin_socket.parent):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
