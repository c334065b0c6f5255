"""Generate an Istio-shaped mesh of N services for the xDS benchmarks.

Service i: VIP 127.101.x.y:9080 (a virtual host of the shared 0.0.0.0_9080
listener's route config, as istiod sends HTTP services), an EDS cluster
outbound|9080||svc-i.bench.svc.cluster.local, and 3 endpoints on loopback.
"""
from __future__ import annotations

from tests.support import istio

PORT = 9080


def vip(i: int) -> str:
    return f"127.{101 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def host(i: int) -> str:
    return f"svc-{i}.bench.svc.cluster.local"


def cluster_name(i: int) -> str:
    return istio.outbound(PORT, host(i))


def endpoints(i: int, base_port: int, shift: int = 0) -> list[tuple[str, int]]:
    return [("127.0.0.1", base_port + (i * 3 + k + shift) % 3) for k in range(3)]


def mesh(n: int, base_port: int):
    clusters = [istio.eds_cluster(cluster_name(i)) for i in range(n)] + [istio.passthrough_cluster()]
    clas = [istio.cla(cluster_name(i), endpoints(i, base_port)) for i in range(n)]
    listeners = [istio.virtual_outbound(), istio.http_listener(PORT)]
    routes = [istio.route_config(str(PORT), [{"host": host(i), "vip": vip(i), "port": PORT, "cluster": cluster_name(i)}
                                             for i in range(n)])]
    return clusters, clas, listeners, routes
