"""Fixtures for end-to-end tests on the real kernel (root needed)."""
from __future__ import annotations

import contextlib
import os

import pytest

from tests.support import harness


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session", autouse=True)
def _root_and_bpffs():
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests load BPF programs: run them as root (./build.sh test)")
    harness.ensure_bpffs()


@pytest.fixture
def cgroup():
    cg = harness.Cgroup()
    yield cg
    cg.remove()


@pytest.fixture
def backends():
    started: list[harness.Backend] = []

    def start(*names: str, host: str = "127.0.0.1") -> list[harness.Backend]:
        new = [harness.start_backend(n, host=host) for n in names]
        started.extend(new)
        return new

    yield start
    for b in started:
        b.proc.kill()
        b.proc.wait()


@contextlib.contextmanager
def daemons(cgroup, tmp_path, args: tuple[str, ...] = ()):
    """Factory start(config_dict, ...) -> a started daemon governing
    ``cgroup`` (with ``args`` before the caller's); all torn down at exit."""
    made: list[harness.Kmesh] = []

    def start(config, wait: bool = True, ads: str | None = None, extra_args: tuple[str, ...] = (),
              env: dict | None = None, **kw) -> harness.Kmesh:
        k = harness.Kmesh(cgroup, tmp_path / "kmesh.yaml", ads=ads, extra_args=(*args, *extra_args), env=env, **kw)
        made.append(k)
        k.write_config(config)
        return k.start(wait=wait)

    try:
        yield start
    finally:
        for k in made:
            k.teardown()


@pytest.fixture
def kmesh(cgroup, tmp_path, bpf_object):
    """Factory: kmesh(config_dict) -> a started daemon governing ``cgroup``."""
    with daemons(cgroup, tmp_path) as start:
        yield start


@pytest.fixture
def xds():
    from tests.support.xds_server import XdsServer

    server = XdsServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["python", "native"])
def engine_kmesh(request, cgroup, tmp_path, bpf_object):
    """A daemon starter for each L7 engine in turn."""
    with daemons(cgroup, tmp_path, (f"-l7-engine={request.param}",)) as start:
        yield start
