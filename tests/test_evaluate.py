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
    RULE_BASELINES, Case, SearchSettings, best_rules, collapsed_to, decide_plan, equal_budget, evaluate,
    fill_speedups, geomean, learning_curve, load_policy, make_eval_env, parity_point, t_interval, training_stats,
)

from conftest import one_line_error, run_cli

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


def _row(model: str, method: str, ms: float | None, plan: str, split: str = "heldout-model", **extra) -> dict:
    return {"model": model, "target": "host", "split": split, "method": method, "latency_ms": ms,
            "plan_hash": plan, **extra}


def test_speedups_against_the_best_fixed_rule_of_each_split() -> None:
    """The best rule is the one best on the whole split (geomean), not the fastest per case;
    a rule that failed on a case of the split cannot be it."""
    rows = []
    # model: (tvm, aggressive, aggressive_1anchor, tensorrt) latencies in ms
    for model, (tvm, agg, agg1, trt) in {"a": (1.0, 1.0, 0.5, 0.1), "b": (1.0, 0.7, 0.8, None)}.items():
        rows += [_row(model, "tvm", tvm, f"{model}-tvm"), _row(model, "aggressive", agg, f"{model}-agg"),
                 _row(model, "aggressive_1anchor", agg1, f"{model}-agg1"), _row(model, "tensorrt", trt, f"{model}-trt")]
    rows += [_row("a", "learned", 0.4, "a-own", run_dir="r0", seed=0), _row("b", "learned", 0.4, "b-own", run_dir="r0", seed=0)]
    rows += [_row("c", "tvm", 2.0, "c-tvm", "train"), _row("c", "aggressive", 4.0, "c-agg", "train"),
             _row("c", "learned", 1.0, "c-own", "train", run_dir="r0", seed=0)]
    fill_speedups(rows)
    assert best_rules(rows) == {"heldout-model": "aggressive_1anchor", "train": "tvm"}
    by = {(r["model"], r["method"]): r for r in rows}
    assert by[("b", "learned")]["speedup_vs_tvm"] == pytest.approx(2.5)
    assert by[("b", "learned")]["best_rule"] == "aggressive_1anchor"
    assert by[("b", "learned")]["speedup_vs_best_rule"] == pytest.approx(2.0)  # 0.8 / 0.4, not 0.7 / 0.4
    assert by[("a", "learned")]["speedup_vs_best_rule"] == pytest.approx(1.25)
    assert by[("c", "learned")]["best_rule"] == "tvm" and by[("c", "learned")]["speedup_vs_best_rule"] == 2.0
    assert by[("b", "tensorrt")]["speedup_vs_tvm"] is None and by[("a", "tensorrt")]["speedup_vs_tvm"] == 10.0


def test_a_policy_equal_to_a_rule_on_every_case_is_marked_collapsed() -> None:
    rows = []
    for model in ("a", "b"):
        rows += [_row(model, "tvm", 1.0, f"{model}-tvm"), _row(model, "aggressive", 1.0, f"{model}-agg"),
                 _row(model, "aggressive_1anchor", 1.0, f"{model}-agg1")]
    # seed 0 reproduces aggressive_1anchor everywhere; seed 1 only on a; the ablation is aggressive.
    rows += [_row("a", "learned", 1.0, "a-agg1", run_dir="r0"), _row("b", "learned", 1.0, "b-agg1", run_dir="r0"),
             _row("a", "learned", 1.0, "a-agg1", run_dir="r1"), _row("b", "learned", 1.0, "b-own", run_dir="r1"),
             _row("a", "learned-nocap", 1.0, "a-agg", run_dir="r2"), _row("b", "learned-nocap", 1.0, "b-agg", run_dir="r2")]
    assert collapsed_to(rows) == {("learned", "r0"): "aggressive_1anchor", ("learned", "r1"): None,
                                  ("learned-nocap", "r2"): "aggressive"}
    # A failed plan (no hash) never counts as equal.
    rows[-1]["plan_hash"] = None
    assert collapsed_to(rows)[("learned-nocap", "r2")] is None


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


def test_decide_plan_refuses_an_env_with_other_decision_options(tiny_run: Path) -> None:
    """The run's snapshot records the options it trained under; an env whose spec now decides
    under others (a changed spec file) is refused, not silently used."""
    from fusion_rl.decisions import DecisionOptions

    policy = load_policy(tiny_run)
    assert policy.model.decisions == DecisionOptions()  # envs/tiny.yaml: no masks
    env = make_eval_env(policy.config, max_mac_anchors=1)
    try:
        with pytest.raises(ConfigError, match="trained under decision options .* the evaluation env"):
            decide_plan(policy.model, env, "mlp_tiny", "host")
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
    rule_plans = {(r["model"], r["target"], r["method"]): r["plan_hash"] for r in rows if r["method"] in RULE_BASELINES}
    for r in rows:
        assert r["best_rule"] in RULE_BASELINES and r["speedup_vs_best_rule"] is not None
    for r in learned:  # the verdict is present, and a named rule really has the policy's plan
        assert "collapsed_to" in r
        if r["collapsed_to"] is not None:
            assert rule_plans[(r["model"], r["target"], r["collapsed_to"])] == r["plan_hash"]


def test_load_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        load_policy(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"env_spec": "tiny", "wandb": "disabled"}))
    with pytest.raises(ConfigError, match="neither final_model.json nor a checkpoint"):
        load_policy(tmp_path)


def test_cli_parses_and_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fusion_rl.cli import build_parser

    args = build_parser().parse_args(["evaluate", "runs/a", "runs/b", "--heldout-models", "se_cnn,gpt_tiny",
                                      "--heldout-targets", "haswell-t1", "--search-budget", "4"])
    assert args.command == "evaluate" and len(args.runs) == 2 and args.search_budget == 4
    one_line_error(*run_cli(capsys, "evaluate", str(tmp_path / "nope"), "--models", "mlp_tiny")[::2],
                   "not a run directory")


def test_cli_reports_the_best_rule_and_a_collapse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`fusion-rl evaluate` prints the speedup vs the best fixed rule beside the one vs tvm, and
    names a seed that collapsed to a rule (rows from a stub: nothing is trained or measured)."""
    import fusion_rl.evaluate
    from fusion_rl.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    common = {"status": "ok", "num_kernels": 1, "intermediate_bytes": 0}

    def fake_evaluate(run_dirs, cases, search, log=print, **kwargs):
        rows = []
        for model in ("a", "b"):
            rows += [_row(model, "tvm", 1.0, f"{model}-tvm", **common),
                     _row(model, "aggressive_1anchor", 0.5, f"{model}-agg1", **common),
                     _row(model, "learned", 0.5, f"{model}-agg1", seed=0, run_dir=str(run), **common)]
        fill_speedups(rows)
        for r in rows:
            if "run_dir" in r:
                r["collapsed_to"] = collapsed_to(rows)[(r["method"], r["run_dir"])]
        return rows

    monkeypatch.setattr(fusion_rl.evaluate, "evaluate", fake_evaluate)
    assert main(["evaluate", str(run), "--heldout-models", "a,b"]) == 0
    out = capsys.readouterr().out
    assert "speedup_vs_best_rule" in out
    assert "vs tvm 2.000x, vs the best fixed rule (heldout-model: aggressive_1anchor) 1.000x" in out
    assert f"seed 0 ({run}) collapsed to the fixed rule aggressive_1anchor" in out
