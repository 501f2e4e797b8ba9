"""Argument helpers shared by the command modules of the ``fusion-rl`` CLI."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from fusion_rl.compiler.schedules import DEFAULT_SCHEDULE
from fusion_rl.errors import ConfigError


def parse_shapes(values: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
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


#: Exit statuses of every command (the README's table is generated from this).
EXIT_OK = 0
EXIT_NO = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_NO: "measured, and the answer is no: `validate` finds the result does not hold, or a "
             "plan's output is wrong (`wrong_output`)",
    EXIT_USER_ERROR: "bad input: a bad option, model, plan, policy or file (one line `error: ...`)",
    EXIT_INTERNAL_ERROR: "internal error: a bug, or a build or measurement that failed for "
                         "another reason (crashed, timeout); `--debug` shows the traceback",
}


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """Exit with ``main()``'s status; a :class:`~fusion_rl.errors.FusionRLError` becomes one
    ``error: ...`` line and status 2, as in ``fusion-rl`` (for the experiment scripts)."""
    from fusion_rl.errors import FusionRLError
    from fusion_rl.io import one_line

    try:
        status = int(main() or 0)
    except FusionRLError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        status = EXIT_USER_ERROR
    sys.exit(status)


def experiment_args(doc: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments of an experiment script (``scripts/<name>.py CONFIG``): the config, ``--out``
    (default: the config's folder, set on the result) and ``--render`` (rewrite results.md from
    results.json, run nothing)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--render", action="store_true",
                        help="only rewrite results.md from results.json (nothing is run)")
    args = parser.parse_args(argv)
    args.out = args.out or args.config.parent
    return args


def positive(kind: type = int, maximum: float | None = None):
    """An argparse ``type``: a finite number > 0 (and <= ``maximum``), so a bad value fails in
    argparse with one line naming the option, not later in whatever object it reaches."""
    return _number(kind, 0, False, maximum)


def nonnegative(kind: type = int, maximum: float | None = None):
    """An argparse ``type``: a finite number >= 0 (seeds: numpy refuses negative ones)."""
    return _number(kind, 0, True, maximum)


def _number(kind: type, minimum: float, inclusive: bool, maximum: float | None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            word = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {word}, got '{text}'") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:g}, got {text}")
        return value

    return parse


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: still accepted, hidden from ``--help``, and it says once
    (one ``warning:`` line) which spelling to use instead."""

    def __init__(self, option_strings, dest, use: str = "", **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.use = use

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"warning: {option_string} is deprecated; use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_output(p: argparse.ArgumentParser, help: str, required: bool = False,
               old: Sequence[str] = (), **kwargs: Any) -> None:
    """``-o/--output``, the one spelling of an output path; ``old`` spellings stay accepted as
    hidden, deprecated aliases."""
    kwargs.setdefault("metavar", "PATH")
    p.add_argument("-o", "--output", type=Path, required=required, help=help, **kwargs)
    for name in old:
        p.add_argument(name, dest="output", type=Path, action=_DeprecatedAlias, use="-o/--output",
                       help=argparse.SUPPRESS)


def add_json(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: the result as JSON on stdout (progress bars and chatter off)."""
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as JSON on stdout (no progress bar)")


def plain(text: str) -> str:
    """Docstring text as plain terminal text: RST roles and double back-quotes dropped
    (``:mod:`fusion_rl.x``` -> ``fusion_rl.x``, ````--plan```` -> ```--plan```)."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "`")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a zoo model name (see `fusion-rl zoo`) or a path to an .onnx file")
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=D1,D2,...",
        help="concrete shape of an input with dynamic dimensions (repeatable)",
    )
    p.add_argument("--seed", type=nonnegative(), default=0,
                   help="seed of zoo weights and example inputs (default 0)")


def add_plan_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--rules", metavar="R",
                     help="a rule set: unfused, tvm, tensorrt, aggressive, aggressive_1anchor, aggressive_shapes")
    src.add_argument("--plan", type=Path, metavar="P.json", help="a plan JSON file (from `fusion-rl plan -o`)")
    src.add_argument("--policy", type=Path, metavar="DIR", help="an exported policy folder (policies/NAME)")


class _CollectPlanSources(argparse.Action):
    """Append ``(kind, value)`` to ``namespace.sources`` in command-line order; ``--rules``
    takes a comma-separated list (``tvm,unfused``), one source per name."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sources = list(getattr(namespace, "sources", None) or [])
        if self.dest == "rules":
            names = [n.strip() for n in str(values).split(",")]
            if not all(names):
                raise argparse.ArgumentError(self, f"empty rule-set name in '{values}'")
            sources += [("rules", n) for n in names]
        else:
            sources.append((self.dest, values))
        namespace.sources = sources


def add_plan_sources(p: argparse.ArgumentParser) -> None:
    """Plan sources that may be repeated and combined (``measure``): one plan measures it, two
    or more compare them head to head. ``args.sources`` lists them in command-line order."""
    p.set_defaults(sources=[])
    p.add_argument("--rules", action=_CollectPlanSources, metavar="R1[,R2,...]",
                   help="rule sets: unfused, tvm, tensorrt, aggressive (comma-separated)")
    p.add_argument("--plan", type=Path, action=_CollectPlanSources, metavar="P.json",
                   help="a plan JSON file (from `fusion-rl plan -o`); repeatable")
    p.add_argument("--policy", type=Path, action=_CollectPlanSources, metavar="DIR",
                   help="an exported policy folder (policies/NAME); repeatable")


def single_source(args: argparse.Namespace) -> None:
    """Set ``args.rules`` / ``args.plan`` / ``args.policy`` from the one entry of
    ``args.sources``, as :func:`add_plan_source` would (None for the other two)."""
    (kind, value), = args.sources
    for name in ("rules", "plan", "policy"):
        setattr(args, name, value if name == kind else None)


def source_plan(args: argparse.Namespace, model, kind: str, value: Any):
    """The plan of one ``(kind, value)`` source, checked legal."""
    from fusion_rl.fusion.legality import require_legal

    ns = argparse.Namespace(**vars(args))
    for name in ("rules", "plan", "policy"):
        setattr(ns, name, value if name == kind else None)
    plan = make_plan_from_args(ns, model)
    require_legal(model.graph, plan)
    return plan


def add_measure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="host",
                   help="target: host, {x86-64,haswell,sapphirerapids}-t{1,2} or llvm:MCPU:tN (default host)")
    p.add_argument(
        "--schedule", default=DEFAULT_SCHEDULE,
        help=f"schedule provider: naive, rules, tuned (default {DEFAULT_SCHEDULE})"
    )
    p.add_argument(
        "--trials", type=positive(), default=None, help="trials per task for --schedule tuned"
    )
    add_timing_args(p)
    p.add_argument("--store", type=Path, default=None, help="measurement store (SQLite) path")
    p.add_argument("--no-store", action="store_true", help="measure without reading or writing the store")
    p.add_argument("--timeout", type=positive(float), default=600.0, help="seconds per measurement")
    p.add_argument("--retry", default="", metavar="STATUSES",
                   help="re-measure stored records with these statuses, e.g. crashed,timeout "
                        "(after a fix; by default a failure is remembered)")


def add_timing_args(p: argparse.ArgumentParser, repeat: int | None = 7) -> None:
    """``--repeat`` and ``--min-repeat-ms``, bounded as the timing protocol requires."""
    default = "the result's" if repeat is None else str(repeat)
    p.add_argument("--repeat", type=positive(int, 1000), default=repeat,
                   help=f"timed repeats, 1 to 1000 (default {default})")
    p.add_argument("--min-repeat-ms", type=positive(int, 60_000), default=50,
                   help="minimum duration of a repeat in ms, 1 to 60000 (default 50)")


def load(args: argparse.Namespace):
    from fusion_rl.graph.model import load_model

    return load_model(args.model, shapes=parse_shapes(args.input_shape), seed=args.seed)


def make_plan_from_args(args: argparse.Namespace, model):
    """The plan named by --rules, --plan or --policy (not yet checked for legality)."""
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.fusion.rules import make_plan

    if getattr(args, "rules", None) is not None:
        return make_plan(args.rules, model.mod, model.graph)
    if getattr(args, "policy", None) is not None:
        from fusion_rl.export import LearnedPlanner

        return LearnedPlanner(args.policy, getattr(args, "target", "host")).plan(model.graph)
    # The model's size is known: a plan of another size is refused before it is built.
    return FusionPlan.load(args.plan, len(model.graph), model.fingerprint)


def plan_for(args: argparse.Namespace, model):
    """:func:`make_plan_from_args`, checked legal (IllegalPlanError names the violation)."""
    from fusion_rl.fusion.legality import require_legal

    plan = make_plan_from_args(args, model)
    require_legal(model.graph, plan)
    return plan


def measurer(args: argparse.Namespace, use_store: bool = True, progress=None):
    """The Measurer the options describe; ``use_store=False`` ignores --store (comparisons);
    ``progress`` gets the tuning progress of ``--schedule tuned``."""
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.store import MeasurementStore, default_store_path
    from fusion_rl.compiler.timing import TimingProtocol

    kwargs: dict[str, Any] = {}
    if args.trials is not None:
        if args.schedule != "tuned":
            raise ConfigError("--trials only applies to --schedule tuned")
        kwargs["trials_per_task"] = args.trials
    store = None if args.no_store or not use_store else MeasurementStore(args.store or default_store_path())
    protocol = TimingProtocol(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms)
    retry = tuple(s for s in getattr(args, "retry", "").split(",") if s)
    return Measurer(
        args.target, args.schedule, kwargs, store=store, protocol=protocol, timeout_s=args.timeout,
        retry=retry, progress=progress,
    )


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


