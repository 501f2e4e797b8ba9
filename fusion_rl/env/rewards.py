"""Rewards of :class:`~fusion_rl.env.fusion_env.FusionEnv`, chosen by the env spec's ``reward``.

All four are relative to TVM's own fusion (the ``tvm`` rule set, ``relax.transform.FuseOps``)
on the same model, target and schedule provider, so a return of 0 means "as good as TVM" and
returns are comparable across models of very different latency.

- ``e2e``: 0 per step; at the end ``-log(latency / reference_latency)``, both measured end to
  end through :class:`~fusion_rl.compiler.measure.Measurer` (a plan already in the store costs
  nothing).
- ``kernel``: dense shaping. When a fuse merges groups A and B, the reward is
  ``(t(A) + t(B) - t(A u B)) / reference_latency`` if all three group latencies are known from
  earlier per-kernel measurements, else 0. At the end, ``e2e_reward - sum(shaped rewards)`` is
  added, so the episode return equals the ``e2e`` reward (shaping changes credit assignment,
  never the objective).
- ``model``: no measurement; at the end ``-log(pred(plan) / pred(tvm_plan))`` from a learned
  :class:`~fusion_rl.compiler.cost_model.LatencyCostModel` (``fit``/``predict``/``save``/``load``).
- ``table``: at the end ``-log(est(plan) / est(tvm_plan))``, both estimated from the
  :class:`~fusion_rl.compiler.kernel_table.KernelTable` (each kernel timed alone once, plus the
  calibrated per-launch cost): an episode times only the kernels the table has not seen, so
  training costs kernels, not plans. An estimate is not a measurement (nothing is verified);
  re-time what a policy trained this way plans, end to end, before reporting it.

  With ``shape_credit`` (the env spec's key), the fuse that forms a multi-anchor group shape
  (:mod:`fusion_rl.fusion.group_shapes`) is paid at its own step what that instance is worth:
  ``-log(est(one-anchor plan with the instance formed) / est(one-anchor plan))``, the
  one-anchor plan being the ``aggressive_1anchor`` rule's. As with ``kernel``, the terminal
  reward subtracts what was paid, so the return is unchanged; only the credit moves to the
  decision that earned it (one decision among the hundred or more of an episode, worth a
  percent or two of the terminal reward, is otherwise lost in it). An instance whose plan
  cannot be estimated earns nothing.

A plan whose measurement fails (build error, wrong output, crash, timeout), a kernel that cannot
be timed, or a non-positive prediction, ends the episode with :data:`FAILURE_PENALTY` as its ``e2e`` reward; the status and
error are in the episode's ``info``. A reference plan that fails to measure is an environment
error (:class:`~fusion_rl.errors.MeasurementError`): no reward can be computed for that pair.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

from fusion_rl.compiler.kernel_table import KernelTable
from fusion_rl.compiler.kernels import group_kernel_times
from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.shape_credit import instance_credits
from fusion_rl.compiler.store import MeasurementRecord
from fusion_rl.compiler.target import TargetSpec
from fusion_rl.env.plan_index import PlanIndex
from fusion_rl.errors import ConfigError, MeasurementError
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.model import Model
from fusion_rl.graph.opgraph import OpGraph

log = logging.getLogger(__name__)

#: ``e2e`` reward of a plan that fails to build, verify or time (about a 2.7x slowdown).
FAILURE_PENALTY = -1.0

Group = tuple[int, ...]


class CostModel(Protocol):
    """What the ``model`` reward needs of :class:`fusion_rl.compiler.cost_model.LatencyCostModel`."""

    def predict(self, graph: OpGraph, plan: FusionPlan) -> float: ...


@dataclass
class RewardContext:
    """The (model, target) pair of the current episode, as rewards see it."""

    model: Model
    target: TargetSpec
    tvm_plan: FusionPlan  #: the reference plan
    measurer: Measurer | None = None  #: None for rewards that do not measure


class Reward:
    """Base class: 0 for every step, nothing at the end. Subclasses override the hooks."""

    name: ClassVar[str] = ""
    needs_measurer: ClassVar[bool] = True

    def start(self, ctx: RewardContext) -> None:
        """Called at ``reset``: prepare the reference (so its failure shows up early)."""

    def on_merge(self, ctx: RewardContext, a: Group, b: Group) -> float:
        """Reward of a fuse that merged groups ``a`` and ``b``."""
        return 0.0

    def terminal(self, ctx: RewardContext, plan: FusionPlan, shaped_return: float) -> tuple[float, dict[str, Any]]:
        """The final reward of ``plan`` given the shaped rewards paid so far, and episode info."""
        raise NotImplementedError

    @property
    def spent(self) -> int:
        """Measurements this reward made itself (beyond the env's measurers): kernels timed."""
        return 0

    def close(self) -> None:
        """Release what the reward holds open (kernel tables)."""


class E2EReward(Reward):
    """``-log(latency / reference_latency)`` at the end, measured; see the module docstring."""

    name = "e2e"
    per_kernel: ClassVar[bool] = False

    def __init__(self, failure_penalty: float = FAILURE_PENALTY) -> None:
        self.failure_penalty = failure_penalty
        self._reference: dict[tuple, MeasurementRecord] = {}

    @staticmethod
    def _context(ctx: RewardContext) -> tuple:
        """What a latency depends on besides the plan (the measurement key minus the plan)."""
        assert ctx.measurer is not None, "a measuring reward got no measurer"
        k = ctx.measurer.key(ctx.model, ctx.tvm_plan)
        return (k.model_fingerprint, k.target, k.provider, k.budget, k.versions, k.protocol)

    def reference_ms(self, ctx: RewardContext) -> float:
        """Latency of the tvm plan (measured once per context, then remembered)."""
        context = self._context(ctx)
        record = self._reference.get(context)
        if record is None:
            record = ctx.measurer.measure(ctx.model, ctx.tvm_plan, per_kernel=self.per_kernel)
            if record.status != "ok":
                raise MeasurementError(
                    f"the reference plan (TVM FuseOps) of model {ctx.model.name!r} on target "
                    f"{ctx.target.name!r} with schedule {ctx.measurer.schedule!r} did not measure "
                    f"({record.status}: {record.error}); drop this model or target from the env "
                    "spec, or use another schedule provider"
                )
            self._observe(ctx, ctx.tvm_plan, record)
            self._reference[context] = record
        return float(record.median_ms)

    def start(self, ctx: RewardContext) -> None:
        self.reference_ms(ctx)

    def _observe(self, ctx: RewardContext, plan: FusionPlan, record: MeasurementRecord) -> None:
        """Hook: a measured record of ``plan`` (the kernel reward learns group times here)."""

    def terminal(self, ctx: RewardContext, plan: FusionPlan, shaped_return: float) -> tuple[float, dict[str, Any]]:
        reference = self.reference_ms(ctx)
        record = ctx.measurer.measure(ctx.model, plan, per_kernel=self.per_kernel)
        self._observe(ctx, plan, record)
        info: dict[str, Any] = {
            "latency_ms": record.median_ms,
            "reference_latency_ms": reference,
            "speedup_vs_tvm": None,
            "measurement_status": record.status,
        }
        if record.status == "ok" and record.median_ms > 0:
            e2e = -math.log(record.median_ms / reference)
            info["speedup_vs_tvm"] = reference / record.median_ms
        else:
            e2e = self.failure_penalty
            info["measurement_error"] = record.error
        info["e2e_reward"] = e2e
        return e2e - shaped_return, info


class KernelReward(E2EReward):
    """Dense per-merge shaping from per-kernel times, corrected at the end to the e2e reward.

    Group latencies live in an in-memory table keyed by (model fingerprint, target key,
    provider, budget, library versions, group). It fills from every per-kernel measurement this
    process makes and, on the first episode of each (model, target), from the store's records,
    whose plans are looked up in the :class:`~fusion_rl.env.plan_index.PlanIndex` sidecar.
    """

    name = "kernel"
    per_kernel = True

    def __init__(self, failure_penalty: float = FAILURE_PENALTY, plan_index: PlanIndex | None = None) -> None:
        super().__init__(failure_penalty)
        self.plan_index = plan_index
        self._times: dict[tuple, dict[Group, float]] = defaultdict(dict)
        self._loaded: set[tuple] = set()

    @staticmethod
    def _table_key(ctx: RewardContext) -> tuple:
        # Per-kernel times do not depend on the end-to-end timing protocol: share across them.
        return E2EReward._context(ctx)[:5]

    def group_latency(self, ctx: RewardContext, group: Group) -> float | None:
        return self._times[self._table_key(ctx)].get(tuple(sorted(group)))

    def start(self, ctx: RewardContext) -> None:
        key = self._table_key(ctx)
        if key not in self._loaded:
            self._loaded.add(key)
            self._load_from_store(ctx, key)
        super().start(ctx)

    def _load_from_store(self, ctx: RewardContext, key: tuple) -> None:
        store = ctx.measurer.store
        if store is None or self.plan_index is None:
            return
        fingerprint, target, provider, budget, versions = key
        records = [
            r for r in store.records(model_fingerprint=fingerprint, target=target, provider=provider,
                                     budget=budget, versions=versions, status="ok")
            if r.kernel_times_ms
        ]
        plans = self.plan_index.get_many(r.key.plan_hash for r in records)
        for record in records:
            plan = plans.get(record.key.plan_hash)
            if plan is not None and plan.num_nodes == len(ctx.model.graph):
                self._times[key].update(group_kernel_times(ctx.model.graph, plan, record.kernel_times_ms))

    def _observe(self, ctx: RewardContext, plan: FusionPlan, record: MeasurementRecord) -> None:
        if record.status != "ok" or not record.kernel_times_ms:
            return
        self._times[self._table_key(ctx)].update(group_kernel_times(ctx.model.graph, plan, record.kernel_times_ms))
        if self.plan_index is not None:
            self.plan_index.put(plan)

    def on_merge(self, ctx: RewardContext, a: Group, b: Group) -> float:
        t_a, t_b = self.group_latency(ctx, a), self.group_latency(ctx, b)
        t_ab = self.group_latency(ctx, a + b)
        if t_a is None or t_b is None or t_ab is None:
            return 0.0
        return (t_a + t_b - t_ab) / self.reference_ms(ctx)


class ModelReward(Reward):
    """``-log(pred(plan) / pred(tvm_plan))`` from a learned cost model; never measures."""

    name = "model"
    needs_measurer = False

    def __init__(self, cost_model: CostModel, failure_penalty: float = FAILURE_PENALTY) -> None:
        self.cost_model = cost_model
        self.failure_penalty = failure_penalty
        self._reference: dict[tuple[str, str], float] = {}

    def reference_ms(self, ctx: RewardContext) -> float:
        key = (ctx.model.fingerprint, ctx.target.key)
        if key not in self._reference:
            value = float(self.cost_model.predict(ctx.model.graph, ctx.tvm_plan))
            if not (math.isfinite(value) and value > 0):
                raise MeasurementError(
                    f"the cost model predicts {value} ms for the reference plan of "
                    f"{ctx.model.name!r}; retrain it (fusion_rl.compiler.cost_model) on this model"
                )
            self._reference[key] = value
        return self._reference[key]

    def start(self, ctx: RewardContext) -> None:
        self.reference_ms(ctx)

    def terminal(self, ctx: RewardContext, plan: FusionPlan, shaped_return: float) -> tuple[float, dict[str, Any]]:
        reference = self.reference_ms(ctx)
        predicted = float(self.cost_model.predict(ctx.model.graph, plan))
        info: dict[str, Any] = {
            "latency_ms": predicted, "reference_latency_ms": reference, "speedup_vs_tvm": None,
            "measurement_status": "predicted",
        }
        if math.isfinite(predicted) and predicted > 0:
            e2e = -math.log(predicted / reference)
            info["speedup_vs_tvm"] = reference / predicted
        else:
            e2e = self.failure_penalty
            info["measurement_error"] = f"cost model predicted {predicted}"
        info["e2e_reward"] = e2e
        return e2e - shaped_return, info


class TableReward(Reward):
    """``-log(est(plan) / est(tvm_plan))`` from the kernel table; see the module docstring.

    ``open_table(target)`` opens the :class:`KernelTable` of a target (the env passes one with
    its schedule provider and store folder); tables open on first use and stay open.
    ``shape_credit`` names the group shapes whose forming fuse is paid at its step (see the
    module docstring); empty: none.
    """

    name = "table"
    needs_measurer = False

    def __init__(self, open_table: Callable[[TargetSpec], KernelTable],
                 failure_penalty: float = FAILURE_PENALTY, shape_credit: tuple[str, ...] = ()) -> None:
        self.open_table = open_table
        self.failure_penalty = failure_penalty
        self.shape_credit = tuple(shape_credit)
        self._tables: dict[str, KernelTable] = {}
        self._reference: dict[tuple[str, str], float] = {}
        self._credits: dict[tuple[str, str], dict[frozenset[int], float]] = {}

    def table(self, target: TargetSpec) -> KernelTable:
        if target.key not in self._tables:
            self._tables[target.key] = table = self.open_table(target)
            if not table.calibrated:
                log.warning("the kernel table of target %s has no per-launch cost for schedule %s: estimates "
                            "count the kernels alone, so the launches a fusion saves earn nothing "
                            "(scripts/learn_bench.py and scripts/kernel_table.py fit one)",
                            target.key, table.key[1])
        return self._tables[target.key]

    def reference_ms(self, ctx: RewardContext) -> float:
        key = (ctx.model.fingerprint, ctx.target.key)
        if key not in self._reference:
            try:
                self._reference[key] = self.table(ctx.target).estimate(ctx.model, ctx.tvm_plan).latency_ms
            except MeasurementError as exc:
                raise MeasurementError(
                    f"the reference plan (TVM FuseOps) of model {ctx.model.name!r} on target "
                    f"{ctx.target.name!r} could not be estimated from the kernel table: {exc}") from exc
        return self._reference[key]

    def start(self, ctx: RewardContext) -> None:
        self.reference_ms(ctx)
        if self.shape_credit:
            self.shape_credits(ctx)

    def shape_credits(self, ctx: RewardContext) -> dict[frozenset[int], float]:
        """Each shape instance's worth, keyed by its conv/matmul anchors
        (:func:`fusion_rl.compiler.shape_credit.instance_credits`; computed once per model and
        target, the instances' kernels timed here if the table lacks them)."""
        key = (ctx.model.fingerprint, ctx.target.key)
        if key not in self._credits:
            graph = ctx.model.graph
            try:
                credits = instance_credits(self.table(ctx.target), ctx.model, self.shape_credit)
            except MeasurementError as exc:
                log.warning("no shape credit on %s: its one-anchor plan has no estimate (%s)", ctx.model.name, exc)
                credits = {}
            self._credits[key] = {frozenset(n for n in instance if graph.nodes[n].is_mac_anchor): credit
                                  for (_, instance), credit in credits.items()}
        return self._credits[key]

    def on_merge(self, ctx: RewardContext, a: Group, b: Group) -> float:
        if not self.shape_credit:
            return 0.0
        nodes = ctx.model.graph.nodes
        anchors = [n for n in (*a, *b) if nodes[n].is_mac_anchor]
        if len(anchors) != 2 or not any(nodes[n].is_mac_anchor for n in a) or not any(
                nodes[n].is_mac_anchor for n in b):
            return 0.0  # only the fuse that joins two one-anchor groups forms a shape
        return self.shape_credits(ctx).get(frozenset(anchors), 0.0)

    def terminal(self, ctx: RewardContext, plan: FusionPlan, shaped_return: float) -> tuple[float, dict[str, Any]]:
        reference = self.reference_ms(ctx)
        table = self.table(ctx.target)
        info: dict[str, Any] = {"reference_latency_ms": reference, "speedup_vs_tvm": None}
        before = table.timed
        try:
            estimate = table.estimate(ctx.model, plan).latency_ms
        except MeasurementError as exc:
            e2e = self.failure_penalty
            info.update(latency_ms=None, measurement_status="failed", measurement_error=str(exc))
        else:
            e2e = -math.log(estimate / reference)
            info.update(latency_ms=estimate, measurement_status="estimated", speedup_vs_tvm=reference / estimate)
        info.update(e2e_reward=e2e, kernels_timed=table.timed - before)
        return e2e - shaped_return, info

    @property
    def spent(self) -> int:
        return sum(t.timed for t in self._tables.values())

    def close(self) -> None:
        for table in self._tables.values():
            table.close()
        self._tables.clear()


def make_reward(mode: str, *, failure_penalty: float = FAILURE_PENALTY, cost_model: CostModel | None = None,
                plan_index: PlanIndex | None = None,
                open_table: Callable[[TargetSpec], KernelTable] | None = None,
                shape_credit: tuple[str, ...] = ()) -> Reward:
    """The reward of env-spec mode ``mode`` (``e2e``, ``kernel``, ``model`` or ``table``);
    ``shape_credit`` (group shape names) applies to ``table`` only."""
    if shape_credit and mode != "table":
        raise ConfigError(f"shape credit is priced from the kernel table: it needs reward 'table', not {mode!r}")
    if mode == "e2e":
        return E2EReward(failure_penalty)
    if mode == "kernel":
        return KernelReward(failure_penalty, plan_index)
    if mode == "model":
        if cost_model is None:
            raise ConfigError(
                "reward 'model' needs a cost model: set 'cost_model: PATH' in the env spec (a saved "
                "LatencyCostModel) or pass cost_model= to FusionEnv"
            )
        return ModelReward(cost_model, failure_penalty)
    if mode == "table":
        if open_table is None:
            raise ConfigError("reward 'table' needs open_table(target) -> KernelTable (FusionEnv passes one)")
        return TableReward(open_table, failure_penalty, shape_credit)
    raise ConfigError(f"unknown reward {mode!r}; choose one of e2e, kernel, model, table")
