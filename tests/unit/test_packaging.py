"""Packaging truth: the RPM (packaging/rpm/kmesh.spec) and setup.cfg name
every package the daemon can import, and nothing it does not; the license
files are the ones the sources declare.

Imports are read from the sources with ``ast``: every module imported
anywhere under src/kmesh, also inside functions (pyroute2 only with
-enable-sockmap, uvloop only when installed), less the standard library.
"""
from __future__ import annotations

import ast
import configparser
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "kmesh"
SPEC = ROOT / "packaging" / "rpm" / "kmesh.spec"

# Import name -> (distribution on PyPI, RPM package). "google" is a namespace
# package: its parts are told apart. The RPM bundles xds-protos in its venv
# (Provides: bundled(python3dist(xds-protos))), which holds Envoy's protos and
# the google.rpc, udpa, xds and validate packages they import.
BUNDLED = "bundled(python3dist(xds-protos))"
PACKAGES = {
    "click": ("click", "python3-click"),
    "google.protobuf": ("protobuf", "python3-protobuf"),
    "google.rpc": ("xds-protos", BUNDLED),
    "envoy": ("xds-protos", BUNDLED),
    "udpa": ("xds-protos", BUNDLED),
    "xds": ("xds-protos", BUNDLED),
    "validate": ("xds-protos", BUNDLED),
    "grpc": ("grpcio", "python3-grpcio"),
    "yaml": ("PyYAML", "python3-pyyaml"),
    "sdnotify": ("sdnotify", "python3-sdnotify"),
    "prometheus_client": ("prometheus-client", "python3-prometheus_client"),
    "httptools": ("httptools", "python3-httptools"),
    "pyroute2": ("pyroute2", "python3-pyroute2"),
    "re2": ("google-re2", "python3-google-re2"),
    "uvloop": ("uvloop", "python3-uvloop"),
}


def _top(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "google" else parts[0]


def _optional(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside ``try: ... except ImportError``."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            for stmt in node.body:
                lines.update(n.lineno for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return lines


def imports() -> dict[str, bool]:
    """Third-party import name -> whether every import of it is optional
    (guarded by ``except ImportError``)."""
    out: dict[str, bool] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        optional = _optional(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = _top(name)
                if top.split(".")[0] in sys.stdlib_module_names or top == "kmesh":
                    continue
                out[top] = out.get(top, True) and node.lineno in optional
    return out


def spec_tags() -> dict[str, list[str]]:
    """Tag -> values of the main package's preamble (Requires:, Recommends:, ...)."""
    out: dict[str, list[str]] = {}
    for line in SPEC.read_text().split("\n%description", 1)[0].splitlines():
        m = re.match(r"^([A-Za-z]+)(?:\([a-z]+\))?:\s*(\S+)", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def normalize(dist: str) -> str:
    """A distribution's name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def install_requires() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = cfg["options"]["install_requires"].split()
    return {normalize(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in reqs if r.strip()}


def test_the_walk_finds_imports_inside_functions():
    found = imports()
    assert found["pyroute2"] is False         # in a function: required all the same
    assert found["uvloop"] is True            # in try/except ImportError: optional
    assert found["yaml"] is False and "google.protobuf" in found and "envoy" in found


def test_every_import_is_known():
    unknown = set(imports()) - set(PACKAGES)
    assert not unknown, f"add {sorted(unknown)} to PACKAGES here, to setup.cfg and to the spec's Requires"


def test_the_map_names_the_installed_distributions():
    """PACKAGES' PyPI names are the distributions that hold those imports
    where the tests run (the dev venv; the RPM's %check: its venv and the
    system's python3-* packages). An optional import may be missing."""
    import importlib.metadata

    found = imports()
    for name, (dist, _) in PACKAGES.items():
        try:
            files = [str(f) for f in importlib.metadata.files(dist) or []]
        except importlib.metadata.PackageNotFoundError:
            assert found.get(name, True), f"kmesh imports {name}, and {dist} is not installed"
            continue
        path = name.replace(".", "/")
        assert any(f == path + ".py" or f.startswith(path + "/") for f in files), (name, dist)


def test_spec_requires_every_import():
    tags = spec_tags()
    requires, recommends, provides = set(tags["Requires"]), set(tags.get("Recommends", [])), set(tags["Provides"])
    for name, optional in imports().items():
        rpm = PACKAGES[name][1]
        if rpm == BUNDLED:
            assert rpm in provides, name
        elif optional:
            assert rpm in requires | recommends, f"import {name}: no Requires: or Recommends: {rpm}"
        else:
            assert rpm in requires, f"import {name}: no Requires: {rpm}"


def test_spec_requires_nothing_else():
    used = {PACKAGES[name][1] for name in imports()}
    python = {r for r in spec_tags()["Requires"] + spec_tags().get("Recommends", []) if r.startswith("python3-")}
    assert python <= used, f"required but never imported: {sorted(python - used)}"


def test_setup_cfg_agrees_with_the_imports():
    want = {normalize(PACKAGES[name][0]) for name in imports()}
    assert install_requires() == want


def test_spec_comment_tells_no_tales():
    # It once said the daemon never imports pyroute2.
    text = SPEC.read_text()
    assert "does not import" not in text and "never imports" not in text


# -- licenses ---------------------------------------------------------------------

def test_license_files():
    apache, gpl = ROOT / "LICENSE", ROOT / "LICENSES" / "GPL-2.0-only.txt"
    assert "Apache License\n" in apache.read_text() and "Version 2.0, January 2004" in apache.read_text()
    assert "GNU GENERAL PUBLIC LICENSE\n" in gpl.read_text() and "Version 2, June 1991" in gpl.read_text()
    # The full texts, not a pointer to them.
    assert len(apache.read_text()) > 10000 and len(gpl.read_text()) > 17000


def test_spec_license_is_spdx_and_matches_the_sources():
    tags = spec_tags()
    assert " ".join(re.search(r"^License:\s*(.+)$", SPEC.read_text(), re.M).group(1).split()) == \
        "Apache-2.0 AND GPL-2.0-only"
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["license"] == "Apache-2.0"
    # Every BPF source says GPL-2.0 (SPDX's older name for GPL-2.0-only) and
    # every program tells the kernel "GPL".
    for path in sorted((ROOT / "bpf").rglob("*.[ch]")):
        first = path.read_text().splitlines()[0]
        assert re.search(r"SPDX-License-Identifier: GPL-2\.0(-only)?( \*/)?$", first), path
    for path in sorted((ROOT / "bpf").rglob("*.bpf.c")):
        assert 'char LICENSE[] SEC("license") = "GPL";' in path.read_text(), path
    assert tags  # the preamble parsed


@pytest.mark.parametrize("name", ["LICENSE", "GPL-2.0-only.txt"])
def test_spec_ships_the_licenses(name: str):
    assert re.search(rf"^%license %{{_defaultlicensedir}}/kmesh/{re.escape(name)}$", SPEC.read_text(), re.M)
    layout = (ROOT / "packaging" / "install-layout.sh").read_text()
    assert "share/licenses/kmesh" in layout and name.split(".")[0].split("-")[0] in layout
