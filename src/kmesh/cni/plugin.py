"""kmesh-cni: a chained CNI plugin (spec 1.0) that hands each new container's
network namespace to kmesh-daemon.

The runtime (podman, containerd, CRI-O) runs it after the plugin that made
the interface: ADD enrolls (or bypasses) ``CNI_NETNS`` through the daemon's
admin socket (``POST /workloads/enroll?netns=...``), DEL unenrolls it, CHECK
tells whether it is as ADD left it, VERSION says which specs it speaks. The
previous plugin's result is passed through untouched.

It never fails a container's start because kmesh is down unless the network
config says ``"fail_closed": true``: see docs/containers.md.

This file is the plugin whole, standard library only: ``kmesh-cni install``
copies it onto a node, where kmesh's own package is not installed.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import sys
import time
import urllib.parse

SPEC_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
PLUGIN_TYPE = "kmesh-cni"
MODE_LABEL = "istio.io/dataplane-mode"        # the label Istio ambient and Kmesh read
ENROLL_VALUES = ("kmesh", "ambient")          # compared case-insensitively
BYPASS_VALUES = ("none",)
SIDECAR_STATUS = "sidecar.istio.io/status"    # a pod with a sidecar has its own proxy
DEFAULTS = {
    "admin_socket": "/run/kmesh/admin.sock",
    "enroll": "all",              # "all": every container not labelled none; "labelled": only labelled ones
    "fail_closed": False,         # True: ADD fails while kmesh cannot be told
    "timeout": 5.0,               # seconds to keep trying the daemon (a restart takes ~1 s)
    "state_dir": "/var/lib/kmesh-cni",
    "log_file": "",
    "exclude_namespaces": ["kube-system"],
    "kubernetes": None,           # {"api": URL, "token_file": PATH, "ca_file": PATH}: labels from the API
}
# CNI_ARGS keys that carry the runtime's own facts, not labels.
RUNTIME_ARGS = ("IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID",
                "K8S_POD_UID")

# Error codes of the spec (and ours, 100 up).
E_VERSION, E_ENV, E_DECODE, E_CONFIG, E_TRY_LATER, E_KMESH, E_CHECK = 1, 4, 6, 7, 11, 100, 101


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


class Unreachable(OSError):
    """The daemon's admin socket does not answer."""


# -- pure logic ---------------------------------------------------------------
def parse_config(text: str) -> dict:
    """The plugin's network config from stdin, with defaults filled in;
    CniError names the field and the reason."""
    try:
        conf = json.loads(text or "{}")
    except ValueError as e:
        raise CniError(E_DECODE, f"network config on stdin is not JSON: {e}") from None
    if not isinstance(conf, dict):
        raise CniError(E_DECODE, "network config on stdin is not a JSON object")
    version = conf.get("cniVersion", "1.0.0")
    if version not in SPEC_VERSIONS:
        raise CniError(E_VERSION, f"cniVersion {version!r} is not one of {', '.join(SPEC_VERSIONS)}")
    out = {**DEFAULTS, **conf, "cniVersion": version}
    if out["enroll"] not in ("all", "labelled"):
        raise CniError(E_CONFIG, f"{PLUGIN_TYPE}: enroll: {out['enroll']!r} is not \"all\" or \"labelled\"")
    if not isinstance(out["fail_closed"], bool):
        raise CniError(E_CONFIG, f"{PLUGIN_TYPE}: fail_closed: must be true or false")
    if not isinstance(out["timeout"], (int, float)) or not 0 < out["timeout"] <= 60:
        raise CniError(E_CONFIG, f"{PLUGIN_TYPE}: timeout: must be a number of seconds in (0, 60]")
    if not isinstance(out["exclude_namespaces"], list):
        raise CniError(E_CONFIG, f"{PLUGIN_TYPE}: exclude_namespaces: must be a list of namespace names")
    k8s = out["kubernetes"]
    if k8s is not None and (not isinstance(k8s, dict) or not isinstance(k8s.get("api"), str)):
        raise CniError(E_CONFIG, f"{PLUGIN_TYPE}: kubernetes.api: must be the API server's URL")
    return out


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS, ``K=V;K=V``."""
    out = {}
    for pair in (text or "").split(";"):
        k, sep, v = pair.partition("=")
        if sep and k.strip():
            out[k.strip()] = v.strip()
    return out


def labels_from(conf: dict, cni_args: dict[str, str]) -> dict[str, str]:
    """Labels the runtime passed: ``args.cni.labels`` (the CNI conventions'
    list of {key, value}) and CNI_ARGS keys other than the runtime's own
    (podman passes its CNI_ARGS environment on: ``CNI_ARGS=istio.io/dataplane-mode=none``)."""
    out = {}
    for item in ((conf.get("args") or {}).get("cni") or {}).get("labels") or []:
        if isinstance(item, dict) and "key" in item:
            out[str(item["key"])] = str(item.get("value", ""))
    out.update({k: v for k, v in cni_args.items() if k not in RUNTIME_ARGS})
    return out


def decide(conf: dict, pod_labels: dict[str, str], ns_labels: dict[str, str] | None = None,
           namespace: str = "", pod_annotations: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(action, why): "enroll", "bypass" or None (leave it as the daemon's
    scope says), by Istio ambient's rule: the pod's label wins, then its
    namespace's, then the plugin's ``enroll`` setting."""
    pod = (pod_labels.get(MODE_LABEL) or "").lower()
    ns = ((ns_labels or {}).get(MODE_LABEL) or "").lower()
    if pod in BYPASS_VALUES:
        return "bypass", f"pod label {MODE_LABEL}={pod}"
    if SIDECAR_STATUS in (pod_annotations or {}):
        return "bypass", "the pod has an Istio sidecar"
    if namespace and namespace in conf["exclude_namespaces"]:
        return "bypass", f"namespace {namespace} is excluded"
    if pod in ENROLL_VALUES:
        return "enroll", f"pod label {MODE_LABEL}={pod}"
    if ns in BYPASS_VALUES:
        return "bypass", f"namespace label {MODE_LABEL}={ns}"
    if ns in ENROLL_VALUES:
        return "enroll", f"namespace label {MODE_LABEL}={ns}"
    if conf["enroll"] == "all":
        return "enroll", "enroll: all"
    return None, f"enroll: labelled, and no {MODE_LABEL} label"


def passthrough(conf: dict) -> dict:
    """The result ADD prints: the previous plugin's, in the config's version."""
    prev = conf.get("prevResult")
    out = dict(prev) if isinstance(prev, dict) else {}
    out["cniVersion"] = conf["cniVersion"]
    return out


# -- I/O: the daemon, the Kubernetes API, the state dir ------------------------
class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def admin(conf: dict, method: str, path: str) -> tuple[int, dict]:
    """One request to the daemon's admin socket, retried until ``timeout``
    while nothing answers (a daemon restarting). Unreachable after that."""
    end = time.monotonic() + conf["timeout"]
    delay = 0.05
    while True:
        conn = _UnixHTTP(conf["admin_socket"], timeout=max(0.5, end - time.monotonic()))
        try:
            conn.request(method, path, body=b"" if method == "POST" else None)
            r = conn.getresponse()
            body = r.read()
            try:
                return r.status, json.loads(body or b"{}")
            except ValueError:
                return r.status, {"error": body.decode(errors="replace")}
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() + delay >= end:
                raise Unreachable(f"kmesh-daemon does not answer at {conf['admin_socket']}: {e}") from None
        finally:
            conn.close()
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def kube_get(k8s: dict, path: str) -> dict:
    """GET one object from the Kubernetes API with the node's token."""
    url = urllib.parse.urlsplit(k8s["api"].rstrip("/") + path)
    headers = {"Accept": "application/json"}
    if k8s.get("token_file"):
        with open(k8s["token_file"]) as f:
            headers["Authorization"] = "Bearer " + f.read().strip()
    if url.scheme == "https":
        ctx = ssl.create_default_context(cafile=k8s.get("ca_file") or None)
        conn = http.client.HTTPSConnection(url.hostname, url.port or 443, timeout=5, context=ctx)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=5)
    try:
        conn.request("GET", url.path + (f"?{url.query}" if url.query else ""), headers=headers)
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise OSError(f"GET {path}: HTTP {r.status} {body[:200].decode(errors='replace')}")
        return json.loads(body)
    finally:
        conn.close()


def pod_facts(conf: dict, cni_args: dict[str, str]) -> tuple[dict, dict | None, str, dict]:
    """(pod labels, namespace labels, namespace, pod annotations): from the
    runtime, and from the Kubernetes API when the config names it and the
    runtime named the pod (kubelet passes K8S_POD_NAMESPACE/K8S_POD_NAME,
    never labels)."""
    labels = labels_from(conf, cni_args)
    ns, name = cni_args.get("K8S_POD_NAMESPACE", ""), cni_args.get("K8S_POD_NAME", "")
    k8s = conf["kubernetes"]
    if not (k8s and ns and name):
        return labels, None, ns, {}
    q = urllib.parse.quote
    pod = kube_get(k8s, f"/api/v1/namespaces/{q(ns)}/pods/{q(name)}")
    nsobj = kube_get(k8s, f"/api/v1/namespaces/{q(ns)}")
    meta = pod.get("metadata") or {}
    return ({**(meta.get("labels") or {}), **labels}, (nsobj.get("metadata") or {}).get("labels") or {}, ns,
            meta.get("annotations") or {})


def _state_path(conf: dict, container_id: str) -> str:
    safe = "".join(c for c in container_id if c.isalnum() or c in "-_.")[:128] or "unnamed"
    return os.path.join(conf["state_dir"], safe + ".json")


def save_state(conf: dict, container_id: str, state: dict) -> None:
    os.makedirs(conf["state_dir"], mode=0o700, exist_ok=True)
    path = _state_path(conf, container_id)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def load_state(conf: dict, container_id: str) -> dict:
    try:
        with open(_state_path(conf, container_id)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def drop_state(conf: dict, container_id: str) -> None:
    try:
        os.unlink(_state_path(conf, container_id))
    except FileNotFoundError:
        pass


def log(conf: dict, event: str, **kv) -> None:
    """One JSON line to ``log_file`` (if set); stderr reaches the runtime's log only on errors."""
    if not conf.get("log_file"):
        return
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **kv})
    try:
        with open(conf["log_file"], "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


# -- the commands ---------------------------------------------------------------
def _netns_query(netns: str) -> str:
    return "netns=" + urllib.parse.quote(netns, safe="")


def cmd_add(conf: dict, env: dict) -> dict:
    netns, cid = env.get("CNI_NETNS", ""), env.get("CNI_CONTAINERID", "")
    if not netns or not cid:
        raise CniError(E_ENV, "ADD needs CNI_NETNS and CNI_CONTAINERID")
    cni_args = parse_cni_args(env.get("CNI_ARGS", ""))
    try:
        labels, ns_labels, namespace, annotations = pod_facts(conf, cni_args)
    except (OSError, ValueError, http.client.HTTPException) as e:
        # Without the labels the rule cannot be applied: leave the workload
        # to the daemon's scope rather than guess.
        log(conf, "labels unavailable", container=cid, error=str(e))
        if conf["fail_closed"]:
            raise CniError(E_TRY_LATER, f"{PLUGIN_TYPE}: cannot read the pod's labels: {e}") from None
        return passthrough(conf)
    action, why = decide(conf, labels, ns_labels, namespace, annotations)
    if action is None:
        log(conf, "left alone", container=cid, netns=netns, why=why)
        return passthrough(conf)
    try:
        status, body = admin(conf, "POST", f"/workloads/{action}?{_netns_query(netns)}")
    except Unreachable as e:
        log(conf, "kmesh unreachable", container=cid, netns=netns, action=action, error=str(e))
        if conf["fail_closed"]:
            raise CniError(E_TRY_LATER, f"{PLUGIN_TYPE}: {e}; the container is not started because "
                           "fail_closed is true (start kmesh-daemon, or set it false)") from None
        return passthrough(conf)
    if status != 200:
        msg = f"{PLUGIN_TYPE}: kmesh-daemon refused to {action} {netns}: HTTP {status} {body.get('error', body)}"
        log(conf, "refused", container=cid, netns=netns, action=action, status=status, error=str(body))
        if conf["fail_closed"]:
            raise CniError(E_KMESH, msg)
        return passthrough(conf)
    save_state(conf, cid, {"netns": netns, "action": action})
    log(conf, action + "ed", container=cid, netns=netns, why=why)
    return passthrough(conf)


def cmd_del(conf: dict, env: dict) -> None:
    """Unenroll; never fails (the runtime retries a failed DEL forever, and
    a namespace that is gone is forgotten by the daemon within 5 s anyway)."""
    cid = env.get("CNI_CONTAINERID", "")
    state = load_state(conf, cid)
    netns = env.get("CNI_NETNS") or state.get("netns", "")
    if netns:
        try:
            status, body = admin(conf, "POST", f"/workloads/unenroll?{_netns_query(netns)}")
            log(conf, "unenrolled", container=cid, netns=netns, status=status)
        except Unreachable as e:
            log(conf, "kmesh unreachable", container=cid, netns=netns, action="unenroll", error=str(e))
    drop_state(conf, cid)


def cmd_check(conf: dict, env: dict) -> None:
    """The namespace is as ADD left it, or an error says what differs."""
    cid, netns = env.get("CNI_CONTAINERID", ""), env.get("CNI_NETNS", "")
    want = load_state(conf, cid).get("action")
    if not want:
        return
    try:
        status, body = admin(conf, "GET", "/workloads")
    except Unreachable as e:
        if conf["fail_closed"]:
            raise CniError(E_TRY_LATER, f"{PLUGIN_TYPE}: {e}") from None
        return
    mode = {"enroll": "enrolled", "bypass": "bypass"}[want]
    for w in body.get("workloads", []) if status == 200 else []:
        if w.get("kind") == "netns" and w.get("path") == netns and w.get("mode") == mode:
            return
    raise CniError(E_CHECK, f"{PLUGIN_TYPE}: {netns} is not {mode} in kmesh-daemon's workloads")


def run(env: dict, stdin: str) -> tuple[int, str]:
    """(exit code, stdout) for one invocation."""
    command = env.get("CNI_COMMAND", "")
    version = "1.0.0"
    try:
        if command == "VERSION":
            return 0, json.dumps({"cniVersion": "1.0.0", "supportedVersions": list(SPEC_VERSIONS)})
        conf = parse_config(stdin)
        version = conf["cniVersion"]
        if command == "ADD":
            try:
                return 0, json.dumps(cmd_add(conf, env))
            except CniError:
                raise
            except Exception as e:   # a bug here must not stop a container that fail-open lets start
                log(conf, "internal error", error=repr(e))
                if conf["fail_closed"]:
                    raise CniError(E_KMESH, f"{PLUGIN_TYPE}: internal error: {e!r}") from None
                return 0, json.dumps(passthrough(conf))
        if command == "DEL":
            try:
                cmd_del(conf, env)
            except Exception as e:   # DEL never fails
                log(conf, "internal error", error=repr(e))
            return 0, ""
        if command == "CHECK":
            cmd_check(conf, env)
            return 0, ""
        raise CniError(E_ENV, f"CNI_COMMAND {command!r} is not ADD, DEL, CHECK or VERSION")
    except CniError as e:
        return 1, json.dumps({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details})


def main() -> int:
    if "CNI_COMMAND" not in os.environ:
        print(f"{PLUGIN_TYPE}: a CNI plugin, run by a container runtime with CNI_COMMAND set",
              file=sys.stderr)
        return 2
    code, out = run(dict(os.environ), sys.stdin.read())
    if out:
        sys.stdout.write(out + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
