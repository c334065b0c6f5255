"""km_config: the one record of switches the BPF programs read on every
connect (close tracking, the access log and its rate, the L7 hand-off
address). Several parts of the daemon own fields of it; this is the one
place that writes it, always whole."""
from __future__ import annotations

import ctypes

from kmesh.bpf import libbpf, records


class KernelConfig:
    def __init__(self, config_map: libbpf.Map):
        self.map = config_map
        # Start from what is pinned (a restart takes it over unchanged
        # until a part of the daemon sets its field).
        self.record = config_map.lookup(ctypes.c_uint32(0)) or records.KmeshConfig()

    def set(self, **fields) -> None:
        for name, value in fields.items():
            setattr(self.record, name, value)
        self.map.update(ctypes.c_uint32(0), self.record)
