#!/usr/bin/env python
"""The transfer experiment: train seeds, evaluate zero-shot, write ``experiments/transfer/README.md``.

    FUSION_RL_CACHE=/tmp/frl_cache TVM_NUM_THREADS=2 \
        python scripts/transfer.py experiments/transfer/config.yaml [--runs RUN_DIR ...] [--metaschedule]

CleanRL style, top to bottom:

1. read the experiment config and the training config it names;
2. find a finished run per seed in ``runs_dir`` (or take ``--runs``); train the missing seeds
   through :func:`fusion_rl.policy.training.train`;
3. learning curves from each run's ``episodes.jsonl`` (PNG) and the measurements to parity
   with ``tvm`` rules;
4. the equal search budget (training measurements / training models, capped);
5. :func:`fusion_rl.evaluate.evaluate` on the training models, held-out models and held-out
   targets; rows to ``results.json``;
6. the report: ``README.md`` (tables, plots, commands, machine, wall times);
7. with ``--metaschedule``: ``tvm`` rules + MetaSchedule against learned fusion + MetaSchedule
   at the same trials per task, to ``metaschedule.md``;
8. with ``--remeasure``: the held-out cases' plans timed again without the store, interleaved.

The shipped policy's card comes from ``experiments/learn_bench`` (``scripts/learn_bench.py --card``),
not from this tiny-zoo experiment.

The measuring steps are :mod:`fusion_rl.transfer`; the tables and plots :mod:`fusion_rl.report.transfer`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusion_rl import transfer  # noqa: E402
from fusion_rl.cli.common import run_script  # noqa: E402
from fusion_rl.evaluate import RULE_BASELINES, equal_budget, evaluate, training_stats  # noqa: E402
from fusion_rl.io import read_yaml, write_atomic  # noqa: E402
from fusion_rl.paths import relative_to_repo  # noqa: E402
from fusion_rl.report import transfer as report  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="experiment config (experiments/transfer/config.yaml)")
    p.add_argument("--runs", type=Path, nargs="+", default=None, help="reuse these run dirs (one per seed)")
    p.add_argument("--metaschedule", action="store_true", help="also write metaschedule.md (tuned, minutes per model)")
    p.add_argument("--skip-eval", action="store_true", help="with --metaschedule: only the MetaSchedule table")
    p.add_argument("--remeasure", type=int, default=0, metavar="ROUNDS",
                   help="re-time the held-out-model cases' plans without the store, interleaved, ROUNDS rounds")
    p.add_argument("--out-dir", type=Path, default=None, help="report folder (default: the config's folder)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw speedups.png from the report folder's results.json (nothing is run)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv_list = list(sys.argv if argv is None else ["scripts/transfer.py", *argv])
    args = parse_args(argv)
    from fusion_rl.env.spec import EnvSpec
    from fusion_rl.policy.training import load_config

    # 1. Configs.
    t_start = time.time()
    cfg = read_yaml(args.config, "transfer config")
    out_dir = args.out_dir or args.config.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        rows = json.loads((out_dir / "results.json").read_text())
        report.plot_heldout([r for r in rows if r["split"] != "train"], out_dir / "speedups.png")
        return 0
    train_config_path = (REPO / cfg["train_config"]).resolve()
    env_spec = EnvSpec.from_yaml(load_config(train_config_path).env_spec)

    # 2. Runs (trained here if missing).
    t0 = time.time()
    runs, commands = transfer.get_runs(cfg, train_config_path, REPO / cfg.get("runs_dir", "runs"), args.runs)
    stats = [training_stats(r) for r in runs]
    train_s = sum(s["wall_s"] or 0.0 for s in stats)
    print(f"runs: {[str(r) for r in runs]} (this invocation spent {time.time() - t0:.0f} s training)", flush=True)

    # 7. MetaSchedule comparison (first, as it may be all that is asked).
    if args.metaschedule:
        report.write_metaschedule(out_dir, cfg, env_spec, transfer.metaschedule_runs(cfg, runs, env_spec), argv_list)
        if args.skip_eval:
            return 0

    # 3. Learning curves.
    parity = report.plot_curves(runs, int(cfg.get("window", 20)), out_dir / "learning_curves.png")

    # 4. Equal search budget.
    budget = equal_budget([st["measurements"] for st in stats], len(env_spec.models),
                          cfg["search"].get("equal_budget_cap"))
    search = transfer.search_settings(cfg["search"], budget["budget"], env_spec.targets)

    # 5. Evaluate.
    t0 = time.time()
    rows = evaluate(runs, transfer.eval_cases(cfg, env_spec), search, rules=tuple(cfg.get("rules", RULE_BASELINES)),
                    ablations=transfer.ablations(cfg, REPO))
    eval_s = time.time() - t0
    for r in rows:  # committed reports name runs relative to the repository, not this machine
        if r.get("run_dir"):
            r["run_dir"] = relative_to_repo(r["run_dir"])
    write_atomic(out_dir / "results.json", json.dumps(rows, indent=1), what="report")
    report.plot_heldout([r for r in rows if r["split"] != "train"], out_dir / "speedups.png")

    # 6. Report.
    times = {"train_s": train_s, "eval_s": eval_s, "total_s": time.time() - t_start}
    report.write_report(out_dir, cfg, env_spec, runs, stats, parity, budget, rows, commands, times, argv_list)

    # 8. Re-measurement under identical conditions, inserted before the held-out table.
    if args.remeasure > 0:
        t0 = time.time()
        again = transfer.remeasure(rows, env_spec, args.remeasure, ("heldout-model",))
        write_atomic(out_dir / "remeasured.json", json.dumps(again, indent=1), what="report")
        section = report.remeasure_section(again, args.remeasure, argv_list)
        section.append(f"Re-measurement wall time: {time.time() - t0:.0f} s.\n")
        text = (out_dir / "README.md").read_text()
        marker = "## Held-out models (training target)"
        write_atomic(out_dir / "README.md", text.replace(marker, "\n".join(section) + "\n" + marker, 1), what="report")
    print(f"wrote {out_dir / 'README.md'} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    run_script(main)
