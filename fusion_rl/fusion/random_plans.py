"""Random *legal* plans: for tests, plan fuzzing and the random-search baseline.

A plan is grown by contracting edges in random order, each accepted with probability
``merge_prob`` if the merged group stays convex and opaque-free. ``merge_prob`` near 0 gives
near-unfused plans, near 1 gives near-maximal groups, so sweeping it covers small groups, large
groups and plans at the legality boundary (every rejected merge was one step from illegal).
"""

from __future__ import annotations

import numpy as np

from fusion_rl.fusion.legality import PATTERN_OPAQUE, is_convex
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph


def random_plan(
    graph: OpGraph,
    rng: np.random.Generator,
    merge_prob: float | None = None,
    start: FusionPlan | None = None,
    max_anchors: int | None = None,
) -> FusionPlan:
    """A random legal plan; ``start`` (a legal plan) is grown further if given.

    ``merge_prob=None`` draws it uniformly from [0, 1] per plan. ``max_anchors`` caps the
    conv/matmul anchors per group (``None``: no cap).
    """
    p = float(rng.uniform()) if merge_prob is None else merge_prob
    owner = start.group_of() if start is not None else list(range(len(graph)))
    members: dict[int, set[int]] = {}
    for n, g in enumerate(owner):
        members.setdefault(g, set()).add(n)
    macs = {g: sum(graph.nodes[n].is_mac_anchor for n in ms) for g, ms in members.items()}
    for k in rng.permutation(len(graph.edges)):
        e = graph.edges[int(k)]
        a, b = owner[e.src], owner[e.dst]
        if a == b or rng.uniform() >= p:
            continue
        if PATTERN_OPAQUE in (graph.nodes[e.src].pattern, graph.nodes[e.dst].pattern):
            continue
        if max_anchors is not None and macs[a] + macs[b] > max_anchors:
            continue
        merged = members[a] | members[b]
        if not is_convex(merged, graph):
            continue
        for n in members[b]:
            owner[n] = a
        members[a] = merged
        macs[a] += macs.pop(b)
        del members[b]
    return FusionPlan.from_assignment(owner, graph.fingerprint, "random")


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
