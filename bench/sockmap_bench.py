#!/usr/bin/env python3
"""Same-host acceleration (sockmap) benchmark: plain loopback TCP against
kmesh's sockops + sk_msg redirect, side by side in one run.

    sudo .venv/bin/python bench/sockmap_bench.py [--seconds 2] [--rounds 3]

One kmesh-daemon governs a child cgroup made for the run; the servers and
the clients all run in it (an accepted socket is enrolled by its listener's
cgroup). Plain and accelerated rounds alternate (the feature is switched
through the admin API, and a round starts only when nothing from the last
one is still enrolled); each figure is the median over the rounds.

* request/response (bench/pingpong.c, non-blocking sockets and poll(), as
  event loops do): 64 B, 1 KiB, 16 KiB, 256 KiB; 1 and 16 connections;
  round-trip p50/p99 and round trips per second;
  also 64 B and 1 KiB with client and server on one CPU (taskset): on a VM
  a wake-up on another CPU costs ~60 µs and hides what the stack costs;
* streaming: one connection writing 4 KiB, 64 KiB or 1 MiB chunks (Gbit/s);
  and iperf3 (4 KiB and 128 KiB writes), whose blocking sockets kmesh does
  not enroll (docs/sockmap.md), so it must come out at 1.0×;
* HTTP: wrk -> nginx directly, and through a kmesh VIP without and with the
  acceleration (wrk -t1 -c1 and -t2 -c16; requests/s and p50/p99).

Prints a markdown table of ratios (accelerated / plain; for latency lower
is better) and writes bench/results/sockmap.json and sockmap.png.
Everything it made is removed at the end, also on failure.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lib import new_figure, nginx_conf, parse_wrk, save_figure, write_plot  # noqa: E402
from tests.support import harness  # noqa: E402
from tests.support.envoy import bootstrap, cluster, lb_ep, tcp_listener  # noqa: E402

SIZES = (64, 1024, 16384, 262144)
ONE_CPU_SIZES = (64, 1024)
ONE_CPU = ["taskset", "-c", "0"]
CONNS = (1, 16)
STREAM_WRITES = (4096, 65536, 1 << 20)
IPERF_WRITES = ("4K", "128K")
VIP = "127.100.77.1"


def log(msg: str) -> None:
    print(f"[sockmap-bench] {msg}", file=sys.stderr, flush=True)


class Run:
    def __init__(self, seconds: float, tmp: Path):
        self.seconds = seconds
        self.tmp = tmp
        self.cg = harness.Cgroup()
        self.procs: list[subprocess.Popen] = []
        self.pingpong = tmp / "pingpong"
        subprocess.run(["cc", "-O2", "-pthread", "-o", str(self.pingpong), str(ROOT / "bench" / "pingpong.c")],
                       check=True)
        self.nginx_port = harness.free_port()
        (tmp / "nginx.conf").write_text(nginx_conf(tmp, self.nginx_port))
        self.k = harness.Kmesh(self.cg, tmp / "kmesh.yaml", extra_args=("-enable-sockmap",))
        self.k.write_config(bootstrap([tcp_listener("web", VIP, 80, "web")],
                                      [cluster("web", lb_ep("127.0.0.1", self.nginx_port))]))

    def start(self) -> None:
        self.k.start()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.k.stop()
        self.k.teardown()
        self.cg.remove()

    def accelerate(self, on: bool) -> None:
        self.k.post("/sockmap/" + ("on" if on else "off"))
        end = time.monotonic() + 30
        while self.k.get("/sockmap")["state"] != ("on" if on else "off"):
            if time.monotonic() > end:
                raise RuntimeError(f"sockmap did not turn {'on' if on else 'off'}: {self.k.get('/sockmap')}")
            time.sleep(0.1)

    def server(self, argv: list[str], ready: str = "listening") -> subprocess.Popen:
        p = self.cg.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        if ready:
            line = p.stdout.readline()
            if not line.startswith(ready):
                raise RuntimeError(f"{argv[0]} did not start: {line!r}")
        return p

    def stop_servers(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.clear()

    def pingpong_run(self, *args, prefix: tuple = ()) -> dict:
        r = self.cg.run([*prefix, str(self.pingpong), *map(str, args)], timeout=self.seconds + 60)
        if r.returncode != 0:
            raise RuntimeError(f"pingpong {args}: {r.stderr}")
        return json.loads(r.stdout)

    def iperf(self, port: int, length: str) -> dict:
        r = self.cg.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(self.seconds), "-l", length, "-J"],
                        timeout=self.seconds + 60)
        return {"gbps": json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9}

    def wrk(self, url: str, conns: int) -> dict:
        threads = 1 if conns == 1 else 2
        r = self.cg.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{self.seconds}s", "--latency", url],
                        timeout=self.seconds + 60)
        return parse_wrk(r.stdout)

    def round(self, on: bool) -> dict:
        """One pass over every test, with the acceleration on or off."""
        self.accelerate(on)
        out: dict = {}
        echo_port, sink_port = harness.free_port(), harness.free_port()
        self.server([str(self.pingpong), "echo", str(echo_port)])
        self.server([str(self.pingpong), "sink", str(sink_port)])
        iperf_port = harness.free_port()
        self.server(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)], ready="")
        pinned_port = harness.free_port()
        self.server([*ONE_CPU, str(self.pingpong), "echo", str(pinned_port)])
        nginx = self.server(["nginx", "-p", str(self.tmp), "-c", str(self.tmp / "nginx.conf"),
                             "-e", str(self.tmp / "nginx-error.log")], ready="")
        for size in SIZES:
            for conns in CONNS:
                out[f"rr {size} B x{conns}"] = self.pingpong_run("rr", echo_port, size, conns, self.seconds)
        for size in ONE_CPU_SIZES:
            out[f"rr {size} B x1, one CPU"] = self.pingpong_run("rr", pinned_port, size, 1, self.seconds,
                                                                prefix=tuple(ONE_CPU))
        for w in STREAM_WRITES:
            out[f"stream {w} B writes"] = self.pingpong_run("stream", sink_port, w, self.seconds)
        wait_port(iperf_port)
        for length in IPERF_WRITES:
            out[f"stream iperf3 -l {length}"] = self.iperf(iperf_port, length)
        wait_port(self.nginx_port)
        for conns in CONNS:
            if not on:
                out[f"wrk direct x{conns}"] = self.wrk(f"http://127.0.0.1:{self.nginx_port}/", conns)
            out[f"wrk VIP x{conns}"] = self.wrk(f"http://{VIP}/", conns)
        nginx.terminate()   # the master stops its worker
        nginx.wait(10)
        self.stop_servers()
        return out


def wait_port(port: int, timeout: float = 10) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def median_of(rounds: list[dict]) -> dict:
    out = {}
    for key in rounds[0]:
        out[key] = {m: statistics.median(r[key][m] for r in rounds)
                    for m in rounds[0][key] if isinstance(rounds[0][key][m], (int, float))}
    return out


def table(plain: dict, fast: dict) -> str:
    lines = ["| test | plain loopback | sockmap | ratio |", "|---|---:|---:|---:|"]
    for key, p in plain.items():
        if key.startswith("wrk direct"):
            continue
        f = fast[key]
        if key.startswith("rr"):
            lines.append(f"| {key}: p50 latency | {p['p50_us']:.1f} µs | {f['p50_us']:.1f} µs | "
                         f"{f['p50_us'] / p['p50_us']:.2f}× |")
            lines.append(f"| {key}: p99 latency | {p['p99_us']:.1f} µs | {f['p99_us']:.1f} µs | "
                         f"{f['p99_us'] / p['p99_us']:.2f}× |")
            lines.append(f"| {key}: round trips/s | {p['rps']:,.0f} | {f['rps']:,.0f} | {f['rps'] / p['rps']:.2f}× |")
        elif key.startswith("stream"):
            lines.append(f"| {key}: throughput | {p['gbps']:.2f} Gbit/s | {f['gbps']:.2f} Gbit/s | "
                         f"{f['gbps'] / p['gbps']:.2f}× |")
        else:   # wrk through the VIP
            conns = key.split()[-1]
            d = plain[f"wrk direct {conns}"]
            lines.append(f"| {key}: requests/s (plain = VIP without sockmap) | {p['rps']:,.0f} | {f['rps']:,.0f} | "
                         f"{f['rps'] / p['rps']:.2f}× |")
            lines.append(f"| {key}: requests/s vs wrk → nginx direct | {d['rps']:,.0f} | {f['rps']:,.0f} | "
                         f"{f['rps'] / d['rps']:.2f}× |")
            lines.append(f"| {key}: p50 latency vs direct | {d.get('p50_us', 0):.0f} µs | {f.get('p50_us', 0):.0f} µs |"
                         f" {f.get('p50_us', 0) / max(d.get('p50_us', 1), 1e-9):.2f}× |")
    return "\n".join(lines)


def plot(plain: dict, fast: dict, path: Path) -> None:
    fig, axes = new_figure(2)
    for ax, conns in zip(axes, CONNS):
        for data, label in ((plain, "plain loopback"), (fast, "kmesh sockmap")):
            ax.plot(SIZES, [data[f"rr {s} B x{conns}"]["p50_us"] for s in SIZES], marker="o", label=f"{label} p50")
            ax.plot(SIZES, [data[f"rr {s} B x{conns}"]["p99_us"] for s in SIZES], marker="x", linestyle="--",
                    label=f"{label} p99")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("round-trip latency (µs)")
        ax.set_title(f"request/response, {conns} connection{'s' if conns > 1 else ''}")
    save_figure(fig, path, which="major")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=2, help="per test")
    ap.add_argument("--rounds", type=int, default=3, help="plain/sockmap pairs")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "sockmap.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (it loads BPF programs into a child cgroup)")
    for tool in ("cc", "wrk", "nginx", "iperf3", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: run ./build.sh setup")
    harness.ensure_bpffs()
    tmp = Path(tempfile.mkdtemp(prefix="kmesh-sockmap-bench-"))
    run = Run(args.seconds, tmp)
    plain_rounds, fast_rounds = [], []
    try:
        run.start()
        for i in range(args.rounds):
            log(f"round {i + 1}/{args.rounds}: plain")
            plain_rounds.append(run.round(False))
            log(f"round {i + 1}/{args.rounds}: sockmap")
            fast_rounds.append(run.round(True))
    finally:
        run.close()
        shutil.rmtree(tmp, ignore_errors=True)
    plain, fast = median_of(plain_rounds), median_of(fast_rounds)
    print(table(plain, fast))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"plain": plain, "sockmap": fast, "rounds": {"plain": plain_rounds,
                                                                           "sockmap": fast_rounds}}, indent=2))
    write_plot(plot, out.with_suffix(".png"), plain, fast)
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
