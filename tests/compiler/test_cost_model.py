"""The learned latency cost model: features, fitting, rank correlation, save/load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fusion_rl.compiler.cost_model import (
    GROUP_FEATURE_NAMES,
    LatencyCostModel,
    group_features,
    spearman,
    xgboost_available,
)
from fusion_rl.errors import ConfigError
from fusion_rl.fusion.metrics import plan_metrics
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.random_plans import random_plan

from _tiny import diamond

BACKENDS = ["ridge"] + (["xgboost"] if xgboost_available() else [])
OVERHEAD_MS = 0.004


def synthetic_group_ms(graph, plan) -> dict[tuple[int, ...], float]:
    """A clearly structured 'hardware': compute at 50 GFLOP/s plus memory traffic at 5 GB/s.

    Fusion pays off exactly through the bytes it keeps inside a kernel, and through launches.
    """
    rows = group_features(graph, plan)
    names = list(GROUP_FEATURE_NAMES)
    out = {}
    for gi, group in enumerate(plan.groups):
        flops = sum(graph.nodes[i].flops for i in group)
        inv = lambda v: 2.0 ** (v * 32.0) - 1.0  # undo features._log
        moved = inv(rows[gi, names.index("log_bytes_in")]) + inv(rows[gi, names.index("log_bytes_out")])
        out[group] = flops / 50e6 + moved / 5e6  # ms
    return out


def make_samples(model_cache, n_plans: int, seed: int):
    rng = np.random.default_rng(seed)
    samples = []
    for name in ("mlp_tiny", "cnn_plain", "se_cnn"):
        graph = model_cache(name).graph
        for _ in range(n_plans):
            plan = random_plan(graph, rng)
            times = synthetic_group_ms(graph, plan)
            samples.append((graph, plan, times, sum(times.values()) + OVERHEAD_MS * plan.num_groups))
    return samples


@pytest.fixture(scope="module")
def data(model_cache):
    return make_samples(model_cache, 40, seed=0), make_samples(model_cache, 15, seed=1)


def test_group_features_shape_and_bytes():
    graph = diamond()
    whole = FusionPlan.from_groups([[0, 1, 2, 3]], 4, graph.fingerprint)
    rows = group_features(graph, whole)
    assert rows.shape == (1, len(GROUP_FEATURE_NAMES)) and np.isfinite(rows).all()
    names = list(GROUP_FEATURE_NAMES)
    saved = rows[0, names.index("log_bytes_saved")]
    assert saved > 0  # every edge is internal
    unfused = group_features(graph, FusionPlan.singletons(4, graph.fingerprint))
    assert (unfused[:, names.index("log_bytes_saved")] == 0).all()
    assert unfused[:, names.index("size")].tolist() == [1, 1, 1, 1]


def test_spearman_helper():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 6]) == pytest.approx(1.0)  # ties averaged
    assert math.isnan(spearman([1.0], [2.0])) and math.isnan(spearman([1, 1], [1, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_predict_rank_and_round_trip(data, backend, tmp_path):
    train, holdout = data
    cm = LatencyCostModel(backend=backend, meta={"target": "synthetic"})
    cm.fit([(g, p, t) for g, p, t, _ in train]).fit_plans([(g, p, ms) for g, p, _, ms in train])
    preds = [cm.predict(g, p) for g, p, _, _ in holdout]
    assert all(math.isfinite(x) and x > 0 for x in preds)
    assert cm.overhead_ms == pytest.approx(OVERHEAD_MS, rel=0.5)
    # Rank plans *within* each model: the pooled correlation would be inflated by model size.
    for name in ("mlp_tiny", "cnn_plain", "se_cnn"):
        part = [(g, p, ms) for g, p, _, ms in holdout if g.name == name]
        rho = cm.spearman(part)
        assert rho > 0.8, (backend, name, rho)
    path = cm.save(tmp_path / "cm.json")
    assert "pickle" not in path.read_text()[:200]
    again = LatencyCostModel.load(path)
    assert again.meta == {"target": "synthetic"} and again.backend == backend
    assert [again.predict(g, p) for g, p, _, _ in holdout] == preds  # bit-identical


def test_shuffled_targets_do_not_rank(data, model_cache):
    """Negative control: the rank test above must be able to fail."""
    train, holdout = data
    rng = np.random.default_rng(0)
    shuffled = []
    for g, p, t, _ in train:
        values = rng.permutation(list(t.values()))
        shuffled.append((g, p, dict(zip(t.keys(), values * rng.uniform(0.1, 10, len(values))))))
    cm = LatencyCostModel(backend="ridge").fit(shuffled)
    part = [(g, p, ms) for g, p, _, ms in holdout if g.name == "cnn_plain"]
    assert not cm.spearman(part) > 0.8


def test_errors(tmp_path):
    graph = diamond()
    plan = FusionPlan.singletons(4, graph.fingerprint)
    cm = LatencyCostModel(backend="ridge")
    with pytest.raises(ConfigError, match="not trained"):
        cm.predict(graph, plan)
    with pytest.raises(ConfigError, match="per_kernel=True"):
        cm.fit([(graph, plan, {})])
    with pytest.raises(ConfigError, match="unknown cost-model backend"):
        LatencyCostModel(backend="forest")
    (tmp_path / "bad.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ConfigError, match="refit"):
        LatencyCostModel.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not found"):
        LatencyCostModel.load(tmp_path / "missing.json")
