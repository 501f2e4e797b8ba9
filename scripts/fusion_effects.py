"""Regenerate the tables of experiments/fusion_effects/: latency, spread, kernels, intermediate
bytes and the per-kernel time breakdown of every rule set under every schedule provider.

Usage: python scripts/fusion_effects.py experiments/fusion_effects/config.yaml
The written analysis lives in experiments/fusion_effects/README.md; this script writes
results.md and results.json beside it.
"""

from __future__ import annotations

import argparse
import os
import json
import sys
import time
from pathlib import Path


from fusion_rl.compare import load_experiment, machine_description
from fusion_rl.compiler.kernels import group_kernel_times
from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.paired import head_to_head
from fusion_rl.compiler.store import MeasurementStore, default_store_path
from fusion_rl.fusion.metrics import plan_metrics
from fusion_rl.fusion.rules import RULE_SETS, make_plan
from fusion_rl.graph.model import load_model
from fusion_rl.io import write_atomic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    cfg, spec, protocol, schedules = load_experiment(args.config)
    rows = []
    lines = [
        "# Fusion effects: measured tables\n",
        f"Machine: {machine_description(spec.num_threads)}; target `{spec.key}`; protocol "
        f"`{protocol.key}` (median of {protocol.repeat} repeats, spread = IQR).  ",
        "Command: `" + (f"FUSION_RL_HOST_MCPU={os.environ['FUSION_RL_HOST_MCPU']} "
                        if os.environ.get("FUSION_RL_HOST_MCPU") else "")
        + f"python scripts/fusion_effects.py {args.config}`\n",
        "`kernel sum` is the sum of per-kernel times (each kernel re-run on its live inputs); the "
        "rest of the end-to-end time is VM dispatch, allocation and thread-pool wake-ups.\n",
    ]
    with MeasurementStore(args.store or default_store_path()) as store:
        for name in cfg["models"]:
            model = load_model(name)
            plans = {r: make_plan(r, model.mod, model.graph) for r in RULE_SETS}
            lines += [f"## {name} ({len(model.graph)} ops)\n",
                      "| schedule | rules | median ms | IQR ms | vs unfused | kernels | kernel sum ms | intermediate KiB | multi-anchor groups |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for schedule, kwargs in schedules:
                if schedule == "tuned" and name not in cfg.get("tuned_models", cfg["models"]):
                    continue  # tuning costs minutes per kernel set; see tuned_models
                t0 = time.perf_counter()
                with Measurer(spec, schedule, kwargs, store=store, protocol=protocol,
                              timeout_s=cfg.get("timeout_s", 1800)) as m:
                    base = None
                    for rules, plan in plans.items():
                        if schedule == "tuned" and rules not in cfg.get("tuned_rules", RULE_SETS):
                            continue
                        rec = m.measure(model, plan, per_kernel=True)
                        met = plan_metrics(model.graph, plan)
                        row = {"model": name, "schedule": schedule, "rules": rules, "status": rec.status,
                               "median_ms": rec.median_ms, "spread_ms": rec.spread_ms,
                               "kernels": rec.num_kernels, **met.to_dict(), "error": rec.error}
                        if rec.status == "ok":
                            groups = group_kernel_times(model.graph, plan, rec.kernel_times_ms or {})
                            row["kernel_sum_ms"] = sum(groups.values())
                            row["top_groups"] = sorted(
                                ([[model.graph.nodes[i].op for i in g], ms] for g, ms in groups.items()),
                                key=lambda x: -x[1])[:5]
                            base = base or rec.median_ms
                            lines.append(
                                f"| {schedule} | {rules} | {rec.median_ms:.3f} | {rec.spread_ms:.3f} | "
                                f"{base / rec.median_ms:.2f}x | {rec.num_kernels} | {row['kernel_sum_ms']:.3f} | "
                                f"{met.intermediate_bytes / 1024:.1f} | {met.multi_anchor_groups} |")
                        else:
                            lines.append(f"| {schedule} | {rules} | {rec.status} | | | | | | {met.multi_anchor_groups} |")
                        rows.append(row)
                print(f"{name}/{schedule}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            lines.append("")
        lines += significance(cfg, spec, protocol, schedules, rows)
    out = args.config.parent
    write_atomic(out / "results.md", "\n".join(lines) + "\n", what="report")
    write_atomic(out / "results.json", json.dumps(rows, indent=1), what="report")
    return 0


def significance(cfg: dict, spec, protocol, schedules, rows: list[dict]) -> list[str]:
    """Re-time `unfused` and the best rule set of every tuned model in interleaved rounds.

    The store's records of one model were taken minutes apart; this compares the two plans
    within one run (fusion_rl.compiler.paired explains the two readings of the bar).
    """
    rounds = int(cfg.get("confirm_rounds", 0))
    if rounds < 2:
        return []
    kwargs = dict(schedules)["tuned"]
    lines = ["## Does fusion beat `unfused` under `tuned` by more than 5x the spread?\n",
             f"Each model's `unfused` plan and its best rule set (lowest stored median under `tuned`) "
             f"re-timed in {rounds} rounds, no store: each round builds both plans and times them "
             f"repeat by repeat ({protocol.repeat} repeats, order flipping; "
             "`fusion_rl/compiler/paired.py`). *Unpaired*: gap of the pooled medians vs 5x the "
             "larger pooled IQR. *Paired*: median per-repeat speedup minus 1 vs 5x the IQR of the "
             "per-repeat speedups (a machine regime that slows both plans of a repeat cancels in "
             "the ratio).\n",
             "| model | best | unfused ms (IQR) | best ms (IQR) | speedup | gap ms | 5x spread | unpaired | "
             "per-repeat speedup (IQR) | paired | repeats won | rounds won |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in cfg.get("tuned_models", cfg["models"]):
        tuned = [r for r in rows if r["model"] == name and r["schedule"] == "tuned" and r["status"] == "ok"]
        if not any(r["rules"] == "unfused" for r in tuned) or len(tuned) < 2:
            continue
        best = min((r for r in tuned if r["rules"] != "unfused"), key=lambda r: r["median_ms"])["rules"]
        model = load_model(name)
        plans = {r: make_plan(r, model.mod, model.graph) for r in ("unfused", best)}
        t0 = time.perf_counter()
        with Measurer(spec, "tuned", kwargs, store=None, protocol=protocol,
                      timeout_s=cfg.get("timeout_s", 1800)) as m:
            cmp = head_to_head(m, model, plans, rounds)
        if cmp.failures:
            lines.append(f"| {name} | {best} | failed: {cmp.failures} |" + " |" * 9)
            continue
        v = cmp.verdict("unfused", best)
        lines.append(
            f"| {name} | {best} | {cmp.median_ms('unfused'):.4f} ({cmp.iqr_ms('unfused'):.4f}) | "
            f"{cmp.median_ms(best):.4f} ({cmp.iqr_ms(best):.4f}) | {v['speedup']:.2f}x | {v['gap_ms']:.4f} | "
            f"{5 * v['spread_ms']:.4f} | {'yes' if v['unpaired'] else 'no'} | {v['paired_speedup']:.3f}x "
            f"({v['paired_spread']:.3f}) | {'yes' if v['paired'] else 'no'} | {v['repeats_won']}/{v['repeats']} | "
            f"{v['rounds_won']}/{rounds} |")
        rows.append({"model": name, "schedule": "tuned", "rules": best, "status": "significance",
                     "rounds": rounds, "round_medians": cmp.round_medians, **v})
        print(f"{name}/significance: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
