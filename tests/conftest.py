"""Shared fixtures: loaded zoo models are cached for the whole session (import costs ~1 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TVM_NUM_THREADS", "2")

_MODELS: dict = {}

#: The tier of each test file; files not listed are ``integration``. A test marked ``slow`` is
#: ``e2e`` whatever its file. ``make test-fast`` runs ``-m unit``.
#: - unit: pure Python and model loading, no TVM build and no worker process;
#: - integration: builds, measures or runs the CLI on tiny models;
#: - e2e: whole jobs (training, the fuzzer, validate re-timing).
_UNIT_FILES = frozenset({
    "test_cost_model.py", "test_decisions.py", "test_opgraph.py", "test_paired.py", "test_plan.py",
    "test_policy.py", "test_rules.py", "test_store.py", "test_target.py",
})
_E2E_FILES = frozenset({"test_fuzz.py", "test_train.py", "test_validate.py"})
TIERS = ("unit", "integration", "e2e")


def tier_of(filename: str, slow: bool) -> str:
    """The tier marker of a test in ``filename`` (``slow``: it carries the ``slow`` marker)."""
    if slow or filename in _E2E_FILES:
        return "e2e"
    return "unit" if filename in _UNIT_FILES else "integration"


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test with exactly one tier (see :data:`TIERS`), from its file name."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            tier = tier_of(item.path.name, item.get_closest_marker("slow") is not None)
            item.add_marker(getattr(pytest.mark, tier))


def load_cached(name: str):
    from fusion_rl.graph.model import load_model

    if name not in _MODELS:
        _MODELS[name] = load_model(name)
    return _MODELS[name]


@pytest.fixture(scope="session")
def model_cache():
    return load_cached


@pytest.fixture(scope="session")
def target():
    from fusion_rl.compiler.target import parse_target

    return parse_target("host").to_tvm()
