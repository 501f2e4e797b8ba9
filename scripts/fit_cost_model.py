"""Fit the learned latency cost model and report how well it ranks plans it has not seen.

Reads top to bottom: parse args -> measure random plans per model (per-kernel times) -> split
into train / held-out plans, plus one held-out model -> fit -> report Spearman rank correlations.

    FUSION_RL_CACHE=/tmp/frl_cache .venv/bin/python scripts/fit_cost_model.py \\
        --models mlp_tiny cnn_plain se_cnn transformer_encoder --holdout-model resnet_tiny \\
        --plans 24 --schedule rules --output cost_model.json

Plans per model: the unfused, tvm and tensorrt plans plus random legal plans (``merge_prob``
drawn per plan, at most one conv/matmul per group unless ``--allow-multi-anchor``). Every
measurement goes through the store, so a rerun costs nothing. Rank correlations are reported
*within* each model (the number that matters to a search over one model's plans) and pooled.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", "2")

from fusion_rl.compiler.cost_model import LatencyCostModel, spearman  # noqa: E402
from fusion_rl.compiler.kernels import group_kernel_times  # noqa: E402
from fusion_rl.compiler.measure import Measurer  # noqa: E402
from fusion_rl.compiler.store import MeasurementStore, default_store_path  # noqa: E402
from fusion_rl.compiler.timing import TimingProtocol  # noqa: E402
from fusion_rl.fusion.random_plans import random_plan  # noqa: E402
from fusion_rl.fusion.rules import make_plan  # noqa: E402
from fusion_rl.graph.model import load_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp_tiny", "cnn_plain", "se_cnn", "transformer_encoder"])
    p.add_argument("--holdout-model", default="resnet_tiny", help="a model never trained on")
    p.add_argument("--plans", type=int, default=24, help="random plans per model (plus 3 rule sets)")
    p.add_argument("--holdout-frac", type=float, default=0.25, help="share of each model's plans held out")
    p.add_argument("--target", default="host")
    p.add_argument("--schedule", default="rules")
    p.add_argument("--backend", default=None, help="xgboost (default when installed) or ridge")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="TimingProtocol.quick() (3 repeats, 5 ms)")
    p.add_argument("--in-process", action="store_true", help="measure in this process (faster, no crash isolation)")
    p.add_argument("--allow-multi-anchor", action="store_true")
    p.add_argument("--output", type=Path, default=None, help="save the fitted model (JSON)")
    return p.parse_args()


def measure_model(name: str, measurer: Measurer, n_plans: int, rng: np.random.Generator, max_anchors: int | None):
    """(graph, plan, {group: ms}, plan ms) for every plan of ``name`` that measured ok."""
    model = load_model(name)
    plans = {}
    for rules in ("unfused", "tvm", "tensorrt"):
        plan = make_plan(rules, model.mod, model.graph)
        plans.setdefault(plan.hash, plan)
    for _ in range(n_plans * 5):  # small graphs repeat plans; stop at n_plans distinct ones
        if len(plans) >= n_plans + 3:
            break
        plan = random_plan(model.graph, rng, max_anchors=max_anchors)
        plans.setdefault(plan.hash, plan)
    rows = []
    for plan in plans.values():
        record = measurer.measure(model, plan, per_kernel=True)
        if record.status != "ok" or not record.kernel_times_ms:
            print(f"  {name}: plan {plan.hash} {record.status}: {(record.error or '')[:100]}")
            continue
        times = group_kernel_times(model.graph, plan, record.kernel_times_ms)
        rows.append((model.graph, plan, times, float(record.median_ms)))
    return rows


def within_model_spearman(cm: LatencyCostModel, rows) -> dict[str, float]:
    by_model: dict[str, list] = {}
    for g, p, _, ms in rows:
        by_model.setdefault(g.name, []).append((g, p, ms))
    return {name: round(cm.spearman(part), 3) for name, part in by_model.items()}


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    protocol = TimingProtocol.quick() if args.quick else TimingProtocol()
    store = MeasurementStore(args.store or default_store_path())
    measurer = Measurer(args.target, args.schedule, store=store, protocol=protocol, isolate=not args.in_process)
    max_anchors = None if args.allow_multi_anchor else 1
    t0 = time.time()
    train, held_plans = [], []
    with measurer:
        for name in args.models:
            rows = measure_model(name, measurer, args.plans, rng, max_anchors)
            order = rng.permutation(len(rows))
            k = max(2, int(round(args.holdout_frac * len(rows))))
            held_plans += [rows[i] for i in order[:k]]
            train += [rows[i] for i in order[k:]]
            print(f"{name}: {len(rows)} plans measured ok ({measurer.stats.misses} measurements so far)")
        held_model = measure_model(args.holdout_model, measurer, args.plans, rng, max_anchors)
    spent = measurer.stats.to_dict()

    cm = LatencyCostModel(
        backend=args.backend, seed=args.seed,
        meta={"target": measurer.spec.key, "provider": measurer.provider.name, "train_models": args.models,
              "protocol": protocol.key},
    )
    cm.fit([(g, p, t) for g, p, t, _ in train]).fit_plans([(g, p, ms) for g, p, _, ms in train])
    report = {
        "backend": cm.backend,
        "target": measurer.spec.key,
        "schedule": measurer.provider.name,
        "train_plans": len(train),
        "overhead_ms_per_kernel": cm.overhead_ms,
        "heldout_plans": {
            "n": len(held_plans),
            "spearman_pooled": round(cm.spearman([(g, p, ms) for g, p, _, ms in held_plans]), 3),
            "spearman_within_model": within_model_spearman(cm, held_plans),
        },
        "heldout_model": {
            "model": args.holdout_model,
            "n": len(held_model),
            "spearman": round(cm.spearman([(g, p, ms) for g, p, _, ms in held_model]), 3),
            "latency_spread_ms": [min(r[3] for r in held_model), max(r[3] for r in held_model)] if held_model else None,
        },
        "train_spearman_within_model": within_model_spearman(cm, train),
        "measurements": spent,
        "wall_s": round(time.time() - t0, 1),
        "seed": args.seed,
    }
    if args.output:
        cm.save(args.output)
        report["saved"] = str(args.output)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
