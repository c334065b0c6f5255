"""The package's import graph (every import, module-level or late): no
cycle, and each layer imports only the layers below it."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# The layer of a module is its first name under kmesh (kmesh.config.http.routes: "config").
# What each layer may import besides itself and the small helpers every layer uses.
HELPERS = {"kmesh", "limits", "log", "options", "memory", "mounts", "status"}
MAY_IMPORT = {
    "bpf": set(),                                  # libbpf, loader, records, features
    "config": {"bpf.records"},                     # Envoy protos -> the model -> record layouts
    "dataplane": {"bpf", "config"},                # plans and writes maps
    "l7": {"bpf", "config"},                       # the runtime that routes with compiled tables
    "xds": {"config"},
    "accesslog": {"bpf"},
    "metrics": {"bpf"},
    "admin": {"metrics"},
    "daemon": {"bpf", "config", "dataplane", "l7", "xds", "accesslog", "metrics", "admin"},
    "cni": set(),                                  # the CNI plugin runs on nodes without kmesh: stdlib only
    "cli": {"bpf", "config", "dataplane", "admin", "daemon"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "kmesh").rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "kmesh"


def test_no_import_cycle():
    edges = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            # a package's __init__ importing its own modules is not a cycle of design
            if m == "kmesh" or (n.startswith(m + ".") and _modules()[m].name == "__init__.py"):
                continue
            assert state.get(n) != 1, "import cycle: " + " -> ".join(stack[stack.index(n):] + [n])
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_each_layer_imports_only_the_layers_below():
    wrong = []
    for m, targets in sorted(_graph().items()):
        mine = _layer(m)
        if mine in HELPERS:
            continue
        assert mine in MAY_IMPORT, f"{m}: a new layer; say what it may import in MAY_IMPORT"
        for t in sorted(targets):
            theirs = _layer(t)
            allowed = MAY_IMPORT[mine] | HELPERS | {mine}
            if theirs not in allowed and t.split(".", 1)[-1] not in allowed:
                wrong.append(f"{m} -> {t}")
    assert not wrong, wrong
