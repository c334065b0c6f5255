"""kmesh-cni's logic: config, labels, the decision, the CNI protocol against
a stand-in admin socket and API server, and the installer's chaining.
(tests/e2e/test_containers.py runs it under podman with a real daemon.)"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import pytest

from kmesh.cni import install, plugin

PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
        "ips": [{"address": "10.1.0.5/24", "interface": 0}]}


def conf(**kw) -> dict:
    return plugin.parse_config(json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "kmesh-cni", **kw}))


# -- config and labels ----------------------------------------------------------
@pytest.mark.parametrize("text, code, words", [
    ("{", plugin.E_DECODE, "not JSON"),
    ("[]", plugin.E_DECODE, "not a JSON object"),
    ('{"cniVersion": "9.9.9"}', plugin.E_VERSION, "9.9.9"),
    ('{"enroll": "some"}', plugin.E_CONFIG, "enroll"),
    ('{"fail_closed": "yes"}', plugin.E_CONFIG, "fail_closed"),
    ('{"timeout": 0}', plugin.E_CONFIG, "timeout"),
    ('{"kubernetes": {"token_file": "/t"}}', plugin.E_CONFIG, "kubernetes.api"),
])
def test_bad_config_is_refused_naming_the_field(text, code, words):
    with pytest.raises(plugin.CniError) as e:
        plugin.parse_config(text)
    assert e.value.code == code and words in e.value.msg


def test_labels_come_from_cni_args_and_the_conventions_args_key():
    c = conf(args={"cni": {"labels": [{"key": "app", "value": "web"}, {"key": "istio.io/dataplane-mode",
                                                                        "value": "kmesh"}]}})
    args = plugin.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=p;istio.io/dataplane-mode=none")
    assert plugin.labels_from(c, args) == {"app": "web", "istio.io/dataplane-mode": "none"}


@pytest.mark.parametrize("enroll, pod, ns, namespace, annotations, action", [
    ("all", {}, None, "", {}, "enroll"),
    ("labelled", {}, None, "", {}, None),
    ("all", {"istio.io/dataplane-mode": "none"}, None, "", {}, "bypass"),
    ("all", {"istio.io/dataplane-mode": "NONE"}, {"istio.io/dataplane-mode": "kmesh"}, "a", {}, "bypass"),
    ("labelled", {"istio.io/dataplane-mode": "Kmesh"}, None, "", {}, "enroll"),
    ("labelled", {"istio.io/dataplane-mode": "ambient"}, None, "", {}, "enroll"),
    ("labelled", {}, {"istio.io/dataplane-mode": "kmesh"}, "a", {}, "enroll"),
    ("all", {}, {"istio.io/dataplane-mode": "none"}, "a", {}, "bypass"),
    ("all", {"istio.io/dataplane-mode": "kmesh"}, None, "kube-system", {}, "bypass"),
    ("all", {}, None, "a", {"sidecar.istio.io/status": "{}"}, "bypass"),
])
def test_the_decision_follows_istio_ambients_labels(enroll, pod, ns, namespace, annotations, action):
    assert plugin.decide(conf(enroll=enroll), pod, ns, namespace, annotations)[0] == action


def test_add_passes_the_previous_result_through_in_the_configs_version():
    c = conf(prevResult=PREV)
    c["cniVersion"] = "0.4.0"
    assert plugin.passthrough(c) == {**PREV, "cniVersion": "0.4.0"}


def test_version_names_the_specs():
    code, out = plugin.run({"CNI_COMMAND": "VERSION"}, "")
    assert code == 0 and json.loads(out) == {"cniVersion": "1.0.0", "supportedVersions": list(plugin.SPEC_VERSIONS)}


def test_an_unknown_command_is_an_error_in_the_specs_shape():
    code, out = plugin.run({"CNI_COMMAND": "GC"}, json.dumps({"cniVersion": "1.0.0"}))
    assert code == 1 and json.loads(out)["code"] == plugin.E_ENV


# -- the protocol against a stand-in admin socket --------------------------------
class FakeDaemon:
    """An admin API on a Unix socket that records what it is asked."""

    def __init__(self, path: Path, status: int = 200):
        self.path, self.status, self.calls = path, status, []
        self.workloads: list[dict] = []
        fake = self

        class H(BaseHTTPRequestHandler):
            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                fake.calls.append(self.path)
                action, _, q = self.path.rpartition("?")
                netns = q.partition("=")[2].replace("%2F", "/")
                if fake.status == 200 and not action.endswith("unenroll"):
                    fake.workloads.append({"kind": "netns", "path": netns,
                                           "mode": "enrolled" if action.endswith("enroll") else "bypass"})
                self._reply(fake.status, {"error": "nope"} if fake.status != 200 else {})

            def do_GET(self):
                self._reply(200, {"workloads": fake.workloads})

            def log_message(self, *a):
                pass

        class S(ThreadingHTTPServer):
            address_family = socket.AF_UNIX

            def server_bind(self):
                self.socket.bind(str(fake.path))

            def get_request(self):
                s, _ = self.socket.accept()
                return s, ("local", 0)

        self.server = S(str(path), H)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def daemon(tmp_path):
    d = FakeDaemon(tmp_path / "admin.sock")
    yield d
    d.close()


def env(cmd: str, netns: str = "/run/netns/cni-1", cid: str = "c1", args: str = "") -> dict:
    return {"CNI_COMMAND": cmd, "CNI_NETNS": netns, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
            "CNI_ARGS": args}


def stdin(tmp_path, **kw) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "kmesh-cni", "prevResult": PREV,
                       "admin_socket": str(tmp_path / "admin.sock"), "state_dir": str(tmp_path / "state"),
                       "timeout": 0.3, **kw})


def test_add_enrolls_check_finds_it_del_unenrolls_from_the_state_it_kept(tmp_path, daemon):
    code, out = plugin.run(env("ADD"), stdin(tmp_path))
    assert code == 0 and json.loads(out) == PREV
    assert daemon.calls == ["/workloads/enroll?netns=%2Frun%2Fnetns%2Fcni-1"]
    assert plugin.run(env("CHECK"), stdin(tmp_path)) == (0, "")
    # DEL after the namespace is gone: the runtime may pass no CNI_NETNS.
    assert plugin.run(env("DEL", netns=""), stdin(tmp_path)) == (0, "")
    assert daemon.calls[-1] == "/workloads/unenroll?netns=%2Frun%2Fnetns%2Fcni-1"
    assert not list((tmp_path / "state").iterdir())


def test_a_bypass_label_in_cni_args_bypasses(tmp_path, daemon):
    code, _ = plugin.run(env("ADD", args="IgnoreUnknown=1;istio.io/dataplane-mode=none"), stdin(tmp_path))
    assert code == 0 and daemon.calls == ["/workloads/bypass?netns=%2Frun%2Fnetns%2Fcni-1"]


def test_check_reports_a_workload_that_is_not_as_add_left_it(tmp_path, daemon):
    plugin.run(env("ADD"), stdin(tmp_path))
    daemon.workloads.clear()
    code, out = plugin.run(env("CHECK"), stdin(tmp_path))
    assert code == 1 and json.loads(out)["code"] == plugin.E_CHECK


def test_kmesh_down_fails_open_by_default_and_closed_when_configured(tmp_path):
    code, out = plugin.run(env("ADD"), stdin(tmp_path))
    assert code == 0 and json.loads(out) == PREV
    code, out = plugin.run(env("ADD"), stdin(tmp_path, fail_closed=True))
    err = json.loads(out)
    assert code == 1 and err["code"] == plugin.E_TRY_LATER and "fail_closed" in err["msg"]
    assert plugin.run(env("DEL"), stdin(tmp_path, fail_closed=True)) == (0, "")   # DEL never fails


def test_a_refusal_fails_only_a_fail_closed_add(tmp_path, daemon):
    daemon.status = 400
    assert plugin.run(env("ADD"), stdin(tmp_path))[0] == 0
    code, out = plugin.run(env("ADD"), stdin(tmp_path, fail_closed=True))
    assert code == 1 and json.loads(out)["code"] == plugin.E_KMESH and "HTTP 400" in json.loads(out)["msg"]


def test_labels_and_namespace_labels_are_read_from_the_kubernetes_api(tmp_path, daemon):
    objects = {
        "/api/v1/namespaces/shop/pods/web-1": {"metadata": {"labels": {"app": "web"}}},
        "/api/v1/namespaces/shop": {"metadata": {"labels": {"istio.io/dataplane-mode": "kmesh"}}},
        "/api/v1/namespaces/shop/pods/db-1": {"metadata": {"labels": {"istio.io/dataplane-mode": "none"}}},
    }
    seen = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            body = json.dumps(objects.get(self.path, {})).encode()
            self.send_response(200 if self.path in objects else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    api = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=api.serve_forever, args=(0.05,), daemon=True).start()
    try:
        (tmp_path / "token").write_text("s3cret\n")
        k8s = {"api": f"http://127.0.0.1:{api.server_port}", "token_file": str(tmp_path / "token")}
        std = stdin(tmp_path, enroll="labelled", kubernetes=k8s)
        args = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=x"
        assert plugin.run(env("ADD", args=args), std)[0] == 0
        assert daemon.calls[-1].startswith("/workloads/enroll?")      # by the namespace's label
        assert plugin.run(env("ADD", cid="c2", args=args.replace("web-1", "db-1")), std)[0] == 0
        assert daemon.calls[-1].startswith("/workloads/bypass?")      # the pod's label wins
        assert seen and set(seen) == {"Bearer s3cret"}
        # The API unreachable: left to the daemon's scope, or refused when fail closed.
        n = len(daemon.calls)
        bad = stdin(tmp_path, kubernetes={"api": "http://127.0.0.1:1"})
        assert plugin.run(env("ADD", cid="c3", args=args), bad)[0] == 0 and len(daemon.calls) == n
        code, out = plugin.run(env("ADD", cid="c3", args=args), stdin(tmp_path, fail_closed=True,
                                                                      kubernetes={"api": "http://127.0.0.1:1"}))
        assert code == 1 and json.loads(out)["code"] == plugin.E_TRY_LATER
    finally:
        api.shutdown()
        api.server_close()


# -- the installer ------------------------------------------------------------------
BRIDGE = {"cniVersion": "1.0.0", "name": "podnet",
          "plugins": [{"type": "bridge", "bridge": "br0", "ipam": {"type": "host-local"}},
                      {"type": "portmap", "capabilities": {"portMappings": True}}]}


def test_chaining_appends_once_and_unchaining_restores():
    entry = {"type": "kmesh-cni", "enroll": "labelled"}
    once = install.chained(BRIDGE, entry)
    assert [p["type"] for p in once["plugins"]] == ["bridge", "portmap", "kmesh-cni"]
    assert install.chained(once, {"type": "kmesh-cni"})["plugins"][-1] == {"type": "kmesh-cni"}
    assert len(install.chained(once, entry)["plugins"]) == 3
    assert install.unchained(once) == BRIDGE


def test_a_single_plugin_conf_becomes_a_conflist():
    single = {"cniVersion": "0.4.0", "name": "old", "type": "bridge", "bridge": "b"}
    out = install.chained(single, {"type": "kmesh-cni"})
    assert out == {"cniVersion": "0.4.0", "name": "old",
                   "plugins": [{"type": "bridge", "bridge": "b"}, {"type": "kmesh-cni"}]}


def test_install_puts_a_standalone_plugin_and_chains_it(tmp_path):
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    (conf_dir / "10-podnet.conflist").write_text(json.dumps(BRIDGE))
    (conf_dir / "20-other.conflist").write_text(json.dumps({**BRIDGE, "name": "other"}))
    argv = ["install", f"--bin-dir={bin_dir}", f"--conf-dir={conf_dir}", f"--python={sys.executable}",
            "--set", 'enroll="labelled"', "--set", "fail_closed=true"]
    assert install.main(argv) == 0 and install.main(argv) == 0
    got = json.loads((conf_dir / "10-podnet.conflist").read_text())
    assert got["plugins"][-1] == {"type": "kmesh-cni", "enroll": "labelled", "fail_closed": True}
    assert len(got["plugins"]) == 3
    assert json.loads((conf_dir / "20-other.conflist").read_text()) == {**BRIDGE, "name": "other"}
    # The copied plugin runs with nothing but the standard library (-I -S).
    exe = bin_dir / "kmesh-cni"
    assert os.access(exe, os.X_OK) and exe.read_text().startswith(f"#!{sys.executable}\n")
    r = subprocess.run([sys.executable, "-I", "-S", str(exe)], env={"CNI_COMMAND": "VERSION"}, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["supportedVersions"][-1] == "1.0.0"
    assert install.main(["uninstall", f"--bin-dir={bin_dir}", f"--conf-dir={conf_dir}"]) == 0
    assert json.loads((conf_dir / "10-podnet.conflist").read_text()) == BRIDGE and not exe.exists()


def test_install_refuses_a_bad_setting_and_a_missing_network(tmp_path, capsys):
    (tmp_path / "a.conflist").write_text(json.dumps(BRIDGE))
    assert install.main(["install", f"--bin-dir={tmp_path}", f"--conf-dir={tmp_path}", "--set", "timeout=0"]) == 1
    assert "timeout" in capsys.readouterr().err
    assert install.main(["install", f"--bin-dir={tmp_path}", f"--conf-dir={tmp_path}", "--network=nope"]) == 1
    assert "no CNI network config named 'nope'" in capsys.readouterr().err


def test_a_daemon_speaking_garbage_or_a_bug_fails_only_a_fail_closed_add(tmp_path, monkeypatch):
    """Not HTTP on the admin socket (http.client's own exceptions), and an
    unexpected exception: fail-open passes the result through, DEL succeeds."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "admin.sock"))
    srv.listen(8)

    def garbage():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.recv(4096)
            c.sendall(b"SSH-2.0-not-http\r\n")
            c.close()

    threading.Thread(target=garbage, daemon=True).start()
    try:
        code, out = plugin.run(env("ADD"), stdin(tmp_path))
        assert code == 0 and json.loads(out) == PREV
        code, out = plugin.run(env("ADD"), stdin(tmp_path, fail_closed=True))
        assert code == 1 and json.loads(out)["code"] == plugin.E_TRY_LATER
    finally:
        srv.close()
    monkeypatch.setattr(plugin, "decide", lambda *a: 1 / 0)
    code, out = plugin.run(env("ADD"), stdin(tmp_path))
    assert code == 0 and json.loads(out) == PREV
    code, out = plugin.run(env("ADD"), stdin(tmp_path, fail_closed=True))
    assert code == 1 and "internal error" in json.loads(out)["msg"]
    monkeypatch.setattr(plugin, "load_state", lambda *a: 1 / 0)
    assert plugin.run(env("DEL"), stdin(tmp_path)) == (0, "")
