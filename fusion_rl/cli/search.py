"""The ``search`` command: run a search baseline and compare its best plan with TVM's rules."""

from __future__ import annotations

import argparse
import math
import sys

from fusion_rl.cli.common import add_json, add_measure_args, add_model_args, add_output, load, measurer, positive
from fusion_rl.cli.progress import add_no_progress, bar
from fusion_rl.io import dumps_json

ALGOS = ("random", "greedy", "annealing", "exhaustive")


def cmd_search(args: argparse.Namespace) -> int:
    from fusion_rl.baselines.search import run_search
    from fusion_rl.errors import MeasurementError
    from fusion_rl.fusion.metrics import plan_metrics
    from fusion_rl.fusion.rules import make_plan

    model = load(args)
    with bar(args, f"{args.algo} search", unit="plan", total=args.budget) as progress, \
            bar(args, "tuning", unit="task") as tuning, measurer(args, progress=tuning) as m:
        result = run_search(args.algo, model, m, args.budget, seed=args.seed, progress=progress)
        # The reference is measured after the search, so it never counts against the budget.
        before = m.stats.misses
        tvm_record = m.measure(model, make_plan("tvm", model.mod, model.graph))
        reference_spent = m.stats.misses - before
    if result.best_plan is None:
        raise MeasurementError(
            f"{args.algo} search evaluated {result.evaluations} plans and none measured ok "
            f"({result.failures} failed); check `fusion-rl measure {args.model} --rules unfused`"
        )
    if args.output:
        result.best_plan.save(args.output, what="-o")
    tvm_ms = tvm_record.median_ms if tvm_record.status == "ok" else None
    metrics = plan_metrics(model.graph, result.best_plan)
    out = {
        "model": model.name,
        "fingerprint": model.fingerprint,
        "algo": args.algo,
        "target": m.spec.key,
        "schedule": m.provider.name,
        "seed": args.seed,
        "budget": args.budget,
        "measurements_spent": result.measurements_spent,
        "evaluations": result.evaluations,
        "failures": result.failures,
        "best_ms": result.best_ms,
        "best_plan_hash": result.best_plan.hash,
        "num_kernels": metrics.num_kernels,
        "intermediate_bytes": metrics.intermediate_bytes,
        "tvm_ms": tvm_ms,
        "speedup_vs_tvm": (tvm_ms / result.best_ms) if tvm_ms else None,
        "reference_measurements": reference_spent,
        "info": result.info,
        "history": [[s, None if math.isinf(b) else b] for s, b in result.history],
    }
    if args.json:
        print(dumps_json(out))
        return 0
    print(
        f"{model.name}: {args.algo} search on {out['target']} ({out['schedule']}), seed {args.seed}: "
        f"{result.measurements_spent} measurements spent, {result.evaluations} plans evaluated "
        f"(budget {args.budget})"
    )
    print(f"  best plan: {result.best_ms:.4f} ms, {metrics.num_kernels} kernels, hash {result.best_plan.hash}")
    if tvm_ms:
        print(f"  tvm rules: {tvm_ms:.4f} ms  -> {tvm_ms / result.best_ms:.3f}x vs tvm")
    else:
        print(f"  tvm rules: measurement {tvm_record.status}: {tvm_record.error}", file=sys.stderr)
    if args.output:
        print(f"  saved best plan to {args.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search for a fast plan (random, greedy, annealing, exhaustive) and compare with tvm",
        description=(
            "Run a search baseline within a measurement budget and compare its best plan with "
            "TVM's FuseOps rules. --budget caps the distinct plans evaluated; plans already in the "
            "store are free. --seed seeds the zoo weights, the inputs and the search."
        ),
    )
    add_model_args(p)
    for action in p._actions:  # one seed for everything (STYLE lesson 6): say so in --help
        if action.dest == "seed":
            action.help = "seed of zoo weights, example inputs and the search (default 0)"
    p.add_argument("--algo", choices=ALGOS, default="greedy", help="search algorithm (default greedy)")
    p.add_argument("--budget", type=positive(), required=True, help="plans to evaluate (> 0)")
    add_measure_args(p)
    add_output(p, "save the best plan as JSON")
    add_json(p, "the search's result")
    add_no_progress(p)
    p.set_defaults(func=cmd_search)
