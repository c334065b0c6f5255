"""The C header is the source of truth for map records: check the Python
mirrors against the BTF of the built object and against the header itself."""
from __future__ import annotations

import ctypes
import json
import subprocess

from kmesh.bpf import records
from tests.conftest import ROOT


def _btf_types(obj) -> dict[str, dict]:
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj)], check=True,
                         capture_output=True, text=True).stdout
    return {t["name"]: t for t in json.loads(out)["types"] if t.get("kind") == "STRUCT" and t.get("name")}


def test_structs_match_btf(bpf_object):
    btf = _btf_types(bpf_object)
    for cname, cls in records.STRUCTS.items():
        assert cname in btf, f"struct {cname} is not in the object's BTF"
        t = btf[cname]
        assert t["size"] == ctypes.sizeof(cls), f"struct {cname}: C {t['size']} bytes, Python {ctypes.sizeof(cls)}"
        c_members = [(m["name"], m["bits_offset"] // 8) for m in t["members"]]
        py_members = [(name, getattr(cls, name).offset) for name, *_ in cls._fields_]
        assert c_members == py_members, f"struct {cname} members differ"


def test_enums_and_offsets_match_header(tmp_path):
    """Compile a probe against the header with the host compiler."""
    lines = [f'printf("{n} %lld\\n", (long long){n});' for n in records.LIMITS]
    lines += [f'printf("KMESH_LB_{p.name} %lld\\n", (long long)KMESH_LB_{p.name});' for p in records.LbPolicy]
    src = tmp_path / "probe.c"
    src.write_text("#include <stdio.h>\n#include <linux/types.h>\n#include \"kmesh_records.h\"\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n")
    exe = tmp_path / "probe"
    subprocess.run(["cc", "-I", str(ROOT / "bpf" / "include"), str(src), "-o", str(exe)], check=True)
    got = dict(line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                        check=True).stdout.splitlines())
    want = {**records.LIMITS, **{f"KMESH_LB_{p.name}": int(p) for p in records.LbPolicy}}
    assert {k: int(v) for k, v in got.items()} == want


def test_addresses_are_network_order():
    k = records.addr_key("127.100.0.1", 80)
    assert bytes(k)[:4] == bytes([127, 100, 0, 1])
    assert bytes(k)[4:6] == (80).to_bytes(2, "big")
    assert records.decode_listener_key(k) == "127.100.0.1:80"


def test_smooth_wrr_interleaves():
    assert records.smooth_wrr_slots([1, 1]) == [0, 1]
    s = records.smooth_wrr_slots([3, 1])
    assert sorted(s) == [0, 0, 0, 1] and len(s) == 4
    s = records.smooth_wrr_slots([2, 4, 6])  # divided by the gcd first
    assert len(s) == 6 and s.count(2) == 3


def test_smooth_wrr_scales_large_weights():
    s = records.smooth_wrr_slots([1000, 3000, 1])
    assert len(s) == records.KMESH_LB_SLOTS
    assert s.count(2) == 1                       # never dropped
    assert abs(s.count(1) / s.count(0) - 3) < 0.1


def test_listener_record_cumulative_weights():
    r = records.listener_record([(1, 80), (2, 0), (3, 20)])
    assert r.cluster_count == 2 and r.total_weight == 100
    assert [(r.clusters[i].cluster_id, r.clusters[i].cum_weight) for i in range(2)] == [(1, 80), (3, 100)]


def test_cluster_record_limits():
    import pytest

    with pytest.raises(ValueError, match="exceed"):
        records.cluster_record(records.LbPolicy.RANDOM,
                               [("127.0.0.1", 1000 + i, 1) for i in range(records.KMESH_MAX_ENDPOINTS + 1)])
