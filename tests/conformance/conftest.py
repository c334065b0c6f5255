"""The conformance suite runs on the real kernel like tests/e2e: root, the
built BPF objects, a child cgroup per daemon."""
from __future__ import annotations

import pytest

# The e2e fixtures, for this directory too: root and bpffs, a child cgroup
# per test, the kmesh daemon factory.
from tests.e2e.conftest import _root_and_bpffs, cgroup, kmesh  # noqa: F401


def pytest_collection_modifyitems(items):
    for item in items:
        if "/conformance/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
