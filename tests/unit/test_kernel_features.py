"""The kernel feature decisions, from the probes the kernel matrix recorded
on each kernel (tests/fixtures/kernels/), and the README table they make."""
from __future__ import annotations

import pytest

from kmesh.bpf import features, loader
from tests.kernels import table

# What each kernel of the matrix must give: the objects it loads and the
# features that are off there.
EXPECTED = {
    "5.10": ("legacy", {"atomic_fetch", "econnrefused", "sockmap_link"}),
    "6.1": ("current", {"sockmap_link"}),
    "6.12": ("current", set()),
    "6.18": ("current", set()),
}


def _decided(name: str) -> features.Features:
    return features.decide(features.KernelProbe.from_dict(table.recorded()[name]["probe"]))


def test_every_matrix_kernel_is_recorded():
    assert set(EXPECTED) <= set(table.recorded()), "run python -m tests.kernels.matrix --write"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_decisions_per_kernel(name):
    f = _decided(name)
    flavour, off = EXPECTED[name]
    assert f.missing == ()
    assert f.flavour == flavour
    assert {x.name for x in f.off()} == off
    assert f.as_dict()["objects"] == flavour


def test_a_kernel_without_btf_or_the_5_10_hooks_is_refused_by_name(tmp_path):
    old = features.KernelProbe(release="5.4.0", btf=False)
    f = features.decide(old)
    assert "BTF (Linux 5.4)" in f.missing and any("sock_release" in m for m in f.missing)
    with pytest.raises(loader.LoaderError, match=r"kernel 5.4.0 cannot run kmesh: it lacks BTF.*Linux 5.10"):
        loader.Dataplane(str(tmp_path), str(tmp_path), features=f)


def test_the_legacy_flavour_is_loaded_from_its_directory(tmp_path):
    dp = loader.Dataplane(str(tmp_path), str(tmp_path), object_dir=str(tmp_path / "bpf"), features=_decided("5.10"))
    assert dp.object_path == str(tmp_path / "bpf" / "legacy" / loader.OBJECT_NAME)
    dp = loader.Dataplane(str(tmp_path), str(tmp_path), object_dir=str(tmp_path / "bpf"), features=_decided("6.12"))
    assert dp.object_path == str(tmp_path / "bpf" / loader.OBJECT_NAME)


def test_switching_features_off():
    f = features.without(_decided("6.18"), features.parse_disabled("l7_splice, atomic_fetch"))
    assert {x.name for x in f.off()} == {"l7_splice", "atomic_fetch"} and f.flavour == "legacy"
    assert "switched off by -bpf-disable-features" in f.as_dict()["features"]["l7_splice"]["instead"]
    with pytest.raises(ValueError, match="cannot switch off kernel feature econnrefused"):
        features.parse_disabled("econnrefused")   # decided inside the objects from the kernel's BTF
    assert features.parse_disabled("") == frozenset()


def test_probe_round_trips_through_json():
    p = features.KernelProbe(release="6.1.0", btf=True, enum_values=("BPF_LINK_TYPE_CGROUP",), sk_skb_splice=True,
                             atomic_fetch=True, kconfig=None)
    assert features.KernelProbe.from_dict(p.as_dict()) == p


def test_readme_kernel_table_is_what_the_recordings_say():
    assert table.readme_table(table.README.read_text()) == table.render(table.recorded()), \
        "the README's kernel table is stale: python -m tests.kernels.matrix --write (or table.write_readme)"


@pytest.mark.parametrize("obj", ["kmesh_sock.bpf.o", "legacy/kmesh_sock.bpf.o"])
def test_no_kconfig_sets_every_kconfig_extern_of_the_objects(obj):
    """libbpf reads the system's kernel config if any extern is left unset by
    the one kmesh passes, and fails where there is none."""
    import re
    import subprocess

    from tests.conftest import BUILD_BPF

    dump = subprocess.run(["bpftool", "btf", "dump", "file", str(BUILD_BPF / obj)], capture_output=True,
                          text=True, check=True).stdout
    section = dump.split("DATASEC '.kconfig'", 1)[1].split("\n[", 1)[0] if "'.kconfig'" in dump else ""
    externs = set(re.findall(r"\(VAR '(\w+)'\)", section))
    given = {line.split("=", 1)[0] for line in loader.NO_KCONFIG.splitlines()}
    assert externs and externs == given
