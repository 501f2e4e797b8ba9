"""``fusion-rl compare``: rule sets x schedule providers beside ORT and torch, in one run."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from fusion_rl.compiler.schedules import DEFAULT_SCHEDULE
from fusion_rl.cli.common import add_json, add_model_args, add_output, add_timing_args, load, positive
from fusion_rl.cli.progress import add_no_progress, bar
from fusion_rl.errors import ConfigError
from fusion_rl.io import dumps_json


def cmd_compare(args: argparse.Namespace) -> int:
    from fusion_rl.compare import compare_model, machine_description, to_markdown, write_report
    from fusion_rl.compiler.schedules import SCHEDULE_NAMES
    from fusion_rl.compiler.store import MeasurementStore, default_store_path
    from fusion_rl.compiler.target import parse_target
    from fusion_rl.compiler.timing import TimingProtocol

    names = args.schedule.split(",")
    for n in names:
        if n not in SCHEDULE_NAMES:
            raise ConfigError(f"unknown schedule provider '{n}'; choose from {', '.join(SCHEDULE_NAMES)}")
    schedules = [(n, {"trials_per_task": args.trials} if n == "tuned" else {}) for n in names]
    spec = parse_target(args.target)
    model = load(args)
    protocol = TimingProtocol(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms)
    store = None if args.no_store else MeasurementStore(args.store or default_store_path())
    with bar(args, "compare", unit="row") as progress, bar(args, "tuning", unit="task") as tuning:
        rows = compare_model(model, schedules, spec.name, store, protocol, progress=progress,
                             tuning=tuning)
    if args.json:
        print(dumps_json([asdict(r) for r in rows]))
    else:
        print(to_markdown(rows, f"{model.name} on {spec.key}"))
    if args.output:
        command = "fusion-rl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        header = (
            f"Machine: {machine_description(spec.num_threads)}; target {spec.key}.\n"
            f"Protocol: {protocol.key} (median of {protocol.repeat} repeats of >= "
            f"{protocol.min_repeat_ms} ms each; spread = IQR). Every output verified against "
            f"ONNX Runtime before it was timed.\nCommand: `{command}`\n"
        )
        md, png = write_report(rows, args.output, model.name, header)
        print(f"wrote {md} and {png}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="rule sets x schedules beside ORT and torch")
    add_model_args(p)
    p.add_argument("--schedule", default=DEFAULT_SCHEDULE,
                   help=f"comma-separated providers, e.g. naive,rules,tuned (default {DEFAULT_SCHEDULE})")
    p.add_argument("--trials", type=positive(), default=16, help="trials per task for tuned (default 16)")
    p.add_argument("--target", default="host",
                   help="target: host, {x86-64,haswell,sapphirerapids}-t{1,2} or llvm:MCPU:tN (default host)")
    add_timing_args(p)
    p.add_argument("--store", type=Path, default=None, help="measurement store (SQLite) path")
    p.add_argument("--no-store", action="store_true", help="measure without reading or writing the store")
    add_output(p, "write a report here: a folder for <model>.md, .json and .png", old=("--out",))
    add_json(p, "the rows")
    add_no_progress(p)
    p.set_defaults(func=cmd_compare)
