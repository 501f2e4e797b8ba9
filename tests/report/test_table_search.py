"""scripts/table_search.py end to end on a tiny model: searches over the kernel table, the best
plans re-timed head to head, and the generated report (fusion_rl/report/search.py)."""

from __future__ import annotations

import json

import yaml

from conftest import load_script


def test_table_search_script_searches_retimes_and_reports(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "models": ["mlp_tiny"], "algos": ["random", "annealing"], "budgets": [4, 8], "retime_budget": 8,
        "rounds": 2, "seed": 0, "max_anchors": 1, "target": "host", "schedule": "rules",
        "repeat": 2, "min_repeat_ms": 1, "kernel_repeat": 2, "kernel_min_repeat_ms": 1, "timeout_s": 300,
    }))
    assert load_script("table_search").main([str(config), "--table", str(tmp_path / "kernels.sqlite")]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    searches = [r for r in rows if r["algo"] != "retime"]
    assert {(r["algo"], r["budget"]) for r in searches} == {(a, b) for a in ("random", "annealing") for b in (4, 8)}
    assert all(r["evaluations"] <= r["budget"] and r["failures"] == 0 for r in searches)
    # The table is shared: the first search times kernels, later ones mostly reuse them.
    assert searches[0]["kernels_timed"] > 0
    retimed = {r["label"]: r for r in rows if r["algo"] == "retime"}
    assert set(retimed) == {"tvm", "random@8", "annealing@8"}
    assert all(r["status"] == "ok" and r["latency_ms"] > 0 for r in retimed.values())
    assert retimed["tvm"]["speedup_vs_tvm"] == 1.0 and retimed["random@8"]["speedup_vs_tvm"] > 0
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Search baselines over the kernel table") and "random@8" in text and "geomean" in text
