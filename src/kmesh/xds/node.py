"""The Node a sidecar presents to istiod, and where the control plane is."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from kmesh import __version__, limits

DEFAULT_XDS_ADDRESS = "istiod.istio-system.svc:15010"


@dataclass(frozen=True)
class NodeIdentity:
    service_node: str = ""     # full node id; derived from the pod when empty
    service_cluster: str = ""
    pod_name: str = ""
    pod_namespace: str = ""
    instance_ip: str = ""      # one address, or one of each family comma-separated (INSTANCE_IPS)

    @classmethod
    def from_env(cls, service_node: str = "", service_cluster: str = "") -> "NodeIdentity":
        return cls(service_node, service_cluster, os.environ.get("POD_NAME", ""),
                   os.environ.get("POD_NAMESPACE", ""),
                   os.environ.get("INSTANCE_IPS", "") or os.environ.get("INSTANCE_IP", ""))

    def resolved(self) -> tuple[str, str, str]:
        pod = self.pod_name or socket.gethostname()
        ns = self.pod_namespace or "default"
        ip = self.instance_ip or "127.0.0.1"
        return pod, ns, ip

    def node_id(self) -> str:
        if self.service_node:
            return self.service_node
        pod, ns, ips = self.resolved()
        # A dual-stack node has an address of each family, comma-separated
        # (as Istio's INSTANCE_IPS); the id names the first.
        return f"sidecar~{ips.split(',')[0].strip()}~{pod}.{ns}~{ns}.svc.cluster.local"

    def to_proto(self) -> base_pb2.Node:
        """A Node as istiod expects from a sidecar: the id names the proxy type,
        IP and pod; the metadata carries what istiod reads to build its view."""
        pod, ns, ip = self.resolved()
        meta = struct_pb2.Struct()
        meta.update({
            "NAME": pod,
            "NAMESPACE": ns,
            "INSTANCE_IPS": ip,
            "CLUSTER_ID": os.environ.get("CLUSTER_ID", "Kubernetes"),
            "ISTIO_VERSION": os.environ.get("ISTIO_VERSION", "1.20.0"),
            "INTERCEPTION_MODE": "REDIRECT",
            "LABELS": {},
            "PROXY_CONFIG": {},
            "KMESH_VERSION": __version__,
        })
        return base_pb2.Node(
            id=self.node_id(),
            cluster=self.service_cluster or f"{pod}.{ns}",
            metadata=meta,
            user_agent_name="kmesh",
            user_agent_version=__version__,
        )


@dataclass(frozen=True)
class XdsTarget:
    address: str
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    origin: str = "default"   # flag, environment, bootstrap or default
    # The largest message taken from the server; a bigger one ends the stream
    # (RESOURCE_EXHAUSTED). The bootstrap's envoy_grpc.max_receive_message_length.
    max_message_bytes: int = limits.XDS_MESSAGE.value

    @property
    def tls(self) -> bool:
        return bool(self.ca_file)


def target_from_bootstrap(bootstrap) -> XdsTarget | None:
    """The ADS server named by ``dynamic_resources.ads_config``: an
    ``envoy_grpc`` cluster in static_resources (as Kmesh's kmesh.json does with
    ``xds-grpc``), or a ``google_grpc`` target URI."""
    ads = bootstrap.dynamic_resources.ads_config
    if not ads.grpc_services:
        return None
    svc = ads.grpc_services[0]
    if svc.HasField("google_grpc"):
        ca = svc.google_grpc.channel_credentials.ssl_credentials.root_certs.filename
        return XdsTarget(svc.google_grpc.target_uri, ca_file=ca, origin="bootstrap")
    name = svc.envoy_grpc.cluster_name
    for c in bootstrap.static_resources.clusters:
        if c.name != name:
            continue
        for lle in c.load_assignment.endpoints:
            for lbe in lle.lb_endpoints:
                sa = lbe.endpoint.address.socket_address
                if sa.address:
                    ca = _tls_ca(c)
                    return XdsTarget(f"{sa.address}:{sa.port_value}", ca_file=ca, origin="bootstrap")
    return None


def _tls_ca(cluster) -> str:
    if not cluster.HasField("transport_socket"):
        return ""
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    ctx = tls_pb2.UpstreamTlsContext()
    if cluster.transport_socket.typed_config.Unpack(ctx):
        return ctx.common_tls_context.validation_context.trusted_ca.filename
    return ""


def resolve_target(flag_address: str, bootstrap, ca_file: str = "", cert_file: str = "",
                   key_file: str = "") -> XdsTarget:
    """Flag, then $XDS_ADDRESS, then the bootstrap, then istiod's default."""
    if flag_address:
        base = XdsTarget(flag_address, origin="flag")
    elif os.environ.get("XDS_ADDRESS"):
        base = XdsTarget(os.environ["XDS_ADDRESS"], origin="environment")
    else:
        base = target_from_bootstrap(bootstrap) or XdsTarget(DEFAULT_XDS_ADDRESS)
    return XdsTarget(base.address, ca_file or os.environ.get("XDS_CA_FILE", "") or base.ca_file,
                     cert_file or os.environ.get("XDS_CERT_FILE", ""), key_file or os.environ.get("XDS_KEY_FILE", ""),
                     base.origin, max_message_bytes(bootstrap))


def max_message_bytes(bootstrap) -> int:
    """As Envoy: ``ads_config.grpc_services[0].envoy_grpc.max_receive_message_length``
    when set (0: kmesh's own limit, not unlimited)."""
    ads = bootstrap.dynamic_resources.ads_config if bootstrap is not None else None
    if ads is not None and ads.grpc_services:
        n = ads.grpc_services[0].envoy_grpc.max_receive_message_length.value
        if n:
            return n
    return limits.XDS_MESSAGE.value
