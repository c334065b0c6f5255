"""Envoy extension types kmesh understands, imported so that their typed_config
``@type`` URLs resolve in protobuf's descriptor pool."""
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401

TCP_PROXY = "envoy.filters.network.tcp_proxy"
HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"

TCP_PROXY_TYPE = tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name
HCM_TYPE = hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
