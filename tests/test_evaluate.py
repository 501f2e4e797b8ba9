"""Zero-shot evaluation (:mod:`fusion_rl.evaluate`) and ``fusion-rl evaluate``.

One tiny real run is trained once per module (``envs/tiny.yaml``: two tiny models, the naive
schedule, in-process measurement, a store in tmp), then evaluated: every baseline gets a row,
the policy's decisions spend zero measurements, and the CI matches scipy's t-distribution.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fusion_rl.errors import ConfigError
from fusion_rl.evaluate import (
    RULE_BASELINES, Case, SearchSettings, decide_plan, equal_budget, evaluate, geomean, learning_curve,
    load_policy, make_eval_env, parity_point, t_interval, training_stats,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for 64 steps on envs/tiny.yaml, with its own store."""
    from fusion_rl.policy.policy import PPOConfig
    from fusion_rl.policy.training import TrainConfig, train

    tmp = tmp_path_factory.mktemp("evaluate")
    config = TrainConfig(
        env_spec=str(REPO / "envs" / "tiny.yaml"), exp_name="evaltest", total_timesteps=64, seed=0,
        checkpoint_every=64, wandb="disabled", env_kwargs={"store": str(tmp / "store.sqlite")},
        ppo=PPOConfig(n_steps=32, batch_size=16, n_epochs=1, net_arch=[16],
                      features_extractor_kwargs={"hidden": 16, "heads": 2, "num_layers": 2, "hw_hidden": 4}),
    )
    return train(config, runs_dir=tmp / "runs", wandb_mode="disabled", progress=False)


def test_t_interval_matches_scipy() -> None:
    from scipy import stats

    values = [1.02, 1.10, 0.97, 1.05]
    mean, lo, hi = t_interval(values, 0.95)
    x = np.array(values)
    ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean == pytest.approx(x.mean())
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)
    # Known numbers: [1, 2, 3] -> mean 2, s = 1, t_{0.975, 2} = 4.302652729911275.
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-9)
    assert math.isnan(t_interval([1.5])[1])


def test_geomean_and_budget() -> None:
    assert geomean([2.0, 0.5]) == pytest.approx(1.0)
    assert geomean([4.0, None, float("inf")]) == pytest.approx(4.0)
    assert equal_budget([100, 60], 4, cap=None) == {"amortized": 20, "cap": None, "budget": 20}
    assert equal_budget([100, 60], 4, cap=8)["budget"] == 8


def test_learning_curve_parity(tmp_path: Path) -> None:
    lines = [{"global_step": 10 * (i + 1), "measurements": 1, "speedup_vs_tvm": s}
             for i, s in enumerate([0.5, 0.9, 1.2, 1.3, None, 1.5])]
    (tmp_path / "episodes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curve = learning_curve(tmp_path, window=2)
    assert curve["measurements"] == [1, 2, 3, 4, 5, 6]
    assert curve["rolling"][2] == pytest.approx(1.05)
    assert parity_point(curve, window=2) == {"step": 30.0, "measurements": 3.0, "episode": 3}
    assert parity_point(curve, window=2, threshold=2.0) is None
    assert training_stats(tmp_path)["measurements"] == 6


def test_decisions_spend_no_measurement(tiny_run: Path) -> None:
    policy = load_policy(tiny_run)
    env = make_eval_env(policy.config)
    try:
        measurer = env.measurer("host")
        before = (measurer.stats.misses, measurer.stats.hits)
        plans = [decide_plan(policy.model, env, m, "host") for m in ("mlp_tiny", "cnn_plain", "mlp_tiny")]
        assert (measurer.stats.misses, measurer.stats.hits) == before
        assert plans[0].hash == plans[2].hash  # deterministic
        assert plans[1].num_nodes == len(env._model_entry("cnn_plain").model.graph)
    finally:
        env.close()


def test_evaluate_rows_for_every_baseline(tiny_run: Path) -> None:
    search = SearchSettings(algos=("random", "greedy"), budget=2, multiplier=2,
                            search_models=("mlp_tiny",), multiplied_models=("mlp_tiny",),
                            goal_budget=3, goal_models=("mlp_tiny",))
    cases = [Case("mlp_tiny", "host", "train"), Case("cnn_plain", "haswell-t1", "heldout-target")]
    rows = evaluate([tiny_run], cases, search, log=lambda s: None)
    methods = {(r["model"], r["method"]) for r in rows}
    for model in ("mlp_tiny", "cnn_plain"):
        for method in ("learned", *RULE_BASELINES):
            assert (model, method) in methods
    for method in ("random@2", "random@3", "random@4", "greedy@2", "greedy@3", "greedy@4"):
        assert ("mlp_tiny", method) in methods
    assert not any(m.startswith(("random", "greedy")) for mod, m in methods if mod == "cnn_plain")
    for r in rows:
        assert r["status"] == "ok" and r["latency_ms"] > 0 and r["num_kernels"] >= 1
        assert r["intermediate_bytes"] is not None and r["speedup_vs_tvm"] is not None
    learned = [r for r in rows if r["method"] == "learned"]
    assert all(r["decision_measurements"] == 0 and r["seed"] == 0 for r in learned)
    tvm = [r for r in rows if r["method"] == "tvm"]
    assert all(r["speedup_vs_tvm"] == pytest.approx(1.0) for r in tvm)


def test_load_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        load_policy(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"env_spec": "tiny", "wandb": "disabled"}))
    with pytest.raises(ConfigError, match="neither final_model.json nor a checkpoint"):
        load_policy(tmp_path)


def test_cli_parses_and_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fusion_rl.cli import build_parser, main

    args = build_parser().parse_args(["evaluate", "runs/a", "runs/b", "--heldout-models", "se_cnn,gpt_tiny",
                                      "--heldout-targets", "haswell-t1", "--search-budget", "4"])
    assert args.command == "evaluate" and len(args.runs) == 2 and args.search_budget == 4
    code = main(["evaluate", str(tmp_path / "nope"), "--models", "mlp_tiny"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and "not a run directory" in err and len(err.strip().splitlines()) == 1
