"""The transfer report (:mod:`fusion_rl.report.transfer`) and the harness's config helpers
(:mod:`fusion_rl.transfer`), on a tiny synthetic results set: no training, no measurement."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from fusion_rl import transfer
from fusion_rl.errors import ConfigError
from fusion_rl.evaluate import fill_speedups
from fusion_rl.report import transfer as report

ENV_SPEC = SimpleNamespace(models=["mlp_tiny"], targets=["host"], schedule="rules", reward="e2e",
                           protocol=SimpleNamespace(key="n1r3m5w1", repeat=3, min_repeat_ms=5))
CFG = {"train_config": "experiments/transfer/train.yaml", "seeds": [0, 1], "heldout_models": ["se_cnn"],
       "heldout_targets": ["haswell-t1"], "window": 4,
       "search": {"algos": ["random"], "multiplier": 10, "equal_budget_cap": 8, "multiplied_models": ["se_cnn"],
                  "search_models": ["se_cnn"], "goal_budget": 0, "seed": 3}}


def _row(model: str, split: str, method: str, ms: float | None, seed: int | None = None, **extra) -> dict:
    row = {"model": model, "target": "host", "split": split, "method": method, "latency_ms": ms,
           "spread_ms": 0.01 if ms else None, "status": "ok" if ms else "failed", "num_kernels": 3,
           "intermediate_bytes": 2048, "multi_anchor_groups": 0, "plan_hash": f"{method}{seed}", "plan": None,
           "collapsed_to": None, **extra}
    if seed is not None:
        row.update(seed=seed, run_dir=f"runs/r{seed}")
    return row


@pytest.fixture
def rows() -> list[dict]:
    """One held-out case and one training case; two seeds; two rule sets; one search."""
    rows = [
        _row("se_cnn", "heldout-model", "learned", 0.5, seed=0),
        _row("se_cnn", "heldout-model", "learned", 0.8, seed=1),
        _row("se_cnn", "heldout-model", "tvm", 1.0),
        _row("se_cnn", "heldout-model", "unfused", 2.0),
        _row("se_cnn", "heldout-model", "random@8", 0.4, algo="random", budget=8, evaluations=8, measurements=5),
        _row("mlp_tiny", "train", "learned", 0.3, seed=0),
        _row("mlp_tiny", "train", "learned", None, seed=1),
        _row("mlp_tiny", "train", "tvm", 0.6),
        _row("mlp_tiny", "train", "unfused", 0.9),
    ]
    fill_speedups(rows, ["tvm", "unfused"])
    return rows


# ---- cells ------------------------------------------------------------------------------------


def test_cells():
    assert report.fmt(None) == report.fmt(math.nan) == report.fmt(math.inf) == "—"
    assert report.fmt(1.23456, ".2f") == "1.23"
    assert report.cell(None) == "—"
    assert report.cell({"latency_ms": None, "status": "timeout"}) == "timeout"
    assert report.cell({"latency_ms": 2.0, "spread_ms": None, "speedup_vs_tvm": 1.5}) == "2.0000 ±— (1.50×)"
    learned = [{"latency_ms": 1.0, "speedup_vs_tvm": 2.0}, {"latency_ms": 3.0, "speedup_vs_tvm": 1.0},
               {"latency_ms": 4.0, "speedup_vs_tvm": 0.5}]
    assert report.learned_cell(learned) == "3.0000 [1.0000–4.0000] (1.17×)"
    assert report.learned_cell([{"latency_ms": None, "speedup_vs_tvm": None, "status": "crashed"}]) == "crashed"


def test_env_prefix_names_the_host_cpu_override(monkeypatch):
    monkeypatch.delenv("FUSION_RL_HOST_MCPU", raising=False)
    assert report.env_prefix() == "FUSION_RL_CACHE=/tmp/frl_cache TVM_NUM_THREADS=2 "
    monkeypatch.setenv("FUSION_RL_HOST_MCPU", "skylake")
    assert report.env_prefix().endswith("FUSION_RL_HOST_MCPU=skylake ")


# ---- the report -------------------------------------------------------------------------------


def _write(tmp_path: Path, rows: list[dict], monkeypatch) -> tuple[str, dict]:
    monkeypatch.setattr(report, "machine", lambda: "a test machine")
    stats = [{"run_dir": "runs/r0", "steps": 64, "episodes": 8, "measurements": 30, "failures": 0, "wall_s": 12.0},
             {"run_dir": "runs/r1", "steps": 64, "episodes": 8, "measurements": 10, "failures": 1, "wall_s": 8.0}]
    parity = [{"seed": 0, "point": {"step": 40.0, "measurements": 21.0}}, {"seed": 1, "point": None}]
    budget = {"amortized": 20, "cap": 8, "budget": 8}
    times = {"train_s": 20.0, "eval_s": 5.0, "total_s": 30.0}
    report.write_report(tmp_path, CFG, ENV_SPEC, [Path("runs/r0"), Path("runs/r1")], stats, parity, budget, rows,
                        ["python scripts/train.py --seed 0"], times, ["scripts/transfer.py", "cfg.yaml"])
    return (tmp_path / "README.md").read_text(), json.loads((tmp_path / "summary.json").read_text())


def test_report_tables_come_from_the_rows(tmp_path, rows, monkeypatch):
    text, summary = _write(tmp_path, rows, monkeypatch)
    assert "Machine: a test machine." in text
    assert "scripts/transfer.py cfg.yaml" in text and ".venv/bin/python scripts/train.py --seed 0" in text
    # Training runs: parity reached by seed 0 only.
    assert "| 0 | `runs/r0` | 64 | 8 | 30 | 0 | 12 | step 40, after 21 measurements |" in text
    assert "| 1 | `runs/r1` | 64 | 8 | 10 | 1 | 8 | not reached |" in text
    # The held-out table: learned = seed median [min-max] (mean speedup); rules as latency ± spread (speedup).
    assert "| se_cnn | host | 0.6500 [0.5000–0.8000] (1.62×) | 1.0000 ±0.0100 (1.00×) | 2.0000 ±0.0100 (0.50×)" in text
    # Amortized cost 20 > cap 8: the report says search gets fewer measurements.
    assert "**B = 8**" in text and "search gets *fewer* measurements" in text
    # Learned vs search: best search latency / learned seed-median = 0.4 / 0.65.
    assert f"| {0.4 / 0.65:.3f} |" in text
    held = summary["summary"]["heldout-model"]
    assert held["per_seed"] == pytest.approx([2.0, 1.25]) and held["mean"] == pytest.approx(1.625)
    assert held["best_rule"] == "tvm" and held["rules"] == {"unfused": pytest.approx(0.5)}
    assert summary["budget"] == {"amortized": 20, "cap": 8, "budget": 8}
    assert summary["parity"] == [{"seed": 0, "point": {"step": 40.0, "measurements": 21.0}}, {"seed": 1, "point": None}]
    assert "collapsed to" not in text


def test_report_says_when_a_seed_collapsed(tmp_path, rows, monkeypatch):
    for r in rows:
        if r["method"] == "learned" and r["seed"] == 1:
            r["collapsed_to"] = "tvm"
    text, summary = _write(tmp_path, rows, monkeypatch)
    assert "**Seed 1 collapsed to `tvm`**" in text and "Seed 0 collapsed" not in text
    assert summary["collapsed_to"] == {"0": None, "1": "tvm"}


def test_remeasure_section(rows):
    lines = report.remeasure_section([r for r in rows if r["split"] == "heldout-model"], 3, ["x"])
    assert lines[0] == "## Re-measured under identical conditions\n"
    assert "timed again without the store, 3 rounds" in lines[1]
    assert any(ln.startswith("| se_cnn | host | 0.6500 [0.5000–0.8000] (1.62×) |") for ln in lines)
    summary = next(ln for ln in lines if ln.startswith("- heldout-model"))
    assert "per seed 2.000×, 1.250×; mean **1.625×**" in summary and "unfused 0.500×" in summary


def test_plot_heldout_writes_a_png(tmp_path, rows):
    report.plot_heldout([r for r in rows if r["split"] != "train"], tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


class _Retimed:
    failures: list = []

    def verdict(self, a: str, b: str) -> dict:
        return {"paired_speedup": 1.2, "paired_spread": 0.05, "repeats_won": 5, "repeats": 6}


def test_metaschedule_table(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "machine", lambda: "a test machine")

    def rec(ms: float | None) -> SimpleNamespace:
        return SimpleNamespace(status="ok" if ms else "timeout", median_ms=ms, spread_ms=0.001, wall_s=90.0)

    plan_a, plan_b = SimpleNamespace(hash="a"), SimpleNamespace(hash="b")
    runs = {"seed": 0, "run": Path("runs/r0"), "trials": 16, "started": 0.0, "models": [
        {"name": "se_cnn", "tvm": (plan_a, rec(2.0), 1.0, True), "learned": (plan_b, rec(1.0), 2.0, False),
         "kernels": {"tvm": 9, "learned": 4}, "retimed": _Retimed()},
        {"name": "mlp_tiny", "tvm": (plan_a, rec(1.0), 0.0, True), "learned": (plan_a, rec(1.0), 0.0, True),
         "kernels": {"tvm": 3, "learned": 3}},
    ]}
    cfg = {**CFG, "metaschedule": {"target": "host", "retime_rounds": 3}}
    report.write_metaschedule(tmp_path, cfg, ENV_SPEC, runs, ["scripts/transfer.py", "--metaschedule"])
    text = (tmp_path / "metaschedule.md").read_text()
    assert "**16 trials per task**" in text and "seed 0's policy (`runs/r0`)" in text
    assert "| se_cnn* | 2.0000 (±0.0010) | 1.0000 (±0.0010) | 2.000× | 1.200× (0.050, 5/6) | 9 | 4 | 90 | 90 | 1 / 2 | no |" in text
    assert "| mlp_tiny | 1.0000 (±0.0010) | 1.0000 (±0.0010) | 1.000× | same plan | 3 | 3 |" in text
    assert "held-out models: **2.000×** over 1 models" in text
    assert "re-timed, all models: **1.095×** over 2 models" in text  # geomean(1.2, 1.0)


# ---- the harness's config helpers -------------------------------------------------------------


def test_cases_and_search_settings_from_the_config():
    cases = transfer.eval_cases(CFG, ENV_SPEC)
    assert [(c.model, c.target, c.split) for c in cases] == [
        ("se_cnn", "host", "heldout-model"), ("mlp_tiny", "haswell-t1", "heldout-target"),
        ("se_cnn", "haswell-t1", "heldout-target"), ("mlp_tiny", "host", "train")]
    s = transfer.search_settings(CFG["search"], 8, ENV_SPEC.targets)
    assert (s.algos, s.budget, s.multiplier, s.search_targets, s.seed) == (("random",), 8, 10, ("host",), 3)
    assert s.multiplied_models == ("se_cnn",) and s.exhaustive_models == ()


def test_runs_found_given_or_refused(tmp_path):
    for name in ("e__x__0__1", "e__x__0__2", "e__x__0__3"):
        (tmp_path / name).mkdir()
    for name in ("e__x__0__1", "e__x__0__2"):
        (tmp_path / name / "final_model.zip").write_bytes(b"")
    assert transfer.find_run(tmp_path, "e", "x", 0) == tmp_path / "e__x__0__2"  # newest finished
    assert transfer.find_run(tmp_path, "e", "x", 1) is None
    (tmp_path / "e__x__0__1" / "config.json").write_text(json.dumps({"seed": 5}))
    runs, commands = transfer.get_runs(CFG, tmp_path / "t.yaml", tmp_path, [tmp_path / "e__x__0__1"])
    assert runs == [tmp_path / "e__x__0__1"] and "--seed 5 " in commands[0]
    with pytest.raises(ConfigError, match="not a run directory"):
        transfer.get_runs(CFG, tmp_path / "t.yaml", tmp_path, [tmp_path / "e__x__0__3"])
    (tmp_path / "ab" / "config.json").parent.mkdir()
    (tmp_path / "ab" / "config.json").write_text("{}")
    cfg = {"ablations": [{"label": "kept", "runs": ["ab"], "env": {"k": 1}}, {"label": "absent", "runs": ["no"]},
                         {"label": "partly absent", "runs": ["ab", "no"]}]}
    assert transfer.ablations(cfg, tmp_path) == [("kept", [tmp_path / "ab"], {"k": 1})]
