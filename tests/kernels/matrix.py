"""The kernel matrix: boot each of Debian's stock kernels under qemu (tests/vm),
run kmesh's own tests inside against that kernel, and check the README's
kernel table against what the kernels showed.

    python -m tests.kernels.matrix                 # every kernel, the CI subset
    python -m tests.kernels.matrix --kernels 5.10  # one
    python -m tests.kernels.matrix --write         # record the probes, regenerate the README table
    python -m tests.kernels.matrix --full          # the whole e2e suite in each VM (long)

Fails when a kernel cannot run its tests, or when a kernel's probe differs
from its recording (then the README's table would not be true: rerun with
--write and commit). Under TCG a daemon start takes ~40 s instead of ~1 s, so
each VM runs the short forms of the checks that differ between kernels
(SUITE, ~8 minutes with the three VMs side by side on two cores); the host
kernel runs the whole suite.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.kernels import table
from tests.kernels import guest
from tests.kernels.guest import PROBE_MARKER

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("5.10", "6.1", "6.12")
# What every kernel runs: one daemon checked for what differs between
# kernels (the object flavour's counters, errnos, the connect timeout, the
# ring buffer, L7 spliced or relayed, sk_msg with or without links, takeover
# and upgrade); a daemon start costs tens of seconds under TCG, so the long
# forms of these checks run on the host only. (tests/unit/test_bpf_lb.py
# drives the LB through a SEC("syscall") program, a 5.14 test vehicle.)
SUITE = ("tests/e2e/test_kernel_core.py",)
# Where the kernel splices L7 connections, the splice's hand-over too.
SPLICE_SUITE = ("tests/e2e/test_l7_splice.py::test_spliced_connections_survive_a_daemon_restart[host]",)
# This kernel runs as a host without /boot/config-* or /proc/config.gz does
# (the connect timeout's fallback).
WITHOUT_KERNEL_CONFIG = "5.10"
FULL = ("tests/e2e",)
_SUMMARY = re.compile(r"(?:(\d+) failed)?(?:, )?(?:(\d+) passed)?.* in [\d.]+s")


@dataclass
class Outcome:
    kernel: str
    rc: int
    probe: dict | None
    passed: int
    failed: int
    seconds: float
    tests: tuple[str, ...]
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.probe is not None and self.failed == 0 and self.passed > 0


def _counts(text: str) -> tuple[int, int]:
    passed = failed = 0
    for line in text.splitlines()[::-1]:
        if re.search(r" in [\d.]+s", line) and ("passed" in line or "failed" in line):
            m_p, m_f = re.search(r"(\d+) passed", line), re.search(r"(\d+) failed", line)
            m_e = re.search(r"(\d+) error", line)
            passed = int(m_p.group(1)) if m_p else 0
            failed = (int(m_f.group(1)) if m_f else 0) + (int(m_e.group(1)) if m_e else 0)
            break
    return passed, failed


def _probe_of(text: str) -> dict | None:
    for line in text.splitlines():
        if PROBE_MARKER in line:
            return json.loads(line.split(PROBE_MARKER, 1)[1])
    return None


def run_kernel(name: str, tests: tuple[str, ...] | None, cpus: int, timeout: float, log_dir: Path) -> Outcome:
    """Boot ``name``, probe, then run ``tests`` (None: the CI subset, with the
    splice tests where the kernel has the splice)."""
    from tests.vm import qemu

    log = (log_dir / f"{name}.log").open("w")
    py = str(ROOT / ".venv" / "bin" / "python")

    def show(line: str) -> None:
        log.write(line + "\n")
        log.flush()
        if re.search(r"(PASSED|FAILED|ERROR|passed|failed|error|Error|kernel \S+: objects)", line):
            print(f"[{name}] {line}", flush=True)

    start = time.monotonic()
    if tests is None:
        # Probe first (a short boot) to pick the suite: a kernel without the
        # splice verdict relays, so the splice tests do not apply there.
        res = qemu.run([py, "-m", "tests.kernels.guest"], name, cpus=cpus, timeout=300, cwd=str(ROOT), on_line=show)
        probe = _probe_of(res.output)
        if probe is None:
            log.close()
            return Outcome(name, res.rc, None, 0, 0, time.monotonic() - start, (), "no probe output")
        from kmesh.bpf import features

        splice = features.decide(features.KernelProbe.from_dict(probe)).on("l7_splice")
        tests = SUITE + (SPLICE_SUITE if splice else ())
        if name == WITHOUT_KERNEL_CONFIG:
            tests = (guest.WITHOUT_KERNEL_CONFIG, *tests)
    try:
        res = qemu.run([py, "-m", "tests.kernels.guest", *tests], name, cpus=cpus, timeout=timeout,
                       cwd=str(ROOT), on_line=show)
    except qemu.VMError as e:
        log.close()
        return Outcome(name, 124 if e.timed_out else 125, _probe_of(e.output), *_counts(e.output),
                       time.monotonic() - start, tests, str(e).splitlines()[0])
    log.close()
    passed, failed = _counts(res.command_output)
    return Outcome(name, res.rc, _probe_of(res.output), passed, failed, time.monotonic() - start, tests)


def _comparable(probe: dict) -> dict:
    """What decides features: everything but the exact release string (Debian
    ships point releases of each series; a new one that changes a feature
    shows as a difference here)."""
    return {k: v for k, v in probe.items() if k != "release"}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.kernels.matrix", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated, of " + ", ".join(KERNELS))
    ap.add_argument("--write", action="store_true", help="record the probes and regenerate the README table")
    ap.add_argument("--full", action="store_true", help="the whole e2e suite in each VM (slow under TCG)")
    ap.add_argument("--tests", nargs="*", help="these pytest selections instead of the subset")
    ap.add_argument("--parallel", type=int, default=3, help="VMs at once (each is one TCG thread per vCPU)")
    ap.add_argument("--cpus", type=int, default=1, help="vCPUs per VM")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per kernel")
    ap.add_argument("--log-dir", default=str(ROOT / "build" / "kernel-matrix"))
    a = ap.parse_args(argv)
    names = [k.strip() for k in a.kernels.split(",") if k.strip()]
    unknown = sorted(set(names) - set(KERNELS))
    if unknown:
        ap.error(f"unknown kernel {', '.join(unknown)}: choose from {', '.join(KERNELS)}")
    log_dir = Path(a.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)

    from tests.vm import kernels

    for name in names:
        kernels.fetch(name)
    tests = tuple(a.tests) if a.tests else FULL if a.full else None
    print(f"kernel matrix: {', '.join(names)}; logs in {log_dir}", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, a.parallel)) as pool:
        outcomes = list(pool.map(lambda n: run_kernel(n, tests, a.cpus, a.timeout, log_dir), names))

    rec = table.recorded()
    failed = False
    print("\nkernel  release                 result  passed failed  seconds  tests")
    for o in outcomes:
        release = (o.probe or {}).get("release", "?")
        print(f"{o.kernel:7} {release:23} {'ok' if o.ok else 'FAIL':7} {o.passed:6} {o.failed:6} "
              f"{o.seconds:8.0f}  {len(o.tests)} selections {o.error}")
        failed |= not o.ok
        if o.probe is None:
            continue
        want = rec.get(o.kernel, {}).get("probe")
        if a.write:
            table.FIXTURES.mkdir(parents=True, exist_ok=True)
            (table.FIXTURES / f"{o.kernel}.json").write_text(json.dumps(
                {"probe": o.probe, "suite": {"passed": o.passed, "failed": o.failed, "tests": list(o.tests)}},
                indent=2, sort_keys=True) + "\n")
        elif want is None or _comparable(want) != _comparable(o.probe):
            print(f"{o.kernel}: the kernel's probe differs from tests/fixtures/kernels/{o.kernel}.json:\n"
                  f"  recorded {json.dumps(want, sort_keys=True)}\n  observed {json.dumps(o.probe, sort_keys=True)}\n"
                  "  the README's kernel table is out of date: rerun with --write and commit", flush=True)
            failed = True
    if a.write:
        from kmesh.bpf import features

        host = features.probe().as_dict()
        series = ".".join(host["release"].split(".")[:2])
        (table.FIXTURES / f"{series}.json").write_text(json.dumps(
            {"probe": host, "suite": {"passed": 1, "failed": 0, "tests": ["the whole suite (./build.sh test)"]}},
            indent=2, sort_keys=True) + "\n")
        table.write_readme(table.recorded())
        print("recorded the probes and regenerated the README's kernel table")
    print("\n" + table.render(table.recorded()))
    print(f"\nmatrix: {sum(o.ok for o in outcomes)} passed, {sum(not o.ok for o in outcomes)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
