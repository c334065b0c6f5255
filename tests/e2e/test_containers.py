"""Containers under real podman with kmesh-cni chained into a test CNI
network: a container is enrolled by the runtime's own CNI call, with no
manual step; a bypass label keeps one out; removing it leaves nothing."""
from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time

import pytest

from tests.support import containers, harness
from tests.support import envoy as e

VIP_PORT = 80


@pytest.fixture(autouse=True, scope="module")
def _podman_here():
    why = containers.available()
    if why:
        pytest.fail(why)


@pytest.fixture(scope="session")
def busybox():
    image = containers.build_busybox()
    yield image
    containers.remove_image(image)


@pytest.fixture(scope="session")
def image_and_archive(tmp_path_factory):
    """The README's ``./build.sh image TAG ARCHIVE``, from this tree (about
    2 minutes); KMESH_TEST_IMAGE names one already built instead (kept)."""
    if os.environ.get("KMESH_TEST_IMAGE"):
        yield os.environ["KMESH_TEST_IMAGE"], None
        return
    archive = tmp_path_factory.mktemp("image") / "kmesh.tar"
    tag = containers.build_image(archive=archive)
    yield tag, archive
    containers.remove_image(tag)


@pytest.fixture(scope="session")
def kmesh_image(image_and_archive):
    return image_and_archive[0]


def test_the_image_archive_is_an_oci_archive_of_the_tag(image_and_archive):
    """ARCHIVE: what ``ctr images import`` or ``podman load`` takes."""
    tag, archive = image_and_archive
    if archive is None:
        pytest.skip("KMESH_TEST_IMAGE: no archive was built in this run")
    with tarfile.open(archive) as t:
        layout = json.load(t.extractfile("oci-layout"))
        index = json.load(t.extractfile("index.json"))
    assert layout["imageLayoutVersion"] == "1.0.0"
    (manifest,) = index["manifests"]
    assert manifest["annotations"]["org.opencontainers.image.ref.name"] == tag


def httpd(pm: containers.Podman, image: str, name: str, ip: str) -> str:
    """A container answering ``name`` over HTTP on ip:8080 (busybox httpd),
    at / and at /v1 and /v2."""
    return pm.run(name, image, "sh", "-c", f"mkdir -p /www && for f in index.html v1 v2; do echo {name} > /www/$f; "
                  "done && exec httpd -f -p 8080 -h /www", ip=ip, cni_args="istio.io/dataplane-mode=none")


def fetch(pm: containers.Podman, name: str, host: str, port: int, path: str = "/") -> subprocess.CompletedProcess:
    """GET ``path`` from inside container ``name``; stdout is the body's last
    line. (busybox nc: Debian's static busybox wget crashes in a container.)"""
    r = pm.exec(name, "sh", "-c", f"printf 'GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n' | "
                f"nc -w 3 {host} {port}",
                check=False)
    r.raw = r.stdout
    lines = r.stdout.strip().splitlines()
    if r.returncode == 0 and not (lines and lines[0].startswith("HTTP/1.") and " 200 " in lines[0]):
        r.returncode = 1
    r.stdout = lines[-1].strip() if lines else ""
    return r


def workloads(k) -> list[dict]:
    return [w for w in k.get("/workloads")["workloads"] if w["kind"] == "netns"]


def test_the_cni_plugin_enrolls_a_new_container_and_bypasses_a_labelled_one(kmesh, cgroup, tmp_path, busybox):
    with containers.podman(tmp_path / "pm", cgroup) as pm:
        vip = f"10.203.{pm.subnet.rsplit('.', 1)[1]}.1"
        a, b = pm.ip(10), pm.ip(11)
        k = kmesh(e.bootstrap([e.tcp_listener("svc", vip, VIP_PORT)],
                              [e.cluster("c1", e.lb_ep(a, 8080), e.lb_ep(b, 8080))]),
                  extra_args=("-workloads=enrolled",))
        pm.install_cni({"admin_socket": str(k.admin_socket)})
        httpd(pm, busybox, "A", a)
        httpd(pm, busybox, "B", b)
        # The backends carry the bypass label: CNI told kmesh so.
        assert {w["path"]: w["mode"] for w in workloads(k)} == {
            pm.netns(f"{pm.network}-A"): "bypass", pm.netns(f"{pm.network}-B"): "bypass"}

        client = pm.run("client", busybox, "sleep", "3600")
        ns = pm.netns(client)
        assert ns.startswith("/run/netns/") and {"path": ns, "mode": "enrolled"}.items() <= \
            next(w for w in workloads(k) if w["path"] == ns).items()
        got = []
        for _ in range(4):
            r = fetch(pm, client, vip, VIP_PORT)
            assert r.returncode == 0, r.stderr
            got.append(r.stdout.strip())
        assert sorted(got) == ["A", "A", "B", "B"]          # round robin, exact

        # The bypass label: the same connect is not redirected, and fails
        # inside the network (no route to the VIP).
        other = pm.run("bypassed", busybox, "sleep", "3600", cni_args="IgnoreUnknown=1;istio.io/dataplane-mode=none")
        assert next(w for w in workloads(k) if w["path"] == pm.netns(other))["mode"] == "bypass"
        r = fetch(pm, other, vip, VIP_PORT)
        assert r.returncode != 0 and "unreachable" in r.stderr.lower(), r.stderr
        assert fetch(pm, other, a, 8080).stdout.strip() == "A"   # its own traffic is its own

        # Removed: CNI DEL unenrolls at once (not the daemon's 5 s sweep).
        for name in (client, other):
            path = pm.netns(name)
            pm.rm(name)
            assert path not in {w["path"] for w in workloads(k)}
        log = [json.loads(line) for line in pm.cni_log.read_text().splitlines()]
        assert [x["event"] for x in log].count("enrolled") == 1 and [x["event"] for x in log].count("unenrolled") == 2
        pm.rm(f"{pm.network}-A")
        pm.rm(f"{pm.network}-B")
        assert workloads(k) == [] and not list(pm.cni_state.iterdir())


def test_kmesh_down_fails_a_container_start_only_when_fail_closed(cgroup, tmp_path, busybox):
    """Fail open (the default): kmesh down does not stop a container; with
    fail_closed the runtime's start fails and says why."""
    with containers.podman(tmp_path / "pm", cgroup) as pm:
        pm.install_cni({"admin_socket": str(tmp_path / "nobody.sock"), "timeout": 0.5})
        c = pm.run("open", busybox, "sleep", "3600")
        assert pm.podman("inspect", "--format", "{{.State.Running}}", c) == "true"
        assert "kmesh unreachable" in pm.cni_log.read_text()
        pm.install_cni({"admin_socket": str(tmp_path / "nobody.sock"), "timeout": 0.5, "fail_closed": True})
        with pytest.raises(RuntimeError) as err:
            pm.run("closed", busybox, "sleep", "3600")
        assert "fail_closed is true" in str(err.value)


LOOP = """ok=0; failed=0
while [ ! -e /stop ]; do
  if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {vip} {port} | head -1 | grep -q ' 200 '; then
    ok=$((ok+1)); else failed=$((failed+1)); fi
done
echo "$ok $failed"
"""


def test_the_image_runs_as_a_daemonset_pod_would_and_restarts_under_load_without_a_failed_connection(
        cgroup, tmp_path, busybox, kmesh_image):
    """kmesh's image under podman (host network and PID, the host's bpffs,
    cgroups and /run/netns, capabilities, not --privileged) with kmesh-cni:
    L4 and per-request L7 from a CNI container, the same checks as the host
    daemon's; a container restart under a client loop fails no connection
    and takes the pins (routes, enrollments) over."""
    with containers.podman(tmp_path / "pm", cgroup) as pm:
        third = pm.subnet.rsplit(".", 1)[1]
        vip, vip7 = f"10.203.{third}.1", f"10.203.{third}.2"
        a, b = pm.ip(10), pm.ip(11)
        routes = [{"match": {"prefix": "/v1"}, "route": {"cluster": "ca"}},
                  {"match": {"prefix": "/"}, "route": {"cluster": "cb"}}]
        cfg = e.bootstrap([e.tcp_listener("svc", vip, VIP_PORT),
                           e.http_listener("web", vip7, VIP_PORT, [{"name": "vh", "domains": ["*"],
                                                                     "routes": routes}])],
                          [e.cluster("c1", e.lb_ep(a, 8080), e.lb_ep(b, 8080)),
                           e.cluster("ca", e.lb_ep(a, 8080)), e.cluster("cb", e.lb_ep(b, 8080))])
        k = containers.ContainerKmesh(cgroup, tmp_path / "kmesh.yaml", extra_args=("-workloads=enrolled",),
                                      pm=pm, name=f"{pm.network}-kmesh", image=kmesh_image)
        try:
            k.write_config(cfg)
            k.start()
            assert k.attached_programs() == harness.PROGRAMS
            # The DaemonSet's probe, and a read as the image's non-root user.
            assert pm.podman("exec", k.name, "/usr/bin/kmeshctl", f"--admin=127.0.0.1:{k.admin_port}",
                             "ready") == "ready"
            assert "kmesh-daemon" in pm.podman("run", "--rm", "--network", "host", "--user", "kmesh",
                                               f"--cgroup-parent={k.cgroup_parent}",
                                               "--entrypoint", "/usr/bin/kmeshctl", kmesh_image,
                                               f"--admin=127.0.0.1:{k.admin_port}", "version")
            pm.install_cni({"admin_socket": str(k.admin_socket)})
            httpd(pm, busybox, "A", a)
            httpd(pm, busybox, "B", b)
            client = pm.run("client", busybox, "sleep", "3600")

            def smoke():
                got = sorted(fetch(pm, client, vip, VIP_PORT).stdout for _ in range(4))
                assert got == ["A", "A", "B", "B"]
                for path, want in (("/v1", "A"), ("/v2", "B"), ("/v1", "A")):
                    r = fetch(pm, client, vip7, VIP_PORT, path)
                    assert (r.returncode, r.stdout) == (0, want), (r.raw, r.stderr, k.log()[-3000:])

            smoke()
            before = {w["path"]: w["mode"] for w in workloads(k)}
            assert before[pm.netns(client)] == "enrolled"

            loop = subprocess.Popen(["podman", "exec", client, "sh", "-c", LOOP.format(vip=vip, port=VIP_PORT)],
                                    stdout=subprocess.PIPE, text=True, env=pm.env)
            time.sleep(1)
            assert k.stop() == 0
            time.sleep(1)                      # connects go on with no daemon at all
            k.start()
            time.sleep(1)
            pm.exec(client, "touch", "/stop")
            ok, failed = map(int, loop.communicate(timeout=60)[0].split())
            assert failed == 0 and ok > 20, (ok, failed, k.log()[-4000:])
            assert "takeover=True" in k.log()
            assert {w["path"]: w["mode"] for w in workloads(k)} == before
            smoke()
        finally:
            k.teardown()
