"""Thousands of mutated configs and xDS pushes (tests/fuzz/mutate.py, fixed
seeds: the same cases every run): each is accepted, or refused with its
source and field path (a ConfigError, a NACK with a reason), and after a
NACK the last good push is taken again. `python -m tests.fuzz.mutate` runs
a longer, newly seeded campaign."""
from __future__ import annotations

from tests.fuzz import mutate


def test_mutated_configs_are_accepted_or_refused_with_a_path():
    got = mutate.run(3000, seed=2026)
    assert not got["failures"], "\n".join(got["failures"])
    assert got["counts"]["accepted"] > 50 and got["counts"]["refused"] > 1000, got["counts"]


def test_mutated_xds_pushes_are_acked_or_nacked_one_by_one():
    got = mutate.run_xds(2000, seed=2026)
    assert not got["failures"], "\n".join(got["failures"])
    assert got["counts"]["accepted"] > 50 and got["counts"]["refused"] > 500, got["counts"]
