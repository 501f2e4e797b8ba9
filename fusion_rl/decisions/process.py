"""The per-edge decision process: the one state machine behind training, evaluation and the plugin.

:class:`~fusion_rl.env.fusion_env.FusionEnv` (training, ``FusionEnv.decide`` in evaluation) and
:class:`~fusion_rl.export.passes.LearnedPlanner` (``plan --policy``, ``LearnedFusion``) both step
a :class:`DecisionProcess` built with the same :class:`DecisionOptions`, so a policy sees the same
states and the same masks wherever it runs. No gymnasium here.

Edges are decided in topological order, sorted by (consumer, producer, tuple index). An edge
whose two ends already share a group is skipped (marked decided without asking), and so is a
legal epilogue edge under ``prefuse_epilogues``, which is fused. Fusing merges
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

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from fusion_rl.errors import ConfigError, IllegalPlanError, PlanMismatchError
from fusion_rl.fusion.epilogues import epilogue_edges
from fusion_rl.fusion.group_shapes import check_shape_names, matches_shape
from fusion_rl.fusion.legality import PATTERN_OPAQUE, reaches_via_other
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph


@dataclass(frozen=True)
class DecisionOptions:
    """Every constraint and mask option of a :class:`DecisionProcess` beyond plan legality.

    A policy has only learned to decide under the masks it was trained with, so these options
    travel with it: the env spec sets them for training and evaluation
    (:attr:`fusion_rl.env.spec.EnvSpec.decision_options`), the exporter writes them to the
    policy card's ``decisions`` field, and :class:`~fusion_rl.export.passes.LearnedPlanner`
    reads them back. A new option added here reaches all three through :meth:`to_dict` /
    :meth:`from_dict`.

    Parameters
    ----------
    max_mac_anchors : int or None
        If set, forbid a fuse that puts more conv/matmul anchors than this in one group (legal,
        but a schedule provider runs such a kernel anchor by anchor; docs/design.md §12), unless
        the group is one of ``group_shapes``. ``None``: no cap.
    group_shapes : tuple of str
        Multi-anchor group shapes allowed past the cap (:mod:`fusion_rl.fusion.group_shapes`):
        the shapes the schedule provider declares it schedules as one kernel. Needs a cap.
    prefuse_epilogues : bool
        Fuse every epilogue edge (:func:`~fusion_rl.fusion.epilogues.epilogue_edges`: a
        conv/matmul's elementwise epilogue and elementwise chains, the ``tensorrt`` rule) when
        the process reaches it and the fuse is legal, without asking; the policy decides the
        rest. Every rule set fuses these edges on the bench models, so a policy that decides
        them can only under-fuse there; but taking them away changes the states of the other
        decisions too (docs/design.md §9 has what it did to transfer).
    """

    max_mac_anchors: int | None = None
    group_shapes: tuple[str, ...] = ()
    prefuse_epilogues: bool = False

    #: Options a card may lack, with the value that reproduces the planner that wrote it: a
    #: policy exported before the option existed decided without it.
    _ADDED_LATER: ClassVar[Mapping[str, Any]] = MappingProxyType({"group_shapes": (), "prefuse_epilogues": False})

    def __post_init__(self) -> None:
        v = self.max_mac_anchors
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"decision option 'max_mac_anchors' must be an int >= 1 or null, got {v!r}")
        shapes = self.group_shapes
        if isinstance(shapes, str) or not isinstance(shapes, (list, tuple)):
            raise ConfigError(f"decision option 'group_shapes' must be a list of shape names, got {shapes!r}")
        object.__setattr__(self, "group_shapes", check_shape_names(shapes, "decision option 'group_shapes'"))
        if self.group_shapes and v is None:
            raise ConfigError("decision option 'group_shapes' needs 'max_mac_anchors': without a cap every group is allowed")
        if not isinstance(self.prefuse_epilogues, bool):
            raise ConfigError(f"decision option 'prefuse_epilogues' must be true or false, got {self.prefuse_epilogues!r}")

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready mapping (every field, ``None`` included)."""
        out = asdict(self)
        out["group_shapes"] = list(self.group_shapes)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "decision options") -> DecisionOptions:
        """Options from :meth:`to_dict`'s mapping, strictly.

        Every field must be present: an option that is not recorded is not known, and guessing
        it is how a policy ends up deciding under masks it was never trained with.

        Raises
        ------
        ConfigError
            If ``data`` is not a mapping, lacks a field, has an unknown key or a bad value.
        """
        names = [f.name for f in fields(cls)]
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping with keys {names}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown decision option {unknown[0]!r}; valid: {', '.join(names)}")
        missing = [n for n in names if n not in data and n not in cls._ADDED_LATER]
        if missing:
            raise ConfigError(f"{source}: decision option {missing[0]!r} is not recorded")
        try:
            return cls(**{n: data.get(n, cls._ADDED_LATER.get(n)) for n in names})
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


class DecisionProcess:
    """The state of one episode over one OpGraph: groups, decided edges, the current edge.

    Parameters
    ----------
    graph : OpGraph
        The model's OpGraph (node ids are in program order, so every edge goes from a smaller id
        to a larger one).
    options : DecisionOptions
        Masks beyond legality (default: none).
    """

    def __init__(self, graph: OpGraph, options: DecisionOptions = DecisionOptions()) -> None:
        self.graph = graph
        self.options = options
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
        self._prefused = np.zeros(self.num_edges, dtype=bool)
        if options.prefuse_epilogues:
            self._prefused[epilogue_edges(graph)] = True
        self.reset()

    # ---- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the unfused plan with every edge undecided."""
        self.label = np.arange(self.num_nodes, dtype=np.int64)  #: group label per node
        self.members: dict[int, list[int]] = {i: [i] for i in range(self.num_nodes)}
        self.decided = np.zeros(self.num_edges, dtype=bool)
        self.steps = 0  #: decisions taken (skipped and prefused edges are not decisions)
        self.prefused: list[int] = []  #: edges fused without asking (``prefuse_epilogues``)
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

        Raises
        ------
        IllegalPlanError
            when done, or when ``fuse`` is asked where :meth:`can_fuse`
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
        """Move to the next edge whose ends are in different groups, skipping the others and
        fusing the legal prefused ones (a masked prefused edge is asked as usual: only keep)."""
        while self._pos < len(self.order):
            k = self.order[self._pos]
            if self.label[self.src[k]] == self.label[self.dst[k]]:
                self.decided[k] = True
                self._pos += 1
                continue
            legal = self._legal_merge(k)
            if legal and self._prefused[k]:
                self._merge(int(self.label[self.src[k]]), int(self.label[self.dst[k]]))
                self.prefused.append(k)
                self.decided[k] = True
                self._pos += 1
                continue
            self.current = k
            self._fuse_ok = legal
            return
        self.current = None
        self._fuse_ok = False

    # ---- legality --------------------------------------------------------------------------
    def _legal_merge(self, k: int) -> bool:
        s, d = int(self.src[k]), int(self.dst[k])
        if self._opaque[s] or self._opaque[d]:
            return False  # opaque ops are always singletons, so only the two ends can be opaque
        a, b = int(self.label[s]), int(self.label[d])
        cap = self.options.max_mac_anchors
        if cap is not None:
            macs = int(self._mac[self.members[a]].sum() + self._mac[self.members[b]].sum())
            if macs > cap and not matches_shape(
                self.graph, [*self.members[a], *self.members[b]], self.options.group_shapes
            ):
                return False
        return not self._reaches_via_other(a, b)

    def _reaches_via_other(self, a: int, b: int) -> bool:
        return reaches_via_other(self._succ, self.label, self.members, a, b)


def actions_for_plan(graph: OpGraph, plan: FusionPlan, options: DecisionOptions = DecisionOptions()) -> list[int]:
    """The actions (0 keep, 1 fuse) that drive a :class:`DecisionProcess` to ``plan``.

    Fuse an edge iff both ends are in one group of ``plan``. This reaches every legal plan whose
    groups are connected subgraphs (rule sets, FuseOps): deciding edges by consumer order keeps
    each partial group a convex piece of its final group.

    Raises
    ------
    PlanMismatchError
        if the plan is for another model.
    IllegalPlanError
        if a needed fuse is masked (illegal plan, or over
        ``options.max_mac_anchors``), a group is not connected (unreachable by edge merges), or
        the plan keeps apart an epilogue edge that ``options.prefuse_epilogues`` fuses.
    """
    if plan.num_nodes != len(graph) or (plan.fingerprint and plan.fingerprint != graph.fingerprint):
        raise PlanMismatchError(
            f"plan {plan.hash} ({plan.num_nodes} nodes) is not for {graph.name or 'this model'} "
            f"({len(graph)} nodes, fingerprint {graph.fingerprint})"
        )
    target = plan.group_of()
    process = DecisionProcess(graph, options)
    actions: list[int] = []
    while not process.done:
        k = process.current
        fuse = target[int(process.src[k])] == target[int(process.dst[k])]
        if fuse and not process.can_fuse():
            raise IllegalPlanError(
                f"plan {plan.hash} is not reachable: fusing edge {int(process.src[k])} -> "
                f"{int(process.dst[k])} is masked (illegal, or over max_mac_anchors and no declared group shape)"
            )
        actions.append(int(fuse))
        process.decide(fuse)
    if process.plan().hash != plan.hash:
        split = [k for k in process.prefused if target[int(process.src[k])] != target[int(process.dst[k])]]
        if split:
            raise IllegalPlanError(
                f"plan {plan.hash} is not reachable: it keeps apart the epilogue edge "
                f"{int(process.src[split[0]])} -> {int(process.dst[split[0]])}, which prefuse_epilogues fuses"
            )
        raise IllegalPlanError(
            f"plan {plan.hash} is not reachable by edge merges: some group is not a connected subgraph"
        )
    return actions
