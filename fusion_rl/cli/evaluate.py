"""``fusion-rl evaluate``: zero-shot evaluation of trained runs against rule sets and search."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fusion_rl.cli.common import add_json, add_output, positive
from fusion_rl.cli.progress import add_no_progress, bar
from fusion_rl.io import dumps_json, write_atomic


def _names(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fusion_rl.errors import ConfigError, require_extra

    require_extra("fusion-rl evaluate", "train", "stable_baselines3", "sb3_contrib", "scipy")
    from fusion_rl.evaluate import Case, SearchSettings, evaluate, geomean

    for run in args.runs:
        if not (run / "config.json").is_file():
            raise ConfigError(f"{run}: not a run directory (no config.json); train one with `fusion-rl train`")
    models = _names(args.models)
    heldout = _names(args.heldout_models)
    targets = _names(args.targets)
    heldout_targets = _names(args.heldout_targets)
    if not models and not heldout:
        raise ConfigError("give --models and/or --heldout-models (comma-separated zoo names)")
    cases = [Case(m, t, "train") for m in models for t in targets]
    cases += [Case(m, t, "heldout-model") for m in heldout for t in targets]
    cases += [Case(m, t, "heldout-target") for m in models + heldout for t in heldout_targets]
    search = SearchSettings(
        algos=tuple(_names(args.search_algos)), budget=args.search_budget or 0,
        multiplier=args.multiplier, search_models=tuple(models + heldout),
        multiplied_models=tuple(models + heldout) if args.multiplied else (), search_targets=tuple(targets),
    )
    with bar(args, "evaluate", unit="case", total=len(cases)) as progress:
        log = (lambda s: print(s, file=sys.stderr)) if args.json else progress.print
        rows = evaluate(args.runs, cases, search, log=log, progress=progress)
    if args.output:
        write_atomic(args.output, dumps_json(rows, indent=1), what="-o")
    if args.json:
        print(dumps_json(rows))
        return 0
    from fusion_rl.cli.common import print_table

    def ratio(x: float | None) -> str:
        return f"{x:.3f}" if x else ""

    shown = [{**r, "latency_ms": f"{r['latency_ms']:.4f}" if r["latency_ms"] else r["status"],
              "speedup_vs_tvm": ratio(r["speedup_vs_tvm"]), "speedup_vs_best_rule": ratio(r["speedup_vs_best_rule"]),
              "seed": r.get("seed", "")} for r in rows]
    print_table(shown, ["model", "target", "split", "method", "seed", "latency_ms", "speedup_vs_tvm",
                        "speedup_vs_best_rule", "num_kernels", "intermediate_bytes"])
    learned = [r for r in rows if r["method"] == "learned"]
    best = ", ".join(f"{split}: {rule}" for split, rule in dict.fromkeys((r["split"], r["best_rule"]) for r in rows))
    print(f"learned policy: geomean speedup vs tvm {geomean(r['speedup_vs_tvm'] for r in learned):.3f}x, "
          f"vs the best fixed rule ({best}) {geomean(r['speedup_vs_best_rule'] for r in learned):.3f}x, "
          f"over {len(learned)} (case, seed) pairs")
    for (seed, run), rule in {(r["seed"], r["run_dir"]): r["collapsed_to"] for r in learned}.items():
        if rule is not None:
            print(f"seed {seed} ({run}) collapsed to the fixed rule {rule}: its plans equal {rule}'s on every case")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="zero-shot evaluation of trained runs vs rule sets and search",
        description=(
            "Evaluate trained runs (one per seed) zero-shot: the policy decides every edge with "
            "its deterministic masked action and spends no measurement; its plan is then measured "
            "once. Rule sets (unfused, tvm, tensorrt, aggressive, aggressive_1anchor) and, with "
            "--search-budget, search baselines are measured on the same store. Speedups are given "
            "against tvm and against the best fixed rule of each split; a seed whose plans equal a "
            "rule set's on every case is reported as collapsed to it."
        ),
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (runs/...)")
    p.add_argument("--models", default="", help="training models, comma-separated")
    p.add_argument("--heldout-models", default="", help="held-out models, comma-separated")
    p.add_argument("--targets", default="host", help="training targets, comma-separated (default host)")
    p.add_argument("--heldout-targets", default="", help="held-out targets, e.g. haswell-t1")
    p.add_argument("--search-budget", type=positive(), default=None, help="search budget per case (none: no search)")
    p.add_argument("--search-algos", default="random,greedy", help="search algorithms (default random,greedy)")
    p.add_argument("--multiplier", type=positive(), default=10, help="the larger search budget factor (default 10)")
    p.add_argument("--multiplied", action="store_true", help="also search at multiplier x budget")
    add_output(p, "write the rows as JSON")
    add_json(p, "the rows")
    add_no_progress(p)
    p.set_defaults(func=cmd_evaluate)
