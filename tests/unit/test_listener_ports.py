"""km_listener_ports as ConfigMaps keeps it: a port is set before the first
listener on it is written and cleared after the last one is deleted, so the
connect hooks' early miss never hides a listener (pure: fake maps)."""
from __future__ import annotations

import ctypes

from kmesh.bpf import records
from kmesh.config.model import Cluster, Endpoint, Listener, MeshConfig, WeightedCluster
from kmesh.dataplane.maps import ConfigMaps
from kmesh.dataplane.plan import MapState, plan


class FakeMap:
    def __init__(self, log: list, name: str):
        self.d, self.log, self.name = {}, log, name

    def update(self, k, v):
        self.log.append((self.name, "set", bytes(k), bytes(v)))
        self.d[bytes(k)] = v

    def update_batch(self, items):
        for k, v in items:
            self.update(k, v)

    def delete(self, k):
        self.log.append((self.name, "del", bytes(k)))
        self.d.pop(bytes(k), None)

    def keys(self):
        return [records.KmeshAddr.from_buffer_copy(k) for k in self.d] if self.name == "listener" else list(self.d)


def mesh(*keys) -> MeshConfig:
    return MeshConfig(listeners=tuple(Listener(f"l{i}", ip, p, (WeightedCluster("c", 1),))
                                      for i, (ip, p) in enumerate(keys)),
                      clusters=(Cluster("c", records.LbPolicy.ROUND_ROBIN, (Endpoint("10.0.0.1", 80),)),))


def port_on(m: FakeMap, port: int) -> bool:
    v = m.d.get(bytes(ctypes.c_uint32(records.port_key(port))))
    return bool(v and v.value)


def test_a_port_is_set_before_its_first_listener_and_cleared_after_its_last():
    log: list = []
    lst, ports = FakeMap(log, "listener"), FakeMap(log, "ports")
    cm = ConfigMaps(lst, FakeMap(log, "cluster"), ports=ports)
    st = MapState()
    p = plan(st, mesh(("10.96.0.1", 80), ("fd96::1", 80), ("10.96.0.2", 81)))
    cm.apply(p)
    st = p.commit(st)
    assert port_on(ports, 80) and port_on(ports, 81) and not port_on(ports, 82)
    first_listener = next(i for i, e in enumerate(log) if e[0] == "listener")
    assert all(e[0] == "ports" for e in log[:first_listener] if e[0] != "cluster")
    log.clear()
    p = plan(st, mesh(("fd96::1", 80)))   # 81 loses its only listener, 80 keeps one
    cm.apply(p)
    st = p.commit(st)
    assert port_on(ports, 80) and not port_on(ports, 81)
    assert [e[0] for e in log if e[0] != "cluster"][-1] == "ports"   # cleared after the delete
    # a daemon taking over counts what is pinned
    again = ConfigMaps(lst, FakeMap([], "cluster"), ports=ports)
    p = plan(st, mesh())
    again.apply(p)
    assert not port_on(ports, 80)
