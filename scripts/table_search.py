#!/usr/bin/env python
"""Search baselines over the kernel table, re-timed head to head against ``tvm`` rules.

    TVM_NUM_THREADS=2 python scripts/table_search.py experiments/table_search/config.yaml [--models M ...]

Top to bottom:

1. read the config; open the kernel table (the kernel-table report's file and key, so the
   kernels it timed are reused, and its calibrated per-launch cost);
2. per model, per algorithm and budget: the search over :class:`TableObjective` (evaluations are
   estimates; what a search spends is kernels timed alone);
3. the best plan of each search at ``retime_budget`` and the ``tvm`` plan: built, verified and
   timed head to head in interleaved rounds (:func:`fusion_rl.compiler.paired.head_to_head`);
4. ``results.json`` (rows merged by model, so ``--models`` re-runs a subset) and ``results.md``
   (:mod:`fusion_rl.report.search`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion_rl.baselines.search import run_search  # noqa: E402
from fusion_rl.compiler.kernel_table import KernelTable, TableObjective  # noqa: E402
from fusion_rl.compiler.measure import Measurer  # noqa: E402
from fusion_rl.compiler.paired import head_to_head  # noqa: E402
from fusion_rl.compiler.target import parse_target  # noqa: E402
from fusion_rl.compiler.timing import TimingProtocol  # noqa: E402
from fusion_rl.cli.common import run_script  # noqa: E402
from fusion_rl.fusion.rules import make_plan  # noqa: E402
from fusion_rl.graph.model import load_model  # noqa: E402
from fusion_rl.io import read_yaml, write_atomic  # noqa: E402
from fusion_rl.report import search as report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--models", nargs="+", default=None, help="only these models (rows of others are kept)")
    p.add_argument("--table", type=Path, default=None, help="kernel table file (default: beside the store)")
    args = p.parse_args(argv)

    # 1. Config and table.
    cfg = read_yaml(args.config, "table-search config")
    spec = parse_target(cfg.get("target", "host"))
    schedule = cfg.get("schedule", "rules")
    protocol = TimingProtocol(repeat=cfg.get("repeat", 7), min_repeat_ms=cfg.get("min_repeat_ms", 50))
    kprotocol = TimingProtocol(repeat=cfg.get("kernel_repeat", 5),
                               min_repeat_ms=cfg.get("kernel_min_repeat_ms", 10), warmup=1)
    timeout = cfg.get("timeout_s", 600)
    out = args.config.parent
    results = out / "results.json"
    rows = json.loads(results.read_text())["rows"] if results.is_file() else []
    models = args.models or cfg["models"]
    rows = [r for r in rows if r["model"] not in models]
    with KernelTable(args.table, spec, schedule, {}, kprotocol, timeout) as table, \
            Measurer(spec, schedule, {}, store=None, protocol=protocol, timeout_s=timeout) as measurer:
        launch_ms = table.launch_ms
        for name in models:
            model = load_model(name)
            # 2. Searches over the table.
            best = {}
            for algo in cfg["algos"]:
                for budget in cfg["budgets"]:
                    objective = TableObjective(table)
                    t0 = time.perf_counter()
                    res = run_search(algo, model, objective, budget, seed=cfg.get("seed", 0),
                                     max_anchors=cfg.get("max_anchors"))
                    row = {"model": name, "algo": algo, "budget": budget, "evaluations": res.evaluations,
                           "kernels_timed": res.measurements_spent, "failures": res.failures,
                           "estimate_ms": res.best_ms, "wall_s": time.perf_counter() - t0,
                           "plan_hash": res.best_plan.hash if res.best_plan else None,
                           "plan": res.best_plan.to_dict() if res.best_plan else None}
                    rows.append(row)
                    print(f"{name} {algo}@{budget}: est {res.best_ms:.3f} ms, {res.evaluations} plans, "
                          f"{res.measurements_spent} kernels timed, {row['wall_s']:.0f} s", file=sys.stderr, flush=True)
                    if budget == cfg["retime_budget"] and res.best_plan is not None:
                        best[f"{algo}@{budget}"] = res.best_plan
            # 3. Head to head against tvm rules (head_to_head times a plan two labels share once).
            tvm_plan = make_plan("tvm", model.mod, model.graph)
            plans = {"tvm": tvm_plan, **best}
            t0 = time.perf_counter()
            h2h = head_to_head(measurer, model, plans, cfg.get("rounds", 3))
            retime_s = time.perf_counter() - t0
            est_tvm = table.estimate(model, tvm_plan).latency_ms
            for label, plan in plans.items():
                row = {"model": name, "algo": "retime", "label": label, "plan_hash": plan.hash,
                       "estimate_ms": est_tvm if label == "tvm" else None, "retime_s": retime_s}
                if label in h2h.failures:
                    row.update(status="failed", error=h2h.failures[label])
                else:
                    v = h2h.verdict("tvm", label)
                    row.update(status="ok", latency_ms=h2h.median_ms(label), spread_ms=h2h.iqr_ms(label),
                               num_kernels=h2h.num_kernels.get(label), speedup_vs_tvm=v["paired_speedup"],
                               speedup_spread=v["paired_spread"])
                rows.append(row)
            print(f"{name}: re-timed {len(h2h.pooled_ms) - len(h2h.same_as)} plans in {retime_s:.0f} s", file=sys.stderr, flush=True)
            # 4. Written after every model, so an interrupted run keeps what it measured.
            write_atomic(results, json.dumps({"launch_ms": launch_ms, "rows": rows}, indent=1), what="report")
            write_atomic(out / "results.md", report.render(cfg, rows, spec, schedule, protocol, kprotocol,
                                                           launch_ms, args.config), what="report")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    run_script(main)
