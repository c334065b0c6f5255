"""Envoy extension types kmesh understands, imported so that their typed_config
``@type`` URLs resolve in protobuf's descriptor pool."""
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.network.local_ratelimit.v3 import local_rate_limit_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401

TCP_PROXY = "envoy.filters.network.tcp_proxy"
HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
LOCAL_RATELIMIT = "envoy.filters.network.local_ratelimit"

TCP_PROXY_TYPE = tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name
HCM_TYPE = hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
RBAC_TYPE = rbac_pb2.RBAC.DESCRIPTOR.full_name


def rds_names(listeners) -> set[str]:
    """Route names referenced (over RDS) by the HTTP connection managers of listeners."""
    names = set()
    for lst in listeners:
        chains = list(lst.filter_chains) + ([lst.default_filter_chain] if lst.HasField("default_filter_chain") else [])
        for chain in chains:
            for f in chain.filters:
                if f.typed_config.TypeName() == HCM_TYPE:
                    hcm = hcm_pb2.HttpConnectionManager()
                    f.typed_config.Unpack(hcm)
                    if hcm.WhichOneof("route_specifier") == "rds":
                        names.add(hcm.rds.route_config_name)
    return names
