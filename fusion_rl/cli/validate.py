"""``fusion-rl validate RESULT.json``: re-measure a stored result and say whether it still holds.

RESULT.json is what ``fusion-rl measure --json`` printed, or a result bundle
(:mod:`fusion_rl.compiler.result`) that also carries the plan. The plan comes from, in order:
``--plan``, ``--rules``, the bundle, or the rule set named in the measurement's ``plan`` field;
its hash must equal the recorded ``plan_hash``. The re-measurement bypasses the store (a fresh
compile, verification and timing on the recorded target, schedule and budget) and is compared
with the criterion documented in :mod:`fusion_rl.compiler.result`.

Exit status: 0 if the result holds, 1 if it does not (or the plan no longer verifies), 2 for a
bad RESULT.json or option, 3 for an internal error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fusion_rl.cli.common import EXIT_NO, EXIT_OK, add_json, add_output, add_timing_args, nonnegative, parse_shapes, plain, positive
from fusion_rl.cli.progress import add_no_progress, bar
from fusion_rl.errors import ConfigError, PlanMismatchError
from fusion_rl.io import dumps_json

EXIT_HOLDS = EXIT_OK
EXIT_DOES_NOT_HOLD = EXIT_NO


def cmd_validate(args: argparse.Namespace) -> int:
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.result import Result, Verdict, holds, load_result, target_name
    from fusion_rl.compiler.timing import TimingProtocol
    from fusion_rl.fusion.legality import require_legal
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.fusion.rules import RULE_SETS, make_plan
    from fusion_rl.graph.model import load_model

    result = load_result(args.result)
    m = result.measurement
    spec = args.model or result.model or m["model"]
    shapes = parse_shapes(args.input_shape) if args.input_shape else {k: tuple(v) for k, v in result.input_shapes.items()}
    seed = args.seed if args.seed is not None else result.seed
    model = load_model(spec, shapes=shapes or None, seed=seed)
    if m.get("fingerprint") and m["fingerprint"] != model.fingerprint:
        raise PlanMismatchError(
            f"{args.result} was measured on model {m['fingerprint']}, but '{spec}' is {model.fingerprint}; "
            "give the right model with --model"
        )

    if args.plan is not None:
        plan = FusionPlan.load(args.plan, len(model.graph), model.fingerprint)
    elif args.rules:
        plan = make_plan(args.rules, model.mod, model.graph)
    elif result.plan is not None:
        plan = FusionPlan.from_dict(result.plan, len(model.graph), model.fingerprint)
    elif isinstance(m.get("plan"), str) and m["plan"] in RULE_SETS:
        plan = make_plan(m["plan"], model.mod, model.graph)
    else:
        raise ConfigError(
            f"{args.result} does not carry the plan's groups; give --plan PLAN.json or --rules NAME "
            "(or validate a result bundle)"
        )
    if plan.hash != m["plan_hash"]:
        raise PlanMismatchError(f"the plan given has hash {plan.hash}, but {args.result} measured plan {m['plan_hash']}")
    require_legal(model.graph, plan)

    if result.protocol is not None:
        protocol = TimingProtocol(**result.protocol)
    else:
        repeat = args.repeat or (m.get("repeats") if isinstance(m.get("repeats"), int) and m.get("repeats", 0) > 0 else 7)
        protocol = TimingProtocol(repeat=repeat, min_repeat_ms=args.min_repeat_ms)
    kwargs = {"trials_per_task": m["budget"]} if m["schedule"] == "tuned" and m["budget"] else {}
    with bar(args, "tuning", unit="task") as tuning, \
            Measurer(target_name(m["target"]), m["schedule"], kwargs, store=None, protocol=protocol,
                     timeout_s=args.timeout, progress=tuning) as measurer:
        if measurer.spec.key != m["target"] or measurer.provider.budget != m["budget"]:
            raise ConfigError(
                f"cannot reproduce target {m['target']} / budget {m['budget']} here "
                f"(got {measurer.spec.key} / {measurer.provider.budget})"
            )
        record = measurer.measure(model, plan)

    old, old_spread = float(m["latency_ms"]), float(m["spread_ms"])
    if record.status == "ok":
        verdict = holds(old, old_spread, float(record.median_ms), float(record.spread_ms))
    else:
        verdict = Verdict(False, old, None, old_spread, None, 0.0, record.status, record.error)
    what = f"{model.name} / plan {plan.hash} on {m['target']} ({m['schedule']}, budget {m['budget']})"
    if args.output is not None:
        Result(m, plan.to_dict(), spec, seed, {k: list(v) for k, v in shapes.items()},
               {"repeat": protocol.repeat, "min_repeat_ms": protocol.min_repeat_ms,
                "number": protocol.number, "warmup": protocol.warmup}).save(args.output)
    if args.json:
        out = {"result": str(args.result), "model": model.name, "plan_hash": plan.hash,
               "target": m["target"], "schedule": m["schedule"], "budget": m["budget"],
               "protocol": protocol.key, "new_times_ms": record.times_ms, **verdict.to_dict(),
               "verdict": verdict.line(what)}
        print(dumps_json(out))
    else:
        print(verdict.line(what))
    return EXIT_HOLDS if verdict.holds else EXIT_DOES_NOT_HOLD


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="re-measure a result (from `measure --json`) and check its latency still holds",
        # The module docstring's RST (``--plan``, :mod:`...`) as plain text.
        description=plain(__doc__.split("\n\n")[1]) if __doc__ else None,
    )
    p.add_argument("result", type=Path, metavar="RESULT.json", help="RESULT.json: `fusion-rl measure --json` output or a result bundle")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--plan", type=Path, help="the plan JSON that was measured (if RESULT.json lacks it)")
    src.add_argument("--rules", help="the rule set that was measured (if RESULT.json lacks it)")
    p.add_argument("--model", help="zoo name or .onnx path, if not the result's model name")
    p.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...", help="as for measure")
    p.add_argument("--seed", type=nonnegative(), default=None,
                   help="seed of zoo weights and inputs (default: the result's, else 0)")
    add_timing_args(p, repeat=None)
    p.add_argument("--timeout", type=positive(float), default=600.0, help="seconds for the re-measurement")
    add_output(p, "also write a self-contained result bundle here", old=("--save-bundle",))
    add_json(p, "the verdict")
    add_no_progress(p)
    p.set_defaults(func=cmd_validate)
