"""The ``fusion-rl`` command line.

Every user error (bad model file, unknown name, illegal plan, bad option) prints one line,
``error: <what is wrong>``, and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from fusion_rl.errors import ConfigError, FusionRLError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


# ---- argument helpers ------------------------------------------------------------------------


def _shapes(values: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for text in values or []:
        name, sep, dims = text.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
            if any(d <= 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"bad --input-shape '{text}'; expected NAME=D1,D2,... with positive integers"
            ) from None
    return shapes


def _positive(kind: type = int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a zoo model name (see `fusion-rl zoo`) or a path to an .onnx file")
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=D1,D2,...",
        help="concrete shape of an input with dynamic dimensions (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of zoo weights and example inputs")


def _add_plan_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--rules", help="a rule set: unfused, tvm, tensorrt, aggressive")
    src.add_argument("--plan", type=Path, help="a plan JSON file (from `fusion-rl plan -o`)")


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="host", help="target name (default: host); see docs")
    p.add_argument(
        "--schedule", default="naive", help="schedule provider: naive, rules, tuned (default naive)"
    )
    p.add_argument(
        "--trials", type=_positive(), default=None, help="trials per task for --schedule tuned"
    )
    p.add_argument("--repeat", type=_positive(), default=7, help="timed repeats (default 7)")
    p.add_argument(
        "--min-repeat-ms", type=int, default=50, help="minimum duration of a repeat (default 50)"
    )
    p.add_argument("--store", type=Path, default=None, help="measurement store (SQLite) path")
    p.add_argument("--no-store", action="store_true", help="measure without reading or writing the store")
    p.add_argument("--timeout", type=_positive(float), default=600.0, help="seconds per measurement")


def _load(args: argparse.Namespace):
    from fusion_rl.graph.model import load_model

    return load_model(args.model, shapes=_shapes(args.input_shape), seed=args.seed)


def _plan_for(args: argparse.Namespace, model):
    from fusion_rl.fusion.legality import require_legal
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.fusion.rules import make_plan

    if getattr(args, "rules", None):
        return make_plan(args.rules, model.mod, model.graph)
    plan = FusionPlan.load(args.plan)
    require_legal(model.graph, plan)
    return plan


def _measurer(args: argparse.Namespace):
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.store import MeasurementStore, default_store_path
    from fusion_rl.compiler.timing import TimingProtocol

    kwargs: dict[str, Any] = {}
    if args.trials is not None:
        if args.schedule != "tuned":
            raise ConfigError("--trials only applies to --schedule tuned")
        kwargs["trials_per_task"] = args.trials
    store = None if args.no_store else MeasurementStore(args.store or default_store_path())
    protocol = TimingProtocol(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms)
    return Measurer(
        args.target, args.schedule, kwargs, store=store, protocol=protocol, timeout_s=args.timeout
    )


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# ---- commands --------------------------------------------------------------------------------


def cmd_zoo(args: argparse.Namespace) -> int:
    from fusion_rl.graph.zoo import list_models

    rows = [
        {"name": e.name, "family": e.family, "source": e.source, "description": e.description}
        for e in list_models()
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows, ["name", "family", "source", "description"])
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from fusion_rl.fusion.legality import check_plan
    from fusion_rl.fusion.metrics import plan_metrics
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.fusion.rules import make_plan

    model = _load(args)
    if args.rules:
        plan = make_plan(args.rules, model.mod, model.graph)
    else:
        plan = FusionPlan.load(args.plan)
    report = check_plan(model.graph, plan)
    if args.output:
        plan.save(args.output)
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
        print(json.dumps(out))
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

    model = _load(args)
    plan = _plan_for(args, model)
    with _measurer(args) as measurer:
        hits = measurer.stats.hits
        record = measurer.measure(model, plan, per_kernel=args.per_kernel)
        cached = measurer.stats.hits > hits
    metrics = plan_metrics(model.graph, plan)
    out = {
        "model": model.name,
        "fingerprint": model.fingerprint,
        "plan": plan.name or str(args.plan),
        "plan_hash": plan.hash,
        "target": measurer.spec.key,
        "schedule": measurer.provider.name,
        "budget": measurer.provider.budget,
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
        print(json.dumps(out))
    elif record.status == "ok":
        print(
            f"{model.name} / {out['plan']} on {out['target']} ({out['schedule']}): "
            f"{record.median_ms:.3f} ms (IQR {record.spread_ms:.3f}, {record.repeats} repeats), "
            f"{out['num_kernels']} kernels, verified{' [from store]' if cached else ''}"
        )
        for name, ms in sorted((record.kernel_times_ms or {}).items(), key=lambda kv: -kv[1]):
            print(f"  {ms:9.4f} ms  {name}")
    if record.status != "ok":
        print(f"error: measurement {record.status}: {record.error}", file=sys.stderr)
        return EXIT_USER_ERROR if record.status == "wrong_output" else EXIT_INTERNAL_ERROR
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fusion_rl.demo import run_demo

    return run_demo(quick=args.quick)


# ---- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-rl", description="Learn and compare operator-fusion plans for TVM Relax."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("zoo", help="list the built-in models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("plan", help="show a plan's groups, ops and legality")
    _add_model_args(p)
    _add_plan_source(p)
    p.add_argument("-o", "--output", type=Path, help="save the plan as JSON")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("measure", help="compile, verify and time a plan")
    _add_model_args(p)
    _add_plan_source(p)
    _add_measure_args(p)
    p.add_argument("--per-kernel", action="store_true", help="also time each kernel")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("demo", help="the main job on the built-in default (README)")
    p.add_argument("--quick", action="store_true", help="one small model, for smoke tests")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    try:
        return int(args.func(args) or 0)
    except FusionRLError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in fusion_rl: say so, in one line unless --debug
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"internal error: {type(exc).__name__}: {first[:300]} (rerun with --debug)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
