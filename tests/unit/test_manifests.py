"""deploy/kmesh.yaml: every object valid against the Kubernetes schemas
(kubernetes-validate, strict), and the DaemonSet consistent with what the
podman tests run: the same capabilities, flags the daemon accepts, and an
install-cni command that really chains kmesh-cni into a node's config."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kmesh.cli.daemon import main as daemon_main
from kmesh.cni import install
from tests.support import containers

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kmesh.yaml"
DOCS = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
# The oldest Kubernetes still supported upstream when this was written, and the newest schemas at hand.
VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]


def kind(k: str) -> dict:
    return next(d for d in DOCS if d["kind"] == k)


DS = kind("DaemonSet")
POD = DS["spec"]["template"]["spec"]
CONFIG = kind("ConfigMap")["data"]


def expand(args: list[str], env: list[dict]) -> list[str]:
    """$(VAR) in args as kubelet expands them, from the ConfigMap (other
    sources: a stand-in value)."""
    values = {}
    for e in env:
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        values[e["name"]] = CONFIG[ref["key"]] if ref else e.get("value", "192.0.2.7")
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in args]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_each_object_validates_against_the_kubernetes_schemas(doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_objects_are_the_cluster_mode_set():
    assert sorted(d["kind"] for d in DOCS) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet",
                                              "Namespace", "ServiceAccount"]
    rules = kind("ClusterRole")["rules"]
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in rules)     # read only
    assert POD["serviceAccountName"] == kind("ServiceAccount")["metadata"]["name"]


def test_the_daemon_runs_with_the_capabilities_the_podman_tests_give_it_and_no_more():
    (c,) = POD["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["capabilities"]["add"] == list(containers.CAPS)
    assert POD["hostNetwork"] and POD["hostPID"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert {"/sys/fs/bpf", "/sys/fs/cgroup", "/run/kmesh", "/run/netns"} <= set(mounts)
    assert mounts["/run/netns"]["mountPropagation"] == "HostToContainer"     # namespaces made after start
    init = POD["initContainers"][0]["securityContext"]
    assert init["capabilities"] == {"drop": ["ALL"]} and init["allowPrivilegeEscalation"] is False


def test_the_daemons_flags_are_ones_it_accepts():
    (c,) = POD["containers"]
    args = expand(c["args"], c["env"])
    ctx = daemon_main.make_context("kmesh-daemon", list(args))
    assert ctx.params["workloads"] == "enrolled" and ctx.params["xds_address"] == CONFIG["xds-address"]
    assert ctx.params["admin_socket"] in [a.split("=", 2)[2].strip('"') for a in POD["initContainers"][0]["args"]
                                          if a.startswith("--set=admin_socket=")]


def test_the_install_cni_command_chains_the_plugin_into_a_node(tmp_path, monkeypatch):
    """The init container's command, run against a stand-in node (its
    /opt/cni/bin and /etc/cni/net.d) with a stand-in service account."""
    init = POD["initContainers"][0]
    node = {"/host/opt/cni/bin": tmp_path / "bin", "/host/etc/cni/net.d": tmp_path / "net.d"}
    for d in node.values():
        d.mkdir()
    (node["/host/etc/cni/net.d"] / "10-flannel.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "cbr0",
        "plugins": [{"type": "flannel", "delegate": {"isDefaultGateway": True}}, {"type": "portmap"}]}))
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("t0ken")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(install, "SA_DIR", sa)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    args = expand(init["args"], init["env"])
    for host_path, there in node.items():
        args = [a.replace(host_path, str(there)) for a in args]
    args = [f"--python={sys.executable}" if a.startswith("--python=") else a for a in args]
    assert init["command"] == ["/usr/bin/kmesh-cni", "install"]
    assert install.main(["install", *args]) == 0
    got = json.loads((node["/host/etc/cni/net.d"] / "10-flannel.conflist").read_text())
    entry = got["plugins"][-1]
    assert [p["type"] for p in got["plugins"]] == ["flannel", "portmap", "kmesh-cni"]
    assert entry["enroll"] == "labelled" and entry["fail_closed"] is False
    assert entry["kubernetes"] == {"api": "https://10.96.0.1:443", "token_file": "/etc/cni/net.d/kmesh-cni.d/token",
                                   "ca_file": "/etc/cni/net.d/kmesh-cni.d/ca.crt"}
    assert (node["/host/etc/cni/net.d"] / "kmesh-cni.d" / "token").read_text() == "t0ken"
    r = subprocess.run([str(node["/host/opt/cni/bin"] / "kmesh-cni")], input="", capture_output=True, text=True,
                       env={"CNI_COMMAND": "VERSION"})
    assert r.returncode == 0 and "1.0.0" in r.stdout


def test_the_validation_is_not_vacuous():
    import copy

    bad = copy.deepcopy(DS)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = copy.deepcopy(DS)
    bad["spec"]["template"]["spec"]["hostPID"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
