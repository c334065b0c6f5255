#!/usr/bin/env python3
"""kmesh standalone demo: two backends, the bundled example config, and
kmesh-daemon governing a demo cgroup. Run through `sudo ./build.sh demo`.

Only processes in the demo cgroup are governed; run a command there with
`sudo examples/kmesh-demo-run <command>` from another terminal, e.g.

    sudo examples/kmesh-demo-run curl -s http://127.0.0.1:23333/

--check starts everything, shows the redirect working, and stops again.
--pods runs examples/demo_pods.py instead: bookinfo in pods.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = ROOT / "config" / "examples" / "standalone.yaml"
CGROUP2 = Path("/sys/fs/cgroup/unified")


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def in_cgroup(cg: Path):
    def enter():
        (cg / "cgroup.procs").write_text(str(os.getpid()))
    return enter


def curl(cg: Path, url: str, *headers: str) -> list[str]:
    r = subprocess.run(["curl", "-sS", "--max-time", "5", "-H", "Connection: close",
                        *(a for h in headers for a in ("-H", h)), url],
                       preexec_fn=in_cgroup(cg), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"curl {url}: {r.stderr.strip()}")
    return r.stdout.split()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="show the redirect, then stop")
    ap.add_argument("--pods", action="store_true", help="bookinfo in pods instead (examples/demo_pods.py)")
    ap.add_argument("--cgroup", default="kmesh-demo", help="child cgroup name under /sys/fs/cgroup/unified")
    ap.add_argument("--bpf-fs-path", default="/sys/fs/bpf")
    ap.add_argument("--admin-address", default="127.0.0.1:15200")
    args = ap.parse_args()
    if args.pods:
        os.execv(sys.executable, [sys.executable, str(ROOT / "examples" / "demo_pods.py"), *sys.argv[1:]])

    cg = CGROUP2 / args.cgroup
    procs: list[subprocess.Popen] = []
    daemon = None
    try:
        cg.mkdir(exist_ok=True)
        (ROOT / "build").mkdir(exist_ok=True)
        (ROOT / "build" / "demo-cgroup").write_text(str(cg))
        for name, port in (("backend-A", 18081), ("backend-B", 18082)):
            p = subprocess.Popen([sys.executable, str(ROOT / "examples" / "backend.py"), name, str(port)],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            if not p.stdout.readline().startswith("listening"):
                raise RuntimeError(f"{name} could not listen on 127.0.0.1:{port} (port in use?)")
        say("backends on 127.0.0.1:18081 (backend-A) and 127.0.0.1:18082 (backend-B)")
        daemon = subprocess.Popen([str(BIN / "kmesh-daemon"), "-enable-kmesh", "-enable-ads=false",
                                   f"-config-file={CONFIG}", f"-cgroup2-path={cg}",
                                   f"-bpf-fs-path={args.bpf_fs_path}", f"-admin-address={args.admin_address}"])
        admin = f"http://{args.admin_address}"
        for _ in range(300):
            if daemon.poll() is not None:
                raise RuntimeError(f"kmesh-daemon exited with {daemon.returncode}")
            try:
                with urllib.request.urlopen(f"{admin}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("kmesh-daemon did not become ready")

        say(f"governed cgroup: {cg}")
        say("curl http://127.0.0.1:23333/ four times (VIP -> round robin over A and B):")
        for _ in range(4):
            say(f"    {curl(cg, 'http://127.0.0.1:23333/')[0]}")
        split = collections.Counter(curl(cg, "http://127.100.0.1/[1-100]"))
        say(f"100 connections to the canary VIP 127.100.0.1:80 (80/20): {dict(sorted(split.items()))}")
        pinned = collections.Counter(curl(cg, "http://127.100.0.1/[1-3]", "x-canary: always"))
        say(f"with the header x-canary: always: {dict(pinned)} (an L7 route: decided by the daemon's hand-off "
            "listener, then spliced in the kernel)")
        outside = subprocess.run(["curl", "-sS", "--max-time", "2", "http://127.0.0.1:23333/"],
                                 capture_output=True, text=True)
        say(f"the same curl outside the cgroup is not governed: exit {outside.returncode} (connection refused)")
        if args.check:
            return 0
        say("running; try it from another terminal:")
        say("    sudo examples/kmesh-demo-run curl -s http://127.0.0.1:23333/")
        say(f"    curl -s {admin}/bpf/kmesh/maps      # decoded BPF maps")
        say("    edit config/examples/standalone.yaml, then: sudo kill -HUP " + str(daemon.pid))
        say("Ctrl-C stops the daemon and the backends, and detaches and unpins (kmesh-daemon cleanup)")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        daemon.wait()
        return daemon.returncode or 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        say(f"error: {e}")
        return 1
    finally:
        if daemon and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(15)
        if daemon:
            # A stopped daemon fails static (its programs stay in force); the
            # demo leaves nothing behind.
            subprocess.run([str(BIN / "kmesh-daemon"), f"-bpf-fs-path={args.bpf_fs_path}", "cleanup", "--force"],
                           capture_output=True)
        for p in procs:
            p.kill()
            p.wait()
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())
