"""Core commands: ``zoo``, ``plan``, ``measure``, ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fusion_rl.cli.common import (
    add_measure_args,
    add_model_args,
    add_plan_source,
    load,
    make_plan_from_args,
    measurer,
    plan_for,
    print_table,
)
from fusion_rl.io import dumps_json, one_line

EXIT_USER_ERROR = 2  # the same codes as fusion_rl.cli (which imports this module)
EXIT_INTERNAL_ERROR = 1




def cmd_zoo(args: argparse.Namespace) -> int:
    from fusion_rl.graph.zoo import list_models

    rows = [
        {"name": e.name, "family": e.family, "source": e.source, "description": e.description}
        for e in list_models()
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows, ["name", "family", "source", "description"])
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from fusion_rl.fusion.legality import check_plan
    from fusion_rl.fusion.metrics import plan_metrics
    model = load(args)
    plan = make_plan_from_args(args, model)
    report = check_plan(model.graph, plan)
    if args.output and report.legal:  # an illegal plan is reported, never written
        plan.save(args.output, what="-o")
    groups = [
        {"group": gi, "ops": [model.graph.nodes[i].op for i in g], "nodes": list(g)}
        for gi, g in enumerate(plan.groups)
    ] if report.legal else []
    if args.json:
        out = {
            "model": model.name,
            "fingerprint": model.fingerprint,
            "plan": plan.to_dict(),
            "legality": report.to_dict(),
            "groups": groups,
        }
        if report.legal:
            out["metrics"] = plan_metrics(model.graph, plan).to_dict()
        print(dumps_json(out))
    else:
        print(f"{model.graph.summary()}\n{plan}")
        for g in groups:
            print(f"  group {g['group']:3d}: {' + '.join(g['ops'])}  (nodes {g['nodes']})")
        for v in report.warnings:
            print(f"  warning: {v}")
        print("legal" if report.legal else f"ILLEGAL: {'; '.join(map(str, report.errors))}")
    if not report.legal:
        report.raise_if_illegal()
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from fusion_rl.fusion.metrics import plan_metrics

    model = load(args)
    plan = plan_for(args, model)
    with measurer(args) as m:
        hits = m.stats.hits
        record = m.measure(model, plan, per_kernel=args.per_kernel)
        cached = m.stats.hits > hits
    metrics = plan_metrics(model.graph, plan)
    out = {
        "model": model.name,
        "fingerprint": model.fingerprint,
        "plan": plan.name or str(args.plan or args.policy),
        "plan_hash": plan.hash,
        "target": m.spec.key,
        "schedule": m.provider.name,
        "budget": m.provider.budget,
        "status": record.status,
        "verified": record.status == "ok",
        "latency_ms": record.median_ms,
        "spread_ms": record.spread_ms,
        "spread_kind": "iqr",
        "repeats": record.repeats,
        "times_ms": record.times_ms,
        "num_kernels": record.num_kernels or metrics.num_kernels,
        "intermediate_bytes": metrics.intermediate_bytes,
        "cached": cached,
        "error": record.error,
    }
    if args.per_kernel:
        out["kernel_times_ms"] = record.kernel_times_ms
    if args.json:
        print(dumps_json(out))  # strict JSON: a non-finite number becomes null, never Infinity
    elif record.status == "ok":
        print(
            f"{model.name} / {out['plan']} on {out['target']} ({out['schedule']}): "
            f"{record.median_ms:.3f} ms (IQR {record.spread_ms:.3f}, {record.repeats} repeats), "
            f"{out['num_kernels']} kernels, verified{' [from store]' if cached else ''}"
        )
        for name, ms in sorted((record.kernel_times_ms or {}).items(), key=lambda kv: -kv[1]):
            print(f"  {ms:9.4f} ms  {name}")
    if record.status != "ok":
        where = ""
        if cached:  # a remembered failure: say so, and how to measure again
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created))
            where = (f" (remembered in the store from {when}, not measured now; "
                     f"rerun with --retry {record.status} to measure again)")
        print(f"error: measurement {record.status}{where}: {one_line(str(record.error))}", file=sys.stderr)
        return EXIT_USER_ERROR if record.status == "wrong_output" else EXIT_INTERNAL_ERROR
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fusion_rl.demo import run_demo

    return run_demo(quick=args.quick)




def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="list the built-in models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("plan", help="show a plan's groups, ops and legality")
    add_model_args(p)
    add_plan_source(p)
    p.add_argument("-o", "--output", type=Path, help="save the plan as JSON")
    p.add_argument("--target", default="host", help="target the policy plans for (with --policy)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("measure", help="compile, verify and time a plan")
    add_model_args(p)
    add_plan_source(p)
    add_measure_args(p)
    p.add_argument("--per-kernel", action="store_true", help="also time each kernel")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("demo", help="the main job on the built-in default (README)")
    p.add_argument("--quick", action="store_true", help="one small model, for smoke tests")
    p.set_defaults(func=cmd_demo)
