"""Search baselines: random search, greedy merging, simulated annealing, and an exhaustive oracle.

Every algorithm takes ``(model, measurer, budget, seed)`` and returns a :class:`SearchResult`.
They spend the same currency as RL training: measurements, counted as the measurer's store
*misses* during the search (a plan served from the store costs 0).

Budget semantics
----------------
``budget`` caps the number of *distinct plans a search evaluates*. On a cold store that is
exactly the number of measurements it spends; on a warm store some evaluations are served for
free, so ``measurements_spent <= budget``. Counting evaluations rather than misses keeps a
search's trajectory independent of the store's contents: the same seed proposes the same plans
and returns the same result whether the store is empty or full, and a rerun spends 0. A plan the
search has already evaluated is never re-evaluated (it costs neither budget nor a measurement).

Failed measurements (build failure, wrong output, crash, timeout) count as evaluations and have
latency ``inf``: a search never returns a plan that did not verify.

Parallel measurement
--------------------
Given a :class:`~fusion_rl.compiler.pool.MeasurerPool` of N runners, random search, greedy and
the exhaustive oracle measure N plans at once (:meth:`_Evaluator.evaluate_many`). They propose
the same plans in the same order as with one runner, so a seed gives the same result; annealing
is sequential by nature (each step depends on the last) and uses one runner.
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import numpy as np

from fusion_rl.compiler.measure import Measurer
from fusion_rl.errors import ConfigError
from fusion_rl.fusion.group_shapes import shape_instances, within_anchor_limit
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.plan_space import (EXHAUSTIVE_LIMIT, form_shape, is_legal, legal_plans, merge_candidates,
                                         peel_node, shape_candidates)
from fusion_rl.fusion.random_plans import mutate_plan, random_plan
from fusion_rl.graph.model import Model


@dataclass
class SearchResult:
    """What a search found and what it cost.

    ``history`` has one ``(measurements spent, best-so-far latency ms)`` point per evaluated plan;
    the best is ``inf`` until a plan measures ``ok``.
    """

    algo: str
    best_plan: FusionPlan | None  #: ``None`` if no evaluated plan measured ``ok``
    best_ms: float
    measurements_spent: int  #: measurer misses during the search
    evaluations: int  #: distinct plans evaluated (<= budget)
    budget: int
    seed: int | None
    history: list[tuple[int, float]] = field(default_factory=list)
    failures: int = 0  #: evaluated plans whose measurement was not ``ok``
    info: dict[str, Any] = field(default_factory=dict)  #: algorithm-specific facts

    def to_dict(self) -> dict[str, Any]:
        return {
            "algo": self.algo,
            "best_ms": None if math.isinf(self.best_ms) else self.best_ms,
            "best_plan": self.best_plan.to_dict() if self.best_plan is not None else None,
            "measurements_spent": self.measurements_spent,
            "evaluations": self.evaluations,
            "budget": self.budget,
            "seed": self.seed,
            "failures": self.failures,
            "history": [[s, None if math.isinf(b) else b] for s, b in self.history],
            "info": self.info,
        }


class _Evaluator:
    """Shared book-keeping: budget, per-search plan cache, best-so-far and history."""

    def __init__(self, model: Model, measurer: Measurer, budget: int, per_kernel: bool = False,
                 progress: Callable[[int, int | None, str], None] | None = None):
        _check_budget(budget)
        # Called as progress(evaluated, budget, label) after each evaluation (the CLI draws a
        # bar with it; this layer never imports one).
        self.progress = progress
        self.model = model
        self.measurer = measurer
        self.budget = budget
        self.per_kernel = per_kernel
        self.seen: dict[str, float] = {}  # plan hash -> latency (inf when not ok)
        self.best_plan: FusionPlan | None = None
        self.best_ms = math.inf
        self.history: list[tuple[int, float]] = []
        self.failures = 0
        self._misses0 = measurer.stats.misses

    @property
    def spent(self) -> int:
        return self.measurer.stats.misses - self._misses0

    @property
    def exhausted(self) -> bool:
        return len(self.seen) >= self.budget

    def known(self, plan: FusionPlan) -> float | None:
        return self.seen.get(plan.hash)

    @property
    def runners(self) -> int:
        """Plans the measurer measures at once (a pool's size; 1 for a plain measurer)."""
        return int(getattr(self.measurer, "runners", 1))

    def evaluate(self, plan: FusionPlan) -> float | None:
        """Latency of ``plan`` (``inf`` if it failed); ``None`` when the budget is spent.

        The plan must be legal (callers filter with :func:`is_legal`).
        """
        if plan.hash in self.seen:
            return self.seen[plan.hash]
        if self.exhausted:
            return None
        return self._record(plan, self.measurer.measure(self.model, plan, per_kernel=self.per_kernel))

    def evaluate_many(self, plans: Sequence[FusionPlan]) -> list[float | None]:
        """:meth:`evaluate` each plan, measuring the new ones in parallel on a pool.

        Returns one latency per plan, ``None`` for the plans past the budget (as :meth:`evaluate`).
        """
        new: dict[str, FusionPlan] = {}
        for plan in plans:
            if plan.hash not in self.seen and plan.hash not in new and len(self.seen) + len(new) < self.budget:
                new[plan.hash] = plan
        todo = list(new.values())
        if len(todo) > 1 and hasattr(self.measurer, "measure_many"):
            records = self.measurer.measure_many(self.model, todo, per_kernel=self.per_kernel)
        else:
            records = [self.measurer.measure(self.model, p, per_kernel=self.per_kernel) for p in todo]
        for plan, record in zip(todo, records):
            self._record(plan, record)
        return [self.seen.get(plan.hash) for plan in plans]

    def _record(self, plan: FusionPlan, record: Any) -> float:
        ms = float(record.median_ms) if record.status == "ok" else math.inf
        if record.status != "ok":
            self.failures += 1
        self.seen[plan.hash] = ms
        if ms < self.best_ms:
            self.best_ms, self.best_plan = ms, plan
        self.history.append((self.spent, self.best_ms))
        if self.progress is not None:
            best = "none ok yet" if math.isinf(self.best_ms) else f"best {self.best_ms:.4f} ms"
            self.progress(len(self.seen), self.budget, best)
        return ms

    def result(self, algo: str, seed: int | None, **info: Any) -> SearchResult:
        best = self.best_plan.with_name(algo) if self.best_plan is not None else None
        return SearchResult(
            algo=algo, best_plan=best, best_ms=self.best_ms, measurements_spent=self.spent,
            evaluations=len(self.seen), budget=self.budget, seed=seed, history=self.history,
            failures=self.failures, info=info,
        )


def within_anchor_cap(graph: Any, plan: FusionPlan, max_anchors: int | None,
                      shapes: Collection[str] = ()) -> bool:
    """Whether every group of ``plan`` holds at most ``max_anchors`` conv/matmul anchors or is
    one of the group ``shapes`` (``None``: no cap), the constraint the training env's mask
    enforces (:attr:`~fusion_rl.env.spec.EnvSpec.decision_options`)."""
    return all(within_anchor_limit(graph, g, max_anchors, shapes) for g in plan.groups)


def _best_seed(ev: _Evaluator, graph: Any, seeds: Sequence[FusionPlan], default: FusionPlan,
               max_anchors: int | None = None, shapes: Collection[str] = ()) -> FusionPlan:
    """Evaluate the legal ``seeds`` within the anchor cap (and the budget) and return the
    fastest that measured ``ok``; ``default`` when there is none. A local search that starts
    here can only improve on its seeds, e.g. on the best fixed rule's plan."""
    best, best_ms = default, math.inf
    for plan in seeds:
        if ev.exhausted:
            break
        if is_legal(graph, plan) and within_anchor_cap(graph, plan, max_anchors, shapes):
            ms = ev.evaluate(plan)
            if ms is not None and ms < best_ms:
                best, best_ms = plan, ms
    return best


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ConfigError(f"search budget must be a positive number of measurements, got {budget!r}")


# --------------------------------------------------------------------------------------------
# random search
# --------------------------------------------------------------------------------------------


def random_search(
    model: Model,
    measurer: Measurer,
    budget: int,
    seed: int = 0,
    seeds: Sequence[FusionPlan] = (),
    max_anchors: int | None = None,
    max_proposals: int | None = None,
    shapes: Collection[str] = (),
    progress: Callable[[int, int | None, str], None] | None = None,
) -> SearchResult:
    """Measure random legal plans (:func:`random_plan`, ``merge_prob ~ U[0, 1]`` per plan).

    ``seeds`` are measured first (e.g. rule-set plans); by default the search is purely random.
    ``max_anchors`` and ``shapes`` bound every plan's groups as :func:`within_anchor_cap` does.
    Duplicates are free, so on a small graph the plan space can run out before the budget:
    the search stops after ``max_proposals`` proposals (default ``50 * budget``).
    """
    ev = _Evaluator(model, measurer, budget, progress=progress)
    rng = np.random.default_rng(seed)
    graph = model.graph
    _best_seed(ev, graph, seeds, FusionPlan.singletons(len(graph), graph.fingerprint, "random"),
               max_anchors, shapes)
    proposals = 0
    limit = max_proposals if max_proposals is not None else 50 * budget
    while not ev.exhausted and proposals < limit:
        # A batch of new legal plans, one per runner (one plan with a plain measurer).
        batch: dict[str, FusionPlan] = {}
        while len(batch) < min(ev.runners, budget - len(ev.seen)) and proposals < limit:
            proposals += 1
            plan = random_plan(graph, rng, merge_prob=None, max_anchors=max_anchors, shapes=shapes)
            # random_plan keeps groups convex; a cycle *between* groups is possible
            if plan.hash not in ev.seen and is_legal(graph, plan):
                batch.setdefault(plan.hash, plan)
        ev.evaluate_many(list(batch.values()))
    return ev.result("random", seed, proposals=proposals)


# --------------------------------------------------------------------------------------------
# greedy merging
# --------------------------------------------------------------------------------------------


def greedy(model: Model, measurer: Measurer, budget: int, seed: int | None = None,
           seeds: Sequence[FusionPlan] = (), max_anchors: int | None = None,
           shapes: Collection[str] = (),
           progress: Callable[[int, int | None, str], None] | None = None) -> SearchResult:
    """Best-improvement merging: start unfused (or from the fastest of ``seeds``, measured
    first); each round measure every legal one-edge merge of the current plan (within
    ``max_anchors`` per group, or into one of ``shapes``), and every plan that forms one more
    instance of a shape (:func:`~fusion_rl.fusion.plan_space.shape_candidates`: often no
    one-edge merge away), and take the best-measured one; stop
    when no merge improves on the current plan or the budget is spent (the best merge measured
    so far in an interrupted round is still taken if it improves). Deterministic: ``seed`` is
    unused and only recorded."""
    ev = _Evaluator(model, measurer, budget, progress=progress)
    graph = model.graph
    current = _best_seed(ev, graph, seeds, FusionPlan.singletons(len(graph), graph.fingerprint, "greedy"),
                         max_anchors, shapes)
    current_ms = ev.evaluate(current)
    rounds = 0
    stop = "budget"
    while current_ms is not None and not ev.exhausted:
        rounds += 1
        best_cand, best_ms = None, current_ms
        interrupted = False
        cands = [c for c in merge_candidates(graph, current) + shape_candidates(graph, current, shapes)
                 if within_anchor_cap(graph, c, max_anchors, shapes)]
        for start in range(0, len(cands), ev.runners):
            chunk = cands[start:start + ev.runners]
            for cand, ms in zip(chunk, ev.evaluate_many(chunk)):
                if ms is None:
                    interrupted = True
                    break
                if ms < best_ms:
                    best_cand, best_ms = cand, ms
            if interrupted:
                break
        if best_cand is None:
            stop = "budget" if interrupted else "no improving merge"
            break
        current, current_ms = best_cand, best_ms
    return ev.result("greedy", seed, rounds=rounds, stop=stop)


# --------------------------------------------------------------------------------------------
# simulated annealing
# --------------------------------------------------------------------------------------------


def annealing(
    model: Model,
    measurer: Measurer,
    budget: int,
    seed: int = 0,
    seeds: Sequence[FusionPlan] = (),
    t_start: float = 0.1,
    t_end: float = 0.002,
    max_proposals: int | None = None,
    max_anchors: int | None = None,
    shapes: Collection[str] = (),
    progress: Callable[[int, int | None, str], None] | None = None,
) -> SearchResult:
    """Simulated annealing over legal plans, moving with :func:`mutate_plan` and :func:`peel_node`
    (a move that puts more than ``max_anchors`` conv/matmul anchors in a group not of one of
    ``shapes`` is not proposed), and with ``shapes``, by forming one of their instances.

    Neighbourhood: with probability 1/2 :func:`mutate_plan` (split a fused group into
    singletons, or merge along a few more edges), else :func:`peel_node` (move one node out of a
    fused group). With ``shapes``, each of the three moves is drawn with probability 1/3, the
    third forming a random instance of a shape (:func:`~fusion_rl.fusion.plan_space.form_shape`:
    a shape's group is often no merge away). ``mutate_plan`` alone cannot step back from a large group except by dissolving
    it, so a search that merged too much would be stuck; peeling gives the finer reverse move.

    Energy is latency; a move is judged by its *relative* change ``d = (new - cur) / cur`` so the
    schedule does not depend on the model's scale. An improving move is always accepted, a worse
    one with probability ``exp(-d / T)``. The temperature falls geometrically with the budget
    used: ``T_k = t_start * (t_end / t_start) ** (k / (budget - 1))`` after ``k`` evaluations, so
    a 10 % slowdown is accepted with probability ~37 % at the start (``T = 0.1``) and ~0 at the
    end (``T = 0.002``): exploration first, then a local search. A failed plan (``inf``) is never
    accepted. Re-proposing an evaluated plan is free; the search stops after ``max_proposals``
    proposals (default ``50 * budget``) in case the neighbourhood is exhausted.
    """
    if not (t_start > 0 and t_end > 0):
        raise ConfigError(f"annealing temperatures must be > 0, got t_start={t_start}, t_end={t_end}")
    ev = _Evaluator(model, measurer, budget, progress=progress)
    rng = np.random.default_rng(seed)
    graph = model.graph
    # Start unfused, or from the fastest of ``seeds`` (measured first, within the budget).
    current = _best_seed(ev, graph, seeds, FusionPlan.singletons(len(graph), graph.fingerprint, "annealing"),
                         max_anchors, shapes)
    current_ms = ev.evaluate(current)
    # Found once: a move builds one candidate, not every one (all of EfficientNet-B0's took 41 ms).
    instances = [(name, inst) for name in shapes for inst in shape_instances(graph, name)]
    proposals = accepted = 0
    limit = max_proposals if max_proposals is not None else 50 * budget
    while current_ms is not None and not ev.exhausted and proposals < limit:
        proposals += 1
        move = rng.uniform()
        if shapes and move < 1 / 3:
            cand = current
            if instances:
                name, inst = instances[int(rng.integers(len(instances)))]
                cand = form_shape(graph, current, name, inst) or current
        elif move < (2 / 3 if shapes else 0.5):
            cand = mutate_plan(graph, current, rng)
        else:
            cand = peel_node(graph, current, rng)
        if cand.hash == current.hash or not within_anchor_cap(graph, cand, max_anchors, shapes) \
                or not is_legal(graph, cand):
            continue
        ms = ev.evaluate(cand)
        if ms is None:
            break
        frac = len(ev.seen) / max(1, budget - 1)
        temp = t_start * (t_end / t_start) ** min(1.0, frac)
        if math.isinf(ms):
            continue
        delta = (ms - current_ms) / current_ms if math.isfinite(current_ms) else -math.inf
        if delta <= 0 or rng.uniform() < math.exp(-delta / temp):
            current, current_ms = cand, ms
            accepted += 1
    return ev.result("annealing", seed, proposals=proposals, accepted=accepted)


# --------------------------------------------------------------------------------------------
# exhaustive oracle
# --------------------------------------------------------------------------------------------


def exhaustive(
    model: Model,
    measurer: Measurer,
    budget: int,
    seed: int | None = None,
    max_plans: int = EXHAUSTIVE_LIMIT,
    progress: Callable[[int, int | None, str], None] | None = None,
) -> SearchResult:
    """The oracle: measure every legal plan with connected groups, return the best.

    Refuses (:class:`ConfigError`, before measuring anything) when the graph has more than
    ``max_plans`` connected partitions, or when the plans not yet in the store exceed ``budget``:
    an oracle that stops early is no oracle. Deterministic; ``seed`` is only recorded.
    """
    _check_budget(budget)
    try:
        plans = legal_plans(model.graph, max_plans)
    except ConfigError as exc:
        raise ConfigError(f"exhaustive search: {exc}") from None
    new = sum(measurer.cached(model, p) is None for p in plans)
    if new > budget:
        raise ConfigError(
            f"exhaustive search of {model.name} has {len(plans)} legal plans, {new} not yet "
            f"measured, but the budget is {budget}; pass --budget {len(plans)} (or more)"
        )
    # Plans already in the store are free; the budget then bounds only the new ones.
    ev = _Evaluator(model, measurer, max(budget, len(plans)), progress=progress)
    for start in range(0, len(plans), ev.runners):
        ev.evaluate_many(plans[start:start + ev.runners])
    result = ev.result("exhaustive", seed, legal_plans=len(plans))
    result.budget = budget
    return result


ALGORITHMS: dict[str, Callable[..., SearchResult]] = {
    "random": random_search,
    "greedy": greedy,
    "annealing": annealing,
    "exhaustive": exhaustive,
}


def run_search(algo: str, model: Model, measurer: Measurer, budget: int, seed: int = 0,
               progress: Callable[[int, int | None, str], None] | None = None,
               **options: Any) -> SearchResult:
    """Run search algorithm ``algo`` (a key of :data:`ALGORITHMS`).

    ``progress(evaluated, budget, label)``, if given, is called after each plan evaluated;
    ``options`` go to the algorithm (e.g. ``max_anchors`` and ``shapes`` for random, greedy and
    annealing).
    """
    try:
        fn = ALGORITHMS[algo]
    except KeyError:
        raise ConfigError(f"unknown search algorithm '{algo}'; choose one of {', '.join(ALGORITHMS)}") from None
    return fn(model, measurer, budget, seed=seed, progress=progress, **options)
