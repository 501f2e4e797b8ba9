"""Random *legal* plans: for tests, plan fuzzing and the random-search baseline.

A plan is grown by contracting edges in random order, each accepted with probability
``merge_prob`` if the merged group stays convex and opaque-free. ``merge_prob`` near 0 gives
near-unfused plans, near 1 gives near-maximal groups, so sweeping it covers small groups, large
groups and plans at the legality boundary (every rejected merge was one step from illegal).
"""

from __future__ import annotations

from typing import Callable, Collection, Iterable

import numpy as np

from fusion_rl.fusion.group_shapes import matches_shape
from fusion_rl.fusion.legality import PATTERN_OPAQUE, reaches_via_other
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph


def grow_plan(
    graph: OpGraph,
    edge_order: Iterable[int],
    accept: Callable[[], bool] = lambda: True,
    start: FusionPlan | None = None,
    max_anchors: int | None = None,
    name: str = "grown",
    shapes: Collection[str] = (),
) -> FusionPlan:
    """Merge along the edges in ``edge_order`` (indices into ``graph.edges``) whenever the merge
    keeps the plan legal and ``accept()`` says yes. ``start`` must be legal; so is the result.

    Legal merges: neither end opaque, at most ``max_anchors`` conv/matmul per group unless the
    merged group is one of ``shapes`` (:mod:`~fusion_rl.fusion.group_shapes`), and no path
    between the two groups through a third one (:func:`~fusion_rl.fusion.legality.reaches_via_other`).
    """
    succ = graph.successor_lists()
    label = list(range(len(graph)))
    members: dict[int, list[int]] = {n: [n] for n in range(len(graph))}
    if start is not None:
        members = {g[0]: list(g) for g in start.groups}
        for g in start.groups:
            for n in g:
                label[n] = g[0]
    macs = {g: sum(graph.nodes[n].is_mac_anchor for n in ms) for g, ms in members.items()}
    for k in edge_order:
        e = graph.edges[int(k)]
        a, b = label[e.src], label[e.dst]
        if a == b or not accept():
            continue
        if PATTERN_OPAQUE in (graph.nodes[e.src].pattern, graph.nodes[e.dst].pattern):
            continue
        if (max_anchors is not None and macs[a] + macs[b] > max_anchors
                and not matches_shape(graph, members[a] + members[b], shapes)):
            continue
        if reaches_via_other(succ, label, members, a, b):
            continue
        keep, gone = min(a, b), max(a, b)  # labels stay the smallest node id of each group
        for n in members[gone]:
            label[n] = keep
        members[keep] = members[keep] + members.pop(gone)
        macs[keep] = macs[keep] + macs.pop(gone)
    return FusionPlan.from_assignment(label, graph.fingerprint, name)


def random_plan(
    graph: OpGraph,
    rng: np.random.Generator,
    merge_prob: float | None = None,
    start: FusionPlan | None = None,
    max_anchors: int | None = None,
    shapes: Collection[str] = (),
) -> FusionPlan:
    """A random legal plan; ``start`` (a legal plan) is grown further if given.

    ``merge_prob=None`` draws it uniformly from [0, 1] per plan. ``max_anchors`` caps the
    conv/matmul anchors per group (``None``: no cap) except in a group of one of ``shapes``.
    """
    p = float(rng.uniform()) if merge_prob is None else merge_prob
    order = rng.permutation(len(graph.edges))
    return grow_plan(graph, order, lambda: bool(rng.uniform() < p), start, max_anchors, "random", shapes)


def mutate_plan(graph: OpGraph, plan: FusionPlan, rng: np.random.Generator) -> FusionPlan:
    """A legal neighbour of ``plan``: split one fused group, or merge along one more edge."""
    fused = plan.fused_groups
    if fused and rng.uniform() < 0.5:
        victim = fused[int(rng.integers(len(fused)))]
        groups = [g for g in plan.groups if g != victim]
        # Splitting into singletons keeps legality: every piece of a convex group is a node.
        groups.extend((n,) for n in victim)
        return FusionPlan.from_groups(groups, plan.num_nodes, plan.fingerprint, "mutant")
    grown = random_plan(graph, rng, merge_prob=1.0 / max(1, len(graph.edges)) * 3, start=plan)
    return grown.with_name("mutant")
