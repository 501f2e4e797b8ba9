"""How well does the kernel table estimate end-to-end latency? (issue 10, item 4)

Usage: python scripts/kernel_table.py experiments/kernel_table/config.yaml [--out DIR]
       [--store PATH] [--table PATH]

For each model: its rule-set plans and ``plans_per_model`` random legal plans. Each plan's kernels
missing from the kernel table are timed alone (fusion_rl/compiler/kernel_table.py), and the plan
is measured end to end (served from the measurement store when known). The per-launch cost is
fitted on the rule-set plans of all models; the estimator is scored on the random plans, which
the fit never saw: Spearman correlation of estimate and measurement (per model, and pooled over
all models) and mean absolute percentage error. Writes results.md and results.json to --out
(default: the config's folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fusion_rl.compare import machine_description
from fusion_rl.cli.common import run_script
from fusion_rl.compiler.cost_model import spearman
from fusion_rl.compiler.kernel_table import KernelTable
from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.store import MeasurementStore, default_store_path
from fusion_rl.compiler.target import parse_target
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.errors import ConfigError, FusionRLError, read_yaml
from fusion_rl.fusion.random_plans import random_plan
from fusion_rl.fusion.rules import RULE_SETS, make_plan
from fusion_rl.graph.model import load_model

KEYS = {"models", "plans_per_model", "seed", "max_anchors", "target", "schedule", "trials_per_task",
        "repeat", "min_repeat_ms", "kernel_repeat", "kernel_min_repeat_ms", "timeout_s", "e2e_passes",
        "kernel_passes"}


def mape(est: list[float], real: list[float]) -> float:
    e, r = np.asarray(est), np.asarray(real)
    return float(np.mean(np.abs(e - r) / r) * 100) if len(r) else float("nan")


def load_config(path: Path) -> dict:
    cfg = read_yaml(path, "kernel-table config")
    if not isinstance(cfg, dict) or set(cfg) - KEYS or not cfg.get("models"):
        raise ConfigError(f"{path}: expected a mapping with 'models' and keys among {sorted(KEYS)}")
    if not isinstance(cfg["models"], list) or not all(isinstance(m, str) for m in cfg["models"]):
        raise ConfigError(f"{path}: 'models' must be a list of model names")
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--store", type=Path, default=None, help="measurement store")
    parser.add_argument("--table", type=Path, default=None, help="kernel table file")
    args = parser.parse_args()
    cfg = load_config(args.config)
    spec = parse_target(cfg.get("target", "host"))
    schedule = cfg.get("schedule", "rules")
    kwargs = {"trials_per_task": cfg["trials_per_task"]} if schedule == "tuned" else {}
    protocol = TimingProtocol(repeat=cfg.get("repeat", 7), min_repeat_ms=cfg.get("min_repeat_ms", 50))
    kprotocol = TimingProtocol(repeat=cfg.get("kernel_repeat", 5),
                               min_repeat_ms=cfg.get("kernel_min_repeat_ms", 10), warmup=1)
    timeout = cfg.get("timeout_s", 600)
    rng = np.random.default_rng(cfg.get("seed", 0))
    rows, measured, models = [], [], {}
    with MeasurementStore(args.store or default_store_path()) as store, \
            KernelTable(args.table, spec, schedule, kwargs, kprotocol, timeout) as table, \
            Measurer(spec, schedule, kwargs, store=store, protocol=protocol, timeout_s=timeout) as m:
        for name in cfg["models"]:
            model = models[name] = load_model(name)
            plans = [("rules", r, make_plan(r, model.mod, model.graph)) for r in RULE_SETS]
            seen = {p.hash for _, _, p in plans}
            for _ in range(50 * cfg.get("plans_per_model", 25)):  # give up on duplicates eventually
                if len(plans) - len(RULE_SETS) >= cfg.get("plans_per_model", 25):
                    break
                p = random_plan(model.graph, rng, max_anchors=cfg.get("max_anchors"))
                if p.hash not in seen:
                    seen.add(p.hash)
                    plans.append(("random", "random", p))
            for kind, label, plan in plans:
                row = {"model": name, "kind": kind, "plan": label, "plan_hash": plan.hash}
                t0 = time.perf_counter()
                try:
                    row["kernels_timed"] = table.ensure(model, plan)
                except FusionRLError as exc:
                    row.update(status="kernel_failed", error=str(exc))
                    rows.append(row)
                    continue
                row["kernel_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                rec = m.measure(model, plan)
                row.update(status=rec.status, e2e_ms=rec.median_ms, e2e_iqr_ms=rec.spread_ms,
                           e2e_s=time.perf_counter() - t0, error=rec.error)
                est = table.estimate(model, plan)
                row.update(kernel_ms=est.kernel_ms, launches=est.launches)
                row["e2e_pass_ms"] = [rec.median_ms]
                rows.append(row)
                measured.append((model, plan, row))
            print(f"{name}: {len(plans)} plans, table {len(table)} kernels", file=sys.stderr)
        # Later passes time every plan again, minutes after its first timing, without the store;
        # a plan's end-to-end latency is the fastest pass's median. This machine drifts between
        # speed regimes (and a neighbour's load slows whole minutes): one pass put plans at 2-8x
        # their re-timed latency. The minimum keeps the measurement no slowdown touched.
        with Measurer(spec, schedule, kwargs, store=None, protocol=protocol, timeout_s=timeout) as fresh:
            for k in range(1, cfg.get("e2e_passes", 1)):
                for model, plan, row in measured:
                    if row.get("status") != "ok":
                        continue
                    t0 = time.perf_counter()
                    rec = fresh.measure(model, plan)
                    row["e2e_s"] += time.perf_counter() - t0
                    row["e2e_pass_ms"].append(rec.median_ms if rec.status == "ok" else None)
                    if rec.status == "ok" and rec.median_ms < row["e2e_ms"]:
                        row.update(e2e_ms=rec.median_ms, e2e_iqr_ms=rec.spread_ms)
                print(f"pass {k + 1} of {cfg['e2e_passes']} done", file=sys.stderr, flush=True)
        # The kernel side of the same guard: after the end-to-end passes, every kernel is timed
        # again and keeps the faster median (KernelTable.retime), so one slow minute during a
        # kernel's first timing does not inflate every plan that launches it.
        for k in range(1, cfg.get("kernel_passes", 1)):
            again: set[str] = set()
            for model, plan, row in measured:
                if row.get("status") == "ok":
                    t0 = time.perf_counter()
                    row["kernels_retimed"] = row.get("kernels_retimed", 0) + table.retime(model, plan, again)
                    row["kernel_s"] += time.perf_counter() - t0
            print(f"kernel pass {k + 1} of {cfg['kernel_passes']} done", file=sys.stderr, flush=True)
        for model, plan, row in measured:
            if row.get("status") == "ok":
                row.update(kernel_ms=table.estimate(model, plan).kernel_ms)
        schedule = m.provider.key  # the versioned key (e.g. rules:v6): what the numbers are of
        calib = [(model, plan, row["e2e_ms"]) for model, plan, row in measured
                 if row["kind"] == "rules" and row.get("status") == "ok"]
        launch_ms = table.calibrate(calib) if calib else 0.0
    for r in rows:
        if r.get("status") == "ok":
            r["estimate_ms"] = r["kernel_ms"] + r["launches"] * launch_ms
    out = args.out or args.config.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"launch_ms": launch_ms, "schedule": schedule, "rows": rows}, indent=1))
    (out / "results.md").write_text(report(cfg, args, spec, schedule, protocol, kprotocol, launch_ms, rows))
    print((out / "results.md").read_text())
    return 0


def report(cfg, args, spec, schedule, protocol, kprotocol, launch_ms, rows) -> str:
    held = [r for r in rows if r["kind"] == "random"]
    ok = [r for r in held if r.get("status") == "ok"]
    lines = [
        "# Kernel-table estimator vs end-to-end latency\n",
        f"Machine: {machine_description(spec.num_threads)}; target `{spec.key}`; schedule `{schedule}`; "
        f"end-to-end protocol `{protocol.key}`, kernel protocol `{kprotocol.key}`.  ",
        f"End-to-end latency: the fastest of {cfg.get('e2e_passes', 1)} pass(es) over all plans "
        "(each pass times every plan once; passes minutes apart, so a slow regime of the machine "
        "touches one pass of a plan, not all).  ",
        f"Kernel time: the faster median of {cfg.get('kernel_passes', 1)} pass(es) over all kernels "
        "(the second after the end-to-end passes).  ",
        f"Command: `python scripts/kernel_table.py {args.config}{f' --out {args.out}' if args.out else ''}`\n",
        f"Estimate = sum of the plan's kernels, each timed alone, + launches x {launch_ms:.5f} ms "
        f"(per-launch cost fitted on the {sum(r['kind'] == 'rules' and r.get('status') == 'ok' for r in rows)} "
        "rule-set plans). Scored on random legal plans only (held out from the fit).\n",
        "| model | random plans ok / drawn | Spearman | MAPE % | kernels timed (all plans) | launches (all plans) | kernel timing s | end-to-end s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in cfg["models"]:
        mine = [r for r in ok if r["model"] == name]
        every = [r for r in rows if r["model"] == name]
        lines.append(
            f"| {name} | {len(mine)} / {sum(r['model'] == name for r in held)} | "
            f"{spearman([r['estimate_ms'] for r in mine], [r['e2e_ms'] for r in mine]):.3f} | "
            f"{mape([r['estimate_ms'] for r in mine], [r['e2e_ms'] for r in mine]):.1f} | "
            f"{sum(r.get('kernels_timed', 0) for r in every)} | {sum(r.get('launches', 0) for r in every)} | "
            f"{sum(r.get('kernel_s', 0.0) for r in every):.0f} | {sum(r.get('e2e_s', 0.0) for r in every):.0f} |")
    per_model = [spearman([r["estimate_ms"] for r in ok if r["model"] == n], [r["e2e_ms"] for r in ok if r["model"] == n])
                 for n in cfg["models"]]
    lines += [
        f"| **all** | {len(ok)} / {len(held)} | pooled {spearman([r['estimate_ms'] for r in ok], [r['e2e_ms'] for r in ok]):.3f}, "
        f"mean per model {np.nanmean(per_model) if np.isfinite(per_model).any() else float('nan'):.3f} | "
        f"{mape([r['estimate_ms'] for r in ok], [r['e2e_ms'] for r in ok]):.1f} | | | | |", "",
        "Pooled Spearman ranks plans of different models together, which model size alone makes "
        "easy; the per-model figure is the one that matters for choosing between plans.",
    ]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", f"{len(failed)} plan(s) failed: " + "; ".join(
            f"{r['model']} {r['plan_hash']} {r.get('status')}: {(r.get('error') or '')[:120]}" for r in failed[:10])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
