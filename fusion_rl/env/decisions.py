"""The per-edge decision process behind :class:`~fusion_rl.env.fusion_env.FusionEnv`, without Gym.

Edges are decided in topological order, sorted by (consumer, producer, tuple index). An edge
whose two ends already share a group is skipped (marked decided without asking). Fusing merges
the producer's group into the consumer's; the merged group is labelled by its smallest node id.

Legality is kept as an invariant: the partial plan is legal after every step (each group convex,
no opaque op in a fused group, the contracted group graph a DAG), so a fuse is legal exactly
when merging the two groups keeps the contracted graph acyclic and adds no opaque op. Because
the contracted graph is a DAG with an edge A -> B, the merge closes a cycle iff B is reachable
from A through some *other* group; that is one pruned search over groups, no full
:func:`~fusion_rl.fusion.legality.check_plan`. (An acyclic contracted graph implies every group
is convex: a path leaving a group and re-entering it would be a cycle of groups.)
"""

from __future__ import annotations

from collections import deque

import numpy as np

from fusion_rl.errors import IllegalPlanError, PlanMismatchError
from fusion_rl.fusion.legality import PATTERN_OPAQUE, reaches_via_other
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph


class DecisionProcess:
    """The state of one episode over one OpGraph: groups, decided edges, the current edge.

    :param graph: The model's OpGraph (node ids are in program order, so every edge goes from
        a smaller id to a larger one).
    :param max_mac_anchors: If set, also forbid a fuse that puts more conv/matmul anchors than
        this in one group (legal, but schedules break on them; DESIGN.md section 3).
    """

    def __init__(self, graph: OpGraph, max_mac_anchors: int | None = None) -> None:
        self.graph = graph
        self.max_mac_anchors = max_mac_anchors
        n = len(graph)
        self.num_nodes = n
        self.num_edges = len(graph.edges)
        self.src = np.array([e.src for e in graph.edges], dtype=np.int64)
        self.dst = np.array([e.dst for e in graph.edges], dtype=np.int64)
        #: Edge indices (into ``graph.edges``) in decision order.
        self.order: list[int] = sorted(
            range(self.num_edges), key=lambda k: (graph.edges[k].dst, graph.edges[k].src, graph.edges[k].index)
        )
        self._succ = graph.successor_lists()
        self._opaque = [node.pattern == PATTERN_OPAQUE for node in graph.nodes]
        self._mac = np.array([node.is_mac_anchor for node in graph.nodes], dtype=np.int64)
        self.reset()

    # ---- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the unfused plan with every edge undecided."""
        self.label = np.arange(self.num_nodes, dtype=np.int64)  #: group label per node
        self.members: dict[int, list[int]] = {i: [i] for i in range(self.num_nodes)}
        self.decided = np.zeros(self.num_edges, dtype=bool)
        self.steps = 0  #: decisions taken (skipped edges are not decisions)
        self._pos = 0
        self.current: int | None = None  #: edge index being decided; None when done
        self._fuse_ok = False
        self._advance()

    @property
    def done(self) -> bool:
        return self.current is None

    def can_fuse(self) -> bool:
        """Whether fusing the current edge keeps the plan legal (False when done)."""
        return self._fuse_ok

    def group_members(self, node: int) -> tuple[int, ...]:
        return tuple(self.members[int(self.label[node])])

    def plan(self, name: str = "env") -> FusionPlan:
        """The (partial) plan so far; undecided edges count as kept apart."""
        return FusionPlan.from_assignment(self.label.tolist(), self.graph.fingerprint, name)

    # ---- transitions -----------------------------------------------------------------------
    def decide(self, fuse: bool) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Decide the current edge; returns the two merged groups (producer's, consumer's) if it
        fused, else None.

        :raises IllegalPlanError: when done, or when ``fuse`` is asked where :meth:`can_fuse`
            is False (the env turns that into a penalized keep before calling this).
        """
        if self.current is None:
            raise IllegalPlanError("no edge left to decide; reset the decision process")
        k = self.current
        merged = None
        if fuse:
            if not self._fuse_ok:
                raise IllegalPlanError(
                    f"fusing edge {int(self.src[k])} -> {int(self.dst[k])} would make the plan illegal"
                )
            merged = self._merge(int(self.label[self.src[k]]), int(self.label[self.dst[k]]))
        self.decided[k] = True
        self.steps += 1
        self._pos += 1
        self._advance()
        return merged

    def _merge(self, a: int, b: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        group_a, group_b = self.members.pop(a), self.members.pop(b)
        merged = sorted(group_a + group_b)
        new = merged[0]
        self.members[new] = merged
        self.label[merged] = new
        return tuple(group_a), tuple(group_b)

    def _advance(self) -> None:
        """Move to the next edge whose ends are in different groups, skipping the others."""
        while self._pos < len(self.order):
            k = self.order[self._pos]
            if self.label[self.src[k]] == self.label[self.dst[k]]:
                self.decided[k] = True
                self._pos += 1
                continue
            self.current = k
            self._fuse_ok = self._legal_merge(k)
            return
        self.current = None
        self._fuse_ok = False

    # ---- legality --------------------------------------------------------------------------
    def _legal_merge(self, k: int) -> bool:
        s, d = int(self.src[k]), int(self.dst[k])
        if self._opaque[s] or self._opaque[d]:
            return False  # opaque ops are always singletons, so only the two ends can be opaque
        a, b = int(self.label[s]), int(self.label[d])
        if self.max_mac_anchors is not None:
            macs = int(self._mac[self.members[a]].sum() + self._mac[self.members[b]].sum())
            if macs > self.max_mac_anchors:
                return False
        return not self._reaches_via_other(a, b)

    def _reaches_via_other(self, a: int, b: int) -> bool:
        return reaches_via_other(self._succ, self.label, self.members, a, b)


def actions_for_plan(graph: OpGraph, plan: FusionPlan, max_mac_anchors: int | None = None) -> list[int]:
    """The actions (0 keep, 1 fuse) that drive a :class:`DecisionProcess` to ``plan``.

    Fuse an edge iff both ends are in one group of ``plan``. This reaches every legal plan whose
    groups are connected subgraphs (rule sets, FuseOps): deciding edges by consumer order keeps
    each partial group a convex piece of its final group.

    :raises PlanMismatchError: if the plan is for another model.
    :raises IllegalPlanError: if a needed fuse is masked (illegal plan, or over
        ``max_mac_anchors``) or a group is not connected (unreachable by edge merges).
    """
    if plan.num_nodes != len(graph) or (plan.fingerprint and plan.fingerprint != graph.fingerprint):
        raise PlanMismatchError(
            f"plan {plan.hash} ({plan.num_nodes} nodes) is not for {graph.name or 'this model'} "
            f"({len(graph)} nodes, fingerprint {graph.fingerprint})"
        )
    target = plan.group_of()
    process = DecisionProcess(graph, max_mac_anchors)
    actions: list[int] = []
    while not process.done:
        k = process.current
        fuse = target[int(process.src[k])] == target[int(process.dst[k])]
        if fuse and not process.can_fuse():
            raise IllegalPlanError(
                f"plan {plan.hash} is not reachable: fusing edge {int(process.src[k])} -> "
                f"{int(process.dst[k])} is masked (illegal, or over max_mac_anchors)"
            )
        actions.append(int(fuse))
        process.decide(fuse)
    if process.plan().hash != plan.hash:
        raise IllegalPlanError(
            f"plan {plan.hash} is not reachable by edge merges: some group is not a connected subgraph"
        )
    return actions
