"""Legality of a fusion plan, checked on the OpGraph before anything is built.

The policy proposes, legality disposes (as in MLGO): these checks are what FuseTIR and the build
really reject, so a plan that passes them compiles, and one that fails them would not.

Errors (the plan is rejected):

- ``partition``: a node in no group, in two groups, or out of range;
- ``mismatch``: the plan was made for a model with another fingerprint;
- ``non_convex``: a path leaves the group and re-enters it, so the fused kernel would need its
  own output before it could run;
- ``cycle``: groups that depend on each other (the contracted graph is not a DAG);
- ``opaque``: an opaque kernel (pattern kind 8) shares a group. This rule is *conservative*:
  the legality fuzz (``fusion_rl.fuzz``) built and verified 42 plans it rejects, all fusing
  ``take`` (the only opaque op in the zoo, opaque because its indices are data). It stays
  because no schedule provider schedules opaque blocks, so fusing them only costs; externally
  called kernels without a single root block would really fail in FuseTIR.

Warnings (legal, but measured to be dangerous; docs/design.md §12):

- ``multi_anchor``: two or more multiply-accumulate anchors (conv/matmul) in one group.
  MetaSchedule's anchor-trace application fails on them and its fallbacks were 12x slower or
  numerically wrong; dlight ran one 80x slower.
- ``multi_reduction``: two or more reductions (softmax, layernorm) in one group.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from fusion_rl.errors import IllegalPlanError, PlanMismatchError
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph

PATTERN_OPAQUE = 8


@dataclass(frozen=True)
class Violation:
    """One broken (error) or risky (warning) rule, for one group."""

    rule: str
    group: int
    message: str

    def __str__(self) -> str:
        return f"group {self.group}: {self.rule}: {self.message}"


@dataclass
class LegalityReport:
    errors: list[Violation] = field(default_factory=list)
    warnings: list[Violation] = field(default_factory=list)

    @property
    def legal(self) -> bool:
        return not self.errors

    def raise_if_illegal(self) -> None:
        if self.errors:
            first = self.errors[0]
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            exc = PlanMismatchError if first.rule == "mismatch" else IllegalPlanError
            raise exc(f"illegal plan: {first}{more}")

    def to_dict(self) -> dict:
        return {
            "legal": self.legal,
            "errors": [vars(v) for v in self.errors],
            "warnings": [vars(v) for v in self.warnings],
        }


def check_plan(graph: OpGraph, plan: FusionPlan) -> LegalityReport:
    """Check every rule of the module docstring; never raises for an illegal plan."""
    report = LegalityReport()
    if plan.fingerprint and plan.fingerprint != graph.fingerprint:
        report.errors.append(
            Violation(
                "mismatch",
                -1,
                f"plan is for model {plan.fingerprint}, not {graph.name or 'this model'} "
                f"({graph.fingerprint})",
            )
        )
        return report
    if plan.num_nodes != len(graph):
        report.errors.append(
            Violation(
                "mismatch", -1, f"plan has {plan.num_nodes} nodes, the model has {len(graph)}"
            )
        )
        return report

    group_of = plan.group_of()
    succ = graph.successor_lists()
    for gi, group in enumerate(plan.groups):
        if len(group) == 1:
            continue
        nodes = [graph.nodes[i] for i in group]
        opaque = [n.id for n in nodes if n.pattern == PATTERN_OPAQUE]
        if opaque:
            report.errors.append(
                Violation("opaque", gi, f"opaque op(s) {opaque} cannot be fused with others")
            )
        reentry = _reentry_path(set(group), succ)
        if reentry is not None:
            report.errors.append(
                Violation(
                    "non_convex",
                    gi,
                    f"path {' -> '.join(map(str, reentry))} leaves the group and re-enters it",
                )
            )
        macs = [n.id for n in nodes if n.is_mac_anchor]
        if len(macs) > 1:
            report.warnings.append(
                Violation("multi_anchor", gi, f"{len(macs)} conv/matmul anchors {macs}")
            )
        reductions = [n.id for n in nodes if n.is_anchor and not n.is_mac_anchor]
        if len(reductions) > 1:
            report.warnings.append(
                Violation("multi_reduction", gi, f"{len(reductions)} reductions {reductions}")
            )
    if not any(v.rule == "non_convex" for v in report.errors):
        cycle = _quotient_cycle(plan.num_groups, group_of, graph)
        if cycle is not None:
            report.errors.append(
                Violation(
                    "cycle",
                    cycle[0],
                    f"groups {' -> '.join(map(str, cycle))} depend on each other",
                )
            )
    return report


def require_legal(graph: OpGraph, plan: FusionPlan) -> LegalityReport:
    """:func:`check_plan`, raising :class:`IllegalPlanError` naming the first violation."""
    report = check_plan(graph, plan)
    report.raise_if_illegal()
    return report


def reaches_via_other(
    succ: list[list[int]], label, members: dict[int, list[int]], a: int, b: int
) -> bool:
    """Does group ``a`` reach group ``b`` through at least one other group?

    For a legal plan and an edge from group ``a`` to group ``b``, merging them is legal exactly
    when this is False: a path a -> other -> b would make the merged group non-convex or create
    a cycle between groups. (A path b -> ... -> a cannot exist: with the edge a -> b it would
    already be a cycle.) ``label`` maps node -> group, ``members`` group -> nodes.

    The search runs over groups, not nodes, and cannot be pruned by node order: a path may
    enter a group through a late node and leave it through an early one.
    """
    seen: set[int] = {a, b}
    queue: deque[int] = deque()
    for u in members[a]:
        for v in succ[u]:
            h = int(label[v])
            if h not in seen:
                seen.add(h)
                queue.append(h)
    while queue:
        g = queue.popleft()
        for u in members[g]:
            for v in succ[u]:
                h = int(label[v])
                if h == b:
                    return True
                if h not in seen:
                    seen.add(h)
                    queue.append(h)
    return False


def is_convex(group: Iterable[int], graph: OpGraph) -> bool:
    """True if no path leaves ``group`` and comes back (for many groups of one graph, build
    :func:`convexity_test` once)."""
    return convexity_test(graph)(group)


def convexity_test(graph: OpGraph) -> Callable[[Iterable[int]], bool]:
    """A predicate: is a group of ``graph`` convex? It answers from reachability sets built once
    (one bit mask per node), not from a walk per group. :func:`check_plan` walks instead, because
    it names the path that leaves and re-enters.

    A group is non-convex exactly when one of its outside successors reaches back into it.
    Nodes are numbered in topological order (:mod:`fusion_rl.graph.opgraph`), so one pass
    from the last node to the first builds every node's set.
    """
    succ = graph.successor_lists()
    reach = [0] * len(succ)
    for u in range(len(succ) - 1, -1, -1):
        mask = 1 << u
        for v in succ[u]:
            mask |= reach[v]
        reach[u] = mask

    def convex(group: Iterable[int]) -> bool:
        members = set(group)
        inside = sum(1 << u for u in members)
        return not any(reach[v] & inside for u in members for v in succ[u] if v not in members)

    return convex


# --------------------------------------------------------------------------------------------


def _reentry_path(group: set[int], succ: list[list[int]]) -> list[int] | None:
    """A path group -> outside ... -> group, or None. BFS from the group's outside successors."""
    parent: dict[int, int] = {}
    queue: deque[int] = deque()
    for u in group:
        for v in succ[u]:
            if v not in group and v not in parent:
                parent[v] = u
                queue.append(v)
    while queue:
        u = queue.popleft()
        for v in succ[u]:
            if v in group:
                path = [v, u]
                while path[-1] not in group:
                    path.append(parent[path[-1]])
                return path[::-1]
            if v not in parent:
                parent[v] = u
                queue.append(v)
    return None


def _quotient_cycle(num_groups: int, group_of: list[int], graph: OpGraph) -> list[int] | None:
    """A cycle in the contracted (group) graph, or None (Kahn's algorithm, then a walk)."""
    succ: list[set[int]] = [set() for _ in range(num_groups)]
    for e in graph.edges:
        a, b = group_of[e.src], group_of[e.dst]
        if a != b:
            succ[a].add(b)
    indeg = [0] * num_groups
    for a in range(num_groups):
        for b in succ[a]:
            indeg[b] += 1
    queue = deque(g for g in range(num_groups) if indeg[g] == 0)
    done = 0
    while queue:
        a = queue.popleft()
        done += 1
        for b in succ[a]:
            indeg[b] -= 1
            if indeg[b] == 0:
                queue.append(b)
    if done == num_groups:
        return None
    # Every group Kahn's algorithm left has a predecessor that it also left (its in-degree
    # counts only those), so walking *predecessors* inside the remainder must revisit a group,
    # and the revisited stretch is a cycle. Walking successors is not safe: a remaining group
    # downstream of a cycle can have no remaining successor.
    remaining = {g for g in range(num_groups) if indeg[g] > 0}
    pred: dict[int, list[int]] = {g: [] for g in remaining}
    for a in remaining:
        for b in succ[a]:
            if b in remaining:
                pred[b].append(a)
    walk = [min(remaining)]
    position = {walk[0]: 0}
    while True:
        prev = min(pred[walk[-1]])
        if prev in position:
            cycle = walk[position[prev]:]  # each entry's successor precedes it in the walk
            cycle.reverse()
            return cycle + [cycle[0]]
        position[prev] = len(walk)
        walk.append(prev)


def topological_group_order(plan: FusionPlan, graph: OpGraph) -> list[int]:
    """Group indices in a dependency order, ties broken by first node id (program order)."""
    import heapq

    group_of = plan.group_of()
    succ: list[set[int]] = [set() for _ in range(plan.num_groups)]
    for e in graph.edges:
        a, b = group_of[e.src], group_of[e.dst]
        if a != b:
            succ[a].add(b)
    indeg = [0] * plan.num_groups
    for a in range(plan.num_groups):
        for b in succ[a]:
            indeg[b] += 1
    heap = [(plan.groups[g][0], g) for g in range(plan.num_groups) if indeg[g] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, a = heapq.heappop(heap)
        order.append(a)
        for b in succ[a]:
            indeg[b] -= 1
            if indeg[b] == 0:
                heapq.heappush(heap, (plan.groups[b][0], b))
    if len(order) != plan.num_groups:
        raise IllegalPlanError("illegal plan: the groups form a cycle")
    return order
