#!/usr/bin/env python
"""Fuzz fusion plans against the reference, and the legality checker against the build.

    python scripts/fuzz_plans.py --plans 1000 --seed 0 --schedules naive,rules --out runs/fuzz

``--plans`` is the total number of distinct legal plans, spread over ``--models``; each is
compiled under every schedule. ``--partitions`` arbitrary partitions (default plans / 2) test the
legality checker. Mismatches get reproducer folders under ``--reproducers`` (default
``reproducers/``; docs/reproducers.md).
Writes ``OUT/summary.json`` and ``OUT/summary.md``; exits 1 if anything was found.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_rl.compare import machine_description  # noqa: E402
from fusion_rl.errors import ConfigError, first_line  # noqa: E402
from fusion_rl.fuzz import DEFAULT_SCHEDULES, bench_models, default_models, fuzz_plans  # noqa: E402
from fusion_rl.fuzz.report import FuzzReport  # noqa: E402
from fusion_rl.io import read_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", type=int, default=100, help="distinct legal plans in all (default 100)")
    p.add_argument("--partitions", type=int, default=None, help="arbitrary partitions for the legality fuzz (default plans/2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=[*default_models(), *bench_models()],
                   help="zoo names or .onnx paths (default: every tiny zoo model and the bench suite)")
    p.add_argument("--schedules", default=",".join(DEFAULT_SCHEDULES), help="comma-separated: naive,rules[,tuned]")
    p.add_argument("--out", type=Path, default=Path("runs/fuzz"), help="summary folder (default: runs/fuzz)")
    p.add_argument("--reproducers", type=Path, default=Path("reproducers"),
                   help="where failing plans are saved (default: reproducers/, git-ignored)")
    p.add_argument("--time-budget", type=float, default=None, help="stop starting new plans after this many seconds")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per compile before it counts as a hang")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                   help="merge the summary.json of fuzz runs made side by side into --out, run nothing")
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.merge:
        try:
            shards = [FuzzReport.from_dict(read_json(d / "summary.json", "fuzz summary")) for d in args.merge]
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            print(f"error: {first_line(exc)}", file=sys.stderr)
            return 2
        report = FuzzReport.merge(shards, command)
        report.write(args.out)
        return summarize(report, report.providers, args.out)

    report = fuzz_plans(args.models, args.plans, args.seed, schedules, args.out, args.partitions,
                        args.time_budget, args.timeout, command, log, args.reproducers)
    report.machine = machine_description(int(os.environ["TVM_NUM_THREADS"]))
    report.write(args.out)
    return summarize(report, schedules, args.out)


def summarize(report: FuzzReport, schedules: list[str], out: Path) -> int:
    """Print the one-line summary; exit status 1 if anything was found."""
    c = report.counts()
    lg = c["legality"]
    print(f"plans {c['plans']} on {c['models']} models x {len(schedules)} providers = {c['compiles']} compiles; "
          f"mismatches {c['mismatches']}, findings {c['findings']}; legality: {lg['accepted']} accepted "
          f"({lg['accepted_failed']} failed), {lg['rejected']} rejected ({lg['rejected_but_built']} built anyway); "
          f"summary in {out}/summary.md")
    return 1 if report.findings or report.legality_holes else 0


if __name__ == "__main__":
    sys.exit(main())
