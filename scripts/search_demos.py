#!/usr/bin/env python
"""Search results to imitate: the best plan a search finds on each training model.

    TVM_NUM_THREADS=2 python scripts/search_demos.py experiments/learn_bench/config.yaml

Top to bottom:

1. read the experiment config's ``demonstrations`` block (``algo``, ``budget``, ``seed``,
   ``out``) and its training config's env spec (the training models, the kernel table);
2. make the kernel table ready as ``learn_bench.py`` does before training
   (:func:`fusion_rl.env.tables.prepare_tables`): the fixed rules' kernels timed a second time,
   the faster kept (``retime_rules``: a kernel timed once in a slow regime makes the search chase
   or shun a plan for nothing), and the per-launch cost fitted where the schedule's version has
   none yet (without it the search rates a plan by its kernels alone, and the launches fusion
   saves count for nothing); then, on each training model, run the search over the kernel
   table, seeded with the experiment's fixed rules' plans (so it starts from the best of them),
   within the env's action space (its anchor cap and declared group shapes): behaviour cloning
   skips a plan the mask forbids;
3. write each best plan as a plan file in ``out``; a training config's ``warm_start.plans``
   may list them, and behaviour cloning then imitates whichever candidate (rule or search
   plan) the table rates best per model (issue 11, item 5: "the best known plans, rule sets
   and search results"). Plan files are data: training reads them with ``FusionPlan.load``;
4. with ``--retime ROUNDS``: each plan and ``tvm``'s, built, verified and timed head to head
   (interleaved rounds, paired ratios), to ``out/results.json`` and ``out/results.md``: a
   plan the table rates faster is only worth imitating if it is faster.

Only the training models are searched: a held-out model's plan must never reach training.
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

from fusion_rl.baselines.search import run_search  # noqa: E402
from fusion_rl.cli.common import run_script  # noqa: E402
from fusion_rl.compare import machine_description  # noqa: E402
from fusion_rl.compiler.kernel_table import TableObjective  # noqa: E402
from fusion_rl.compiler.measure import Measurer  # noqa: E402
from fusion_rl.compiler.paired import head_to_head  # noqa: E402
from fusion_rl.compiler.timing import TimingProtocol  # noqa: E402
from fusion_rl.compiler.target import parse_target  # noqa: E402
from fusion_rl.env.fusion_env import FusionEnv  # noqa: E402
from fusion_rl.env.tables import prepare_tables  # noqa: E402
from fusion_rl.errors import ConfigError  # noqa: E402
from fusion_rl.fusion.rules import make_plan  # noqa: E402
from fusion_rl.io import read_yaml, write_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--retime", type=int, default=0, metavar="ROUNDS",
                   help="time each plan against tvm's head to head, ROUNDS interleaved rounds")
    args = p.parse_args(argv)

    # 1. Configs.
    cfg = read_yaml(args.config, "experiment config")
    demos = cfg.get("demonstrations")
    if not isinstance(demos, dict) or not {"algo", "budget", "out"} <= set(demos):
        raise ConfigError(f"{args.config}: needs a 'demonstrations' block with algo, budget and out")
    # The training config's env spec only: load_config would refuse the plan files this writes.
    env_spec = (read_yaml(REPO / cfg["train_config"], "training config") or {}).get("env_spec")
    if not env_spec:
        raise ConfigError(f"{cfg['train_config']}: no env_spec")
    heldout = set(cfg.get("heldout_models", []))
    out = REPO / demos["out"]
    out.mkdir(parents=True, exist_ok=True)
    env = FusionEnv(env_spec)
    spec = parse_target(env.config.targets[0])
    options = env.config.decision_options  # the mask training plays under
    for name in env.config.models:
        if name in heldout:
            env.close()
            raise ConfigError(f"{name} is held out: its plans must not reach training")
    retimed = prepare_tables(env, {env.config.targets[0]: list(env.config.models)}, cfg["rules"],
                             cfg.get("retime_rules", True), progress=lambda line: print(line, flush=True))
    table = env.open_kernel_table(spec)
    rows = []
    # Head to head never reads a store: a store-less measurer of the env's schedule.
    timer = Measurer(spec, env.config.schedule, dict(env.config.schedule_kwargs), store=None,
                     protocol=TimingProtocol(repeat=5, min_repeat_ms=50),
                     timeout_s=env.config.timeout_s) if args.retime else None
    try:
        for name in env.config.models:
            # 2. The search, seeded with the rules' plans.
            model = env.model(name)
            seeds = [make_plan(r, model.mod, model.graph) for r in cfg["rules"]]
            t0 = time.perf_counter()
            res = run_search(demos["algo"], model, TableObjective(table), int(demos["budget"]),
                             seed=int(demos.get("seed", 0)), seeds=seeds,
                             max_anchors=options.max_mac_anchors, shapes=options.group_shapes)
            if res.best_plan is None:
                raise ConfigError(f"{demos['algo']} found no plan that compiles on {name}")
            tvm = make_plan("tvm", model.mod, model.graph)
            tvm_ms = table.estimate(model, tvm).latency_ms
            # 3. The plan file.
            path = res.best_plan.with_name(f"{demos['algo']}@{demos['budget']}").save(out / f"{name}.json")
            print(f"{name}: {res.evaluations} plans, {res.measurements_spent} kernels timed, estimate "
                  f"{res.best_ms:.3f} ms (tvm {tvm_ms:.3f} ms), {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
            row = {"model": name, "plan": path.name, "plan_hash": res.best_plan.hash, "groups": len(res.best_plan.groups),
                   "evaluations": res.evaluations, "kernels_timed": res.measurements_spent,
                   "rule_kernels_retimed": retimed.get(name, 0),
                   "estimate_ms": res.best_ms, "tvm_estimate_ms": tvm_ms}
            # 4. Is the table right? Both plans timed head to head.
            if timer is not None:
                h2h = head_to_head(timer, model, {"tvm": tvm, "search": res.best_plan}, args.retime)
                v = h2h.verdict("tvm", "search") if not h2h.failures else {}
                row.update(retimed_speedup=v.get("paired_speedup"), retimed_spread=v.get("paired_spread"),
                           kernels=h2h.num_kernels, failures=h2h.failures or None)
            rows.append(row)
        if args.retime:
            write_report(out, rows, demos, args.retime, spec, timer.provider.key, args.config)
    finally:
        table.close()
        env.close()
        if timer is not None:
            timer.close()
    return 0


def write_report(out: Path, rows: list[dict], demos: dict, rounds: int, spec, schedule: str,
                 config: Path) -> None:
    """``results.json`` and ``results.md``: each plan's estimate against its re-timed speedup."""
    write_atomic(out / "results.json", json.dumps(rows, indent=1), what="report")
    lines = [f"# {demos['algo']}@{demos['budget']} plans of the training models: estimate vs re-timed", "",
             f"Machine: {machine_description(spec.num_threads)}; target `{spec.key}`; schedule "
             f"`{schedule}`; {rounds} interleaved rounds x 5 repeats, paired ratios.", "",
             "Command (generated; do not edit):", "",
             f"    TVM_NUM_THREADS=2 python scripts/search_demos.py {_repo_path(config)} --retime {rounds}",
             "", "| model | groups | evaluations | kernels timed by this run | estimate ms | tvm estimate ms | "
             "estimated speedup | re-timed speedup over tvm (IQR) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        timed = "failed" if r.get("retimed_speedup") is None else f"{r['retimed_speedup']:.3f} ({r['retimed_spread']:.3f})"
        lines.append(f"| {r['model']} | {r['groups']} | {r['evaluations']} | {r['kernels_timed']} | "
                     f"{r['estimate_ms']:.3f} | {r['tvm_estimate_ms']:.3f} | {r['tvm_estimate_ms'] / r['estimate_ms']:.3f} | "
                     f"{timed} |")
    write_atomic(out / "results.md", "\n".join(lines) + "\n", what="report")


def _repo_path(path: Path) -> str:
    """``path`` as the command line gives it from the repository root."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


if __name__ == "__main__":
    run_script(main)
