"""The admin API and /metrics read the daemon only through
kmesh.status.DaemonView, and the daemon has all of it."""
import ast
import inspect
from pathlib import Path

from kmesh import status
from kmesh.daemon import Daemon

SRC = Path(__file__).resolve().parents[2] / "src" / "kmesh"


def members() -> set[str]:
    names = {n for n in vars(status.DaemonView) if not n.startswith("_")}
    return names | set(inspect.get_annotations(status.DaemonView))


def used(path: Path, holders: set[str]) -> set[str]:
    """Attributes read off the daemon: ``d.x`` / ``self.daemon.x`` / ``self.d.x``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        v = node.value
        if isinstance(v, ast.Name) and v.id in holders:
            out.add(node.attr)
        elif isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and v.value.id == "self" \
                and v.attr in holders:
            out.add(node.attr)
    return out


def test_readers_use_the_view_only():
    view = members()
    assert used(SRC / "admin" / "server.py", {"d", "daemon"}) <= view
    assert used(SRC / "metrics.py", {"d"}) <= view


def test_the_daemon_has_the_whole_view():
    missing = [m for m in sorted(members()) if not hasattr(Daemon, m)
               and m not in inspect.signature(Daemon.__init__).parameters
               and m not in {"opts", "ready", "version", "last_update"}]   # set in __init__
    assert not missing, missing
