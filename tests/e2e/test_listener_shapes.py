"""L4 or L7 (docs/l7.md): a route configuration is decided at connect time
exactly when the virtual host a connection addresses cannot route its
requests differently, with the same rule behind a VIP-specific and a
wildcard listener. Checked side by side with Envoy on the same config and
the same requests."""
from __future__ import annotations

import subprocess

import pytest

from tests.e2e.test_l4 import vip
from tests.e2e.test_l7 import curl
from tests.support import envoy_proc
from tests.support.envoy import bootstrap, cluster, http_listener, lb_ep
from tests.support.harness import free_port

# What istiod puts on every outbound route (tests/fixtures/istio).
RETRY = {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
         "num_retries": 2, "host_selection_retry_max_attempts": "5"}


def kube_dns(v: str, port: int, retry: bool = False) -> dict:
    """The shape of Istio's VIP-specific listener 10.96.0.10_9153: one virtual
    host named for the service, its VIP among the domains, one prefix '/'
    route to one cluster (with istiod's retry policy, or none: a
    VirtualService with ``retries: {attempts: 0}``)."""
    svc = "kube-dns.kube-system.svc.cluster.local"
    return {"name": f"{svc}:{port}", "domains": [svc, "kube-dns.kube-system", "kube-dns", v, f"{v}:{port}"],
            "routes": [{"match": {"prefix": "/"}, "name": "default",
                        "route": {"cluster": "dns-metrics", "timeout": "0s",
                                  **({"retry_policy": RETRY} if retry else {})}}]}


def reviews(v: str, port: int) -> dict:
    """Bookinfo's reviews virtual host: end-user jason -> v2, else v1."""
    return {"name": f"reviews:{port}", "domains": ["reviews", v, f"{v}:{port}"],
            "routes": [{"match": {"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]},
                        "route": {"cluster": "reviews-v2", "timeout": "0s", "retry_policy": RETRY}},
                       {"match": {"prefix": "/"}, "route": {"cluster": "reviews-v1", "timeout": "0s",
                                                            "retry_policy": RETRY}}]}


@pytest.fixture
def shapes(backends):
    a, v1, v2 = backends("dns", "v1", "v2")
    clusters = [cluster("dns-metrics", lb_ep(*a.addr)), cluster("reviews-v1", lb_ep(*v1.addr)),
                cluster("reviews-v2", lb_ep(*v2.addr))]
    return clusters


REQUESTS = [("kube-dns", []), ("kube-dns.kube-system.svc.cluster.local", []), ("reviews", []),
            ("reviews", ["-H", "end-user: jason"]), ("other.example", [])]


@pytest.mark.parametrize("shape, retry", [("vip", False), ("wildcard", False), ("vip", True)])
def test_l4_or_l7_by_the_addressed_virtual_host_as_envoy_routes(kmesh, cgroup, tmp_path, shapes, shape, retry):
    v, port = vip(), 9153
    vhosts = [kube_dns(v, port, retry), reviews(v, port)]
    # Two VIPs, one per service, in one route configuration (as Istio's
    # per-port RDS): the kube-dns one addresses a plain virtual host, the
    # reviews one a virtual host with a header route.
    dns_vip, reviews_vip = v, vip()
    vhosts[1]["domains"] = ["reviews", reviews_vip, f"{reviews_vip}:{port}"]
    if shape == "vip":
        listeners = [http_listener("dns", dns_vip, port, vhosts), http_listener("rev", reviews_vip, port, vhosts)]
    else:
        listeners = [http_listener("wild", "0.0.0.0", port, vhosts)]
    k = kmesh(bootstrap(listeners, shapes))
    eport = free_port()
    with envoy_proc.envoy(bootstrap([http_listener("e", "127.0.0.1", eport, vhosts)], shapes), tmp_path):
        envoy_says = {(host, tuple(h)): curl_host(None, f"http://127.0.0.1:{eport}/", host, h) for host, h in REQUESTS}
        dns_says = {(host, tuple(h)): curl_host(cgroup, f"http://{dns_vip}:{port}/", host, h) for host, h in REQUESTS}
        rev_says = {(host, tuple(h)): curl_host(cgroup, f"http://{reviews_vip}:{port}/", host, h)
                    for host, h in REQUESTS}
    # Envoy routes by Host whatever the address; an unknown Host is a 404.
    assert envoy_says == {("kube-dns", ()): (200, "dns"), ("kube-dns.kube-system.svc.cluster.local", ()): (200, "dns"),
                          ("reviews", ()): (200, "v1"), ("reviews", ("-H", "end-user: jason")): (200, "v2"),
                          ("other.example", ()): (404, "")}
    # The reviews VIP addresses a virtual host whose routes read the request:
    # routed per request, exactly as Envoy, whichever the listener's shape.
    assert rev_says == envoy_says
    m = k.get("/metrics", raw=True)[1].decode()
    if retry:
        # A retry policy is a per-request action (a connection-level choice
        # cannot retry a request): the kube-dns VIP is routed per request too.
        assert dns_says == envoy_says
        assert f'kmesh_connects_total{{decision="l7_handoff"}} {2 * len(REQUESTS)}.0' in m, m
        return
    # The kube-dns VIP addresses a plain virtual host: decided at connect
    # time. Requests that name it (or its VIP) get what Envoy gives them; a
    # Host naming another virtual host, or none, is not looked at: the
    # connection is the addressed service's (docs/l7.md, "L4 or L7").
    assert {r: dns_says[r] for r in (("kube-dns", ()), ("kube-dns.kube-system.svc.cluster.local", ()))} == \
        {r: envoy_says[r] for r in (("kube-dns", ()), ("kube-dns.kube-system.svc.cluster.local", ()))}
    assert {dns_says[r] for r in (("reviews", ()), ("reviews", ("-H", "end-user: jason")), ("other.example", ()))} \
        == {(200, "dns")}
    assert f'kmesh_connects_total{{decision="l7_handoff"}} {len(REQUESTS)}.0' in m, m


def curl_host(cgroup, url: str, host: str, extra: list[str]) -> tuple[int, str]:
    args = ["-H", f"Host: {host}", *extra]
    if cgroup is None:   # Envoy's client: outside the governed cgroup
        r = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args, url],
                           capture_output=True, text=True)
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body.strip()
    return curl(cgroup, url, *args)
