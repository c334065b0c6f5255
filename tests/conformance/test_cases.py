"""Hand-written cases (cases.py), each compared between Envoy 1.40 and
kmesh on the same config and bytes. Cases run in batches: one kmesh start
and one Envoy start serve BATCH cases; each case is then its own test."""
from __future__ import annotations

import pytest

from tests.conformance import oracle
from tests.conformance.cases import CASES
from tests.support import harness

BATCH = 12


def _batch_of(case) -> int:
    return next(i for i, c in enumerate(CASES) if c is case) // BATCH


@pytest.fixture(scope="module")
def outcome_of(tmp_path_factory, bpf_object):
    """outcome_of(case): its batch run once (a child cgroup and a daemon of
    its own, torn down at once, as the kmesh fixture does), then looked up."""
    done: dict[int, dict] = {}

    def get(case) -> oracle.Outcome:
        b = _batch_of(case)
        if b not in done:
            tmp = tmp_path_factory.mktemp(f"batch{b}")
            cg, made = harness.Cgroup(), []

            def start(cfg):
                k = harness.Kmesh(cg, tmp / "kmesh.yaml")
                made.append(k)
                k.write_config(cfg)
                return k.start()
            try:
                done[b] = {id(o.case): o for o in oracle.run_batch(CASES[b * BATCH:(b + 1) * BATCH], start, cg, tmp)}
            except Exception as e:   # every case of the batch reports it
                done[b] = e
            finally:
                for k in made:
                    k.teardown()
                cg.remove()
        if isinstance(done[b], Exception):
            raise done[b]
        return done[b][id(case)]

    return get


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.name.split(":")[0].replace(" ", "-"), marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_case_as_envoy(outcome_of, case):
    oracle.check(outcome_of(case))
