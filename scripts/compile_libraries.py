"""Regenerate experiments/compile_libraries/: the comparison table and charts for each model.

Usage: python scripts/compile_libraries.py experiments/compile_libraries/config.yaml [--replot]

``--replot`` redraws each model's chart from its ``<model>.json`` and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


from fusion_rl.baselines.runtimes import RUNTIMES
from fusion_rl.compare import CompareRow, bar_chart, compare_model, load_experiment, machine_description, to_markdown, write_report
from fusion_rl.compiler.store import MeasurementStore, default_store_path
from fusion_rl.export import LearnedPlanner
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.rules import RULE_SETS, make_plan
from fusion_rl.graph.model import Model, load_model
from fusion_rl.io import write_atomic


def plans_for(model: Model, names, planner: LearnedPlanner | None) -> dict[str, FusionPlan]:
    """The plan of each rule set in ``names``, and the policy's as "learned" if one is given."""
    plans = {r: make_plan(r, model.mod, model.graph) for r in names if r != "learned"}
    if planner is not None and "learned" in names:
        plans["learned"] = planner.plan(model.graph)
    return plans


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--replot", action="store_true", help="only redraw the charts from the JSON files")
    args = parser.parse_args()
    cfg, spec, protocol, schedules = load_experiment(args.config)
    out = args.config.parent
    if args.replot:
        for name in cfg["models"]:
            rows = [CompareRow(**r) for r in json.loads((out / f"{name}.json").read_text())]
            bar_chart(rows, out / f"{name}.png", name)
        return 0
    pin = os.environ.get("FUSION_RL_HOST_MCPU")  # a host CPU override must be reproduced too
    command = (f"FUSION_RL_HOST_MCPU={pin} " if pin else "") + f"python scripts/compile_libraries.py {args.config}"
    sections = [
        "# Compile libraries on the same machine\n",
        f"Machine: {machine_description(spec.num_threads)}; target `{spec.key}`.  ",
        f"Protocol: median of {protocol.repeat} repeats (each >= {protocol.min_repeat_ms} ms), "
        "spread = IQR; every output verified against ONNX Runtime before timing.  ",
        f"`tuned` = MetaSchedule, {cfg['trials_per_task']} trials per task; its setup time "
        "includes tuning (zero when the tuning database already had the kernel).  ",
        f"Command: `{command}`\n",
    ]
    # The shipped policy's plan is a row beside the rule sets' ("learned").
    planner = LearnedPlanner(str(Path(__file__).resolve().parents[1] / cfg["policy"]), spec.name) if cfg.get("policy") else None
    every = (*RULE_SETS, "learned")
    if planner is not None:
        sections.insert(-1, f"`learned` = the plan of the policy `{cfg['policy']}`.  ")
    with MeasurementStore(args.store or default_store_path()) as store:
        for name in cfg["models"]:
            t0 = time.perf_counter()
            model = load_model(name)
            tuned_ok = name in cfg.get("tuned_models", cfg["models"])
            rows = compare_model(model, [(s, kw) for s, kw in schedules if s != "tuned"],
                                 spec.name, store, protocol, plans=plans_for(model, every, planner))
            if tuned_ok:  # tuned only for the rule sets whose kernels tune in bounded time
                plans = plans_for(model, cfg.get("tuned_rules", every), planner)
                tuned = [(s, kw) for s, kw in schedules if s == "tuned"]
                rows[-len(RUNTIMES):-len(RUNTIMES)] = compare_model(model, tuned, spec.name, store,
                                                                    protocol, runtimes=(), plans=plans)
            header = f"Command: `{command}`\n"
            write_report(rows, out, name, header)
            sections.append(to_markdown(rows, f"{name} ({len(model.graph)} ops)"))
            sections.append(f"![{name}]({name}.png)\n\nwall time {time.perf_counter() - t0:.0f} s\n")
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    write_atomic(out / "README.md", "\n".join(sections), what="report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
