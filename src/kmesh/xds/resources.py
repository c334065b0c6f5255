"""The four xDS resource types kmesh subscribes to, in Envoy's order."""
from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2


@dataclass(frozen=True)
class ResourceType:
    short: str          # CDS, EDS, LDS, RDS: also the prefix of error paths
    url: str
    message: type
    wildcard: bool      # subscribed to everything (LDS/CDS) or by name (EDS/RDS)

    def name_of(self, msg) -> str:
        return msg.cluster_name if self.short == "EDS" else msg.name


def _t(short, cls, wildcard):
    return ResourceType(short, f"type.googleapis.com/{cls.DESCRIPTOR.full_name}", cls, wildcard)


CDS = _t("CDS", cluster_pb2.Cluster, True)
EDS = _t("EDS", endpoint_pb2.ClusterLoadAssignment, False)
LDS = _t("LDS", listener_pb2.Listener, True)
RDS = _t("RDS", route_pb2.RouteConfiguration, False)
ALL = (CDS, EDS, LDS, RDS)
BY_URL = {t.url: t for t in ALL}

