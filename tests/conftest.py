"""Shared fixtures: loaded zoo models are cached for the whole session (import costs ~1 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TVM_NUM_THREADS", "2")

_MODELS: dict = {}


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
