"""Runs inside a matrix VM (python -m tests.kernels.guest [--without-kernel-config]
TESTS...): prints the kernel probe after a marker, then runs the given pytest
selection (first removing the kernel config, if asked) and exits with
pytest's status."""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE_MARKER = "KMESH_MATRIX_PROBE="
WITHOUT_KERNEL_CONFIG = "--without-kernel-config"


def main(argv: list[str]) -> int:
    from kmesh.bpf import features

    probe = features.probe()
    decided = features.decide(probe)
    print(PROBE_MARKER + json.dumps(probe.as_dict(), sort_keys=True), flush=True)
    print(f"kernel {probe.release}: objects {decided.flavour}, off: "
          f"{', '.join(f.name for f in decided.off()) or 'nothing'}", flush=True)
    if argv[:1] == [WITHOUT_KERNEL_CONFIG]:
        # As on a host without /boot/config-*: the VM's root is an overlay,
        # so this changes nothing outside it.
        argv = argv[1:]
        if probe.kconfig and probe.kconfig.startswith("/boot/"):
            os.remove(probe.kconfig)
        print(f"kernel {probe.release}: running without the kernel config", flush=True)
    if not argv:
        return 0
    # KMESH_TEST_SLOW: TCG runs ~10-40x slower than the host (tests/support/harness.py).
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "KMESH_TEST_SLOW": "20"}
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "console_output_style=classic",
           "--durations=5", *argv]
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
