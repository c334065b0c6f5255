"""ADS mode end to end: a real grpc management server pushes Istio-shaped
resources; kmesh-daemon turns them into map records; curl inside the test
cgroup follows the pushes. VIPs are loopback addresses."""
from __future__ import annotations

import collections
import signal
import subprocess
import time

from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import any_pb2

from kmesh.bpf import records
from kmesh.xds import resources as rt
from tests.e2e.test_l4 import vip
from tests.support import harness, istio

PORT = 9080
REVIEWS = "reviews.default.svc.cluster.local"
R1, R2 = istio.outbound(PORT, REVIEWS, "v1"), istio.outbound(PORT, REVIEWS, "v2")


def push_reviews(xds, v, a, b, weights=(80, 20), extra_vhosts=(), plain=False):
    xds.set(rt.CDS, [istio.eds_cluster(R1), istio.eds_cluster(R2), istio.passthrough_cluster()])
    xds.set(rt.EDS, [istio.cla(R1, [a.addr]), istio.cla(R2, [b.addr])])
    xds.set(rt.LDS, [istio.virtual_outbound(), istio.http_listener(PORT)])
    return xds.set(rt.RDS, [istio.route_config(str(PORT), [
        {"host": REVIEWS, "vip": v, "port": PORT, "weighted": [(R1, weights[0]), (R2, weights[1])], "plain": plain},
        *extra_vhosts])])


def wait_applied(k, pred, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not applied in time: {k.get('/controller/envoy')['xds']}")


def share(counter, name):
    return counter[name] / sum(counter.values())


def test_traffic_follows_pushes(kmesh, cgroup, backends, xds):
    a, b, c = backends("A", "B", "C")
    v, v2 = vip(), vip()
    push_reviews(xds, v, a, b)
    k = kmesh({}, ads=xds.address)
    st = k.get("/controller/envoy")
    assert st["mode"] == "ads" and st["xds"]["connection"]["state"] == "connected" and st["xds"]["synced"]
    assert xds.requests[0].node_id.startswith("sidecar~")
    got = collections.Counter(cgroup.curl(f"http://{v}:{PORT}/[1-1000]"))
    assert abs(share(got, "A") - 0.8) <= 0.065, got   # binomial, n=1000: P(fail) < 5e-7

    # weights 80/20 -> 20/80
    ver = xds.set(rt.RDS, [istio.route_config(str(PORT), [
        {"host": REVIEWS, "vip": v, "port": PORT, "weighted": [(R1, 20), (R2, 80)]}])])
    xds.wait_ack(rt.RDS, ver)
    got = collections.Counter(cgroup.curl(f"http://{v}:{PORT}/[1-1000]"))
    assert abs(share(got, "A") - 0.2) <= 0.065, got   # binomial, n=1000: P(fail) < 4e-7

    # add a service (TCP listener of its own) and an endpoint to v2
    details = istio.outbound(PORT, "details.default.svc.cluster.local")
    xds.set(rt.CDS, [istio.eds_cluster(R1), istio.eds_cluster(R2), istio.eds_cluster(details),
                     istio.passthrough_cluster()])
    xds.set(rt.EDS, [istio.cla(R2, [b.addr, c.addr]), istio.cla(details, [c.addr])], replace=False)
    ver = xds.set(rt.LDS, [istio.virtual_outbound(), istio.http_listener(PORT), istio.tcp_listener(v2, PORT, details)])
    xds.wait_ack(rt.LDS, ver)
    wait_applied(k, lambda: f"{v2}:{PORT}" in k.get("/bpf/kmesh/maps")["km_listener"])
    assert cgroup.curl(f"http://{v2}:{PORT}/[1-3]") == ["C"] * 3
    got = collections.Counter(cgroup.curl(f"http://{v}:{PORT}/[1-400]"))
    assert set(got) == {"A", "B", "C"}

    # remove an endpoint: C leaves v2 of reviews
    ver = xds.set(rt.EDS, [istio.cla(R2, [b.addr])], replace=False)
    xds.wait_ack(rt.EDS, ver)
    assert set(cgroup.curl(f"http://{v}:{PORT}/[1-200]")) == {"A", "B"}

    # remove the details service
    ver = xds.set(rt.LDS, [istio.virtual_outbound(), istio.http_listener(PORT)])
    xds.wait_ack(rt.LDS, ver)
    r = cgroup.run(["curl", "-sS", "--max-time", "5", f"http://{v2}:{PORT}/"])
    assert r.returncode == 7   # untouched again: nothing listens on the loopback VIP

    # SIGTERM in ADS mode: the stream is closed; the programs fail static
    assert k.stop() == 0
    assert sorted(k.attached_programs()) == harness.PROGRAMS
    # the kernel's catch-all, 20/80: both seen in 70 draws but with P = 0.8^70 + 0.2^70 < 2e-7
    assert set(cgroup.curl(f"http://{v}:{PORT}/[1-70]")) == {"A", "B"}


def test_bad_resource_nacked_old_config_serves(kmesh, cgroup, backends, xds):
    a, b = backends("A", "B")
    v = vip()
    push_reviews(xds, v, a, b, weights=(100, 0))
    k = kmesh({}, ads=xds.address)
    bad = cluster_pb2.Cluster(name="outbound|1||bad", type=cluster_pb2.Cluster.STATIC)
    ep = bad.load_assignment.endpoints.add().lb_endpoints.add()
    ep.endpoint.address.socket_address.address = "127.0.0.1"
    ep.endpoint.address.socket_address.port_value = 70000 - 65536 + 1   # fine
    ep.load_balancing_weight.value = 0                                   # Envoy refuses this
    xds.set(rt.CDS, [bad, istio.eds_cluster(R1), istio.eds_cluster(R2)])
    nack = xds.wait_nack(rt.CDS)
    assert "CDS[outbound|1||bad]" in nack.error and "load_balancing_weight" in nack.error
    # garbage of the wrong type gets a NACK too
    wrong = any_pb2.Any()
    wrong.Pack(istio.cla(R1, [a.addr]))
    xds.send_raw(rt.LDS, [wrong])
    assert "in a LDS response" in xds.wait_nack(rt.LDS).error
    assert cgroup.curl(f"http://{v}:{PORT}/[1-5]") == ["A"] * 5
    state = k.get("/controller/envoy")["xds"]["types"]
    assert state["CDS"]["last_nack"]["error"] and state["CDS"]["version_info"] == "1"
    assert "xDS response rejected" in k.log()


def test_control_plane_gone_for_30s_then_reconcile(kmesh, cgroup, backends, xds):
    a, b = backends("A", "B")
    v = vip()
    push_reviews(xds, v, a, b, weights=(100, 0))
    k = kmesh({}, ads=xds.address)
    load = cgroup.load(v, PORT, 300)
    try:
        xds.stop()
        wait_applied(k, lambda: k.get("/controller/envoy")["xds"]["connection"]["state"] != "connected")
        time.sleep(30)
        # the control plane comes back with a change made while it was away
        push_reviews(xds, v, a, b, weights=(0, 100))
        xds.start()
        wait_applied(k, lambda: cgroup.curl(f"http://{v}:{PORT}/[1-10]") == ["B"] * 10, timeout=60)
    finally:
        report = load.report()
    assert report["failed"] == 0 and report["ok"] > 100, report
    assert k.get("/controller/envoy")["xds"]["connection"]["streams"] == 2


def test_daemon_restart_in_ads_mode(kmesh, cgroup, backends, xds):
    a, b = backends("A", "B")
    v = vip()
    # Decided at connect(): the kernel keeps routing while no daemon runs (a
    # per-request route needs the daemon: docs/l7.md, "Without L7").
    push_reviews(xds, v, a, b, weights=(50, 50), plain=True)
    k = kmesh({}, ads=xds.address)
    load = cgroup.load(v, PORT, 8)
    k.stop(signal.SIGKILL)
    time.sleep(1)
    k.start()
    assert "takeover=True" in k.log()
    report = load.report(stop=False)
    assert report["failed"] == 0 and set(report["bodies"]) == {"A", "B"}, report
    assert k.get("/status")["last_update"]["changes"] == {
        "clusters_written": 0, "listeners_written": 0, "listeners_deleted": 0, "clusters_deleted": 0}


def test_layout_migration_in_ads_mode_waits_for_the_control_plane(kmesh, cgroup, backends, xds):
    """Pins of another layout, and no control plane at start: the old
    programs keep serving until the first full config fills the new maps."""
    a, b = backends("A", "B")
    v = vip()
    push_reviews(xds, v, a, b, weights=(50, 50), plain=True)   # the kernel's routes: no daemon in the path
    k = kmesh({}, ads=xds.address)
    k.stop(signal.SIGTERM)
    k.stamp_layout(0)
    xds.stop()
    k.extra_args = ("-xds-ready-timeout=2",)
    load = cgroup.load(v, PORT, 8)
    k.start()
    assert "switching once the control plane" in k.log()
    assert (k.pin_root / "staging").is_dir() and k.pinned_layout() == 0
    xds.start()   # same port
    wait_applied(k, lambda: "pinned maps migrated" in k.log(), timeout=45)
    report = load.report(stop=False)
    assert report["failed"] == 0 and set(report["bodies"]) == {"A", "B"}, report
    assert k.pinned_layout() == records.KMESH_LAYOUT_VERSION and not (k.pin_root / "staging").exists()
    # 50/50: one backend alone in 25 draws with P = 2 * 0.5^25 < 6e-8
    assert set(cgroup.curl(f"http://{v}:{PORT}/[1-25]")) == {"A", "B"}


def test_ready_after_timeout_without_control_plane(kmesh, cgroup):
    port = harness.dead_port()   # nothing listens there
    t0 = time.monotonic()
    k = kmesh({}, ads=f"127.0.0.1:{port}", extra_args=("-xds-ready-timeout=2",))
    assert time.monotonic() - t0 >= 2
    st = k.get("/controller/envoy")["xds"]
    assert st["synced"] is False and st["connection"]["state"] in ("connecting", "disconnected")
    assert "no full config from the control plane yet" in k.log()


def test_address_from_bootstrap_ads_config_and_static_resources(kmesh, cgroup, backends, xds):
    a, b = backends("A", "B")
    v, static_vip = vip(), vip()
    push_reviews(xds, v, a, b, weights=(100, 0))
    host, port = xds.address.split(":")
    cfg = {
        "dynamic_resources": {"ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                                             "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
                              "cds_config": {"ads": {}, "resource_api_version": "V3"},
                              "lds_config": {"ads": {}, "resource_api_version": "V3"}},
        "static_resources": {
            "clusters": [
                {"name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                    "cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": host, "port_value": int(port)}}}}]}]}},
                {"name": "static-b", "load_assignment": {"cluster_name": "static-b", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": b.port}}}}]}]}},
            ],
            "listeners": [{"name": "static", "address": {"socket_address": {"address": static_vip, "port_value": 80}},
                           "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {
                               "@type": istio.TCP, "stat_prefix": "s", "cluster": "static-b"}}]}]}],
        },
    }
    k = kmesh(cfg, ads="")   # ADS mode (the default), no -xds-address: the bootstrap names the server
    st = k.get("/controller/envoy")["xds"]
    assert st["server"] == xds.address and st["server_from"] == "bootstrap"
    assert cgroup.curl(f"http://{v}:{PORT}/") == ["A"]          # from ADS
    assert cgroup.curl(f"http://{static_vip}/") == ["B"]        # static alongside


def test_tls_to_the_control_plane(kmesh, cgroup, backends, tmp_path):
    """A TLS control plane (CA file), as istiod serves on 15012."""
    from tests.support.xds_server import XdsServer

    key, cert = tmp_path / "server.key", tmp_path / "server.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=istiod.test", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    server = XdsServer(tls=(key.read_bytes(), cert.read_bytes())).start()
    try:
        a, b = backends("A", "B")
        v = vip()
        push_reviews(server, v, a, b, weights=(100, 0))
        k = kmesh({}, ads=server.address, extra_args=(f"-xds-ca-file={cert}",))
        st = k.get("/controller/envoy")["xds"]
        assert st["tls"] is True and st["synced"] is True
        assert cgroup.curl(f"http://{v}:{PORT}/") == ["A"]
    finally:
        server.stop()


def test_tls_with_wrong_ca_is_refused_and_retried(kmesh, cgroup, tmp_path):
    from tests.support.xds_server import XdsServer

    key, cert, other = tmp_path / "k", tmp_path / "c", tmp_path / "other.pem"
    for out_key, out_cert, cn in ((key, cert, "istiod.test"), (tmp_path / "ok", other, "someone-else")):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        f"/CN={cn}", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(out_key),
                        "-out", str(out_cert)], capture_output=True, check=True)
    server = XdsServer(tls=(key.read_bytes(), cert.read_bytes())).start()
    try:
        k = kmesh({}, ads=server.address, extra_args=(f"-xds-ca-file={other}", "-xds-ready-timeout=2"))
        st = k.get("/controller/envoy")["xds"]
        assert st["synced"] is False and st["connection"]["error"], st
        assert not server.requests
    finally:
        server.stop()
