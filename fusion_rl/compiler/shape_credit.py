"""What each multi-anchor group-shape instance is worth, by kernel-table estimate, and the plan
that forms every instance worth forming.

A declared group shape (:mod:`fusion_rl.fusion.group_shapes`, e.g. a pointwise conv with the
depthwise conv it feeds) pays at some instances of a model and not at others: on the same
machine, MobileNetV2's pair at 112 px saves a round trip of 4.8 MB, its pair at 7 px runs
slower than the two kernels apart. No rule set can say which; the kernel table can, without
building a plan:

- :func:`instance_credits`: each instance formed alone on a base plan (the one-anchor rule's),
  its credit ``-log(est(base with it formed) / est(base))``;
- :func:`credit_plan`: the base plan with every instance of positive credit formed.

The env's ``shape_credit`` reward pays each forming fuse its credit, and training can clone
credit plans (:class:`fusion_rl.policy.imitation.FineTune`). Estimates are not measurements:
a credit plan is a label for training, never a reported result.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from fusion_rl.compiler.kernel_table import KernelTable
from fusion_rl.errors import MeasurementError
from fusion_rl.fusion.group_shapes import shape_instances
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.plan_space import form_shape
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import Model

__all__ = ["CREDIT_BASE_RULE_SET", "credit_plan", "instance_credits"]

#: The rule set whose plan each instance is formed on, alone, to price it.
CREDIT_BASE_RULE_SET = "aggressive_1anchor"


def instance_credits(table: KernelTable, model: Model, shapes: Sequence[str],
                     base: FusionPlan | None = None) -> dict[tuple[str, tuple[int, ...]], float]:
    """The credit of every instance of ``shapes`` in ``model``, keyed by (shape, instance).

    Kernels the table lacks are timed. An instance that ``base`` already holds in one group,
    that cannot be formed legally on it, or whose plan cannot be estimated, has no entry.

    Raises
    ------
    MeasurementError
        if ``base`` (default: :data:`CREDIT_BASE_RULE_SET`'s plan) cannot be estimated.
    """
    graph = model.graph
    base = base if base is not None else make_plan(CREDIT_BASE_RULE_SET, model.mod, graph)
    base_ms = table.estimate(model, base).latency_ms
    credits = {}
    for name in shapes:
        for instance in shape_instances(graph, name):
            formed = form_shape(graph, base, name, instance)
            if formed is None:
                continue
            try:
                formed_ms = table.estimate(model, formed).latency_ms
            except MeasurementError:
                continue  # not schedulable here: it earns nothing
            credits[(name, instance)] = -math.log(formed_ms / base_ms)
    return credits


def credit_plan(table: KernelTable, model: Model, shapes: Sequence[str]) -> tuple[FusionPlan, int]:
    """:data:`CREDIT_BASE_RULE_SET`'s plan with every instance of positive credit formed, and
    how many were formed.

    Instances are formed one after another in graph order, each on the plan so far; one that
    can no longer be formed there (an earlier one took its nodes) is left out. The credits are
    each instance's worth alone, so the plan is a label built from them, not a search result:
    two paying instances need not pay together.

    Raises
    ------
    MeasurementError
        if the base plan cannot be estimated.
    """
    graph = model.graph
    base = make_plan(CREDIT_BASE_RULE_SET, model.mod, graph)
    plan, formed = base, 0
    credits = instance_credits(table, model, shapes, base)
    for (name, instance), credit in sorted(credits.items(), key=lambda kv: min(kv[0][1])):
        if credit <= 0:
            continue
        nxt = form_shape(graph, plan, name, instance)
        if nxt is not None:
            plan, formed = nxt, formed + 1
    return dataclasses.replace(plan, name="credit"), formed
