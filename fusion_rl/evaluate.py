"""Zero-shot evaluation of trained fusion policies against rule sets, search and an oracle.

A trained policy is evaluated *zero-shot*: on each (model, target) it decides every edge with
its deterministic (greedy, masked) action, with no training, no search and no measurement at
test time. The plan it produces is then measured once, through the same
:class:`~fusion_rl.compiler.measure.Measurer` (and store) as every baseline, so all numbers in a
report are comparable:

- rule sets (:mod:`fusion_rl.fusion.rules`): ``unfused``, ``tvm``, ``tensorrt``, ``aggressive``,
  ``aggressive_1anchor``;
- search (:mod:`fusion_rl.baselines.search`) at an *equal* budget and at ``multiplier`` x that
  budget (see :func:`equal_budget` for the convention), and the exhaustive oracle where asked;
- beside every latency, the kernels launched and the intermediate bytes of the plan
  (:func:`fusion_rl.fusion.metrics.plan_metrics`), as Welder and Korch report fusion.

Every row's speedup is given against ``tvm`` *and* against the best fixed rule of its split
(:func:`fill_speedups`), and a policy whose plans equal one rule set's on every case it was
evaluated on is marked ``collapsed_to`` that rule (:func:`collapsed_to`): a learned number
that merely reproduces ``aggressive_1anchor`` has learned a bias, not a function of the graph.

The library has no opinion on which models are "held out": :class:`Case` carries a ``split``
label chosen by the caller (``scripts/transfer.py`` uses ``train``, ``heldout-model``,
``heldout-target``).

Example
-------
>>> rows = evaluate(["runs/transfer__transfer__0__..."], [Case("se_cnn", "host", "heldout-model")])  # doctest: +SKIP
"""

from __future__ import annotations

import os

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from fusion_rl.errors import ConfigError

__all__ = [
    "RULE_BASELINES",
    "Case",
    "SearchSettings",
    "TrainedPolicy",
    "best_rules",
    "collapsed_to",
    "decide_plan",
    "equal_budget",
    "evaluate",
    "fill_speedups",
    "geomean",
    "learning_curve",
    "load_policy",
    "parity_point",
    "t_interval",
    "training_stats",
]

#: Rule-set baselines measured on every case.
RULE_BASELINES: tuple[str, ...] = ("unfused", "tvm", "tensorrt", "aggressive", "aggressive_1anchor")


# --------------------------------------------------------------------------------------------
# trained runs
# --------------------------------------------------------------------------------------------


@dataclass
class TrainedPolicy:
    """A trained run: its directory, config and its policy snapshot (safetensors + JSON)."""

    run_dir: Path
    config: Any  #: :class:`fusion_rl.policy.training.TrainConfig`
    model: Any  #: :class:`fusion_rl.policy.snapshot.PolicySnapshot` (SB3's ``predict``)
    checkpoint: Path  #: the snapshot's description file

    @property
    def seed(self) -> int:
        return int(self.config.seed)


def load_policy(run_dir: str | Path) -> TrainedPolicy:
    """Load a run directory's final policy snapshot (else its latest checkpoint's).

    Only ``config.json`` and the ``.safetensors`` + ``.json`` snapshot are read; the SB3 zips
    are pickles and are never loaded here (see :mod:`fusion_rl.policy.snapshot`).

    Raises
    ------
    ConfigError
        if ``run_dir`` is not a run directory or holds no snapshot.
    """
    from fusion_rl.io import read_json
    from fusion_rl.policy.run_dir import run_snapshot
    from fusion_rl.policy.snapshot import load_snapshot
    from fusion_rl.policy.training import TrainConfig

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.json); train one with `fusion-rl train`")
    config = TrainConfig.from_dict(read_json(config_path, "run config", ConfigError, 1 << 20), str(config_path))
    path = run_snapshot(run_dir)
    return TrainedPolicy(run_dir=run_dir, config=config, model=load_snapshot(path), checkpoint=path)


def make_eval_env(config: Any, **overrides: Any):
    """The (unwrapped) :class:`FusionEnv` of a run's env spec, used for observations and to
    get measurers; ``overrides`` replace env-spec keys (e.g. ``store=...``)."""
    from fusion_rl.env.fusion_env import FusionEnv

    return FusionEnv(config.env_spec, **{**dict(config.env_kwargs), **overrides})


def decide_plan(policy: Any, env: Any, model: str, target: str, name: str = "learned"):
    """The plan ``policy`` makes for ``model`` on ``target``: deterministic masked actions.

    Through :meth:`FusionEnv.decide`, not ``reset``/``step``: those would measure the reference
    and the final plan. So this function never measures anything (no measurer is even
    created); the caller measures the returned plan once.

    Parameters
    ----------
    policy
        Anything with SB3's ``predict(obs, action_masks=..., deterministic=True)``.
    env
        A :class:`~fusion_rl.env.fusion_env.FusionEnv` whose observation space matches
        the policy's (the run's own env spec).

    Raises
    ------
    ConfigError
        if ``policy`` is a snapshot that recorded decision options other than ``env``'s.
    """
    if hasattr(policy, "check_decisions"):  # a snapshot: the options it trained under
        policy.check_decisions(env.config.decision_options, "the evaluation env")

    def choose(obs: dict[str, np.ndarray], mask: np.ndarray) -> int:
        action, _ = policy.predict(obs, action_masks=mask, deterministic=True)
        return int(np.asarray(action).reshape(-1)[0])

    # The policy's own training statistics normalise the hardware vector (None: the env's).
    return env.decide(choose, model, target, name=name, hardware_stats=getattr(policy, "hardware_stats", None))


def read_episodes(run_dir: Path) -> list[dict[str, Any]]:
    """The finished episodes of a run (``episodes.jsonl``; a torn last line is skipped)."""
    path = Path(run_dir) / "episodes.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def training_stats(run_dir: str | Path) -> dict[str, Any]:
    """Steps, episodes, measurements spent and wall time of a run (from its files).

    Measurements are store misses: a seed trained after another on a shared store spends fewer,
    because the plans it shares with earlier seeds are free.
    """
    run_dir = Path(run_dir)
    episodes = read_episodes(run_dir)
    final = run_dir / "final_model.zip"
    start = (run_dir / "config.json").stat().st_mtime if (run_dir / "config.json").exists() else None
    wall = (final.stat().st_mtime - start) if final.exists() and start is not None else None
    return {
        # Relative to the working directory when inside it: reports are committed, and an
        # absolute path would name this machine.
        "run_dir": os.path.relpath(run_dir) if not os.path.relpath(run_dir).startswith("..") else str(run_dir),
        "steps": episodes[-1]["global_step"] if episodes else 0,
        "episodes": len(episodes),
        "measurements": int(sum(e.get("measurements") or 0 for e in episodes)),
        "failures": sum(1 for e in episodes if e.get("status") not in (None, "ok")),
        "wall_s": wall,
    }


def learning_curve(run_dir: str | Path, window: int = 20) -> dict[str, list[float]]:
    """Per finished episode: env step, cumulative measurements, speedup vs tvm and its rolling
    mean over the last ``window`` episodes (episodes with a failed measurement count as 0)."""
    episodes = read_episodes(Path(run_dir))
    steps, spent, speedup, rolling = [], [], [], []
    total = 0
    for e in episodes:
        total += int(e.get("measurements") or 0)
        s = e.get("speedup_vs_tvm")
        steps.append(float(e["global_step"]))
        spent.append(float(total))
        speedup.append(float(s) if s is not None else 0.0)
        tail = speedup[-window:]
        rolling.append(float(np.mean(tail)))
    return {"step": steps, "measurements": spent, "speedup": speedup, "rolling": rolling}


def parity_point(curve: dict[str, list[float]], window: int = 20, threshold: float = 1.0) -> dict[str, float] | None:
    """The first episode at which the rolling mean speedup (over a full ``window``) reaches
    ``threshold``: its env step and the measurements spent up to it; ``None`` if never."""
    for i, value in enumerate(curve["rolling"]):
        if i + 1 >= window and value >= threshold:
            return {"step": curve["step"][i], "measurements": curve["measurements"][i], "episode": i + 1}
    return None


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided ``confidence`` interval of the mean, Student t with n-1 dof.

    With one value the interval is ``(nan, nan)``.
    """
    from scipy import stats

    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("t_interval of no values")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def geomean(values: Iterable[float]) -> float:
    x = [float(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    return float(math.exp(np.mean(np.log(x)))) if x else math.nan


def equal_budget(training_measurements: Sequence[int], num_train_models: int, cap: int | None) -> dict[str, Any]:
    """The search budget that counts as "equal" to the learned policy's.

    Convention: the policy spends 0 measurements at test time, so its cost is its *training*
    measurements, amortized over the training models: ``mean over seeds of (training
    measurements) / num_train_models``, rounded up, then capped at ``cap`` (compute limits).
    A cap below the amortized number gives search *less* than the policy spent; the report says
    so.
    """
    amortized = math.ceil(float(np.mean(training_measurements)) / max(1, num_train_models)) if training_measurements else 1
    amortized = max(1, amortized)
    used = min(amortized, cap) if cap is not None else amortized
    return {"amortized": amortized, "cap": cap, "budget": int(used)}


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One (model, target) pair to evaluate, with the caller's label of its split."""

    model: str
    target: str
    split: str = "train"


@dataclass
class SearchSettings:
    """Which searches to run, on which cases, at which budgets.

    ``search_models``: models (on any target) that get search at ``budget`` (the equal budget);
    ``multiplied_models``: the subset that also gets ``multiplier * budget``; ``exhaustive_models``:
    models for the oracle, refused (reported as skipped) above ``exhaustive_limit`` new plans;
    ``goal_models``: models that also get a fixed ``goal_budget`` (the issue's goal compares the
    policy with search at 500 measurements).
    """

    algos: tuple[str, ...] = ("random", "greedy")
    budget: int = 0  #: 0: no search
    multiplier: int = 10
    search_models: tuple[str, ...] = ()
    multiplied_models: tuple[str, ...] = ()
    search_targets: tuple[str, ...] = ("host",)
    exhaustive_models: tuple[str, ...] = ()
    exhaustive_limit: int = 0
    goal_budget: int = 0  #: 0: none
    goal_models: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class _Ctx:
    env: Any
    log: Callable[[str], None]
    models: dict[str, Any] = field(default_factory=dict)


def _row(case: Case, method: str, graph: Any, plan: Any, record: Any, **extra: Any) -> dict[str, Any]:
    from fusion_rl.fusion.metrics import plan_metrics

    metrics = plan_metrics(graph, plan) if plan is not None else None
    ok = record is not None and record.status == "ok"
    return {
        "model": case.model,
        "target": case.target,
        "split": case.split,
        "method": method,
        "latency_ms": float(record.median_ms) if ok else None,
        "spread_ms": float(record.spread_ms) if ok and record.spread_ms is not None else None,
        "status": record.status if record is not None else "skipped",
        "num_kernels": metrics.num_kernels if metrics else None,
        "intermediate_bytes": metrics.intermediate_bytes if metrics else None,
        "multi_anchor_groups": metrics.multi_anchor_groups if metrics else None,
        "plan_hash": plan.hash if plan is not None else None,
        "plan": plan.to_dict() if plan is not None else None,
        "wall_s": float(getattr(record, "wall_s", 0.0) or 0.0) if record is not None else None,
        **extra,
    }


def evaluate(
    run_dirs: Sequence[str | Path],
    cases: Sequence[Case],
    search: SearchSettings | None = None,
    *,
    rules: Sequence[str] = RULE_BASELINES,
    env_overrides: dict[str, Any] | None = None,
    ablations: Sequence[tuple[str, Sequence[str | Path], dict[str, Any]]] = (),
    log: Callable[[str], None] = print,
    progress: Callable[[int, int | None, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate trained runs and baselines on ``cases``; one row per (case, method[, seed]).

    ``log`` gets one line per case; ``progress(done, len(cases), label)``, if given, is called
    after each case (the CLI draws a bar with it).

    Rows of the learned policy have ``method="learned"``, the run's ``seed`` and
    ``decision_measurements`` (store misses while deciding: always 0, asserted). Search rows
    have ``method="<algo>@<budget>"``, ``measurements`` (spent by that search on this store) and
    ``evaluations``. Every row has ``latency_ms`` (median), ``spread_ms``, ``status``,
    ``num_kernels``, ``intermediate_bytes``, and, filled at the end by :func:`fill_speedups`,
    ``speedup_vs_tvm``, ``best_rule`` and ``speedup_vs_best_rule``. Policy rows (learned and
    ablations) also have ``collapsed_to``: the rule set whose plans that policy reproduced on
    every case, or ``None``.

    All runs must share one env spec's observation layout (``max_nodes``/``max_edges``); the
    first run's env spec sets the schedule provider, the timing protocol and the store.

    ``ablations``: ``(label, run_dirs, env_overrides)`` triples: other policies, each deciding in
    its own env (e.g. ``{"max_mac_anchors": None}`` for runs trained without the anchor cap),
    measured like the learned policy, with ``method=label``.
    """
    from fusion_rl.baselines.search import run_search
    from fusion_rl.fusion.rules import make_plan

    if not run_dirs:
        raise ConfigError("evaluate: give at least one run directory")
    policies = [load_policy(d) for d in run_dirs]
    env = make_eval_env(policies[0].config, **(env_overrides or {}))
    # (method, policy, env that decides); the main env measures everything.
    deciders: list[tuple[str, TrainedPolicy, Any]] = [("learned", p, env) for p in policies]
    for label, dirs, overrides in ablations:
        for d in dirs:
            policy = load_policy(d)
            deciders.append((label, policy, make_eval_env(policy.config, **dict(overrides))))
    search = search or SearchSettings()
    rows: list[dict[str, Any]] = []
    try:
        for done, case in enumerate(cases, 1):
            t0 = time.time()
            model = env.model(case.model)
            graph = model.graph
            measurer = env.measurer(case.target)
            # 1. The learned policy, per seed: decide with zero measurements, then measure once.
            for method, policy, decider in deciders:
                envs = {id(env): env, id(decider): decider}.values()
                before = sum(e.measurements_spent for e in envs)
                plan = decide_plan(policy.model, decider, case.model, case.target)
                spent = sum(e.measurements_spent for e in envs) - before
                if spent:
                    raise AssertionError(f"the policy spent {spent} measurements deciding {case}")
                record = measurer.measure(model, plan)
                rows.append(_row(case, method, graph, plan, record, seed=policy.seed,
                                 run_dir=str(policy.run_dir), decision_measurements=spent))
            # 2. Rule sets.
            for name in rules:
                plan = make_plan(name, model.mod, graph)
                rows.append(_row(case, name, graph, plan, measurer.measure(model, plan)))
            # 3. Search: the equal budget, the multiplied one and the goal's (where asked).
            if search.budget > 0 and case.model in search.search_models and case.target in search.search_targets:
                budgets = [search.budget]
                if case.model in search.multiplied_models:
                    budgets.append(search.budget * search.multiplier)
                if search.goal_budget > 0 and case.model in search.goal_models:
                    budgets.append(search.goal_budget)
                budgets = list(dict.fromkeys(budgets))
                for algo in search.algos:
                    # The larger budget first: random and greedy evaluate the same plans in the
                    # same order at any budget, so the smaller run is then served by the store.
                    for budget in sorted(budgets, reverse=True):
                        result = run_search(algo, model, measurer, budget, seed=search.seed)
                        best = result.best_plan
                        record = measurer.cached(model, best) if best is not None else None
                        rows.append(_row(case, f"{algo}@{budget}", graph, best, record, budget=budget,
                                         measurements=result.measurements_spent,
                                         evaluations=result.evaluations, algo=algo))
            # 4. The oracle, where the plan count is within the limit.
            if case.model in search.exhaustive_models and case.target in search.search_targets:
                try:
                    result = run_search("exhaustive", model, measurer, max(1, search.exhaustive_limit))
                    best = result.best_plan
                    record = measurer.cached(model, best) if best is not None else None
                    rows.append(_row(case, "exhaustive", graph, best, record,
                                     measurements=result.measurements_spent, evaluations=result.evaluations))
                except ConfigError as exc:
                    rows.append(_row(case, "exhaustive", graph, None, None, note=str(exc)))
            log(f"  {case.model:>20} on {case.target:<12} ({case.split}): {time.time() - t0:6.1f} s")
            if progress is not None:
                progress(done, len(cases), f"{case.model} on {case.target}")
    finally:
        for decider in {id(d[2]): d[2] for d in deciders}.values():
            decider.close()
    fill_speedups(rows, rules)
    collapse = collapsed_to(rows, rules)
    for r in rows:
        if "run_dir" in r:
            r["collapsed_to"] = collapse[(r["method"], r["run_dir"])]
    return rows


# --------------------------------------------------------------------------------------------
# speedups against tvm and against the best fixed rule; collapse to a rule
# --------------------------------------------------------------------------------------------


def best_rules(rows: Sequence[dict[str, Any]], rules: Sequence[str] = RULE_BASELINES) -> dict[str, str | None]:
    """Per split, the fixed rule set with the best geomean speedup over ``tvm`` on its cases.

    One rule for the whole split, not the fastest rule per case: a fixed rule is what a user
    deploys without measuring each model, while picking per case is a search. A rule counts
    only if it has a latency on every case of the split (a rule that failed somewhere would
    otherwise look better for skipping it); a split where none does maps to ``None``.
    Needs ``speedup_vs_tvm`` on the rows (:func:`fill_speedups` fills it first).
    """
    cases: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        cases.setdefault(r["split"], set()).add((r["model"], r["target"]))
    out: dict[str, str | None] = {}
    for split, split_cases in cases.items():
        scores: dict[str, float] = {}
        for rule in rules:
            speedups = {(r["model"], r["target"]): r["speedup_vs_tvm"] for r in rows
                        if r["split"] == split and r["method"] == rule and r.get("speedup_vs_tvm")}
            if set(speedups) == split_cases:
                scores[rule] = geomean(speedups.values())
        out[split] = max(scores, key=scores.__getitem__) if scores else None
    return out


def fill_speedups(rows: list[dict[str, Any]], rules: Sequence[str] = RULE_BASELINES) -> None:
    """Set ``speedup_vs_tvm``, ``best_rule`` (its split's, :func:`best_rules`) and
    ``speedup_vs_best_rule`` on every row: reference latency / the row's latency, ``None``
    where either is missing."""
    latency = {(r["model"], r["target"], r["method"]): r["latency_ms"] for r in rows if r["method"] in rules}

    def ratio(ref: float | None, ms: float | None) -> float | None:
        return ref / ms if ref and ms else None

    for r in rows:
        r["speedup_vs_tvm"] = ratio(latency.get((r["model"], r["target"], "tvm")), r["latency_ms"])
    best = best_rules(rows, rules)
    for r in rows:
        r["best_rule"] = best.get(r["split"])
        r["speedup_vs_best_rule"] = ratio(latency.get((r["model"], r["target"], r["best_rule"])), r["latency_ms"])


def collapsed_to(rows: Sequence[dict[str, Any]], rules: Sequence[str] = RULE_BASELINES
                 ) -> dict[tuple[str, str], str | None]:
    """For each policy (rows with a ``run_dir``, keyed by ``(method, run_dir)``): the first rule
    set in ``rules`` whose plan equals the policy's on every case the policy decided, else
    ``None`` (plan hashes ignore plan names). The policy's own speedups are then the rule's:
    reports must say so rather than present them as learned."""
    plans = {(r["model"], r["target"], r["method"]): r["plan_hash"] for r in rows if r["method"] in rules}
    policies: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "run_dir" in r:
            policies.setdefault((r["method"], r["run_dir"]), []).append(r)
    out: dict[tuple[str, str], str | None] = {}
    for key, own in policies.items():
        out[key] = next((rule for rule in rules if all(
            r["plan_hash"] is not None and plans.get((r["model"], r["target"], rule)) == r["plan_hash"]
            for r in own)), None)
    return out
