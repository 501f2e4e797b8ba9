"""The transfer experiment's harness (``scripts/transfer.py``): runs, cases, re-timing.

What the experiment measures lives here; what it writes (tables, plots) lives in
:mod:`fusion_rl.report.transfer`. The steps:

- :func:`get_runs`: one finished training run per seed, trained when missing;
- :func:`search_settings`, :func:`eval_cases`, :func:`ablations`: the experiment config turned
  into :func:`fusion_rl.evaluate.evaluate`'s arguments;
- :func:`remeasure`: the held-out cases' plans timed again without the store, interleaved;
- :func:`metaschedule_runs`: ``tvm`` rules + MetaSchedule against learned fusion + MetaSchedule.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from fusion_rl.errors import ConfigError
from fusion_rl.evaluate import RULE_BASELINES, Case, SearchSettings, fill_speedups, load_policy

if TYPE_CHECKING:
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.graph.opgraph import OpGraph


def find_run(runs_dir: Path, env_name: str, exp_name: str, seed: int) -> Path | None:
    """The newest finished run ``<env>__<exp>__<seed>__<time>`` (one with ``final_model.zip``)."""
    found = sorted(runs_dir.glob(f"{env_name}__{exp_name}__{seed}__*"), key=lambda p: p.name)
    finished = [p for p in found if (p / "final_model.zip").is_file()]
    return finished[-1] if finished else None


def get_runs(cfg: dict[str, Any], train_config_path: Path, runs_dir: Path,
             given: Sequence[Path] | None = None) -> tuple[list[Path], list[str]]:
    """One run directory per seed (trained here if missing), and the commands that made them.

    Parameters
    ----------
    cfg
        The experiment config (``train_config``, ``seeds``).
    train_config_path
        The training config the seeds share.
    runs_dir
        Where runs are looked for, and trained into.
    given
        Reuse these run directories (one per seed) instead (``--runs``).

    Raises
    ------
    ConfigError
        If a given folder is not a run directory.
    """
    from fusion_rl.policy.training import load_config, train

    if given:
        for run in given:
            if not (run / "config.json").is_file():
                raise ConfigError(f"--runs {run}: not a run directory (no config.json)")
        seeds = [json.loads((run / "config.json").read_text())["seed"] for run in given]
        return list(given), [
            f"python scripts/train.py --config {cfg['train_config']} --seed {s} --wandb disabled" for s in seeds]
    runs, commands = [], []
    for seed in cfg["seeds"]:
        config = load_config(train_config_path)
        config.seed = int(seed)
        commands.append(f"python scripts/train.py --config {cfg['train_config']} --seed {seed} --wandb disabled")
        run = find_run(runs_dir, config.env_name, config.exp_name, int(seed))
        if run is None:
            print(f"training seed {seed} ({config.total_timesteps} steps)", flush=True)
            run = train(config, runs_dir=runs_dir, wandb_mode="disabled", progress=False)
        runs.append(run)
    return runs, commands


def check_family_split(families: dict[str, str], train_models: Sequence[str], heldout_models: Sequence[str]) -> None:
    """Refuse a split where a held-out model shares a family with a training model, or a model
    has no declared family: "held out" must mean an architecture the policy never saw.

    Raises
    ------
    ConfigError
        naming the first offending model.
    """
    for name in [*train_models, *heldout_models]:
        if name not in families:
            raise ConfigError(f"families: model {name!r} has no family; declare every model's family")
    seen = {families[m]: m for m in train_models}
    for name in heldout_models:
        if name in train_models:
            raise ConfigError(f"heldout_models: {name!r} is also a training model")
        if families[name] in seen:
            raise ConfigError(f"heldout_models: {name!r} is of family {families[name]!r}, which training "
                              f"sees through {seen[families[name]]!r}")


def group_shape_instances(graphs: Mapping[str, OpGraph], shapes: Sequence[str]) -> dict[str, dict[str, int]]:
    """How many instances of each declared group shape each training model has (models with
    none left out): a shape no training model shows is one the policy can meet only by exploring.

    Parameters
    ----------
    graphs
        Training model name -> its :class:`~fusion_rl.graph.opgraph.OpGraph`.
    shapes
        Group shape names (:mod:`fusion_rl.fusion.group_shapes`).
    """
    from fusion_rl.fusion.group_shapes import shape_instances

    counts: dict[str, dict[str, int]] = {}
    for shape in shapes:
        found = {name: len(shape_instances(graph, shape)) for name, graph in graphs.items()}
        counts[shape] = {name: n for name, n in found.items() if n}
    return counts


def shapes_formed(graph: OpGraph, plans: Mapping[str, FusionPlan], shapes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Which instances of each group shape in ``shapes`` each plan forms, for a report: per shape
    with an instance in ``graph``, ``maps`` (each instance's first-anchor output width, in graph
    order) and ``plans`` (label -> a string with ``1`` for each instance formed, ``0`` else).
    """
    from fusion_rl.fusion.group_shapes import formed_instances, shape_instances

    out: dict[str, dict[str, Any]] = {}
    for shape in shapes:
        instances = shape_instances(graph, shape)
        if instances:
            out[shape] = {"maps": [graph.nodes[i[0]].shapes[0][-1] for i in instances],
                          "plans": {label: "".join("1" if f else "0" for f in formed_instances(plan, instances))
                                    for label, plan in plans.items()}}
    return out


def groups_past_mask(graph: OpGraph, plans: Mapping[str, FusionPlan], max_mac_anchors: int | None,
                     shapes: Sequence[str]) -> dict[str, int]:
    """Per plan label, how many of its groups the training mask forbids: more conv/matmul anchors
    than ``max_mac_anchors`` and none of the group ``shapes`` (a search without the mask, or the
    ``aggressive`` rule, plans such groups; a policy cannot). Empty without a cap."""
    from fusion_rl.fusion.group_shapes import within_anchor_limit

    if max_mac_anchors is None:
        return {}
    return {label: sum(not within_anchor_limit(graph, g, max_mac_anchors, shapes) for g in plan.groups)
            for label, plan in plans.items()}


def check_target_split(train_targets: Sequence[str], heldout_targets: Sequence[str]) -> None:
    """Refuse a held-out target that training saw: two names of one target (``host`` and
    ``llvm:znver4:t2`` on a Zen 4 machine) compile the same code, so targets are compared by key.

    Raises
    ------
    ConfigError
        naming the first held-out target that is a training target (or not a target at all).
    """
    from fusion_rl.compiler.target import parse_target

    seen = {parse_target(t).key: t for t in train_targets}
    for name in heldout_targets:
        key = parse_target(name).key
        if key in seen:
            raise ConfigError(f"heldout_targets: {name!r} is the training target {seen[key]!r} ({key})")


def search_settings(search: dict[str, Any], budget: int, targets: Sequence[str]) -> SearchSettings:
    """The config's ``search`` section at the equal ``budget``, on the training ``targets``."""
    s = search
    return SearchSettings(
        algos=tuple(s["algos"]), budget=budget, multiplier=int(s["multiplier"]),
        search_models=tuple(s.get("search_models", ())), multiplied_models=tuple(s.get("multiplied_models", ())),
        search_targets=tuple(targets), exhaustive_models=tuple(s.get("exhaustive_models", ())),
        exhaustive_limit=int(s.get("exhaustive_limit", 0)), goal_budget=int(s.get("goal_budget", 0)),
        goal_models=tuple(s.get("goal_models", ())), seed=int(s.get("seed", 0)),
    )


def eval_cases(cfg: dict[str, Any], env_spec: Any) -> list[Case]:
    """Held-out models on the training targets, every model on the held-out targets, then the
    training models on the training targets."""
    cases = [Case(m, t, "heldout-model") for m in cfg["heldout_models"] for t in env_spec.targets]
    cases += [Case(m, t, "heldout-target") for m in [*env_spec.models, *cfg["heldout_models"]]
              for t in cfg["heldout_targets"]]
    cases += [Case(m, t, "train") for m in env_spec.models for t in env_spec.targets]
    return cases


def ablations(cfg: dict[str, Any], root: Path) -> list[tuple[str, list[Path], dict[str, Any]]]:
    """The config's ablations whose runs all exist under ``root``: (label, runs, env overrides)."""
    return [(a["label"], [root / r for r in a["runs"]], dict(a.get("env", {})))
            for a in cfg.get("ablations", []) if all((root / r / "config.json").is_file() for r in a["runs"])]


def remeasure(rows: list[dict[str, Any]], env_spec: Any, rounds: int, splits: tuple[str, ...]) -> list[dict[str, Any]]:
    """Measure every distinct plan of the given splits again, without the store, round-robin.

    Store records were taken at different times (minutes apart), so two plans' medians may differ
    by machine regime rather than by plan. Here each case's plans are timed back to back,
    ``rounds`` times, interleaved (:func:`~fusion_rl.compiler.paired.head_to_head`); a
    plan's latency is the median of its round medians. Returns one row per (case, method[,
    seed]) with ``latency_ms`` replaced.
    """
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.paired import head_to_head
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.graph.model import load_model

    out: list[dict[str, Any]] = []
    cases = list(dict.fromkeys((r["model"], r["target"]) for r in rows if r["split"] in splits))
    measurers: dict[str, Measurer] = {}
    try:
        for model_name, target in cases:
            t0 = time.time()
            model = load_model(model_name)
            case_rows = [r for r in rows if (r["model"], r["target"]) == (model_name, target) and r["plan"]]
            plans = {r["plan_hash"]: FusionPlan.from_dict(r["plan"]) for r in case_rows}
            if target not in measurers:
                measurers[target] = Measurer(target, env_spec.schedule, dict(env_spec.schedule_kwargs), store=None,
                                             protocol=env_spec.protocol, isolate=True, timeout_s=env_spec.timeout_s)
            times = head_to_head(measurers[target], model, plans, rounds).round_medians
            for r in case_rows:
                t = times[r["plan_hash"]]
                out.append({**r, "latency_ms": float(np.median(t)) if t else None,
                            "spread_ms": float(max(t) - min(t)) if len(t) > 1 else None, "rounds": len(t)})
            print(f"  re-measured {model_name} on {target}: {len(plans)} plans x {rounds} ({time.time() - t0:.0f} s)", flush=True)
    finally:
        for m in measurers.values():
            m.close()
    fill_speedups(out, [m for m in dict.fromkeys(r["method"] for r in out) if m in RULE_BASELINES])
    return out


def metaschedule_runs(cfg: dict[str, Any], runs: list[Path], env_spec: Any) -> dict[str, Any]:
    """``tvm`` rules + MetaSchedule vs learned fusion + MetaSchedule, same trials per task.

    Returns
    -------
    dict[str, Any]
        ``seed`` and ``run`` (whose policy made the learned plans), ``trials``, ``started``
        (Unix time) and ``models``: per model its ``name``, ``tvm`` and ``learned`` entries
        ``(plan, record, seconds this run, served from the store)``, their ``kernels``, and
        ``retimed`` (a :class:`~fusion_rl.compiler.paired.HeadToHead`) where re-timed.
    """
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.paired import head_to_head
    from fusion_rl.compiler.store import MeasurementStore
    from fusion_rl.evaluate import decide_plan, make_eval_env
    from fusion_rl.fusion.metrics import plan_metrics
    from fusion_rl.fusion.rules import make_plan

    ms = cfg["metaschedule"]
    seed = int(ms.get("seed", 0))
    run = next((r for r in runs if json.loads((r / "config.json").read_text())["seed"] == seed), runs[0])
    policy = load_policy(run)
    env = make_eval_env(policy.config)
    store = MeasurementStore(env.store_path)  # the runs' store (env spec, or the run's env_kwargs)
    trials = int(ms["trials_per_task"])
    measurer = Measurer(ms["target"], "tuned", {"trials_per_task": trials}, store=store, protocol=env_spec.protocol,
                        isolate=True, timeout_s=max(env_spec.timeout_s, 1200.0))
    models = []
    started = time.time()
    try:
        for name in ms["models"]:
            model = env.model(name)
            plans = {"tvm": make_plan("tvm", model.mod, model.graph),
                     "learned": decide_plan(policy.model, env, name, ms["target"])}
            res: dict[str, Any] = {"name": name}
            for label, plan in plans.items():
                t0 = time.time()
                cached = measurer.cached(model, plan) is not None
                record = measurer.measure(model, plan)
                res[label] = (plan, record, time.time() - t0, cached)
                print(f"  {name} {label}: {record.status} {record.median_ms} ms ({time.time() - t0:.0f} s)", flush=True)
            res["kernels"] = {label: plan_metrics(model.graph, plan).num_kernels for label, plan in plans.items()}
            # The two records were taken minutes apart (tuning in between): re-time both plans
            # within one run, repeat by repeat, from the now-filled tuning database.
            rounds = int(ms.get("retime_rounds", 0))
            if rounds >= 2 and all(res[label][1].status == "ok" for label in plans) \
                    and plans["tvm"].hash != plans["learned"].hash:
                with Measurer(ms["target"], "tuned", {"trials_per_task": trials}, store=None,
                              protocol=env_spec.protocol, timeout_s=max(env_spec.timeout_s, 1200.0)) as fresh:
                    res["retimed"] = head_to_head(fresh, model, plans, rounds)
            models.append(res)
    finally:
        measurer.close()
        env.close()
        store.close()
    return {"seed": seed, "run": run, "trials": trials, "started": started, "models": models}
