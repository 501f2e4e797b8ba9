"""Regenerate experiments/bench/: the bench suite at deployment sizes, TVM beside the runtimes.

Usage: python scripts/bench.py experiments/bench/config.yaml [--models NAME ...]

For each bench model, on this machine:
1. preparation: export + import wall time (the default schedule needs no tuning);
2. TVM, every configured rule set under the default schedule, timed *head to head*
   (interleaved rounds; paired per-repeat ratios against the first rule set, ``unfused``
   in experiments/bench/);
3. ONNX Runtime (graph optimizations on / off), torch eager and torch.compile, verified;
4. per-kernel times of TVM's best plan, each kernel alone hot and cold (its weights and output
   flushed from the caches, as in a model's run), and ONNX Runtime's per-node profile, grouped
   by kernel class, to show where the remaining gap is, and the wall time of a new random plan
   (compile, verify, time: what an env step or a search step costs);
5. TVM's best plan against ONNX Runtime, head to head in this process (interleaved rounds,
   paired ratios: the columns of separate runs drift apart on a shared VM);
then writes results.json, results.md and bench.png beside the config.

``--update`` re-measures the rows of ``--models`` only. ``--kernels-only`` re-times step 4's
kernel classes (TVM hot and cold, ORT's profile) of the rows already in results.json (or of
``--models``), under the default schedule, and keeps everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from fusion_rl.baselines.runtimes import run_runtime  # noqa: E402
from fusion_rl.cli.common import run_script  # noqa: E402
from fusion_rl.compare import machine_description, time_systems  # noqa: E402
from fusion_rl.compiler.kernel_table import time_plan_kernels_hot_cold  # noqa: E402
from fusion_rl.compiler.measure import Measurer  # noqa: E402
from fusion_rl.compiler.paired import head_to_head  # noqa: E402
from fusion_rl.compiler.schedules import DEFAULT_SCHEDULE, make_schedule  # noqa: E402
from fusion_rl.compiler.target import parse_target  # noqa: E402
from fusion_rl.compiler.timing import TimingProtocol  # noqa: E402
from fusion_rl.errors import read_yaml  # noqa: E402
from fusion_rl.fusion.random_plans import random_plan  # noqa: E402
from fusion_rl.fusion.rules import make_plan  # noqa: E402
from fusion_rl.graph import zoo  # noqa: E402
from fusion_rl.graph.model import load_model  # noqa: E402
from fusion_rl.io import read_json  # noqa: E402
from fusion_rl.report.bench import (  # noqa: E402
    fp32_peak_gflops, kernel_class, ort_class_times, write_markdown, write_plot,
)


def versus_runtime(model, plan, spec, protocol: TimingProtocol, rounds: int, runtime: str) -> dict:
    """``plan`` (default schedule, verified) and ``runtime`` in interleaved rounds: the median
    and IQR of the paired ratios runtime time / TVM time (above 1: TVM is faster)."""
    h2h = time_systems(model, {"tvm": plan}, [runtime], spec, protocol, rounds)
    v = h2h.verdict(runtime, "tvm")
    return {"runtime": runtime, "tvm_ms": h2h.median_ms("tvm"), "runtime_ms": h2h.median_ms(runtime),
            "speedup": v["paired_speedup"], "speedup_spread": v["paired_spread"], "repeats": v["repeats"]}


def kernel_classes(model, plan, spec, rounds: int) -> dict:
    """Step 4: the plan's kernels alone, hot and cold, and ONNX Runtime's node profile, in ms
    per inference by kernel class, with the schedule the kernels ran under."""
    hot: dict[str, float] = {}
    cold: dict[str, float] = {}
    for k in time_plan_kernels_hot_cold(model, plan, spec, rounds=rounds):
        cls = kernel_class(k.name)
        hot[cls] = hot.get(cls, 0.0) + k.hot_ms * k.launches
        cold[cls] = cold.get(cls, 0.0) + k.cold_ms * k.launches
    return {"tvm_classes_hot_ms": hot, "tvm_classes_cold_ms": cold,
            "ort_classes_ms": ort_class_times(model, spec.num_threads),
            "classes_schedule": make_schedule(DEFAULT_SCHEDULE).key}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--models", nargs="+", help="override the config's model list")
    parser.add_argument("--update", action="store_true",
                        help="re-measure --models only and replace their rows in results.json")
    parser.add_argument("--kernels-only", action="store_true",
                        help="re-time only the kernel classes of the rows in results.json")
    args = parser.parse_args(argv)
    cfg = read_yaml(args.config, "bench config")
    out_dir = args.config.parent
    spec = parse_target(cfg["target"])
    protocol = TimingProtocol(repeat=cfg["repeat"], min_repeat_ms=cfg["min_repeat_ms"])
    peak, peak_note = fp32_peak_gflops(spec)
    results = {"machine": machine_description(spec.num_threads), "target": spec.key,
               "schedule": make_schedule(DEFAULT_SCHEDULE).key, "peak_gflops": peak, "peak_note": peak_note,
               "protocol": protocol.key, "rounds": cfg["rounds"], "baseline": cfg["rules"][0],
               "command": f"python scripts/bench.py {args.config}", "models": []}
    kernel_rounds = int(cfg.get("kernel_rounds", 3))
    if args.kernels_only:
        results = read_json(out_dir / "results.json", "bench results")
        for row in results["models"]:
            if (args.models and row["model"] not in args.models) or "best_rules" not in row:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {row['model']}: kernel classes", flush=True)
            model = load_model(row["model"])
            row.pop("tvm_classes_ms", None)  # the re-run on live inputs, replaced by hot and cold
            row.update(kernel_classes(model, make_plan(row["best_rules"], model.mod, model.graph),
                                      spec, kernel_rounds))
            (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        results["classes_command"] = f"python scripts/bench.py {args.config} --kernels-only"
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        write_markdown(results, out_dir / "results.md")
        print(f"wrote {out_dir}/results.json, results.md")
        return 0
    if args.update:
        previous = json.loads((out_dir / "results.json").read_text())
        # Kept rows keep the schedule they were measured under (the report names each).
        results["models"] = [{"schedule": previous.get("schedule"), **m} for m in previous["models"]
                             if m["model"] not in (args.models or [])]
        results["command"] += " (rows of " + ", ".join(args.models or []) + " re-measured with --update)"
    order = {name: i for i, name in enumerate(cfg["models"])}  # rows in the config's order
    for name in args.models or cfg["models"]:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        # 1. Preparation: the export and import a new user pays once per model.
        t0 = time.perf_counter()
        model = load_model(name)
        prep_s = time.perf_counter() - t0
        gflop = zoo.flops(name) / 1e9
        row = {"model": name, "family": zoo.get_entry(name).family, "gflop": gflop,
               "ops": len(model.graph), "prep_s": prep_s, "tvm": {}, "runtimes": {},
               "schedule": results["schedule"]}
        # 2. TVM rule sets, head to head (fresh builds each round, never from a store).
        plans = {r: make_plan(r, model.mod, model.graph) for r in cfg["rules"]}
        t0 = time.perf_counter()
        with Measurer(spec, DEFAULT_SCHEDULE, store=None, protocol=protocol,
                      timeout_s=cfg["timeout_s"]) as m:
            paired = head_to_head(m, model, plans, cfg["rounds"])
            row["compare_s"] = time.perf_counter() - t0
            if paired.failures:
                row["failures"] = paired.failures
            else:
                first = cfg["rules"][0]
                for rules in plans:
                    ratios = paired.speedups(first, rules)
                    row["tvm"][rules] = {
                        "latency_ms": paired.median_ms(rules), "spread_ms": paired.iqr_ms(rules),
                        "kernels": paired.num_kernels.get(rules),
                        "speedup_vs_unfused": float(np.median(ratios)),
                        "speedup_spread": float(np.subtract(*np.percentile(ratios, [75, 25]))),
                    }
                best = min(row["tvm"], key=lambda r: row["tvm"][r]["latency_ms"])
                row["best_rules"] = best
                # 4. Where the time goes: the best plan's kernels by class (below, hot and
                # cold), and which schedule each kernel got (every build records it).
                row["kernel_schedules"] = m.measure(model, plans[best]).kernel_schedules
                # A plan never seen before: compile, verify and time it from scratch.
                fresh = random_plan(model.graph, np.random.default_rng(0), max_anchors=1)
                t0 = time.perf_counter()
                new = m.measure(model, fresh)
                row["new_plan_s"] = time.perf_counter() - t0
                row["new_plan_status"] = new.status
        # 3. The runtimes on the same inputs, verified against the same reference.
        for runtime in cfg["runtimes"]:
            res = run_runtime(runtime, model, protocol, threads=spec.num_threads)
            row["runtimes"][runtime] = {"status": res.status, "latency_ms": res.median_ms,
                                        "spread_ms": res.spread_ms, "setup_s": res.setup_s,
                                        "error": res.error}
        if "best_rules" in row:
            row.update(kernel_classes(model, plans[row["best_rules"]], spec, kernel_rounds))
        # 5. The best plan against ONNX Runtime, head to head in this process: latencies of
        # separate runs (the table's columns) drift apart on a shared VM, paired ratios do not.
        if "best_rules" in row:
            row["vs_ort"] = versus_runtime(model, plans[row["best_rules"]], spec, protocol,
                                           cfg["rounds"], "ort")
        results["models"] = sorted([m for m in results["models"] if m["model"] != name] + [row],
                                   key=lambda m: order.get(m["model"], len(order)))
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))  # partial runs too
    write_markdown(results, out_dir / "results.md")
    write_plot(results, out_dir / "bench.png")
    print(f"wrote {out_dir}/results.json, results.md, bench.png")
    return 0


if __name__ == "__main__":
    run_script(main)
