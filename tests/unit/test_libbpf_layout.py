"""The kernel structs the thin libbpf binding reads, against <linux/bpf.h>."""
from __future__ import annotations

import ctypes
import subprocess

from kmesh.bpf import libbpf


def test_prog_info_matches_uapi_header(tmp_path):
    cls = libbpf.ProgInfo
    fields = [f for f, *_ in cls._fields_ if not f.startswith("_") and f != "gpl_compatible"]
    src = tmp_path / "probe.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/bpf.h>\nint main(void) {\n"
                   'printf("size %zu\\n", sizeof(struct bpf_prog_info));\n'
                   + "".join(f'printf("{f} %zu\\n", offsetof(struct bpf_prog_info, {f}));\n' for f in fields)
                   + "return 0; }\n")
    exe = tmp_path / "probe"
    subprocess.run(["cc", str(src), "-o", str(exe)], check=True)
    got = dict(line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                          check=True).stdout.splitlines())
    want = {"size": str(ctypes.sizeof(cls)), **{f: str(getattr(cls, f).offset) for f in fields}}
    assert got == want
