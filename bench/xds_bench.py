#!/usr/bin/env python3
"""ADS benchmark: how fast pushes reach consistent maps, and at what memory.

    sudo .venv/bin/python bench/xds_bench.py [--sizes 100,1000,10000] [--updates 20]

For each mesh size N it starts a fresh kmesh-daemon in ADS mode against the
in-process test management server (tests/support/xds_server.py), pushes N
Istio-shaped HTTP services (EDS cluster with 3 endpoints, a virtual host with
the service VIP on the shared 0.0.0.0_9080 listener's route), and measures:

* push -> consistent maps: from the push until the daemon has ACKed every
  type at the pushed version (it ACKs only after the maps are written) and
  reports N listener addresses;
* daemon RSS (VmRSS) when the maps became consistent (the JSON also has it
  after the single-endpoint updates and a full admin dump);
* single-endpoint update: one ClusterLoadAssignment changed, push -> ACK,
  median of --updates runs;
* a curl through one VIP, inside the daemon's own child cgroup, as a check.

Prints a markdown table, writes bench/results/xds.json and a plot beside it
(xds.png: push time and RSS against mesh size); ``--plot-only`` redraws the
plot from an earlier JSON.

The daemon governs only a child cgroup made for the run; VIPs are loopback
(127.101.0.0/16 ...); everything is removed at the end, also on failure.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import mesh_gen  # noqa: E402
from bench.lib import new_figure, save_figure, write_plot  # noqa: E402
from kmesh.xds import resources as rt  # noqa: E402
from tests.support import harness  # noqa: E402
from tests.support.xds_server import XdsServer  # noqa: E402

TARGETS = {"apply_10000_s": 1.0, "update_ms": 5.0, "rss_mb": 80.0}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_acks(xds: XdsServer, versions: dict, timeout: float = 120) -> float:
    """Time when every type in ``versions`` was ACKed at that version."""
    def done(reqs):
        last = {}
        for r in reqs:
            if r.nonce and not r.is_nack:
                last[r.type] = (r.version_info, r.time)
        if all(last.get(t.short, ("",))[0] == v for t, v in versions.items()):
            return max(last[t.short][1] for t in versions)
        nacks = [r for r in reqs if r.is_nack]
        if nacks:
            raise RuntimeError(f"NACK: {nacks[-1].error[:300]}")
        return None
    return xds.wait_for(done, timeout)


def run_size(n: int, updates: int, backends) -> dict:
    cg = harness.Cgroup()
    xds = XdsServer().start()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / harness.unique("kmesh-xds-bench")
    tmp.mkdir()
    k = harness.Kmesh(cg, tmp / "kmesh.yaml", ads=xds.address, extra_args=tuple(os.environ.get("XDS_BENCH_ARGS", "").split()))
    try:
        k.write_config({})
        base_port = backends[0].port
        clusters, clas, listeners, routes = mesh_gen.mesh(n, base_port)
        xds.set(rt.CDS, [])
        xds.set(rt.LDS, [])
        k.start()
        rss_idle = rss_mb(k.proc.pid)
        # The snapshot is packed first: packing is the control plane's work.
        versions = {rt.CDS: xds.set(rt.CDS, clusters, push=False), rt.EDS: xds.set(rt.EDS, clas, push=False),
                    rt.LDS: xds.set(rt.LDS, listeners, push=False), rt.RDS: xds.set(rt.RDS, routes, push=False)}
        t0 = time.time()
        xds.push([rt.CDS, rt.EDS, rt.LDS, rt.RDS])
        wait_acks(xds, versions)
        # ACKs of an earlier, smaller subscription can carry the same version:
        # consistent means the daemon holds all N addresses too.
        deadline = time.time() + 120
        while (status := k.get("/status"))["listeners"] != n:
            if time.time() > deadline:
                raise RuntimeError(f"not consistent: {status}")
            time.sleep(0.01)
        t1 = time.time()
        apply_s = t1 - t0
        rss = rss_mb(k.proc.pid)
        # Time inside the daemon, response received -> maps written -> ACK, per type.
        types = k.get("/controller/envoy")["xds"]["types"]
        in_daemon = {t: (types[t]["last_ack"] or {}).get("apply_ms") for t in ("CDS", "EDS", "LDS", "RDS")}
        times = []
        for u in range(updates):
            i = (u * 7919) % n
            cla = mesh_gen.istio.cla(mesh_gen.cluster_name(i), mesh_gen.endpoints(i, base_port, shift=u + 1)[:2])
            ts = time.time()
            v = xds.set(rt.EDS, [cla], replace=False)
            te = wait_acks(xds, {rt.EDS: v})
            times.append((te - ts) * 1000)
        body = cg.curl(f"http://{mesh_gen.vip(0)}:{mesh_gen.PORT}/")
        assert body and body[0].startswith("B"), body
        apply_ms = k.get("/controller/envoy")["xds"]["types"]["EDS"]["last_ack"]["apply_ms"]
        time.sleep(2)
        rss_later = rss_mb(k.proc.pid)   # after the updates and a full admin dump (30 000 notes)
        return {"services": n, "push_to_consistent_s": round(apply_s, 3), "rss_mb": round(rss, 1),
                "rss_after_updates_and_dump_mb": round(rss_later, 1),
                "rss_idle_mb": round(rss_idle, 1), "update_ms_median": round(statistics.median(times), 2),
                "update_ms_p90": round(sorted(times)[int(len(times) * 0.9) - 1], 2),
                "update_apply_ms_in_daemon": apply_ms, "push_apply_ms_in_daemon": in_daemon}
    finally:
        k.stop()
        k.teardown()
        xds.stop()
        cg.remove()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def start_consecutive_backends(n: int, attempts: int = 20) -> list:
    """n backends on consecutive loopback ports (mesh_gen spreads endpoints
    over base_port + 0..n-1)."""
    for _ in range(attempts):
        base = harness.free_port()
        started = []
        for i in range(n):
            p = harness.subprocess.Popen([sys.executable, str(harness.BACKEND), f"B{i}", str(base + i)],
                                         stdout=harness.subprocess.PIPE, text=True)
            if not p.stdout.readline().startswith("listening"):
                p.kill()
                p.wait()
                break
            started.append(harness.Backend(f"B{i}", base + i, p))
        if len(started) == n:
            return started
        for b in started:
            b.proc.kill()
            b.proc.wait()
    raise SystemExit("could not bind consecutive backend ports")


def plot(rows: list[dict], path: Path) -> None:
    n = [r["services"] for r in rows]
    fig, (push, mem) = new_figure(2)
    push.plot(n, [r["push_to_consistent_s"] * 1000 for r in rows], marker="o", label="push → consistent maps")
    push.plot(n, [r["update_ms_median"] for r in rows], marker="x", label="one-endpoint update (median)")
    push.axhline(TARGETS["apply_10000_s"] * 1000, color="gray", linestyle=":", label="target at 10 000: 1 s")
    push.set_yscale("log")
    push.set_ylabel("ms")
    mem.plot(n, [r["rss_mb"] for r in rows], marker="o", label="RSS, maps consistent")
    mem.plot(n, [r["rss_idle_mb"] for r in rows], marker="x", linestyle="--", label="RSS, idle daemon")
    mem.axhline(TARGETS["rss_mb"], color="gray", linestyle=":", label=f"target: {TARGETS['rss_mb']} MB")
    mem.set_ylabel("MB")
    for ax, title in ((push, "ADS push time"), (mem, "kmesh-daemon memory")):
        ax.set_xscale("log")
        ax.set_xlabel("services (Istio-shaped, 3 endpoints each)")
        ax.set_title(title)
    save_figure(fig, path, which="major")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "xds.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from --output's JSON")
    args = ap.parse_args()
    out = Path(args.output)
    if args.plot_only:
        write_plot(plot, out.with_suffix(".png"), json.loads(out.read_text()))
        return 0
    if os.geteuid() != 0:
        sys.exit("run as root (it loads BPF programs into a child cgroup)")
    harness.ensure_bpffs()
    backends = start_consecutive_backends(3)
    try:
        rows = []
        for n in (int(x) for x in args.sizes.split(",")):
            print(f"[xds-bench] {n} services ...", file=sys.stderr, flush=True)
            rows.append(run_size(n, args.updates, backends))
    finally:
        for b in backends:
            b.proc.kill()
            b.proc.wait()
    print("| services | push → consistent maps | single-endpoint update (median / p90) | daemon RSS (idle → loaded) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['services']:,} | {r['push_to_consistent_s'] * 1000:,.0f} ms | "
              f"{r['update_ms_median']:.2f} / {r['update_ms_p90']:.2f} ms | "
              f"{r['rss_idle_mb']:.0f} → {r['rss_mb']:.0f} MB |")
    big = next((r for r in rows if r["services"] == 10000), None)
    if big:
        print(f"\ntargets: 10 000 services ≤ {TARGETS['apply_10000_s']} s: {big['push_to_consistent_s']} s; "
              f"update ≤ {TARGETS['update_ms']} ms: {big['update_ms_median']} ms; "
              f"RSS ≤ {TARGETS['rss_mb']} MB: {big['rss_mb']} MB")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    write_plot(plot, out.with_suffix(".png"), rows)
    print(f"[xds-bench] wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
