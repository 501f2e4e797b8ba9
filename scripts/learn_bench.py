#!/usr/bin/env python
"""Learned fusion on held-out bench families, head to head: regenerate experiments/learn_bench/.

    TVM_NUM_THREADS=2 python scripts/learn_bench.py experiments/learn_bench/config.yaml [--runs RUN ...]

Top to bottom:

1. read the experiment config and its training config; refuse a split where a held-out model
   shares a family with a training model; count each declared group shape's instances in the
   training models (a warning when a shape has none: training never shows it); time every
   fixed rule's kernels a second time, the faster kept (``retime_rules``), so no reference plan
   is rated from one slow-regime timing;
2. one finished run per seed (trained here when missing: behaviour cloning on the best known
   plan per training model, among the rules' plans and any plan files the training config's
   ``warm_start.plans`` lists, e.g. ``scripts/search_demos.py``'s, then MaskablePPO, rewards
   from the kernel table);
3. learning curves: each episode's estimated speedup over ``tvm`` and over the best fixed rule
   of the training models (estimated from the same kernel table);
4. per held-out model: each seed's plan (decided with zero measurements, asserted), each fixed
   rule's plan, and each search's best plan over the kernel table (the training table, so its
   kernels are shared); every search is seeded with the fixed rules' plans, so random search
   measures them first and greedy and annealing start from the fastest of them;
5. the model's distinct plans built, verified and timed head to head (interleaved rounds),
   every plan's paired speedup over every rule and every search;
6. the summary over seeds (:mod:`fusion_rl.report.learn_bench`) and ``results.json``,
   ``results.md``, ``curves.png``; the results are written after every model.

With ``--card POLICY`` nothing is run: the policy's ``card.json`` evaluation and the README's
model card are rewritten from ``results.json`` (:mod:`fusion_rl.report.card`); the policy must be
the export of the best seed's run (``fusion-rl export runs/<run> -o POLICY``).
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
from fusion_rl.baselines.search import ALGORITHMS, run_search  # noqa: E402
from fusion_rl.cli.common import run_script  # noqa: E402
from fusion_rl.compare import machine_description  # noqa: E402
from fusion_rl.compiler.kernel_table import KernelTable, TableObjective  # noqa: E402
from fusion_rl.compiler.measure import Measurer  # noqa: E402
from fusion_rl.compiler.paired import check_rounds, head_to_head  # noqa: E402
from fusion_rl.compiler.regime import FAR_FACTOR, regime_labels  # noqa: E402
from fusion_rl.compiler.target import parse_target  # noqa: E402
from fusion_rl.compiler.timing import TimingProtocol  # noqa: E402
from fusion_rl.errors import ConfigError  # noqa: E402
from fusion_rl.env.fusion_env import FusionEnv  # noqa: E402
from fusion_rl.env.spec import EnvSpec  # noqa: E402
from fusion_rl.env.tables import prepare_tables  # noqa: E402
from fusion_rl.evaluate import decide_plan, geomean, load_policy, make_eval_env, training_stats  # noqa: E402
from fusion_rl.fusion.plan import FusionPlan  # noqa: E402
from fusion_rl.fusion.rules import make_plan  # noqa: E402
from fusion_rl.io import read_yaml, write_atomic  # noqa: E402
from fusion_rl.policy.training import load_config  # noqa: E402
from fusion_rl.report import learn_bench as report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--runs", type=Path, nargs="+", default=None, help="reuse these run dirs (one per seed)")
    p.add_argument("--render", action="store_true", help="only rewrite results.md from results.json (nothing is run)")
    p.add_argument("--card", type=Path, default=None, metavar="POLICY",
                   help="only rewrite POLICY's card.json evaluation and README.md's model card from results.json "
                        "(nothing is run); POLICY must be the export of the best seed's run")
    args = p.parse_args(argv)
    if args.render:
        return render_only(args.config)
    if args.card:
        return write_card(args.card, args.config)

    # 1. Configs and the split.
    cfg = read_yaml(args.config, "learn-bench config")
    train_config_path = REPO / cfg["train_config"]
    train_cfg = load_config(train_config_path)
    env_spec = EnvSpec.resolve(train_cfg.env_spec)
    heldout = list(cfg["heldout_models"])
    if not heldout:
        raise ConfigError("heldout_models: list at least one model to evaluate on")
    transfer.check_family_split(cfg["families"], env_spec.models, heldout)
    search_runs, goal_search, search_seed = parse_searches(cfg.get("search"))
    rounds = parse_rounds(cfg)
    target = cfg.get("target", "host")
    heldout_targets = list(cfg.get("heldout_targets") or [])
    transfer.check_target_split(env_spec.targets, heldout_targets)
    out = args.config.parent
    t_start = time.time()

    # 1a. Each declared group shape's instances in the training models (one env loads the models
    # for this and for 1b).
    start_env = FusionEnv(train_cfg.env_spec)
    try:
        options = env_spec.decision_options
        shapes = options.group_shapes
        shape_instances = transfer.group_shape_instances({m: start_env.model(m).graph for m in env_spec.models}
                                                         if shapes else {}, shapes)
        for shape, found in shape_instances.items():
            if not found:
                print(f"warning: group shape {shape!r} is declared, but no training model has an instance "
                      "of it; the policy can meet it only by exploring", file=sys.stderr)

        # 1b. Every fixed rule's kernels timed a second time, the faster kept, before anything reads
        # the table: a kernel timed once in one of this VM's slow regimes mis-rates the reference
        # that every reward and search divides by (seen: ResNet-18's tvm plan estimated at 10.9 ms,
        # 8.2 ms after a second pass, so behaviour cloning imitated `aggressive` there).
        # Each training target's table is retimed on the training models; the evaluation target's
        # on the held-out models too (its searches read them).
        # 1c. A per-launch cost for every table that has none for its key yet.
        todo = {parse_target(t).key: (t, list(env_spec.models)) for t in env_spec.targets}
        key = parse_target(target).key
        todo[key] = (target, [*todo.get(key, (target, []))[1], *heldout])
        prepare_tables(start_env, dict(todo.values()), list(cfg["rules"]), cfg.get("retime_rules", True),
                       progress=stamped)
    finally:
        start_env.close()

    # 2. Runs (trained when missing).
    runs, commands = transfer.get_runs(cfg, train_config_path, REPO / cfg.get("runs_dir", "runs"), args.runs)
    training = []
    for run in runs:
        stats = training_stats(run)
        stats["seed"] = json.loads((run / "config.json").read_text())["seed"]
        stats["imitated"] = imitated(run / "warm_start.json")
        if (run / "fine_tune.json").is_file():
            stats["fine_tuned"] = imitated(run / "fine_tune.json")
        training.append(stats)
    policies = [load_policy(r) for r in runs]
    env = make_eval_env(policies[0].config)
    spec = parse_target(target)
    rules = list(cfg["rules"])
    protocol = TimingProtocol(repeat=cfg.get("repeat", 5), min_repeat_ms=cfg.get("min_repeat_ms", 50))
    table = env.open_kernel_table(spec)  # the training runs' table: their kernels are reused
    measurer = Measurer(spec, env_spec.schedule, dict(env_spec.schedule_kwargs), store=None,
                        protocol=protocol, timeout_s=cfg.get("timeout_s", 900))
    try:
        # 3. Learning curves against tvm and the best fixed rule of the training models (estimates).
        est: dict[str, dict[str, float]] = {}
        for name in env_spec.models:
            model = env.model(name)
            est[name] = {r: table.estimate(model, make_plan(r, model.mod, model.graph)).latency_ms for r in rules}
        train_best = max(rules, key=lambda r: geomean(est[m]["tvm"] / est[m][r] for m in est))
        finals = report.plot_curves(runs, cfg.get("window", 20), {m: est[m]["tvm"] / est[m][train_best] for m in est},
                                    out / "curves.png")
        # Which shape instances each seed forms on the training models that have them (deciding
        # measures nothing); the held-out models' are added with their plans below.
        formed = {name: {"training": True, "shapes": transfer.shapes_formed(
            env.model(name).graph, policy_plans(policies, env, name, target), shapes)}
            for name in sorted({m for found in shape_instances.values() for m in found})}

        def header() -> str:
            return (f"Machine: {machine_description(spec.num_threads)}; schedule `{measurer.provider.key}`; "
                    f"target `{spec.key}`; head-to-head protocol `{protocol.key}`, {report.rounds_text(cfg)}. "
                    f"Kernel-table per-launch cost {table.launch_ms * 1e3:.2f} us. "
                    f"Training families' best fixed rule by kernel-table estimate: `{train_best}`. Wall time of "
                    f"this run (training of missing seeds included): {time.time() - t_start:.0f} s.")

        rows: list[dict] = []
        compared: dict[str, tuple] = {}  # model name -> (model, plans, refs) of its comparison
        searches: list[dict] = []
        search_labels = [f"{algo}@{budget}" for algo, budget in search_runs]
        for name in heldout:
            model = env.model(name)
            print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
            # 4. Plans: rules, each seed (no measurement), the search's best.
            plans = {**{r: make_plan(r, model.mod, model.graph) for r in rules},
                     **policy_plans(policies, env, name, target)}
            rule_plans = [plans[r] for r in rules]
            for (algo, budget), label in zip(search_runs, search_labels):
                t0 = time.perf_counter()
                res = run_search(algo, model, TableObjective(table), budget, seed=search_seed, seeds=rule_plans)
                searches.append({"model": name, "label": label, "evaluations": res.evaluations,
                                 "kernels_timed": res.measurements_spent, "estimate_ms": res.best_ms,
                                 "wall_s": time.perf_counter() - t0, "info": res.info})
                print(f"[{time.strftime('%H:%M:%S')}]   {label}: {res.evaluations} plans, "
                      f"{res.measurements_spent} kernels timed, best {res.best_ms:.3f} ms", file=sys.stderr, flush=True)
                if res.best_plan is not None:
                    plans[label] = res.best_plan
            formed[name] = heldout_formed(model.graph, plans, options.max_mac_anchors, shapes)
            # 5. Distinct plans head to head; every label's paired speedups over the references.
            refs = [*rules, *(label for label in search_labels if label in plans)]
            compared[name] = (model, plans, refs)
            rows += compare_plans(measurer, model, plans, refs, rounds, table, report.run_reference(rows))
            # 6. Written after every model, so an interrupted run keeps what it measured.
            seeds = [pol.seed for pol in policies]
            summary = report.summarize(rows, rules, seeds, search_labels, goal_search)
            result = {"summary": summary, "rows": rows, "training": training, "searches": searches,
                      "finals": finals, "train_best_rule": train_best, "train_estimates_ms": est,
                      "commands": commands, "header": header(), "heldout_targets": {},
                      "launch_ms": table.launch_ms if table.calibrated else None,
                      "group_shapes": shape_instances, "shapes_formed": formed}
            write_results(out, args.config, cfg, result)
        # 6b. Models compared before the run saw its near probe, again (see misjudged_models).
        rows, again = compare_misjudged(measurer, rows, compared, rounds, table)
        if again:
            result.update(rows=rows, header=header(),
                          summary=report.summarize(rows, rules, seeds, search_labels, goal_search))
            write_results(out, args.config, cfg, result)

        # 7. The held-out targets: each seed's plan decided for that target (its own hardware
        # vector) against the rules, head to head on that target. There is no kernel table there.
        for name_t in heldout_targets:
            t_spec = parse_target(name_t)
            t_rows: list[dict] = []
            t_formed: dict[str, dict] = {}
            t_compared: dict[str, tuple] = {}
            t_measurer = Measurer(t_spec, env_spec.schedule, dict(env_spec.schedule_kwargs), store=None,
                                  protocol=protocol, timeout_s=cfg.get("timeout_s", 900))
            try:
                for name in heldout:
                    model = env.model(name)
                    print(f"[{time.strftime('%H:%M:%S')}] {name} on {name_t}", file=sys.stderr, flush=True)
                    plans = {**{r: make_plan(r, model.mod, model.graph) for r in rules},
                             **policy_plans(policies, env, name, name_t)}
                    t_formed[name] = heldout_formed(model.graph, plans, options.max_mac_anchors, shapes)
                    t_compared[name] = (model, plans, rules)
                    t_rows += compare_plans(t_measurer, model, plans, rules, rounds, None, report.run_reference(t_rows))
                    result["heldout_targets"][name_t] = {
                        "key": t_spec.key, "rows": t_rows, "shapes_formed": t_formed,
                        "summary": report.summarize(t_rows, rules, [pol.seed for pol in policies])}
                    result["header"] = header()
                    write_results(out, args.config, cfg, result)
                t_rows, again = compare_misjudged(t_measurer, t_rows, t_compared, rounds, None, f" on {name_t}")
                if again:
                    result["heldout_targets"][name_t].update(
                        rows=t_rows, summary=report.summarize(t_rows, rules, [pol.seed for pol in policies]))
                    write_results(out, args.config, cfg, result)
            finally:
                t_measurer.close()
    finally:
        table.close()
        measurer.close()
        env.close()
    print((out / "results.md").read_text())
    return 0


def stamped(line: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def imitated(record: Path) -> str:
    """The sources a behaviour-cloning record (``warm_start.json``, ``fine_tune.json``) cloned."""
    if not record.is_file():
        return "—"
    return ", ".join(sorted({d["source"] for d in json.loads(record.read_text())["demonstrations"]}))


def policy_plans(policies: list, env, model: str, target: str) -> dict[str, FusionPlan]:
    """Each seed's plan for ``model`` on ``target`` (label ``seed N``); asserts that deciding
    measured nothing."""
    plans = {}
    for policy in policies:
        before = env.measurements_spent
        plans[f"seed {policy.seed}"] = decide_plan(policy.model, env, model, target)
        if env.measurements_spent != before:
            raise AssertionError(f"the policy of seed {policy.seed} measured while deciding {model}")
    return plans


def parse_rounds(cfg: dict) -> dict[str, int]:
    """The config's ``rounds`` (head-to-head rounds per model), ``min_near_repeats`` (rounds are
    added until that many repeats of a model ran in the host's near fork-join regime, judged
    against the lowest of the run's probes so far and the host's floor; 0: never) and
    ``max_rounds`` (the cap, default twice ``rounds``), as
    :func:`~fusion_rl.compiler.paired.head_to_head` takes them."""
    rounds, min_near = cfg.get("rounds", 3), cfg.get("min_near_repeats", 0)
    # Checked here too, not only in head_to_head: a bad config fails before minutes of training.
    max_rounds = check_rounds(rounds, min_near, cfg.get("max_rounds"),
                              names=("rounds", "min_near_repeats", "max_rounds"))
    return {"rounds": rounds, "min_near": min_near, "max_rounds": max_rounds}


def misjudged_models(rows: list[dict], min_near: int) -> list[str]:
    """Models whose comparison judged its repeats' regime against a far reference and has fewer
    than ``min_near`` near repeats against the run's reference (:func:`report.run_reference`).

    A comparison adds rounds until ``min_near`` repeats ran near, judged against the lowest of
    the run's probes so far and the host's floor. On a host without a floor yet (a new machine,
    or none recorded for :data:`~fusion_rl.compiler.regime.FLOOR_DAYS` days) the run's first
    model has only its own probes: if all ran far, it judges them against one of them, counts
    them near and adds no round. Only the later models' probes show that they were far; such a
    model is compared again, against those.
    """
    ref = report.run_reference(rows)
    if not min_near or ref is None:
        return []
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        row = next((r for r in rows if r["model"] == model and r.get("fork_join_us")), None)
        if row is None:
            continue
        used = row.get("reference_us") or min(row["fork_join_us"])
        if used > FAR_FACTOR * ref and regime_labels(row["fork_join_us"], ref).count("near") < min_near:
            out.append(model)
    return out


def compare_misjudged(measurer: Measurer, rows: list[dict], compared: dict[str, tuple], rounds: dict[str, int],
                      table: KernelTable | None, where: str = "") -> tuple[list[dict], bool]:
    """Each of :func:`misjudged_models` compared again (``compared``: model name -> the
    ``(model, plans, refs)`` of its first comparison) against the run's reference, its rows
    replaced in place; returns the rows and whether any model was compared again."""
    names = misjudged_models(rows, rounds["min_near"])
    for name in names:
        stamped(f"{name}{where}: every repeat ran far, judged against no near probe; compared again")
        rows = replace_model_rows(rows, name, compare_plans(measurer, *compared[name], rounds, table,
                                                            report.run_reference(rows)))
    return rows, bool(names)


def heldout_formed(graph, plans: dict[str, FusionPlan], max_mac_anchors: int | None, shapes) -> dict:
    """A held-out model's entry of the report's "Group shapes formed": the instances each plan
    forms (:func:`transfer.shapes_formed`) and its groups past the training mask."""
    return {"training": False, "shapes": transfer.shapes_formed(graph, plans, shapes),
            "past_mask": transfer.groups_past_mask(graph, plans, max_mac_anchors, shapes)}


def replace_model_rows(rows: list[dict], model: str, new: list[dict]) -> list[dict]:
    """``rows`` with ``model``'s rows replaced by ``new``, the models' order kept."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        out += new if name == model else [r for r in rows if r["model"] == name]
    return out


def compare_plans(measurer: Measurer, model, plans: dict[str, FusionPlan], refs: list[str], rounds: dict[str, int],
                  table: KernelTable | None = None, reference_us: float | None = None) -> list[dict]:
    """``plans`` built, verified and timed head to head (``rounds`` as :func:`parse_rounds`
    gives it; ``reference_us`` the run's lowest probe, which head_to_head judges regimes by beside
    the host's floor); one row per label with its paired speedup over every label in ``refs``
    (``vs``), the reference its regimes were judged by and, given a ``table``, its kernel-table
    estimate."""
    h2h = head_to_head(measurer, model, plans, rounds["rounds"], min_near=rounds["min_near"],
                       max_rounds=rounds["max_rounds"], reference_us=reference_us)
    rows = []
    for label, plan in plans.items():
        known = table.estimate_known(model, plan) if table is not None else None
        row = {"model": model.name, "label": label, "plan_hash": plan.hash, "same_as": h2h.same_as.get(label),
               "estimate_ms": known.latency_ms if known is not None else None, "reference_us": h2h.reference_us}
        if label in h2h.failures:
            row.update(latency_ms=None, status="failed", error=h2h.failures[label])
        else:
            vs = {ref: [(v := h2h.verdict(ref, label))["paired_speedup"], v["paired_spread"]] for ref in refs}
            # The raw repeats and host probes let the report split every ratio by regime.
            row.update(status="ok", latency_ms=h2h.median_ms(label), spread_ms=h2h.iqr_ms(label),
                       num_kernels=h2h.num_kernels.get(label), vs=vs, repeat_ms=h2h.pooled_ms[label],
                       fork_join_us=h2h.fork_join_us, rounds=h2h.rounds)
        rows.append(row)
    return rows


def write_results(out: Path, config: Path, cfg: dict, result: dict) -> None:
    """``results.json`` and ``results.md`` (written after every model, so an interrupted run
    keeps what it measured)."""
    write_atomic(out / "results.json", json.dumps(result, indent=1), what="report")
    cmds = [f"TVM_NUM_THREADS=2 python scripts/learn_bench.py {config}", *result["commands"]]
    write_atomic(out / "results.md", report.render(cfg, result, cmds), what="report")


def parse_searches(search: dict | None) -> tuple[list[tuple[str, int]], str | None, int]:
    """The config's ``search`` block: ``runs`` (algorithm -> kernel-table budgets), ``goal``
    (the run the policy must reach 95 % of) and ``seed``. Returns the (algorithm, budget) runs,
    the goal's label and the seed."""
    if not search:
        return [], None, 0
    unknown = set(search) - {"runs", "goal", "seed"}
    if unknown:
        raise ConfigError(f"search: unknown key(s) {', '.join(sorted(unknown))}; expected runs, goal, seed")
    runs = []
    for algo, budgets in (search.get("runs") or {}).items():
        if algo not in ALGORITHMS or algo == "exhaustive":
            raise ConfigError(f"search: unknown algorithm '{algo}'; choose from random, greedy, annealing")
        if not isinstance(budgets, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                                                    for b in budgets):
            raise ConfigError(f"search: {algo}'s budgets must be a list of positive ints, got {budgets!r}")
        runs += [(algo, b) for b in budgets]
    goal = search.get("goal")
    if goal is not None and goal not in {f"{a}@{b}" for a, b in runs}:
        raise ConfigError(f"search: goal '{goal}' is not one of the runs")
    return runs, goal, int(search.get("seed", 0))


def render_only(config: Path) -> int:
    """Rewrite results.md from the config and results.json (after editing a label, say)."""
    cfg = read_yaml(config, "learn-bench config")
    result = json.loads((config.parent / "results.json").read_text())
    write_results(config.parent, config, cfg, result)
    print((config.parent / "results.md").read_text())
    return 0


def write_card(policy: Path, config: Path) -> int:
    """The shipped policy's card evaluation and the README's model card, from the results file."""
    from fusion_rl.export.artifact import read_card, set_evaluation
    from fusion_rl.paths import relative_to_repo
    from fusion_rl.report import blocks, card

    evaluation = card.policy_evaluation(config.parent)
    best = evaluation["best_seed"]
    run = next(t["run"] for t in evaluation["training"] if t["seed"] == best)
    exported = read_card(policy)[0]["training"]["run"]
    if exported != run:
        raise ConfigError(f"{policy} was exported from run {exported}, but the best seed of {config.parent} is "
                          f"seed {best} (run {run}); export that one first: fusion-rl export runs/{run} -o {policy}")
    print(f"wrote {set_evaluation(policy, evaluation)}")
    readme = REPO / "README.md"
    block = card.card_block(read_card(policy)[0], relative_to_repo(policy))
    write_atomic(readme, blocks.replace_block(readme.read_text(), card.BEGIN, card.END, block), what="README")
    print(f"wrote {readme}'s model card")
    return 0


if __name__ == "__main__":
    run_script(main)
