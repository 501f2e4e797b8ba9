"""experiments/learn_bench: the family split, the summary over seeds (fusion_rl/report/learn_bench.py)
and scripts/learn_bench.py end to end on tiny models (train with table rewards and a warm start,
decide on a held-out family, time head to head, report)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import load_script
from fusion_rl.errors import ConfigError
from fusion_rl.report.learn_bench import best_fixed_rule, by_regime, headroom, render, summarize, unstable_models
from fusion_rl.transfer import check_family_split, check_target_split, groups_past_mask, shapes_formed


def _row(model, label, hash_, vs_tvm, **vs):
    return {"model": model, "label": label, "plan_hash": hash_, "latency_ms": 1.0, "spread_ms": 0.1,
            "vs": {"tvm": [vs_tvm, 0.01], **{k: [v, 0.01] for k, v in vs.items()}}}


@pytest.mark.unit
def test_split_refuses_a_heldout_family_seen_in_training():
    families = {"a": "cnn", "b": "transformer", "c": "cnn", "d": "vit"}
    check_family_split(families, ["a", "b"], ["d"])
    with pytest.raises(ConfigError, match="'c' is of family 'cnn'.*'a'"):
        check_family_split(families, ["a", "b"], ["c", "d"])
    with pytest.raises(ConfigError, match="'e' has no family"):
        check_family_split(families, ["a"], ["e"])
    with pytest.raises(ConfigError, match="also a training model"):
        check_family_split(families, ["a"], ["a"])


@pytest.mark.unit
def test_split_refuses_a_heldout_target_seen_in_training():
    check_target_split(["x86-64-t1", "haswell-t2"], ["haswell-t1"])
    # Two names of one target compile the same code: compared by key, not by name.
    with pytest.raises(ConfigError, match="'llvm:haswell:t2' is the training target 'haswell-t2'"):
        check_target_split(["x86-64-t1", "haswell-t2"], ["haswell-t1", "llvm:haswell:t2"])
    with pytest.raises(ConfigError, match="unknown target|not a known"):
        check_target_split(["x86-64-t1"], ["no-such-target"])


@pytest.mark.unit
def test_summary_judges_seeds_against_the_best_rule_of_the_split():
    rows = []
    for m, agg in (("m1", 1.20), ("m2", 0.90)):
        rows += [_row(m, "tvm", f"{m}t", 1.0, aggressive=1 / agg), _row(m, "aggressive", f"{m}a", agg, aggressive=1.0)]
        rows.append(_row(m, "seed 0", f"{m}a", agg, aggressive=1.0))  # seed 0 plans = aggressive
        rows.append(_row(m, "seed 1", f"{m}x", 1.30, aggressive=1.30 / agg))
    # aggressive: geomean(1.2, 0.9) = 1.039 > tvm's 1.0
    assert best_fixed_rule(rows, ["tvm", "aggressive"]) == "aggressive"
    s = summarize(rows, ["tvm", "aggressive"], [0, 1])
    by_seed = {x["seed"]: x for x in s["per_seed"]}
    assert by_seed[0]["collapsed_to"] == "aggressive" and by_seed[1]["collapsed_to"] is None
    assert by_seed[1]["vs_tvm"] == pytest.approx(1.30)
    assert by_seed[1]["vs_best_rule"] == pytest.approx((1.30 / 1.2 * 1.30 / 0.9) ** 0.5)
    assert s["best_seed"] == 1 and s["vs_tvm"]["n"] == 2 and s["vs_tvm"]["low"] < s["vs_tvm"]["mean"]
    # A seed missing a model is not summarised (its geomean would skip the hard case).
    s = summarize([r for r in rows if not (r["label"] == "seed 1" and r["model"] == "m2")], ["tvm", "aggressive"],
                  [0, 1])
    assert [x["seed"] for x in s["per_seed"]] == [0]


@pytest.mark.unit
def test_headroom_is_the_fastest_plan_of_each_model():
    rows = []
    for m, agg, other in (("m1", 1.20, 1.10), ("m2", 0.90, 1.05)):
        rows += [_row(m, "tvm", f"{m}t", 1.0, aggressive=1 / agg), _row(m, "aggressive", f"{m}a", agg, aggressive=1.0),
                 _row(m, "greedy@500", f"{m}g", other, aggressive=other / agg)]
    room = headroom(rows, "aggressive")
    # m1: the rule itself (1.20); m2: the search's plan (1.05), which beats the rule's 0.90.
    assert {m: x["label"] for m, x in room["per_model"].items()} == {"m1": "aggressive", "m2": "greedy@500"}
    assert room["vs_tvm"] == pytest.approx((1.20 * 1.05) ** 0.5)
    assert room["vs_best_rule"] == pytest.approx((1.0 * 1.05 / 0.9) ** 0.5)
    result = {"summary": summarize(rows, ["tvm", "aggressive"], []), "rows": rows, "header": "h", "training": [],
              "searches": [], "finals": []}
    cfg = {"families": {"m1": "a", "m2": "b"}, "heldout_models": ["m1", "m2"], "rounds": 2, "repeat": 2}
    assert "Headroom: the fastest plan timed here on each held-out model (m1: aggressive 1.200, m2: greedy@500 " \
        "1.050) gives a geomean of 1.122 over `tvm` and 1.080 over `aggressive`" in render(cfg, result, [])
    # A model with no plan timed against tvm (a failed comparison): no bound.
    assert headroom([*rows, {**_row("m3", "tvm", "x", 1.0), "vs": {}}], "aggressive") is None


@pytest.mark.unit
def test_the_training_table_says_what_each_seed_was_fine_tuned_on():
    rows = [_row("m1", "tvm", "t", 1.0, aggressive=1.0), _row("m1", "aggressive", "a", 1.0, aggressive=1.0)]
    cfg = {"families": {"m1": "a"}, "heldout_models": ["m1"], "rounds": 2, "repeat": 2}
    seed = {"seed": 0, "steps": 64, "episodes": 2, "measurements": 3, "imitated": "tvm", "wall_s": 5.0}

    def training_table(training):
        result = {"summary": summarize(rows, ["tvm", "aggressive"], []), "rows": rows, "header": "h",
                  "training": training, "searches": [], "finals": []}
        return render(cfg, result, []).split("## Training")[1]

    plain = training_table([seed])
    assert "fine-tuned" not in plain and "| 0 | 64 | 2 | 3 | tvm | 5 |" in plain
    tuned = training_table([{**seed, "fine_tuned": "credit (5 formed)"}])
    assert "| fine-tuned on (after PPO) |" in tuned and "| 0 | 64 | 2 | 3 | tvm | credit (5 formed) | 5 |" in tuned
    assert "before fine-tuning" in tuned


@pytest.mark.unit
def test_a_model_whose_tvm_timing_spreads_is_flagged():
    calm = _row("calm", "tvm", "c", 1.0)  # IQR 10% of the median: a normal 2-thread spread
    noisy = {**_row("noisy", "tvm", "n", 1.0), "latency_ms": 3.3, "spread_ms": 2.1}
    seed = {**_row("noisy", "seed 0", "s", 1.2), "latency_ms": 2.9, "spread_ms": 1.6}  # only tvm's row counts
    failed = {**_row("failed", "tvm", "f", 1.0), "latency_ms": None}
    found = unstable_models([calm, noisy, seed, failed])
    assert list(found) == ["noisy"] and found["noisy"] == pytest.approx(2.1 / 3.3)


@pytest.mark.unit
def test_ratios_are_split_by_the_host_regime_of_each_repeat():
    # Two near repeats (probe 0.6-0.7 us), then two far ones (1.5 us). "few" (fewer kernels) ties
    # tvm near and wins 1.3x far; the seed's plan wins 1.1x near and ties "few" far.
    probes = [0.6, 0.7, 1.5, 1.5]
    series = {"tvm": [3.0, 3.0, 5.2, 5.2], "few": [3.0, 3.0, 4.0, 4.0], "seed 0": [2.727, 2.727, 4.0, 4.0]}
    rows = [{**_row("m", label, label, 1.0, few=1.0), "repeat_ms": ms, "fork_join_us": probes}
            for label, ms in series.items()]
    near, far = by_regime(rows, "near"), by_regime(rows, "far")
    seed_near, seed_far = near[2]["vs"], far[2]["vs"]
    assert seed_near["tvm"] == pytest.approx([1.1, 0.0, 2], rel=1e-3) and seed_near["few"][0] == pytest.approx(1.1, rel=1e-3)
    assert seed_far["tvm"] == pytest.approx([1.3, 0.0, 2]) and seed_far["few"][0] == pytest.approx(1.0)
    # A row written before raw repeats were kept is left out, not split wrongly.
    assert by_regime([_row("m", "tvm", "t", 1.0)], "near") == []
    # The reference is the run's lowest probe: a model timed wholly far is far.
    other = [{**r, "model": "m2", "fork_join_us": [1.5] * 4} for r in rows]
    assert all(not r["vs"] for r in by_regime(rows + other, "near") if r["model"] == "m2")
    cfg = {"families": {"m": "cnn"}, "heldout_models": ["m"], "rounds": 1, "repeat": 4}
    result = {"summary": summarize(rows, ["tvm", "few"], [0]), "rows": rows, "header": "h", "training": [],
              "searches": [], "finals": []}
    text = render(cfg, result, [])
    assert "## By host regime" in text and "| m | 2 / 2 | 0.65 / 1.50 |" in text
    assert "| near | 1.100 [" in text and "| far | 1.300 [" in text


def test_the_report_says_which_shape_instances_each_plan_forms(model_cache):
    """shapes_formed on tiny MobileNet: a string per plan, 1 where the plan joins an instance's
    two anchors; the report lists the seeds and the rules that form any, per model."""
    from fusion_rl.fusion.group_shapes import shape_instances
    from fusion_rl.fusion.plan_space import form_shape
    from fusion_rl.fusion.rules import make_plan

    model = model_cache("mobilenet_tiny")
    graph = model.graph
    found = shape_instances(graph, "pointwise_depthwise")
    one_anchor = make_plan("aggressive_1anchor", model.mod, graph)
    plans = {"aggressive_1anchor": one_anchor, "aggressive_shapes": make_plan("aggressive_shapes", model.mod, graph),
             "seed 0": form_shape(graph, one_anchor, "pointwise_depthwise", found[-1])}
    formed = shapes_formed(graph, plans, ["pointwise_depthwise", "pointwise_grouped"])
    n = len(found)
    assert list(formed) == ["pointwise_depthwise"]  # no grouped instance on this graph: left out
    assert formed["pointwise_depthwise"]["plans"] == {"aggressive_1anchor": "0" * n, "aggressive_shapes": "1" * n,
                                                      "seed 0": "0" * (n - 1) + "1"}
    assert formed["pointwise_depthwise"]["maps"] == [graph.nodes[g[0]].shapes[0][-1] for g in found]
    # The aggressive rule's one group holds every anchor: past a one-anchor mask, shapes or not.
    plans["aggressive"] = make_plan("aggressive", model.mod, graph)
    past = groups_past_mask(graph, plans, 1, ["pointwise_depthwise"])
    assert past == {"aggressive_1anchor": 0, "aggressive_shapes": 0, "seed 0": 0, "aggressive": 1}
    assert groups_past_mask(graph, plans, 1, [])["aggressive_shapes"] == n  # every pair, without the shape
    assert groups_past_mask(graph, plans, None, []) == {}
    cfg = {"families": {"m": "cnn"}, "heldout_models": ["m"], "rules": list(plans)[:2], "rounds": 1, "repeat": 4}
    rows = [_row("m", label, label, 1.0) for label in plans]
    result = {"summary": summarize(rows, cfg["rules"], [0]), "rows": rows, "header": "h", "training": [],
              "searches": [], "finals": [],
              "shapes_formed": {"m": {"training": False, "shapes": formed, "past_mask": past},
                                "t": {"training": True, "shapes": {}}}}
    text = render(cfg, result, [])
    section = text.split("## Group shapes formed")[1]
    assert f"m (held out), `pointwise_depthwise`, {n} instances on maps" in section
    assert f"| seed 0 | `{'0' * (n - 1)}1` | 1 |" in section and f"| aggressive_shapes | `{'1' * n}` | {n} |" in section
    assert "| aggressive_1anchor |" not in section and "t (training)" not in section
    assert "m: groups the training mask forbids (more conv/matmul anchors than its cap, and no declared " \
           "shape): aggressive 1." in section
    # A held-out target lists the plans decided for it the same way, in its own section.
    result["heldout_targets"] = {"x86-64-t1": {"key": "llvm-x86-64-t1", "rows": rows, "summary": result["summary"],
                                               "shapes_formed": {"m": {"training": False, "shapes": formed}}}}
    held = render(cfg, result, []).split("## Held-out target `x86-64-t1`")[1]
    assert "### Group shapes formed on `x86-64-t1`" in held and f"| seed 0 | `{'0' * (n - 1)}1` | 1 |" in held
    del result["shapes_formed"], result["heldout_targets"]["x86-64-t1"]["shapes_formed"]  # results written before
    assert "Group shapes formed" not in render(cfg, result, [])


@pytest.mark.unit
def test_a_first_model_timed_wholly_far_is_compared_again(monkeypatch):
    """The first model judged its repeats against its own far probes (no reference yet) and
    counted them near; against the run's lowest probe they are far, so it is named for a second
    comparison. A model judged against a near reference, or with enough near repeats, is not."""
    script = load_script("learn_bench")
    far, near = [1.6] * 15, [0.6] * 15

    def rows(model, probes, reference):
        return [{**_row(model, label, label, 1.0), "fork_join_us": probes, "reference_us": reference}
                for label in ("tvm", "seed 0")]

    run = rows("first", far, None) + rows("second", near, None) + rows("third", far, 0.6)
    assert script.misjudged_models(run, 15) == ["first"]  # "third" already added its rounds
    assert script.misjudged_models(run, 0) == []
    assert script.misjudged_models(rows("first", far[:12] + near[:3], None) + rows("second", near, None), 3) == []
    again = rows("first", near, 0.6)
    replaced = script.replace_model_rows(run, "first", again)
    assert [r["model"] for r in replaced] == ["first"] * 2 + ["second"] * 2 + ["third"] * 2
    assert replaced[:2] == again and script.misjudged_models(replaced, 15) == []
    # compare_misjudged compares only those again, with the first comparison's plans, against
    # the run's reference, and says whether it did.
    calls = []

    def compare(measurer, model, plans, refs, rounds, table, reference_us):
        calls.append((model, plans, refs, reference_us))
        return rows(model, near, reference_us)

    monkeypatch.setattr(script, "compare_plans", compare)
    compared = {m: (m, f"plans of {m}", ["tvm"]) for m in ("first", "second", "third")}
    out, again = script.compare_misjudged(None, run, compared, {"min_near": 15}, None)
    assert again and calls == [("first", "plans of first", ["tvm"], 0.6)] and out[:2] == rows("first", near, 0.6)
    assert script.compare_misjudged(None, out, compared, {"min_near": 15}, None) == (out, False)


def test_learn_bench_script_trains_decides_and_times_head_to_head(tmp_path, capsys):
    (tmp_path / "env.yaml").write_text(yaml.safe_dump({
        "models": ["mlp_tiny"], "reward": "table", "store": str(tmp_path / "store.sqlite"),
        "protocol": {"repeat": 2, "min_repeat_ms": 1}, "timeout_s": 300, "max_nodes": 64, "max_edges": 128,
        "max_mac_anchors": 1, "group_shapes": ["pointwise_depthwise"]}))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "env_spec": str(tmp_path / "env.yaml"), "exp_name": "lb", "total_timesteps": 32, "checkpoint_every": 32,
        "wandb": "disabled", "warm_start": {"epochs": 2, "rules": ["tvm", "aggressive"]},
        "ppo": {"n_steps": 16, "batch_size": 8, "n_epochs": 1,
                "features_extractor_kwargs": {"hidden": 8, "heads": 1, "num_layers": 1, "hw_hidden": 4}}}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "train_config": str(tmp_path / "train.yaml"), "seeds": [0], "runs_dir": str(tmp_path / "runs"),
        "families": {"mlp_tiny": "mlp", "cnn_plain": "cnn"}, "heldout_models": ["cnn_plain"],
        "rules": ["tvm", "aggressive"], "search": {"runs": {"annealing": [4], "greedy": [3]}, "goal": "annealing@4", "seed": 0},
        "heldout_targets": ["x86-64-t1"],
        "rounds": 2, "min_near_repeats": 3, "max_rounds": 3, "repeat": 2, "min_repeat_ms": 1, "timeout_s": 300,
        "window": 2}))
    assert load_script("learn_bench").main([str(config)]) == 0
    # An MLP has no pointwise -> depthwise pair: the declared shape is one training never shows.
    assert "warning: group shape 'pointwise_depthwise' is declared, but no training model" in capsys.readouterr().err
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["group_shapes"] == {"pointwise_depthwise": {}}
    formed = result["shapes_formed"]["cnn_plain"]
    assert formed["shapes"] == {} and not formed["training"]
    # The policy decides under the mask, so its plan has no group past it; aggressive's has one.
    assert formed["past_mask"]["seed 0"] == 0 and formed["past_mask"]["aggressive"] >= 1
    assert "cnn_plain: groups the training mask forbids" in (tmp_path / "results.md").read_text()
    # The new table got a per-launch cost, fitted on the rule plans, before training read it.
    assert result["launch_ms"] is not None and result["launch_ms"] >= 0.0
    assert "per-launch cost" in result["header"]
    labels = {r["label"]: r for r in result["rows"]}
    assert set(labels) == {"tvm", "aggressive", "seed 0", "annealing@4", "greedy@3"}
    assert all(r["status"] == "ok" and r["latency_ms"] > 0 for r in labels.values())
    assert labels["tvm"]["vs"]["tvm"] == [1.0, 0.0] and labels["seed 0"]["vs"]["annealing@4"][0] > 0
    # Seeded with the rules' plans, no search's best estimate is worse than the best rule's.
    rule_est = min(labels[r]["estimate_ms"] for r in ("tvm", "aggressive"))
    assert all(s["estimate_ms"] <= rule_est * (1 + 1e-9) for s in result["searches"])
    assert set(result["summary"]["vs_searches"]) == {"annealing@4", "greedy@3"}
    assert result["summary"]["search"] == "annealing@4"
    run = result["training"][0]
    assert run["episodes"] > 0 and run["imitated"] in {"tvm", "aggressive"}
    assert result["summary"]["per_seed"][0]["seed"] == 0 and result["summary"]["best_rule"] in {"tvm", "aggressive"}
    # The held-out target: the rules and the seed's plan decided for it, timed there head to head.
    held = result["heldout_targets"]["x86-64-t1"]
    assert held["key"] == "llvm-x86-64-t1" and held["shapes_formed"]["cnn_plain"]["past_mask"]["seed 0"] == 0
    assert {r["label"] for r in held["rows"]} == {"tvm", "aggressive", "seed 0"}
    assert all(r["status"] == "ok" and r["estimate_ms"] is None for r in held["rows"])
    assert held["summary"]["per_seed"][0]["vs_tvm"] > 0
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Learned fusion on held-out bench families") and "cnn_plain (cnn)" in text
    assert "## Held-out target `x86-64-t1` (`llvm-x86-64-t1`)" in text
    # Two rounds of 2 repeats, a third only where fewer than 3 of the 4 ran near.
    assert "## By host regime" in text and all(len(r["fork_join_us"]) == len(r["repeat_ms"]) == 2 * r["rounds"]
                                                  and r["rounds"] in (2, 3) for r in result["rows"])
    assert "2 interleaved rounds x 2 repeats, more rounds (up to 3) until 3 repeats of a model ran in the near regime" in text
    assert "training models: `pointwise_depthwise` **none**." in text
    assert (tmp_path / "curves.png").stat().st_size > 0
    # The report is regenerated from the results file alone.
    (tmp_path / "results.md").write_text("stale")
    assert load_script("learn_bench").main([str(config), "--render"]) == 0
    assert (tmp_path / "results.md").read_text() == text


@pytest.mark.unit
@pytest.mark.parametrize("search, match", [
    ({"runs": {"bogo": [10]}}, "unknown algorithm 'bogo'"),
    ({"runs": {"random": [0]}}, "positive ints"),
    ({"runs": {"random": [10]}, "goal": "annealing@500"}, "goal 'annealing@500' is not one of the runs"),
    ({"algo": "annealing", "budget": 500}, "unknown key"),
])
def test_learn_bench_refuses_a_bad_search_block(search, match):
    with pytest.raises(ConfigError, match=match):
        load_script("learn_bench").parse_searches(search)


@pytest.mark.unit
@pytest.mark.parametrize("cfg, match", [
    ({"rounds": 1}, "rounds: expected an int >= 2"),
    ({"min_near_repeats": -1}, "min_near_repeats: expected an int >= 0"),
    ({"rounds": 3, "max_rounds": 2}, "max_rounds: expected an int >= 3"),
    ({"min_near_repeats": "all"}, "min_near_repeats"),
])
def test_learn_bench_refuses_bad_rounds(cfg, match):
    with pytest.raises(ConfigError, match=match):
        load_script("learn_bench").parse_rounds(cfg)
    assert load_script("learn_bench").parse_rounds({}) == {"rounds": 3, "min_near": 0, "max_rounds": 6}


def test_search_demos_writes_a_plan_per_training_model(tmp_path, capsys):
    (tmp_path / "env.yaml").write_text(yaml.safe_dump({
        "models": ["mlp_tiny"], "reward": "table", "store": str(tmp_path / "store.sqlite"),
        "protocol": {"repeat": 2, "min_repeat_ms": 1}, "timeout_s": 300, "max_nodes": 64, "max_edges": 128}))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"env_spec": str(tmp_path / "env.yaml"), "exp_name": "sd"}))
    config = tmp_path / "config.yaml"
    cfg = {"train_config": str(tmp_path / "train.yaml"), "rules": ["tvm", "unfused"],
           "heldout_models": ["cnn_plain"],
           "demonstrations": {"algo": "greedy", "budget": 4, "seed": 0, "out": str(tmp_path / "demos")}}
    config.write_text(yaml.safe_dump(cfg))
    assert load_script("search_demos").main([str(config), "--retime", "2"]) == 0
    row = json.loads((tmp_path / "demos" / "results.json").read_text())[0]
    assert row["model"] == "mlp_tiny" and row["retimed_speedup"] > 0 and row["estimate_ms"] <= row["tvm_estimate_ms"]
    assert row["rule_kernels_retimed"] > 0  # the rules' kernels timed twice before the search
    # ... and the new table's per-launch cost fitted, as before training (env/tables.py).
    assert "per-launch cost" in capsys.readouterr().out
    report = (tmp_path / "demos" / "results.md").read_text()
    assert "| mlp_tiny |" in report and f"search_demos.py {config} --retime 2" in report
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.graph.model import load_model

    plan = FusionPlan.load(tmp_path / "demos" / "mlp_tiny.json")
    assert plan.fingerprint == load_model("mlp_tiny").fingerprint and plan.name == "greedy@4"
    # A held-out model in the training env is refused before anything is searched.
    config.write_text(yaml.safe_dump({**cfg, "heldout_models": ["mlp_tiny"]}))
    with pytest.raises(ConfigError, match="mlp_tiny is held out"):
        load_script("search_demos").main([str(config)])
    config.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "demonstrations"}))
    with pytest.raises(ConfigError, match="demonstrations"):
        load_script("search_demos").main([str(config)])
