"""Shared test configuration: paths to the built objects and the venv tools."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_BPF = ROOT / "build" / "bpf"
OBJECT = BUILD_BPF / "kmesh_sock.bpf.o"
BIN = Path(sys.executable).parent

os.environ.setdefault("KMESH_BPF_DIR", str(BUILD_BPF))


@pytest.fixture(scope="session")
def bpf_object() -> Path:
    if not OBJECT.exists():
        pytest.fail(f"{OBJECT} is missing: run ./build.sh -b (./build.sh test does it)")
    return OBJECT
