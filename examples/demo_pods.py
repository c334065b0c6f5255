#!/usr/bin/env python3
"""kmesh demo with pods: bookinfo (tests/support/bookinfo.py) in network
namespaces of their own on a bridge inside a node namespace, each pod in its
own cgroup under the one kmesh-daemon governs; the client pods' namespaces
are enrolled, so that L7 routes work inside them. Run through
`sudo ./build.sh demo --pods` (--check: show it, then stop).

Nothing in the topology has a default route: the ClusterIPs (10.96.0.x) are
reached only because kmesh redirects the connects.
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import bookinfo, harness, pods  # noqa: E402


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def post(admin: str, path: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"http://{admin}{path}", data=b"", method="POST"), timeout=10).close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="show the routing, then stop")
    ap.add_argument("--pods", action="store_true", help="(the flag ./build.sh demo passes on)")
    ap.add_argument("--admin-address", default="127.0.0.1:15200")
    args = ap.parse_args()
    cg = harness.Cgroup()
    tmp = Path(harness.unique("/tmp/kmesh-demo-pods"))
    tmp.mkdir()
    k = None
    try:
        with pods.Topology() as topo:
            mesh = bookinfo.start(topo, cg)
            say("pods: " + ", ".join(f"{n} {p.ip}" for n, p in mesh.pods.items()))
            k = harness.Kmesh(cg, tmp / "bookinfo.yaml", admin_port=int(args.admin_address.rsplit(":", 1)[1]))
            k.write_config(mesh.standalone())
            k.start()
            for pod in bookinfo.clients(mesh):
                post(args.admin_address, f"/workloads/enroll?netns=/run/netns/{pod.netns}")
            say(f"kmesh-daemon governs {cg.path}; enrolled: client, productpage-v1, reviews-v2, reviews-v3")
            client = mesh.pods["client"]
            url = f"http://{bookinfo.VIPS['productpage']}:{bookinfo.PORT}/"

            def page(*headers: str) -> str:
                return client.run(["curl", "-sS", "--max-time", "10", *headers, url]).stdout.strip()
            seen = collections.Counter(page() for _ in range(20))
            say(f"20 requests from the client pod to productpage ({url}), reviews 80/20 v1/v2:")
            for text, n in seen.most_common():
                say(f"    {n:2} x {text}")
            say("with end-user: jason (reviews v2; ratings aborts jason's requests with 500):")
            say(f"    {page('-H', 'end-user: jason')}")
            if args.check:
                return 0
            say("running; from another terminal, e.g.:")
            say(f"    sudo ip netns exec {client.netns} curl -s {url}")
            say(f"    curl -s http://{args.admin_address}/workloads")
            say("Ctrl-C removes the pods, the daemon's programs and pins")
            while k.proc.poll() is None:
                time.sleep(1)
            return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        say(f"error: {e}")
        return 1
    finally:
        if k is not None:
            k.teardown()
        cg.remove()
        subprocess.run(["rm", "-rf", str(tmp)])
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())
