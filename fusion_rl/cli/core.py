"""Core commands: ``zoo``, ``plan``, ``measure``, ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from fusion_rl.cli.common import (
    EXIT_INTERNAL_ERROR,
    EXIT_NO,
    add_json,
    add_measure_args,
    add_model_args,
    add_plan_source,
    add_plan_sources,
    add_output,
    load,
    make_plan_from_args,
    measurer,
    plan_for,
    print_table,
    positive,
    single_source,
    source_plan,
)
from fusion_rl.cli.progress import add_no_progress, bar
from fusion_rl.errors import ConfigError
from fusion_rl.io import dumps_json, one_line


def _failure_status(status: str) -> int:
    """A plan whose output is wrong was measured, and the answer is no (1); a crash, timeout or
    build failure is a failure of the tool (3)."""
    return EXIT_NO if status.startswith("wrong_output") else EXIT_INTERNAL_ERROR


def cmd_zoo(args: argparse.Namespace) -> int:
    from fusion_rl.graph.zoo import flops, list_models

    rows = [
        {"name": e.name, "suite": e.suite, "family": e.family, "source": e.source,
         "flops": flops(e.name), "description": e.description}
        for e in list_models(args.suite)
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            g = row["flops"] / 1e9
            row["GFLOPs"] = f"{g:.3f}" if g >= 1e-3 else f"{g:.1e}"
        print_table(rows, ["name", "suite", "family", "source", "GFLOPs", "description"])
        print("GFLOPs: 2 x multiply-accumulates of convolutions and matrix products, batch 1")
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
    from fusion_rl.compiler.schedules.base import fallbacks
    from fusion_rl.fusion.metrics import plan_metrics

    if not args.sources:
        raise ConfigError("give a plan to measure: --rules R[,R2,...], --plan P.json or --policy DIR")
    if len(args.sources) > 1:
        return _measure_head_to_head(args)
    if args.rounds is not None or args.min_near or args.max_rounds is not None:
        raise ConfigError("--rounds, --min-near and --max-rounds apply to a head-to-head comparison; "
                          "give two or more plans")
    single_source(args)
    model = load(args)
    plan = plan_for(args, model)
    with bar(args, "tuning", unit="task") as tuning, measurer(args, progress=tuning) as m:
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
        # Which schedule each kernel got; a kernel left as naive loops is never silent.
        "kernel_schedules": record.kernel_schedules,
        "fallbacks": fallbacks(record.kernel_schedules or {}),
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
    if not args.json:
        for name, reason in out["fallbacks"].items():
            print(f"warning: kernel {name} runs as naive loops (no schedule fitted): {reason}",
                  file=sys.stderr)
    if record.status != "ok":
        where = ""
        if cached:  # a remembered failure: say so, and how to measure again
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created))
            where = (f" (remembered in the store from {when}, not measured now; "
                     f"rerun with --retry {record.status} to measure again)")
        print(f"error: measurement {record.status}{where}: {one_line(str(record.error))}", file=sys.stderr)
        return _failure_status(record.status)
    return 0


def _measure_head_to_head(args: argparse.Namespace) -> int:
    """Two or more plans, timed in interleaved rounds with paired ratios (never the store).

    Records taken at different times on a shared machine differ by the machine's regime as
    much as by plan (fusion_rl/compiler/paired.py); so plans are compared repeat by repeat, and
    each speedup is the median of per-repeat ratios against the first plan.
    """
    import numpy as np

    from fusion_rl.compiler.paired import check_rounds, head_to_head

    if args.per_kernel:
        raise ConfigError("--per-kernel measures one plan; drop it to compare plans")
    rounds = 3 if args.rounds is None else args.rounds
    # Before the model loads and the plans build: a bad flag costs nothing.
    check_rounds(rounds, args.min_near, args.max_rounds, names=("--rounds", "--min-near", "--max-rounds"))
    model = load(args)
    names = [str(value) for _, value in args.sources]
    plans = {str(i): source_plan(args, model, kind, value)
             for i, (kind, value) in enumerate(args.sources)}
    with bar(args, "rounds", unit="round", total=rounds) as progress, \
            bar(args, "tuning", unit="task") as tuning, \
            measurer(args, use_store=False, progress=tuning) as m:
        result = head_to_head(m, model, plans, rounds, progress=progress, min_near=args.min_near,
                              max_rounds=args.max_rounds)
    if result.failures:
        status = next(iter(result.failures.values()))
        print(f"error: comparison failed: {status}", file=sys.stderr)
        return _failure_status(status)
    rows = []
    for label, name in zip(plans, names):
        ratios = result.speedups("0", label)  # first plan's time / this plan's, repeat by repeat
        q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
        rows.append({
            "name": name,
            "latency_ms": result.median_ms(label),
            "spread_ms": result.iqr_ms(label),
            "verified": True,  # every round verified every plan, or the comparison failed
            "num_kernels": result.num_kernels.get(label),
            "speedup_vs_first": float(q2),
            "speedup_spread": float(q3 - q1),
            "speedup_by_regime": result.regime_speedups("0", label),
        })
    out = {"model": model.name, "schedule": m.provider.name, "target": m.spec.key, "rounds": result.rounds,
           "fork_join_us": result.fork_join_us, "reference_us": result.reference_us, "plans": rows}
    if args.json:
        print(dumps_json(out))
        return 0
    repeats = len(result.pooled_ms["0"])
    print(f"{model.name} on {out['target']} ({out['schedule']}): {result.rounds} interleaved rounds, "
          f"{repeats} paired repeats per plan; every output verified")
    table = [{"plan": r["name"], "median ms": f"{r['latency_ms']:.4f}",
              "IQR ms": f"{r['spread_ms']:.4f}", "kernels": r["num_kernels"],
              f"speedup vs {names[0]} (IQR)": f"{r['speedup_vs_first']:.3f}x ({r['speedup_spread']:.3f})"}
             for r in rows]
    print_table(table, list(table[0]))
    _print_regimes(rows, names[0], result.fork_join_us, result.reference_us)
    return 0


def _print_regimes(rows: list[dict], first: str, probes_us: list[float], reference_us: float | None) -> None:
    """One line on the host's fork-join regime (judged against ``reference_us``, as the
    comparison was), and each plan's speedup per regime when the repeats span both
    (fusion_rl/compiler/regime.py: the far regime favours fewer kernels)."""
    from fusion_rl.compiler.regime import probes_by_regime

    if not probes_us:
        return
    near, far = probes_by_regime(probes_us, reference_us).values()
    line = (f"host fork-join cost: {min(near):.2f}-{max(near):.2f} us in {len(near)} repeats" if near
            else f"host fork-join cost: no repeat near this host's lowest ({reference_us:.2f} us)")
    if not far:
        print(line + "; no repeat in a far regime")
        return
    print(line + f", {min(far):.2f}-{max(far):.2f} us (far regime) in {len(far)}; speedup vs {first} by regime:")
    print_table([{"plan": r["name"], **{f"{k} (IQR, repeats)": f"{v['paired_speedup']:.3f}x ({v['paired_spread']:.3f}, "
                                         f"{v['repeats']})" for k, v in r["speedup_by_regime"].items()}}
                 for r in rows], ["plan", "near (IQR, repeats)", "far (IQR, repeats)"])


def cmd_demo(args: argparse.Namespace) -> int:
    from fusion_rl.demo import run_demo

    with bar(args, "demo", unit="model") as progress:
        return run_demo(quick=args.quick, as_json=args.json, progress=progress, log=progress.print)




def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="list the built-in models with their FLOPs")
    p.add_argument("--suite", choices=("tiny", "bench"), default=None,
                   help="only this suite: tiny (tests, training) or bench (deployment sizes)")
    add_json(p, "the models")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("plan", help="show a plan's groups, ops and legality")
    add_model_args(p)
    add_plan_source(p)
    add_output(p, "save the plan as JSON (only a legal plan is written)")
    p.add_argument("--target", default="host", help="target the policy plans for (with --policy; default host)")
    add_json(p, "the plan, its legality and metrics")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "measure", help="compile, verify and time a plan, or compare several head to head",
        description="One plan: compile, verify and time it (served from the store when known). "
                    "Two or more (--rules tvm,unfused, --plan and --policy may be combined and "
                    "repeated): time them in --rounds interleaved rounds, never from the store, "
                    "and report each one's median speedup over the first, repeat by repeat.")
    add_model_args(p)
    add_plan_sources(p)
    add_measure_args(p)
    p.add_argument("--rounds", type=positive(), default=None,
                   help="rounds of a head-to-head comparison (default 3; each round rebuilds "
                        "every plan and times them repeat by repeat)")
    p.add_argument("--min-near", type=int, default=0, metavar="N",
                   help="add rounds until N repeats ran in the host's near fork-join regime "
                        "(fusion_rl/compiler/regime.py; default 0: never)")
    p.add_argument("--max-rounds", type=positive(), default=None,
                   help="at most this many rounds with --min-near (default twice --rounds)")
    p.add_argument("--per-kernel", action="store_true", help="also time each kernel (one plan)")
    add_json(p, "the measurement (or the comparison)")
    add_no_progress(p)
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("demo", help="the main job on the built-in default (README)")
    p.add_argument("--quick", action="store_true", help="the first model only, fewer repeats")
    add_json(p, "the rows")
    add_no_progress(p)
    p.set_defaults(func=cmd_demo)
