"""``fusion-rl compare`` and the external runtimes it times."""

from __future__ import annotations

import json

import pytest

from fusion_rl.baselines.runtimes import run_runtime, runtime_callable, time_callable, time_paired
from fusion_rl.cli import main
from fusion_rl.compare import compare_model, to_markdown
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.fusion.rules import RULE_SETS
from fusion_rl.graph.model import load_onnx_model
from fusion_rl.graph.zoo import export_onnx

from conftest import one_line_error, run_cli

QUICK = TimingProtocol.quick()


def test_time_callable_scales_number_to_min_repeat():
    calls = []
    timing = time_callable(lambda: calls.append(1), TimingProtocol(repeat=3, min_repeat_ms=5, warmup=1))
    assert len(timing.times_ms) == 3 and len(calls) > 100  # a no-op needs many calls per repeat
    # Each repeat is one batch of calls divided by its count: a per-call time, positive.
    assert all(t > 0 for t in timing.times_ms)
    assert min(timing.times_ms) <= timing.median_ms <= max(timing.times_ms)


def test_time_paired_interleaves_rounds_in_alternating_order():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    probes: list[float] = []
    times = time_paired(fns, TimingProtocol(repeat=2, min_repeat_ms=1, warmup=1), rounds=3, probes_us=probes)
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}  # rounds x repeat each
    assert len(probes) == 6 and probes[0] == probes[1] > 0  # one host probe per repeat, per round
    # Collapse runs of one system: a b | b a | a b  ->  a, b, a, b (each round a contiguous block)
    blocks = [x for i, x in enumerate(order) if i == 0 or order[i - 1] != x]
    assert blocks == ["a", "b", "a", "b"]


def test_runtime_callable_is_verified(model_cache, monkeypatch):
    model = model_cache("cnn_plain")
    assert len(runtime_callable("ort", model)()) >= 1
    import fusion_rl.baselines.runtimes as runtimes

    expected, ref = runtimes.reference_outputs(model)
    monkeypatch.setattr(runtimes, "reference_outputs", lambda m: ([e + 1.0 for e in expected], ref))
    with pytest.raises(ValueError, match="wrong output"):
        runtime_callable("ort", model)


@pytest.mark.parametrize("runtime", ["ort", "ort-noopt", "torch-eager"])
def test_runtimes_verify_and_time(model_cache, runtime):
    res = run_runtime(runtime, model_cache("cnn_plain"), QUICK)
    assert res.status == "ok" and res.median_ms > 0 and res.spread_ms >= 0


def test_torch_runtimes_do_not_apply_to_onnx_files():
    model = load_onnx_model(export_onnx("mlp_tiny"))
    assert run_runtime("torch-eager", model, QUICK).status == "n/a"
    assert run_runtime("ort", model, QUICK).status == "ok"


def test_compare_rows_cover_rules_schedules_and_runtimes(model_cache, tmp_path):
    model = model_cache("mlp_tiny")
    rows = compare_model(model, [("naive", {}), ("rules", {})], protocol=QUICK,
                         runtimes=["ort", "ort-noopt", "torch-eager"])
    systems = {r.system for r in rows}
    assert {"tvm[tvm / rules]", "tvm[unfused / naive]", "ort", "ort-noopt", "torch-eager"} <= systems
    assert len(rows) == len(RULE_SETS) * 2 + 3 and all(r.status == "ok" for r in rows)
    table = to_markdown(rows, "mlp_tiny")
    assert table.count("\n| ") == len(rows) + 1  # header row + one per system


def test_compare_cli_writes_report(tmp_path, capsys):
    code = main(["compare", "mlp_tiny", "--schedule", "naive", "--repeat", "2",
                 "--min-repeat-ms", "2", "--no-store", "-o", str(tmp_path), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out)
    assert any(r["system"] == "torch-compile" for r in rows)
    assert (tmp_path / "mlp_tiny.md").read_text().startswith("Machine:")
    assert (tmp_path / "mlp_tiny.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, words",
    [
        (["compare", "mlp_tiny", "--schedule", "naive,fast"], "unknown schedule provider 'fast'"),
        (["compare", "mlp_tiny", "--target", "arm-m4"], "unknown target"),
        (["measure", "mlp_tiny", "--rules", "tvm", "--store", "/proc/fusion_rl.sqlite"], "/proc/fusion_rl.sqlite"),
    ],
)
def test_compare_and_measure_bad_options(argv, words, capsys):
    one_line_error(*run_cli(capsys, *argv)[::2], words)


@pytest.mark.parametrize("name", ["compile_libraries", "fusion_effects"])
def test_experiment_configs_load(name):
    from pathlib import Path

    from fusion_rl.compare import load_experiment

    path = Path(__file__).resolve().parent.parent / "experiments" / name / "config.yaml"
    cfg, spec, protocol, schedules = load_experiment(path)
    assert cfg["models"] and spec.num_threads >= 1 and protocol.repeat == cfg["repeat"]
    assert dict(schedules)["tuned"] == {"trials_per_task": cfg["trials_per_task"]}


def test_experiment_config_errors(tmp_path):
    from fusion_rl.compare import load_experiment
    from fusion_rl.errors import ConfigError

    bad = tmp_path / "c.yaml"
    bad.write_text("models: [mlp_tiny]\nmodles: [x]\n")
    with pytest.raises(ConfigError, match="unknown keys \\['modles'\\]"):
        load_experiment(bad)
    bad.write_text("models: [mlp_tiny\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(bad)


@pytest.mark.parametrize("rounds", [1, -2, "7", True])
def test_experiment_confirm_rounds_must_be_off_or_two_plus(tmp_path, rounds):
    from fusion_rl.compare import load_experiment
    from fusion_rl.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(f"models: [mlp_tiny]\nschedules: [naive]\ntrials_per_task: 4\ntarget: host\n"
                    f"repeat: 3\nmin_repeat_ms: 1\nconfirm_rounds: {rounds!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match="confirm_rounds"):
        load_experiment(path)


def test_time_systems_times_plans_and_runtimes_head_to_head(model_cache, monkeypatch):
    """Plans and ORT in one process: every system gets rounds x repeat timings, round medians
    for the verdict, and two labels of one plan share a build."""
    from fusion_rl.compare import time_systems
    from fusion_rl.compiler.target import parse_target
    from fusion_rl.fusion.rules import make_plan

    import fusion_rl.compiler.build as build

    builds = []
    real = build.compile_plan
    monkeypatch.setattr(build, "compile_plan", lambda model, plan, *a, **k: builds.append(plan.hash) or real(model, plan, *a, **k))
    model = model_cache("mlp_tiny")
    tvm_plan = make_plan("tvm", model.mod, model.graph)
    plans = {"tvm": tvm_plan, "again": tvm_plan, "unfused": make_plan("unfused", model.mod, model.graph)}
    h2h = time_systems(model, plans, ["ort"], parse_target("host"), TimingProtocol(repeat=3, min_repeat_ms=1), 2)
    assert list(h2h.pooled_ms) == ["tvm", "again", "unfused", "ort"]
    assert sorted(builds) == sorted({p.hash for p in plans.values()})  # one build per distinct plan
    assert all(len(ms) == 6 and min(ms) > 0 for ms in h2h.pooled_ms.values())
    assert all(len(r) == 2 for r in h2h.round_medians.values())
    assert len(h2h.fork_join_us) == 6  # the host regime of every paired repeat
    assert h2h.num_kernels["tvm"] == h2h.num_kernels["again"] < h2h.num_kernels["unfused"]
    assert "ort" not in h2h.num_kernels
    v = h2h.verdict("unfused", "ort")
    assert v["repeats"] == 6 and v["paired_speedup"] > 0
