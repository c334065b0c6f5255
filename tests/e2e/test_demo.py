"""The README's demo command works and cleans up after itself."""
from __future__ import annotations

import subprocess
import sys

from tests.support import harness


def test_demo_check():
    name = harness.unique("kmesh-demo")
    pins = harness.BPFFS / name
    try:
        r = subprocess.run([sys.executable, str(harness.ROOT / "examples" / "demo.py"), "--check",
                            "--cgroup", name, "--bpf-fs-path", str(pins),
                            "--admin-address", f"127.0.0.1:{harness.free_port()}"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = [ln.split()[-1] for ln in r.stdout.splitlines() if ln.strip().endswith(("backend-A", "backend-B"))]
        assert lines == ["backend-A", "backend-B", "backend-A", "backend-B"], r.stdout
        assert "kmesh-daemon ready" in r.stderr
        assert not (pins / "bpf_kmesh").exists()
        assert not (harness.CGROUP2_ROOT / name).exists()
    finally:
        subprocess.run([str(harness.BIN / "kmesh-daemon"), f"-bpf-fs-path={pins}", "cleanup"], capture_output=True)
        for d in (pins,):
            try:
                d.rmdir()
            except OSError:
                pass


def test_demo_pods_check():
    """`./build.sh demo --pods`: bookinfo in pods, routed from the client pod;
    nothing left behind (pods, cgroups, pins)."""
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    r = subprocess.run([sys.executable, str(harness.ROOT / "examples" / "demo.py"), "--pods", "--check",
                        "--admin-address", f"127.0.0.1:{harness.free_port()}"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "productpage-v1 (details-v1) (reviews-v1)" in r.stdout, r.stdout
    assert "productpage-v1 (details-v1) (reviews-v2 (ratings 500))" in r.stdout, r.stdout
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert after <= before, after - before
