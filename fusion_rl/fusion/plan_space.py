"""The space of fusion plans of a graph: one-step neighbours and exhaustive enumeration.

Every plan here has *weakly connected* groups (a group of ops that share no edge gains nothing
from fusion), and every plan returned is legal (:func:`fusion_rl.fusion.legality.check_plan`).
The search baselines (:mod:`fusion_rl.baselines.search`) move through this space; the
exhaustive oracle enumerates it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Iterator

import numpy as np

from fusion_rl.errors import ConfigError
from fusion_rl.fusion.group_shapes import GROUP_SHAPES, shape_instances
from fusion_rl.fusion.legality import PATTERN_OPAQUE, check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph

#: Default cap on the number of connected partitions :func:`legal_plans` enumerates.
EXHAUSTIVE_LIMIT = 5000


def is_legal(graph: OpGraph, plan: FusionPlan) -> bool:
    """Whether ``plan`` passes every legality rule on ``graph``."""
    return check_plan(graph, plan).legal


# ---- one-step neighbours ---------------------------------------------------------------------


def merge_candidates(graph: OpGraph, plan: FusionPlan) -> list[FusionPlan]:
    """Every legal plan made by merging the two groups at the ends of one not-yet-fused edge.

    Deduplicated (two edges between the same groups give one candidate), in edge order.
    """
    group_of = plan.group_of()
    out: dict[str, FusionPlan] = {}
    for e in sorted(graph.edges, key=lambda e: (e.src, e.dst)):
        a, b = group_of[e.src], group_of[e.dst]
        if a == b:
            continue
        if PATTERN_OPAQUE in (graph.nodes[e.src].pattern, graph.nodes[e.dst].pattern):
            continue  # an opaque op never fuses (legality would reject it anyway)
        groups = [g for i, g in enumerate(plan.groups) if i not in (a, b)]
        groups.append(plan.groups[a] + plan.groups[b])
        cand = FusionPlan.from_groups(groups, plan.num_nodes, plan.fingerprint, "greedy")
        if cand.hash not in out and is_legal(graph, cand):
            out[cand.hash] = cand
    return list(out.values())


def shape_candidates(graph: OpGraph, plan: FusionPlan, shapes: Collection[str]) -> list[FusionPlan]:
    """Every legal plan made by forming one instance of a group shape that ``plan`` lacks
    (:func:`form_shape`), deduplicated, in instance order."""
    out: dict[str, FusionPlan] = {}
    for name in shapes:
        for instance in shape_instances(graph, name):
            cand = form_shape(graph, plan, name, instance)
            if cand is not None:
                out.setdefault(cand.hash, cand)
    return list(out.values())


def form_shape(graph: OpGraph, plan: FusionPlan, name: str, instance: tuple[int, ...]) -> FusionPlan | None:
    """``plan`` with ``instance`` of the group shape ``name`` formed, or ``None`` where ``plan``
    holds it in one group already or the result is illegal.

    A shape's group (for ``pointwise_depthwise``: a pointwise conv, its epilogue, the zero pad
    between and the depthwise conv, :func:`~fusion_rl.fusion.group_shapes.shape_instances`)
    is often no one-edge merge away: the depthwise conv's group also holds what follows it (a
    pooling), which the shape excludes, so the merge that would join the two anchors is masked
    and a merging search never reached the pair. Here the instance's nodes leave their groups,
    together with the ops that follow the second anchor in its group while the shape still
    holds (its epilogue); what is left of each group it touched stays as its weakly connected
    parts.
    """
    group_of = plan.group_of()
    if len({group_of[n] for n in instance}) == 1:
        return None
    shape, succ = GROUP_SHAPES[name], graph.successor_lists()
    members = set(instance)
    home = set(plan.groups[group_of[max(instance)]])
    frontier = [max(instance)]
    while frontier:
        for nxt in succ[frontier.pop()]:
            # The shape's predicate admits only injective ops past the anchors.
            if nxt in home and nxt not in members and shape(graph, sorted(members | {nxt})):
                members.add(nxt)
                frontier.append(nxt)
    touched = {group_of[n] for n in members}
    groups = [g for i, g in enumerate(plan.groups) if i not in touched]
    for i in touched:
        groups += connected_parts(set(plan.groups[i]) - members, graph)
    groups.append(tuple(sorted(members)))
    cand = FusionPlan.from_groups(groups, plan.num_nodes, plan.fingerprint, "greedy")
    return cand if is_legal(graph, cand) else None


def connected_parts(nodes: set[int], graph: OpGraph) -> list[tuple[int, ...]]:
    """``nodes`` split into its weakly connected parts (through edges between its members)."""
    adj: dict[int, set[int]] = {n: set() for n in nodes}
    for e in graph.edges:
        if e.src in nodes and e.dst in nodes:
            adj[e.src].add(e.dst)
            adj[e.dst].add(e.src)
    parts, left = [], set(nodes)
    while left:
        start = min(left)
        seen, stack = {start}, [start]
        while stack:
            for v in adj[stack.pop()] - seen:
                seen.add(v)
                stack.append(v)
        parts.append(tuple(sorted(seen)))
        left -= seen
    return parts


def peel_node(graph: OpGraph, plan: FusionPlan, rng: np.random.Generator) -> FusionPlan:
    """A neighbour of ``plan`` with one node of one fused group made a singleton.

    Returns ``plan`` itself when it has no fused group, or when the rest of the group would be
    illegal or not weakly connected (so every search stays inside the space of connected groups
    that :func:`exhaustive` enumerates); the caller treats that as no move.
    """
    fused = plan.fused_groups
    if not fused:
        return plan
    group = fused[int(rng.integers(len(fused)))]
    node = group[int(rng.integers(len(group)))]
    groups = [g for g in plan.groups if g != group]
    groups += [tuple(n for n in group if n != node), (node,)]
    cand = FusionPlan.from_groups(groups, plan.num_nodes, plan.fingerprint, "mutant")
    rest = set(group) - {node}
    return cand if is_connected(rest, graph) and is_legal(graph, cand) else plan


def is_connected(group: set[int], graph: OpGraph) -> bool:
    """Whether ``group`` is weakly connected through edges between its own members."""
    return len(connected_parts(set(group), graph)) == 1


# ---- enumeration ----------------------------------------------------------------------------


def iter_connected_partitions(graph: OpGraph) -> Iterator[FusionPlan]:
    """Every partition of the graph into weakly connected groups, each exactly once.

    Depth-first over the edges: each edge is either *contracted* (its ends share a group) or
    *cut* (its ends must end in different groups). An edge whose ends are already together has no
    choice, and a cut pair may never be merged later, so every partition arises from exactly one
    branch and no deduplication is needed. Groups with an opaque op are pruned early (they can
    never be legal). Convexity and cycles are *not* checked here: a group that is non-convex
    mid-way can become convex once more nodes join (the diamond), so see :func:`legal_plans`.
    """
    n = len(graph)
    edges = sorted({(min(e.src, e.dst), max(e.src, e.dst)) for e in graph.edges})
    opaque = {node.id for node in graph.nodes if node.pattern == PATTERN_OPAQUE}
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x  # no path compression: the DFS undoes unions by restoring one parent entry

    cut: set[tuple[int, int]] = set()

    def separated(a: int, b: int) -> bool:
        # Cut pairs are recorded on roots; check every recorded pair against the current roots.
        return any({find(x), find(y)} == {a, b} for x, y in cut)

    def rec(k: int) -> Iterator[FusionPlan]:
        if k == len(edges):
            yield FusionPlan.from_assignment([find(i) for i in range(n)], graph.fingerprint, "exhaustive")
            return
        u, v = edges[k]
        a, b = find(u), find(v)
        if a == b:
            yield from rec(k + 1)
            return
        if not (u in opaque or v in opaque) and not separated(a, b):
            parent[b] = a
            yield from rec(k + 1)
            parent[b] = b
        cut.add((u, v))
        yield from rec(k + 1)
        cut.discard((u, v))

    yield from rec(0)


def legal_plans(graph: OpGraph, limit: int = EXHAUSTIVE_LIMIT) -> list[FusionPlan]:
    """All legal plans whose groups are connected.

    Raises
    ------
    ConfigError
        when the graph has more than ``limit`` connected partitions (checked
        while enumerating, so a large graph fails fast instead of hanging).
    """
    plans = []
    for count, plan in enumerate(iter_connected_partitions(graph), start=1):
        if count > limit:
            raise ConfigError(
                f"{graph.name or 'this model'} has more than {limit} connected partitions "
                f"({len(graph)} ops, {len(graph.edges)} edges); enumerating them (the exhaustive "
                "oracle) is only for small graphs: raise the limit (max_plans) or use --algo "
                "greedy/annealing/random"
            )
        if is_legal(graph, plan):
            plans.append(plan)
    return plans
