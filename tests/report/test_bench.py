"""The bench report (experiments/bench/results.md) is rendered from the results rows."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import load_script
from fusion_rl.errors import ConfigError
from fusion_rl.report.bench import write_markdown


def _row(name: str, vs_ort: dict | None) -> dict:
    tvm = {r: {"latency_ms": ms, "spread_ms": 0.5, "kernels": 10, "speedup_vs_unfused": s,
               "speedup_spread": 0.02}
           for r, ms, s in (("unfused", 12.0, 1.0), ("tvm", 10.0, 1.2))}
    row = {"model": name, "gflop": 1.0, "ops": 20, "prep_s": 1.0, "tvm": tvm, "best_rules": "tvm",
           "runtimes": {"ort": {"status": "ok", "latency_ms": 11.0, "spread_ms": 0.1}},
           "compare_s": 5.0, "new_plan_s": 2.0, "new_plan_status": "ok", "kernel_schedules": {}}
    if vs_ort:
        row["vs_ort"] = vs_ort
    return row


def test_paired_ort_section_comes_from_the_rows(tmp_path):
    results = {"machine": "m", "target": "llvm-t2", "schedule": "rules", "peak_gflops": 100.0,
               "peak_note": "n", "protocol": "p", "rounds": 3, "command": "c",
               "models": [_row("a", {"runtime": "ort", "tvm_ms": 9.87, "runtime_ms": 11.11,
                                     "speedup": 1.123, "speedup_spread": 0.045, "repeats": 15}),
                          _row("b", None)]}
    path = tmp_path / "results.md"
    write_markdown(results, path)
    text = path.read_text()
    assert "## Head to head: TVM's best rule set vs ONNX Runtime" in text
    assert "| a | tvm | 9.87 | 11.11 | 1.123 (0.045) | 15 |" in text
    assert "| b | tvm |" not in text  # no paired row where none was measured
    results["models"] = [_row("b", None)]
    write_markdown(results, path)
    assert "best rule set vs ONNX Runtime" not in path.read_text()


def test_rows_measured_under_another_schedule_are_named():
    from fusion_rl.report.bench import schedule_note

    results = {"schedule": "rules:v6", "models": [_row("a", None), {**_row("b", None), "schedule": "rules:v6"},
                                                  {**_row("c", None), "schedule": "rules:v5"}]}
    assert schedule_note(results) == "`rules:v6` (`rules:v5` for c)"
    results["models"] = results["models"][:2]
    assert schedule_note(results) == "`rules:v6`"


def test_paired_speedups_are_over_the_first_rule_set_of_the_config(tmp_path):
    """A bench config whose first rule set is ``tvm`` (experiments/bench/fused_rows/): the
    paired section names it and leaves it out of its columns. Results written before the field
    existed were all over ``unfused``."""
    results = {"machine": "m", "target": "llvm-t2", "schedule": "rules", "peak_gflops": 100.0,
               "peak_note": "n", "protocol": "p", "rounds": 3, "command": "c", "baseline": "tvm",
               "models": [_row("a", None)]}
    path = tmp_path / "results.md"
    write_markdown(results, path)
    text = path.read_text()
    assert "## Head to head: speedup over `tvm`" in text
    assert "| model | unfused |\n|---|---|\n| a | 1.000 (0.020) |" in text
    del results["baseline"]
    write_markdown(results, path)
    assert "| model | tvm |\n|---|---|\n| a | 1.200 (0.020) |" in path.read_text()


def _results(*rows: dict) -> dict:
    return {"machine": "m", "target": "llvm-t2", "schedule": "rules", "peak_gflops": 100.0,
            "peak_note": "n", "protocol": "p", "rounds": 3, "command": "c", "models": list(rows)}


def test_kernel_classes_show_hot_cold_and_ort_and_their_sums(tmp_path):
    """Cold (weights and output flushed) is the like-for-like reading against ORT's profile;
    a row measured before cold times existed keeps its hot re-run and shows no cold."""
    new = {**_row("a", None), "tvm_classes_hot_ms": {"conv": 1.0, "other": 0.5},
           "tvm_classes_cold_ms": {"conv": 1.25, "other": 0.75},
           "ort_classes_ms": {"conv": 2.0, "matmul": 0.5}, "classes_schedule": "rules:v20"}
    old = {**_row("b", None), "tvm_classes_ms": {"matmul": 3.0}, "ort_classes_ms": {"matmul": 4.0}}
    path = tmp_path / "results.md"
    write_markdown(_results(new, old), path)
    text = path.read_text()
    assert "| model | conv: hot / cold / ORT | matmul: hot / cold / ORT | norm/softmax/pool: hot / " \
           "cold / ORT | other: hot / cold / ORT | all: hot / cold / ORT | end to end: TVM / ORT |" in text
    assert "| a | 1.00 / 1.25 / 2.00 | — / — / 0.50 | — / — / — | 0.50 / 0.75 / — | 1.50 / 2.00 / 2.50 " \
           "| 10.00 / 11.00 |" in text
    assert "| b | — / — / — | 3.00 / — / 4.00 | — / — / — | — / — / — | 3.00 / — / 4.00 | 10.00 / 11.00 |" in text
    assert "scheduled by `rules:v20`" in text


def test_kernels_only_retimes_the_classes_and_keeps_the_rest(tmp_path):
    bench = load_script("bench")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": ["mlp_tiny"], "rules": ["unfused", "tvm"], "runtimes": ["ort"],
                                      "target": "host", "rounds": 2, "repeat": 1, "min_repeat_ms": 1,
                                      "timeout_s": 60, "kernel_rounds": 1}))
    measured = {**_row("mlp_tiny", None), "tvm_classes_ms": {"matmul": 9.0}, "prep_s": 1.234}
    failed = {**_row("cnn_tiny", None), "failures": {"tvm": "x"}}
    del failed["best_rules"]
    (tmp_path / "results.json").write_text(json.dumps(_results(measured, failed)))
    assert bench.main([str(config), "--kernels-only"]) == 0
    after = json.loads((tmp_path / "results.json").read_text())
    row, untouched = after["models"]
    assert untouched == failed  # no best plan: nothing to re-time
    assert "tvm_classes_ms" not in row and row["prep_s"] == 1.234 and row["tvm"] == measured["tvm"]
    hot, cold = row["tvm_classes_hot_ms"], row["tvm_classes_cold_ms"]
    assert set(hot) == set(cold) and "matmul" in hot and min(hot.values()) > 0 and min(cold.values()) > 0
    assert row["ort_classes_ms"] and row["classes_schedule"].startswith("rules:")
    assert after["classes_command"].endswith("--kernels-only")
    assert after["classes_command"] in (tmp_path / "results.md").read_text()
    (tmp_path / "results.json").unlink()
    with pytest.raises(ConfigError, match="bench results"):  # one line and exit 2 from the script
        bench.main([str(config), "--kernels-only"])
