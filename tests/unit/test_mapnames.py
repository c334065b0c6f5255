"""kmesh.bpf.mapnames names exactly the maps the BPF sources declare, and
every map the daemon types is one of them."""
import re
from pathlib import Path

from kmesh.bpf import loader, mapnames

BPF = Path(__file__).resolve().parents[2] / "bpf"


def declared() -> set[str]:
    out = set()
    for src in [*BPF.glob("*.bpf.c"), *(BPF / "include").glob("*.h")]:
        out |= set(re.findall(r'^\}\s*(km_\w+)\s+SEC\("\.maps"\)', src.read_text(), re.M))
    return out


def test_every_map_named_once_on_each_side():
    assert mapnames.ALL == declared()


def test_the_typed_maps_are_named_maps():
    assert set(loader.MAP_TYPES) | set(loader.SOCKMAP_MAP_TYPES) | set(loader.POLICY_STATE_MAPS) \
        | set(loader.PERCPU_MAPS) <= mapnames.ALL
