"""A bookinfo-shaped mesh in pods (tests/support/pods.py): productpage calls
details and reviews, reviews v2 and v3 call ratings, with the upstream Kmesh
demo's routing (reviews 80/20 v1/v2; `end-user: jason` -> v2; a fault on
ratings: jason's requests are aborted with 500). The same Istio-shaped
resources (tests/support/istio.py: the 0.0.0.0_9080 listener and its route
configuration "9080") drive kmesh once from a standalone config and once
over ADS.

Each service answers its name and what its upstreams answered it, e.g.
``productpage (details-v1) (reviews-v2 (ratings-v1))``; the `end-user`
header is passed on, as bookinfo's apps do."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from google.protobuf import json_format

from kmesh.xds import resources as rt
from tests.support import istio, pods
from tests.support.envoy import bootstrap, cluster, http_listener, lb_ep

PORT = 9080
NS = "default.svc.cluster.local"
VIPS = {"productpage": "10.96.0.10", "details": "10.96.0.13", "reviews": "10.96.0.11", "ratings": "10.96.0.12"}
# service -> what each version calls
CALLS = {"productpage": {"v1": ["details", "reviews"]}, "details": {"v1": []},
         "reviews": {"v1": [], "v2": ["ratings"], "v3": ["ratings"]}, "ratings": {"v1": []}}

SERVICE = """
import http.client, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, ip, port, upstreams = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def call(upstream, user):
    vip, svc = upstream.split("=")
    c = http.client.HTTPConnection(vip, 9080, timeout=10)
    try:
        c.putrequest("GET", "/", skip_host=True)
        c.putheader("Host", f"{svc}:9080")
        if user:
            c.putheader("end-user", user)
        c.endheaders()
        r = c.getresponse()
        body = r.read().decode().strip()
        return body if r.status == 200 else f"{svc} {r.status}"
    except OSError as e:
        return f"{svc} {type(e).__name__}"
    finally:
        c.close()

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        user = self.headers.get("end-user")
        body = " ".join([name] + [f"({call(u, user)})" for u in upstreams]).encode() + b"\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class S(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

srv = S((ip, port), H)
print("listening", flush=True)
srv.serve_forever()
"""


def fqdn(svc: str) -> str:
    return f"{svc}.{NS}"


def outbound(svc: str, version: str = "") -> str:
    return istio.outbound(PORT, fqdn(svc), version)


@dataclass
class Mesh:
    topo: pods.Topology
    pods: dict[str, pods.Pod]        # "reviews-v2" -> its pod; "client" -> the client's
    endpoints: dict[str, str]        # "reviews-v2" -> its pod's IP

    def clusters(self) -> list[tuple[str, list[str]]]:
        """(Istio cluster name, endpoint IPs): one per service and one per subset."""
        out = []
        for svc, versions in CALLS.items():
            ips = [self.endpoints[f"{svc}-{v}"] for v in versions]
            out.append((outbound(svc), ips))
            out += [(outbound(svc, v), [self.endpoints[f"{svc}-{v}"]]) for v in versions if len(versions) > 1]
        return out

    def route_config(self):
        """Route configuration "9080" as istiod shapes it (httproute.go)."""
        vh = []
        for svc in CALLS:
            v = {"host": fqdn(svc), "vip": VIPS[svc], "port": PORT, "cluster": outbound(svc)}
            if svc == "reviews":
                v = {**v, "weighted": [(outbound(svc, "v1"), 80), (outbound(svc, "v2"), 20)],
                     "jason": outbound(svc, "v2")}
            if svc == "ratings":
                v["jason_abort"] = 500
            vh.append(v)
        return istio.route_config(str(PORT), vh)

    def standalone(self) -> dict:
        """The same listener and routes as a bootstrap: the route
        configuration inline, STATIC clusters, less Istio's allow_any
        virtual host (its PassthroughCluster is ORIGINAL_DST, which a
        standalone config may not name)."""
        rc = json.loads(json_format.MessageToJson(self.route_config(), preserving_proto_field_name=True))
        vhosts = [v for v in rc["virtual_hosts"] if v["name"] != "allow_any"]
        lst = http_listener(f"0.0.0.0_{PORT}", "0.0.0.0", PORT, vhosts)
        # The fault filter ahead of the router, as istiod chains them: the
        # per-route abort for jason needs it (as in Envoy).
        lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"].insert(0, {
            "name": "envoy.filters.http.fault",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}})
        return bootstrap([lst], [cluster(name, *(lb_ep(ip, PORT) for ip in ips)) for name, ips in self.clusters()])

    def push(self, xds) -> int:
        """The same over ADS, as istiod sends it: EDS clusters, their
        endpoints, the per-port listener, RDS."""
        xds.set(rt.CDS, [istio.eds_cluster(name) for name, _ in self.clusters()] + [istio.passthrough_cluster()])
        xds.set(rt.EDS, [istio.cla(name, [(ip, PORT) for ip in ips]) for name, ips in self.clusters()])
        xds.set(rt.LDS, [istio.virtual_outbound(), istio.http_listener(PORT)])
        return xds.set(rt.RDS, [self.route_config()])


def start(topo: pods.Topology, governed) -> Mesh:
    """A pod per version of each service and a client pod, all under the
    governed cgroup; each service listens on its pod's address."""
    made, ips = {}, {}
    for svc, versions in CALLS.items():
        for v, calls in versions.items():
            name = f"{svc}-{v}"
            pod = topo.pod(name, parent=governed)
            p = pod.popen([sys.executable, "-c", SERVICE, name, pod.ip, str(PORT), *(f"{VIPS[c]}={c}" for c in calls)],
                          stdout=subprocess.PIPE)
            if p.stdout.readline().strip() != "listening":
                raise RuntimeError(f"{name} did not start")
            made[name], ips[name] = pod, pod.ip
    made["client"] = topo.pod("client", parent=governed)
    return Mesh(topo, made, ips)


def clients(mesh: Mesh) -> list[pods.Pod]:
    """The pods that call L7 services: their namespaces are enrolled."""
    return [mesh.pods[n] for n in ("client", "productpage-v1", "reviews-v2", "reviews-v3")]
