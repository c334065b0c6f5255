"""``kmesh-cni install|uninstall``: put kmesh-cni on a node, as Istio's
install-cni does. It copies the plugin into the CNI bin dir and chains it
at the end of the node's network config (the first ``*.conflist``/``*.conf``
in the conf dir by name, the one kubelet and podman take, or one named),
rewriting the file atomically; run again, it replaces its own entry.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from kmesh.cni import plugin

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def chained(conf: dict, entry: dict) -> dict:
    """``conf`` (a conflist, or a single-plugin .conf) with ``entry`` as its
    last plugin and no other kmesh-cni entry."""
    if "plugins" in conf:
        out = dict(conf)
        plugins = list(conf["plugins"])
    else:   # a .conf: its own keys become the first plugin
        out = {k: conf[k] for k in ("cniVersion", "name") if k in conf}
        plugins = [{k: v for k, v in conf.items() if k not in ("cniVersion", "name")}]
    plugins = [p for p in plugins if p.get("type") != plugin.PLUGIN_TYPE]
    if not plugins:
        raise ValueError("the network config has no plugin to chain after")
    out["plugins"] = plugins + [entry]
    return out


def unchained(conf: dict) -> dict:
    out = dict(conf)
    if "plugins" in conf:
        out["plugins"] = [p for p in conf["plugins"] if p.get("type") != plugin.PLUGIN_TYPE]
    return out


def pick(conf_dir: Path, name: str | None) -> Path:
    """The network config to chain into: the file of network ``name``, else
    the first by file name (what the runtime uses)."""
    files = sorted(p for p in conf_dir.iterdir() if p.suffix in (".conflist", ".conf", ".json") and p.is_file())
    for p in files:
        if name is None:
            return p
        try:
            if json.loads(p.read_text()).get("name") == name:
                return p
        except ValueError:
            continue
    raise FileNotFoundError(f"no CNI network config {'named ' + repr(name) + ' ' if name else ''}in {conf_dir}"
                            " (is the primary CNI installed yet?)")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.kmesh-tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def install_plugin(bin_dir: Path, python: str) -> Path:
    """Copy the plugin (one stdlib-only file) to ``bin_dir/kmesh-cni``, its
    first line naming ``python``; replaced atomically."""
    src = Path(plugin.__file__).read_text()
    body = src.split("\n", 1)[1] if src.startswith("#!") else src
    dst = bin_dir / plugin.PLUGIN_TYPE
    tmp = bin_dir / f".{plugin.PLUGIN_TYPE}.kmesh-tmp"
    tmp.write_text(f"#!{python}\n" + body)
    os.chmod(tmp, 0o755)
    tmp.replace(dst)
    return dst


def kubernetes_block(conf_dir: Path, host_conf_dir: str, sa_dir: Path | None = None) -> dict | None:
    """Copy the pod's service account token and CA next to the config (as
    Istio's kubeconfig for its plugin) and name them, with the API server."""
    sa_dir = sa_dir or SA_DIR
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (sa_dir / "token").exists():
        return None
    d = conf_dir / "kmesh-cni.d"
    d.mkdir(mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)      # also when an earlier install (or someone) made it: the token is a credential
    for f in ("token", "ca.crt"):
        if (sa_dir / f).exists():
            shutil.copyfile(sa_dir / f, d / f)
            os.chmod(d / f, 0o600)
    host = f"[{host}]" if ":" in host else host
    return {"api": f"https://{host}:{port}", "token_file": f"{host_conf_dir}/kmesh-cni.d/token",
            "ca_file": f"{host_conf_dir}/kmesh-cni.d/ca.crt"}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kmesh-cni", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("install", "uninstall"))
    ap.add_argument("--bin-dir", default="/opt/cni/bin", help="where the runtime finds CNI plugins")
    ap.add_argument("--conf-dir", default="/etc/cni/net.d", help="the runtime's CNI network configs")
    ap.add_argument("--network", help="the network to chain into (default: the first config file by name)")
    ap.add_argument("--python", default="/usr/bin/python3", help="the node's Python 3.8+, for the plugin's #! line")
    ap.add_argument("--host-conf-dir", help="--conf-dir as the node sees it (default: the same)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help='a key of the plugin\'s config, e.g. --set enroll=\\"labelled\\" --set fail_closed=true')
    ap.add_argument("--kubernetes", action="store_true",
                    help="read pod and namespace labels from the API server with this pod's service account")
    a = ap.parse_args(argv)
    conf_dir, bin_dir = Path(a.conf_dir), Path(a.bin_dir)
    try:
        path = pick(conf_dir, a.network)
        conf = json.loads(path.read_text())
        if a.action == "uninstall":
            write_json(path, unchained(conf))
            (bin_dir / plugin.PLUGIN_TYPE).unlink(missing_ok=True)
            print(f"kmesh-cni removed from {path} and {bin_dir}")
            return 0
        entry: dict = {"type": plugin.PLUGIN_TYPE}
        for kv in a.set:
            k, sep, v = kv.partition("=")
            if not sep:
                raise ValueError(f"--set {kv!r}: write KEY=JSON")
            try:
                entry[k] = json.loads(v)
            except ValueError:
                entry[k] = v
        if a.kubernetes:
            k8s = kubernetes_block(conf_dir, a.host_conf_dir or a.conf_dir)
            if k8s is None:
                raise ValueError("--kubernetes: no service account token or KUBERNETES_SERVICE_HOST here")
            entry["kubernetes"] = k8s
        plugin.parse_config(json.dumps({"cniVersion": conf.get("cniVersion", "1.0.0"), **entry}))
        dst = install_plugin(bin_dir, a.python)
        write_json(path, chained(conf, entry))
    except plugin.CniError as e:
        print(f"kmesh-cni install: {e.msg}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"kmesh-cni {a.action}: {e}", file=sys.stderr)
        return 1
    print(f"kmesh-cni installed: {dst}, chained into {path}")
    return 0
