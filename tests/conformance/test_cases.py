"""Hand-written cases (cases.py), each compared between Envoy 1.40 and
kmesh on the same config and bytes, with each L7 engine (-l7-engine).
Cases run in batches: one kmesh start and one Envoy start serve BATCH
cases; each case is then its own test."""
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
    """outcome_of(case, engine): its batch run once per engine (a child
    cgroup and a daemon of its own, torn down at once, as the kmesh fixture
    does), then looked up."""
    done: dict[tuple[int, str], dict] = {}

    def get(case, engine: str) -> oracle.Outcome:
        b = (_batch_of(case), engine)
        if b not in done:
            tmp = tmp_path_factory.mktemp(f"batch{b[0]}-{engine}")
            cg = harness.Cgroup()
            cases = CASES[b[0] * BATCH:(b[0] + 1) * BATCH]
            try:
                done[b] = {id(o.case): o for o in oracle.run_batch_own_daemon(cases, cg, tmp,
                                                                                (f"-l7-engine={engine}",))}
            except Exception as e:   # every case of the batch reports it
                done[b] = e
            finally:
                cg.remove()
        if isinstance(done[b], Exception):
            raise done[b]
        return done[b][id(case)]

    return get


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.name.split(":")[0].replace(" ", "-"), marks=marks)


@pytest.mark.parametrize("engine", ["python", "native"])
@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_case_as_envoy(outcome_of, case, engine):
    oracle.check(outcome_of(case, engine))


def test_only_a_warning_on_the_case_listener_excuses():
    """The one rule (oracle.excusing_warnings), on warnings as the daemon
    words them."""
    case = CASES[0]
    w = ["f.yaml: static_resources.listeners[1].filter_chains[0].filters[0].typed_config.route_config"
         ".virtual_hosts[0].routes[0].x: accepted but not enforced by kmesh",
         "f.yaml: static_resources.listeners[10].a: accepted but not enforced by kmesh",
         "f.yaml: static_resources.listeners[1].b: never reached: routes[0] matches every request first (as in Envoy)",
         "f.yaml: static_resources.clusters[1].c: accepted but not enforced by kmesh"]
    assert oracle.excusing_warnings(oracle.Outcome(case, 1, [], [], w)) == [w[0]]
    assert oracle.excusing_warnings(oracle.Outcome(case, 2, [], [], w)) == []


def test_normalisation_keeps_what_a_config_decides():
    got = {"status": 200, "headers": [["Date", "x"], ["server", "envoy"], ["x-envoy-upstream-service-time", "1"],
                                      ["content-length", "5"], ["x-custom", "a"], ["x-custom", "b"]],
           "body": '{"backend": "c1", "method": "GET", "path": "/p", "body": "", "headers": {'
                   '"x-request-id": ["1"], "x-forwarded-proto": ["http"], "x-envoy-original-path": ["/o"], '
                   '"host": ["h"], "x-a": ["1", "2"]}}'}
    got["headers"] = [[k.lower(), v] for k, v in got["headers"]]
    assert oracle.normalise(got) == {"status": 200, "headers": {"x-custom": ["a", "b"]}, "upstream": {
        "backend": "c1", "method": "GET", "path": "/p", "body": "", "headers": {"host": ["h"], "x-a": ["1", "2"]}}}
