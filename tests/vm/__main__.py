"""CLI: python3 -m tests.vm {fetch,list,run} ...

    python3 -m tests.vm fetch [--refresh] 5.10 6.1 6.12
    python3 -m tests.vm list
    python3 -m tests.vm run --kernel 6.1 [--cpus 2] [--mem 2G] [--timeout 900] [--cwd DIR]
                            [--env K=V ...] [--log FILE] -- CMD ARGS...

`run` exits with the guest command's exit status; 124 if the VM timed out, 125 if it ended
without reporting one (panic, init failure: the last console lines go to stderr). The console
goes to stdout, each line prefixed with "[vm <kernel>] ", or to --log FILE.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from . import kernels, qemu


def main(argv: list[str]) -> int:
    cmd: list[str] = []
    if "--" in argv:   # everything after the first -- is the guest command, verbatim
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python3 -m tests.vm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="fetch kernels into the cache and build their initramfs")
    f.add_argument("names", nargs="+", choices=list(kernels.SUITES))
    f.add_argument("--refresh", action="store_true", help="ask the archive for a newer package")
    sub.add_parser("list", help="show the cached kernels")
    r = sub.add_parser("run", help="run `-- CMD ARGS...` as root in a VM")
    r.add_argument("--kernel", default="6.1", choices=list(kernels.SUITES))
    r.add_argument("--cpus", type=int, default=2)
    r.add_argument("--mem", default="2G")
    r.add_argument("--timeout", type=float, default=900, help="seconds, boot included")
    r.add_argument("--cwd", default=os.getcwd(), help="the guest command's directory (default: this one)")
    r.add_argument("--env", action="append", default=[], metavar="K=V")
    r.add_argument("--log", help="write the console to this file instead of stdout")
    a = ap.parse_args(argv)

    if a.action == "fetch":
        for name in a.names:
            k = kernels.fetch(name, refresh=a.refresh)
            print(f"{name}\t{k.release}\t{k.package}={k.version}\t{k.dir}")
        return 0
    if a.action == "list":
        for name, k in kernels.cached_kernels().items():
            print(f"{name}\t{k.release}\t{k.package}={k.version}\t{k.dir}")
        return 0

    if not cmd:
        ap.error("run needs a command after --")
    env = dict(e.split("=", 1) for e in a.env if "=" in e)
    if len(env) != len(a.env):
        ap.error("--env takes K=V")
    # A SIGTERM (CI cancelling the job) unwinds like Ctrl-C, so run()'s cleanup kills qemu.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log = open(a.log, "w") if a.log else None
    prefix = f"[vm {a.kernel}] "

    def show(line: str) -> None:
        if log:
            log.write(line + "\n")
            log.flush()
        else:
            print(prefix + line, flush=True)

    try:
        res = qemu.run(cmd, a.kernel, cpus=a.cpus, mem=a.mem, timeout=a.timeout, cwd=a.cwd,
                       env=env, on_line=show)
    except qemu.VMError as e:
        print(f"[vm] {a.kernel}: {e}", file=sys.stderr)
        return 124 if e.timed_out else 125
    finally:
        if log:
            log.close()
    kernels.log(f"{a.kernel}: exit status {res.rc}; command started at {res.boot_seconds:.1f} s, "
                f"ended at {res.seconds:.1f} s")
    return res.rc


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
