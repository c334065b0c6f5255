"""The C header is the source of truth for map records: check the Python
mirrors against the BTF of the built object and against the header itself."""
from __future__ import annotations

import ctypes
import json
import subprocess

import pytest

from kmesh.bpf import records
from tests.conftest import ROOT


def _btf_types(obj) -> dict[str, dict]:
    """Structs in the BTF of ``obj`` and of the other objects beside it."""
    out = {}
    for path in sorted(obj.parent.glob("*.bpf.o")):
        dump = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(path)], check=True,
                              capture_output=True, text=True).stdout
        out.update({t["name"]: t for t in json.loads(dump)["types"] if t.get("kind") == "STRUCT" and t.get("name")})
    return out


# Structs that only travel as ring buffer data are not in any BTF (nothing
# typed holds them); the header probe below checks them.
NOT_IN_BTF = {"kmesh_conn_event"}


def test_structs_match_btf(bpf_object):
    btf = _btf_types(bpf_object)
    for cname, cls in records.STRUCTS.items():
        if cname in NOT_IN_BTF:
            continue
        assert cname in btf, f"struct {cname} is not in the object's BTF"
        t = btf[cname]
        assert t["size"] == ctypes.sizeof(cls), f"struct {cname}: C {t['size']} bytes, Python {ctypes.sizeof(cls)}"
        c_members = [(m["name"], m["bits_offset"] // 8) for m in t["members"]]
        py_members = [(name, getattr(cls, name).offset) for name, *_ in cls._fields_]
        assert c_members == py_members, f"struct {cname} members differ"


def header_probe(tmp_path, printfs: list[str]) -> dict[str, str]:
    """Compile ``printfs`` ("NAME VALUE" lines) against the header with the
    host compiler and run them."""
    src = tmp_path / "probe.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n#include <linux/bpf.h>\n"
                   "#include \"kmesh_records.h\"\n"
                   "int main(void) {\n" + "\n".join(printfs) + "\nreturn 0; }\n")
    exe = tmp_path / "probe"
    subprocess.run(["cc", "-I", str(ROOT / "bpf" / "include"), str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return dict(line.split() for line in out.splitlines())


def test_enums_and_offsets_match_header(tmp_path):
    want = {name: value for consts in records.ENUMS.values() for name, value in consts.items()}
    got = header_probe(tmp_path, [f'printf("{n} %lld\\n", (long long){n});' for n in want])
    assert {k: int(v) for k, v in got.items()} == want


# What each KMESH_LAYOUT_VERSION stands for: a fingerprint of every struct
# the maps hold and of every map definition. When the test below fails you
# changed one of them: bump KMESH_LAYOUT_VERSION (kmesh_records.h and
# records.py) and add the new fingerprint here, so that an upgraded daemon
# migrates the pins of the old one instead of misreading them.
LAYOUT_FINGERPRINTS = {
    1: "ed5ca7f9dffdafeb",
    2: "c94dd42f890e2526",   # + same-host acceleration (kmesh_sockmap.bpf.o)
    3: "bac686cdf8b55d91",   # + counters, km_config, km_events; km_sock_ep by socket cookie
    4: "1731c9925fc2e21c",   # + failed/bytes counters, conn events, access log bucket; policies; L7 hand-off
    5: "30ae2b47554405e5",   # + L7 splice (km_splice, km_splice_dir, km_splice_relayed)
    6: "015f90b8b8b67e73",   # km_orig_dst keyed by network namespace too (kmesh_handoff_key)
    7: "bb90bbe5966ef164",   # + km_workloads (workloads enrolled by network namespace)
    8: "b12a59c82ce2d3da",   # km_workloads by cgroup or namespace, with a mode, and km_workload_cache; km_config: the daemon's netns and cgroup, workloads_gen
    9: "ac0ee9c2e9d99353",   # addresses of both families: 16 bytes, IPv4 mapped (kmesh_addr, kmesh_sock_key, km_local_ip); km_listener_ports
}


def layout_fingerprint(obj_path) -> str:
    import hashlib

    from kmesh.bpf import libbpf

    btf = _btf_types(obj_path)
    parts = []
    for cname in sorted(records.STRUCTS):
        if cname in NOT_IN_BTF:   # the ctypes layout, checked against the header above
            cls = records.STRUCTS[cname]
            parts.append(f"{cname}:{ctypes.sizeof(cls)}:" + ",".join(
                f"{f}@{getattr(cls, f).offset * 8}" for f, *_ in cls._fields_))
            continue
        t = btf[cname]
        parts.append(f"{cname}:{t['size']}:" + ",".join(f"{m['name']}@{m['bits_offset']}" for m in t["members"]))
    for path in sorted(obj_path.parent.glob("*.bpf.o")):
        obj = libbpf.BpfObject(str(path))
        try:
            for name, h in sorted(obj.maps().items()):
                parts.append(f"{name}:{libbpf.bpf_map__type(h)}:{libbpf.bpf_map__key_size(h)}:"
                             f"{libbpf.bpf_map__value_size(h)}:{libbpf.bpf_map__max_entries(h)}:"
                             f"{libbpf.bpf_map__map_flags(h)}")
        finally:
            obj.close()
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def test_layout_version_names_the_layout(bpf_object):
    got = layout_fingerprint(bpf_object)
    assert LAYOUT_FINGERPRINTS.get(records.KMESH_LAYOUT_VERSION) == got, (
        f"the pinned-map layout is now {got}, but KMESH_LAYOUT_VERSION {records.KMESH_LAYOUT_VERSION} "
        f"stands for {LAYOUT_FINGERPRINTS.get(records.KMESH_LAYOUT_VERSION)!r}: bump the version and record it")


def test_struct_layouts_match_header(tmp_path):
    """sizeof and offsetof of every struct, compiled from the header."""
    lines = []
    for cname, cls in records.STRUCTS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        lines += [f'printf("{cname}.{f} %zu\\n", offsetof(struct {cname}, {f}));' for f, *_ in cls._fields_]
    got = header_probe(tmp_path, lines)
    want = {}
    for cname, cls in records.STRUCTS.items():
        want[cname] = str(ctypes.sizeof(cls))
        want.update({f"{cname}.{f}": str(getattr(cls, f).offset) for f, *_ in cls._fields_})
    assert got == want


def test_addresses_are_network_order():
    """16 bytes for both families, IPv4 mapped (::ffff:a.b.c.d), so an IPv4
    VIP and its mapped form are one key."""
    k = records.addr_key("127.100.0.1", 80)
    assert bytes(k)[:16] == bytes(10) + b"\xff\xff" + bytes([127, 100, 0, 1])
    assert bytes(k)[16:18] == (80).to_bytes(2, "big")
    assert records.addr_text(k) == "127.100.0.1:80"
    assert bytes(records.addr_key("::ffff:127.100.0.1", 80)) == bytes(k)
    k6 = records.addr_key("fd00::a", 8080)
    assert bytes(k6)[:16] == bytes([0xfd]) + bytes(14) + b"\x0a"
    assert records.addr_text(k6) == "[fd00::a]:8080"
    assert records.is_ipv6("fd00::a") and not records.is_ipv6("::ffff:10.0.0.1")
    with pytest.raises(ValueError, match="not an IP address"):
        records.addr_key("10.1", 80)


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
