#!/usr/bin/env python3
"""kmesh L4 benchmark: direct-to-backend vs through a kmesh VIP, in one run.

    sudo .venv/bin/python bench/l4_bench.py [--quick] [--duration S] [--rounds N]

What it does (see bench/README.md for the meaning of every row):

* starts its own nginx (127.0.0.1:<free port>, `return 200 "ok\\n"`);
* creates a child cgroup /sys/fs/cgroup/unified/kmesh-bench-<pid> and starts
  kmesh-daemon standalone on it, with its own bpffs pin dir
  /sys/fs/bpf/kmesh-bench-<pid> and a generated config that maps the loopback
  VIP 127.100.0.10:80 to the nginx backend;
* runs every load generator *inside that child cgroup*, for direct and VIP runs
  alike (so both pay for a connect4 invocation), alternating direct and VIP
  runs round by round, and reports medians:
    1. short connections (wrk + `Connection: close`): connections/s,
    2. keep-alive latency p50/p99 and requests/s at 1 and 16 connections,
    3. the connect4 program's cost from kernel.bpf_stats_enabled (ns per run);
* prints a markdown table and writes bench/results/l4.json.

Everything it creates is removed again on success, failure or Ctrl-C.
Root only. Never attaches to a root cgroup.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = ROOT / ".venv" / "bin"
DAEMON = VENV_BIN / "kmesh-daemon"
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")
BPFFS = Path("/sys/fs/bpf")
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
RESULTS = HERE / "results" / "l4.json"

VIP_IP, VIP_PORT = "127.100.0.10", 80
SHORT_CONNS = 16          # wrk -c for the short-connection test
SHORT_THREADS = 2
TARGETS = {"conn_rate_ratio_min": 0.95, "latency_ratio_max": 1.03,
           "rate_ratio_min": 0.95, "connect4_ns_max": 500.0}

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[l4_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
    for pct in ("50", "99"):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}_us"] = _to_us(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                    map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def nginx_conf(tmp: Path, port: int) -> str:
    """A self-contained nginx answering "ok" on 127.0.0.1:port, everything
    it writes under ``tmp``."""
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
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /nginx_status {{ stub_status; }}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


# -- the bench --------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.pid = os.getpid()
        self.name = f"kmesh-bench-{self.pid}"
        self.cgroup = CGROUP2_ROOT / self.name
        self.pin_path = BPFFS / self.name
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.nginx: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        self.children: list[subprocess.Popen] = []
        self.old_bpf_stats: str | None = None   # set only when we changed it
        self.bpf_stats_before: str | None = None
        self.backend_port = 0
        self.admin = ""
        self.connect4_id: int | None = None
        self.release_id: int | None = None
        self.cgroup_created = False

    # -- setup ----------------------------------------------------------
    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise BenchError("run as root (BPF programs, cgroups, bpf_stats)")
        for tool in ("wrk", "nginx", "bpftool"):
            if not shutil.which(tool):
                raise BenchError(f"{tool} not found: run ./build.sh setup")
        if not DAEMON.exists():
            raise BenchError(f"{DAEMON} missing: run ./build.sh -b (creates .venv)")
        if not (ROOT / "build" / "bpf" / "kmesh_sock.bpf.o").exists():
            raise BenchError("build/bpf/kmesh_sock.bpf.o missing: run ./build.sh -b")
        if not (CGROUP2_ROOT / "cgroup.procs").exists():
            raise BenchError(f"{CGROUP2_ROOT} is not a cgroup2 mount")
        with socket.socket() as s:
            try:
                s.bind((VIP_IP, VIP_PORT))
            except OSError as e:
                raise BenchError(f"VIP {VIP_IP}:{VIP_PORT} is in use ({e}); a listener there would hide "
                                 "a failed redirect") from None

    def sweep_stale(self) -> None:
        """Remove what a SIGKILLed earlier run left (its daemon unpins itself on
        parent death, but the pin dir, the empty cgroup and the temp dir stay)."""
        for p in Path(tempfile.gettempdir()).glob("kmesh-bench-*-*"):
            pid = p.name.split("-")[2]
            if p.is_dir() and pid.isdigit() and int(pid) != self.pid and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(p, ignore_errors=True)
        for base in (BPFFS, CGROUP2_ROOT):
            for p in base.glob("kmesh-bench-*"):
                pid = p.name.rsplit("-", 1)[-1]
                if not pid.isdigit() or Path(f"/proc/{pid}").exists():
                    continue
                try:
                    if base == BPFFS:
                        subprocess.run([str(DAEMON), "-bpf-fs-path", str(p), "cleanup"],
                                       capture_output=True, timeout=30)
                    p.rmdir()
                    log(f"removed stale {p}")
                except OSError as e:
                    log(f"warning: stale {p} not removed: {e}")

    def start_nginx(self) -> None:
        self.backend_port = free_port()
        t = self.tmp
        conf = t / "nginx.conf"
        conf.write_text(nginx_conf(t, self.backend_port))
        self.nginx = subprocess.Popen(
            ["nginx", "-p", str(t), "-c", str(conf), "-e", str(t / "nginx-error.log")],
            stdin=subprocess.DEVNULL, stdout=open(t / "nginx.out", "w"), stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.nginx.poll() is not None:
                raise BenchError(f"nginx exited: {(t / 'nginx.out').read_text()}"
                                 f"{(t / 'nginx-error.log').read_text() if (t / 'nginx-error.log').exists() else ''}")
            try:
                if self.http_get(f"http://127.0.0.1:{self.backend_port}/")[0] == 200:
                    log(f"nginx pid {self.nginx.pid} on 127.0.0.1:{self.backend_port}")
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise BenchError("nginx did not answer within 10 s")

    def write_config(self) -> Path:
        cfg = self.tmp / "kmesh-bench.yaml"
        cfg.write_text(f"""# generated by bench/l4_bench.py
static_resources:
  listeners:
  - name: bench_vip
    address:
      socket_address: {{ address: {VIP_IP}, port_value: {VIP_PORT} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: bench
          cluster: bench
  clusters:
  - name: bench
    type: STATIC
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: bench
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {self.backend_port} }} }} }}
""")
        return cfg

    def start_daemon(self) -> None:
        if self.cgroup.exists() or self.pin_path.exists():
            raise BenchError(f"{self.cgroup} or {self.pin_path} already exists")
        self.cgroup.mkdir()
        self.cgroup_created = True
        cfg = self.write_config()
        self.admin = f"127.0.0.1:{free_port()}"
        cmd = [str(DAEMON), "-enable-ads=false", "-config-file", str(cfg),
               "-cgroup2-path", str(self.cgroup), "-bpf-fs-path", str(self.pin_path),
               "-admin-address", self.admin, *self.args.daemon_arg]
        # the attach target must be our child cgroup, never a root
        assert self.cgroup.parent == CGROUP2_ROOT and self.cgroup != CGROUP2_ROOT
        self.daemon_log = self.tmp / "kmesh-daemon.log"
        self.daemon = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(self.daemon_log, "w"),
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise BenchError(f"kmesh-daemon exited with {self.daemon.returncode}:\n"
                                 f"{self.daemon_log.read_text()}")
            try:
                if self.http_get(f"http://{self.admin}/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise BenchError(f"kmesh-daemon not ready within 30 s:\n{self.daemon_log.read_text()}")
        links = self.pin_path / "bpf_kmesh" / "link"
        self.connect4_id = self.link_prog_id(links / "kmesh_connect4")
        self.release_id = self.link_prog_id(links / "kmesh_sock_release")
        log(f"kmesh-daemon pid {self.daemon.pid} ready; cgroup {self.cgroup}; "
            f"connect4 prog id {self.connect4_id}")

    @staticmethod
    def link_prog_id(pin: Path) -> int:
        out = subprocess.run(["bpftool", "-j", "link", "show", "pinned", str(pin)],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise BenchError(f"bpftool link show pinned {pin}: {out.stderr.strip()}")
        info = json.loads(out.stdout)
        return int(info["prog_id"])

    @staticmethod
    def prog_stats(prog_id: int) -> tuple[int, int]:
        out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise BenchError(f"bpftool prog show id {prog_id}: {out.stderr.strip()}")
        info = json.loads(out.stdout)
        return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))

    def enable_bpf_stats(self) -> None:
        """Turn stats on only if they are off, and later turn off only what we
        turned on. The sysctl is a reference count shared with BPF_ENABLE_STATS
        fds: writing back a "1" we read could leave stats on for good if the
        fd that made it 1 was closed in between."""
        self.bpf_stats_before = BPF_STATS.read_text().strip()
        if self.bpf_stats_before == "0":
            self.old_bpf_stats = "0"
            BPF_STATS.write_text("1\n")
        else:
            log(f"kernel.bpf_stats_enabled is already {self.bpf_stats_before}: leaving it alone")

    @staticmethod
    def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""

    def nginx_accepts(self) -> int:
        _, body = self.http_get(f"http://127.0.0.1:{self.backend_port}/nginx_status")
        m = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)", body)
        if not m:
            raise BenchError(f"cannot parse stub_status: {body!r}")
        return int(m.group(1))

    def run_in_cgroup(self, cmd: list[str], timeout: float) -> str:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True, preexec_fn=_in_cgroup(self.cgroup))
        self.children.append(p)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise BenchError(f"{cmd[0]} did not finish within {timeout:.0f} s") from None
        finally:
            self.children.remove(p)
        if p.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} exited with {p.returncode}:\n{out}")
        return out

    def check_redirect(self) -> None:
        """A process in the cgroup connecting to the VIP must land on nginx."""
        probe = ("import socket,sys\n"
                 f"s=socket.create_connection(('{VIP_IP}',{VIP_PORT}),timeout=2)\n"
                 "s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
                 "d=b''\n"
                 "while True:\n"
                 "  c=s.recv(4096)\n"
                 "  if not c: break\n"
                 "  d+=c\n"
                 "print(s.getpeername()[1], d.split(b'\\r\\n')[0].decode())\n")
        out = self.run_in_cgroup([sys.executable, "-c", probe], timeout=10).split()
        if out[0] != str(self.backend_port) or "200" not in out:
            raise BenchError(f"redirect check failed: {' '.join(out)}")
        # ... and outside the cgroup nothing is redirected (the VIP must refuse)
        try:
            socket.create_connection((VIP_IP, VIP_PORT), timeout=1).close()
            raise BenchError(f"{VIP_IP}:{VIP_PORT} answered from outside the cgroup")
        except ConnectionRefusedError:
            pass
        log(f"redirect check ok: {VIP_IP}:{VIP_PORT} -> 127.0.0.1:{self.backend_port} inside the cgroup only")

    # -- measurements ---------------------------------------------------
    def url(self, mode: str) -> str:
        return (f"http://127.0.0.1:{self.backend_port}/" if mode == "direct"
                else f"http://{VIP_IP}:{VIP_PORT}/")

    def wrk(self, mode: str, test: str, duration: float) -> dict:
        d = f"{max(1, round(duration))}s"
        if test == "short":
            cmd = ["wrk", f"-t{SHORT_THREADS}", f"-c{SHORT_CONNS}", f"-d{d}", "-s", str(self.close_lua)]
        elif test == "ka1":
            cmd = ["wrk", "-t1", "-c1", f"-d{d}", "--latency"]
        elif test == "ka16":
            cmd = ["wrk", "-t2", "-c16", f"-d{d}", "--latency"]
        else:
            raise ValueError(test)
        cmd.append(self.url(mode))
        acc0 = self.nginx_accepts()
        t0, n0 = self.prog_stats(self.connect4_id)
        out = self.run_in_cgroup(cmd, timeout=duration + 30)
        t1, n1 = self.prog_stats(self.connect4_id)
        acc1 = self.nginx_accepts()
        res = parse_wrk(out)
        res["accepts"] = acc1 - acc0 - 1  # the stub_status request of acc1 is one accept
        res["connect4_runs"] = n1 - n0
        res["connect4_ns"] = t1 - t0
        res["cmd"] = " ".join(cmd)
        errs = sum(res["socket_errors"].values()) + res["non_2xx"]
        if res["requests"] == 0:
            raise BenchError(f"wrk made no requests:\n{out}")
        if errs:
            log(f"  warning: {mode} {test}: errors {res['socket_errors']} non-2xx {res['non_2xx']}")
        return res

    def run(self) -> dict:
        a = self.args
        self.close_lua = self.tmp / "close.lua"
        self.close_lua.write_text('wrk.headers["Connection"] = "close"\n')
        self.preflight()
        self.sweep_stale()
        self.start_nginx()
        self.start_daemon()
        self.check_redirect()
        self.enable_bpf_stats()

        self.env_start = environment()
        if self.env_start["other_kmesh_cgroups"]:
            log(f"warning: other kmesh cgroups exist ({', '.join(self.env_start['other_kmesh_cgroups'])}): "
                "something else (a test suite?) may be loading the machine")
        tests = ("short", "ka1", "ka16")
        runs: dict = {t: {"direct": [], "vip": []} for t in tests}
        log("warm-up (1 s per test and mode, not counted)")
        for t in tests:
            for m in ("direct", "vip"):
                self.wrk(m, t, 1)
        for r in range(a.rounds):
            order = ("direct", "vip") if r % 2 == 0 else ("vip", "direct")
            for t in tests:
                for m in order:
                    res = self.wrk(m, t, a.duration)
                    runs[t][m].append(res)
                    extra = "" if t == "short" else f" p50 {res['p50_us']:.1f}us p99 {res['p99_us']:.1f}us"
                    log(f"round {r + 1}/{a.rounds} {t:5} {m:6} {res['rps']:10.1f} req/s{extra} "
                        f"accepts/req {res['accepts'] / res['requests']:.3f}")
        self.env_end = environment()
        return self.summarize(runs)

    # -- results --------------------------------------------------------
    def summarize(self, runs: dict) -> dict:
        med = statistics.median

        def m(test, mode, key):
            return med(r[key] for r in runs[test][mode])

        def ns_per_run(mode):
            ns = sum(r["connect4_ns"] for t in runs for r in runs[t][mode])
            cnt = sum(r["connect4_runs"] for t in runs for r in runs[t][mode])
            return (ns / cnt if cnt else None), cnt

        rows = []

        def row(key, label, unit, d, v, target=None, better="higher", test=None, field=None):
            ratio = v / d if (d and v is not None) else None
            spread = None
            if test is not None:
                vals = [r[field] for r in runs[test]["direct"]]
                spread = max(vals) / min(vals) if min(vals) > 0 else None
            ok = None
            if target is not None and ratio is not None:
                ok = ratio >= target if better == "higher" else ratio <= target
            rows.append({"key": key, "metric": label, "unit": unit, "direct": d, "kmesh": v,
                         "ratio": ratio, "direct_spread": spread, "target": target, "better": better, "ok": ok})

        sc = f"wrk -t{SHORT_THREADS} -c{SHORT_CONNS}, Connection: close"
        row("short_conn_rate", f"short connections/s ({sc})", "conn/s",
            m("short", "direct", "rps"), m("short", "vip", "rps"), TARGETS["conn_rate_ratio_min"],
            test="short", field="rps")
        for t, label in (("ka1", "wrk -t1 -c1"), ("ka16", "wrk -t2 -c16")):
            row(f"{t}_p50", f"keep-alive p50 latency ({label})", "us",
                m(t, "direct", "p50_us"), m(t, "vip", "p50_us"), TARGETS["latency_ratio_max"], "lower",
                test=t, field="p50_us")
            row(f"{t}_p99", f"keep-alive p99 latency ({label})", "us",
                m(t, "direct", "p99_us"), m(t, "vip", "p99_us"), TARGETS["latency_ratio_max"], "lower",
                test=t, field="p99_us")
            row(f"{t}_mean", f"keep-alive mean latency ({label}; no target)", "us",
                m(t, "direct", "mean_us"), m(t, "vip", "mean_us"), None, "lower", test=t, field="mean_us")
            row(f"{t}_rps", f"keep-alive requests/s ({label})", "req/s",
                m(t, "direct", "rps"), m(t, "vip", "rps"), TARGETS["rate_ratio_min"], test=t, field="rps")
        d_ns, d_cnt = ns_per_run("direct")
        v_ns, v_cnt = ns_per_run("vip")
        rows.append({"key": "connect4_ns_per_run",
                     "metric": "connect4 ns/run (bpf_stats; direct: listener miss, kmesh: redirect)",
                     "unit": "ns", "direct": d_ns, "kmesh": v_ns, "ratio": None, "direct_spread": None,
                     "target": TARGETS["connect4_ns_max"], "better": "lower",
                     "ok": (v_ns <= TARGETS["connect4_ns_max"]) if v_ns is not None else None,
                     "runs": {"direct": d_cnt, "kmesh": v_cnt}})
        acc = {mode: med(r["accepts"] / r["requests"] for r in runs["short"][mode]) for mode in ("direct", "vip")}
        rows.append({"key": "short_accepts_per_request", "metric": "short test: nginx accepts per request",
                     "unit": "", "direct": acc["direct"], "kmesh": acc["vip"], "ratio": None, "direct_spread": None,
                     "target": None, "better": None, "ok": None})
        c4 = {mode: med(r["connect4_runs"] / r["requests"] for r in runs["short"][mode]) for mode in ("direct", "vip")}
        rows.append({"key": "short_connect4_per_request", "metric": "short test: connect4 runs per request",
                     "unit": "", "direct": c4["direct"], "kmesh": c4["vip"], "ratio": None, "direct_spread": None,
                     "target": None, "better": None, "ok": None})
        return {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "arch": platform.machine(),
                        "wrk": _version(["wrk", "-v"]), "nginx": _version(["nginx", "-v"])},
            "settings": {"duration_s": self.args.duration, "rounds": self.args.rounds, "quick": self.args.quick,
                         "vip": f"{VIP_IP}:{VIP_PORT}", "backend": f"127.0.0.1:{self.backend_port}",
                         "aggregate": "median over rounds; direct/VIP order alternates per round"},
            "environment": {"start": self.env_start, "end": self.env_end,
                            "bpf_stats_enabled_before": self.bpf_stats_before},
            "targets": TARGETS,
            "rows": rows,
            "runs": runs,
        }

    # -- teardown -------------------------------------------------------
    def cleanup(self) -> list[str]:
        problems: list[str] = []

        def attempt(what, fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep cleaning
                problems.append(f"{what}: {e}")

        for p in list(self.children):
            attempt("kill load generator", lambda p=p: (p.kill(), p.wait(timeout=5)))
        if self.old_bpf_stats is not None:
            attempt("restore bpf_stats_enabled", lambda: BPF_STATS.write_text(self.old_bpf_stats + "\n"))
        if self.daemon is not None and self.daemon.poll() is None:
            def stop_daemon():
                self.daemon.send_signal(signal.SIGTERM)
                try:
                    self.daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.daemon.kill()
                    self.daemon.wait(timeout=5)
                    raise BenchError("kmesh-daemon ignored SIGTERM for 15 s; killed")
            attempt("stop kmesh-daemon", stop_daemon)
        if self.daemon is not None or self.pin_path.exists():
            def safety_cleanup():
                out = subprocess.run([str(DAEMON), "-bpf-fs-path", str(self.pin_path), "cleanup"],
                                     capture_output=True, text=True, timeout=30)
                if out.returncode != 0:
                    raise BenchError(out.stderr.strip() or out.stdout.strip())
            attempt("kmesh-daemon cleanup", safety_cleanup)
        if self.pin_path.exists():
            attempt(f"rmdir {self.pin_path}", self.pin_path.rmdir)
        if self.nginx is not None and self.nginx.poll() is None:
            def stop_nginx():
                self.nginx.terminate()
                try:
                    self.nginx.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.nginx.kill()
                    self.nginx.wait(timeout=5)
            attempt("stop nginx", stop_nginx)
        if self.cgroup_created and self.cgroup.exists():
            def rm_cgroup():
                deadline = time.monotonic() + 10
                while (self.cgroup / "cgroup.procs").read_text().strip():
                    if time.monotonic() > deadline:
                        raise BenchError(f"processes still in {self.cgroup}: "
                                         f"{(self.cgroup / 'cgroup.procs').read_text().split()}")
                    time.sleep(0.05)
                # the last process may still be on its way out
                for _ in range(100):
                    try:
                        self.cgroup.rmdir()
                        return
                    except OSError as e:
                        if e.errno != 16:  # EBUSY
                            raise
                        time.sleep(0.05)
                self.cgroup.rmdir()
            attempt(f"rmdir {self.cgroup}", rm_cgroup)
        if problems and self.daemon is not None and hasattr(self, "daemon_log") and self.daemon_log.exists():
            problems.append("daemon log:\n" + self.daemon_log.read_text()[-4000:])
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def environment() -> dict:
    """Load and other kmesh cgroups on the machine: a busy 2-vCPU VM skews numbers."""
    others = sorted(p.name for p in CGROUP2_ROOT.iterdir()
                    if p.is_dir() and p.name.startswith("kmesh") and p.name != f"kmesh-bench-{os.getpid()}")
    return {"loadavg": Path("/proc/loadavg").read_text().split()[:3], "other_kmesh_cgroups": others}


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return "?"


def _fmt(v, unit) -> str:
    if v is None:
        return "n/a"
    if unit in ("conn/s", "req/s"):
        return f"{v:,.0f}"
    if unit in ("us", "ns"):
        return f"{v:,.1f}"
    return f"{v:.3f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"{result['date']}, kernel {result['machine']['kernel']}, {result['machine']['cpus']} vCPU; "
             f"{s['rounds']} round(s) x {s['duration_s']:g} s per test and mode, medians; "
             f"VIP {s['vip']} -> backend nginx {s['backend']}; load average at start/end "
             f"{result['environment']['start']['loadavg'][0]}/{result['environment']['end']['loadavg'][0]}",
             "",
             "| metric | unit | direct | kmesh VIP | kmesh/direct | direct run spread (max/min) | target | met |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        if r["target"] is None:
            tgt = ""
        elif r["key"] == "connect4_ns_per_run":
            tgt = f"kmesh <= {r['target']:g} ns"
        else:
            tgt = f"{'>=' if r['better'] == 'higher' else '<='} {r['target']:g}"
        ok = "" if r["ok"] is None else ("yes" if r["ok"] else "**NO**")
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        spread = "" if r.get("direct_spread") is None else f"{r['direct_spread']:.2f}"
        lines.append(f"| {r['metric']} | {r['unit']} | {_fmt(r['direct'], r['unit'])} | "
                     f"{_fmt(r['kmesh'], r['unit'])} | {ratio} | {spread} | {tgt} | {ok} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s runs, 2 rounds")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 5, --quick 2)")
    ap.add_argument("--rounds", type=int, help="direct/VIP pairs per test (default 5, --quick 2)")
    ap.add_argument("--output", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="FLAG",
                    help="extra kmesh-daemon flag (repeatable), e.g. --daemon-arg=-track-connections=false")
    args = ap.parse_args()
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.rounds = args.rounds or (2 if args.quick else 5)
    if not (0 < args.duration <= 60 and 0 < args.rounds <= 20):
        ap.error("--duration must be in (0, 60] and --rounds in [1, 20]")

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    bench = Bench(args)
    rc = 0
    result = None
    try:
        result = bench.run()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        rc = 130
    except BenchError as e:
        log(f"error: {e}")
        rc = 1
    finally:
        # a second Ctrl-C must not stop the cleanup half-way
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems = bench.cleanup()
        for p in problems:
            log(f"cleanup problem: {p}")
        if problems:
            rc = rc or 1
    if result is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(markdown(result))
        print(f"\n(JSON: {args.output})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
