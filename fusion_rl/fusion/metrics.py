"""Plan metrics reported beside latency (as Welder and Korch report fusion results)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph


@dataclass(frozen=True)
class PlanMetrics:
    num_kernels: int  #: kernels launched (groups)
    fused_groups: int  #: groups of two or more ops
    intermediate_bytes: int  #: bytes written to memory by one kernel and read by another
    bytes_kept_in_kernel: int  #: bytes that fusion keeps inside a kernel (never materialized)
    max_group_size: int
    multi_anchor_groups: int  #: groups with two or more conv/matmul

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def plan_metrics(graph: OpGraph, plan: FusionPlan) -> PlanMetrics:
    group_of = plan.group_of()
    crossing: dict[tuple[int, int], int] = {}
    internal: dict[tuple[int, int], int] = {}
    for e in graph.edges:
        # A tensor is written once however many consumers read it: key by (producer, output).
        target = crossing if group_of[e.src] != group_of[e.dst] else internal
        target[(e.src, e.index)] = e.bytes
    kept = {k: v for k, v in internal.items() if k not in crossing}
    return PlanMetrics(
        num_kernels=plan.num_groups,
        fused_groups=len(plan.fused_groups),
        intermediate_bytes=sum(crossing.values()),
        bytes_kept_in_kernel=sum(kept.values()),
        max_group_size=max((len(g) for g in plan.groups), default=0),
        multi_anchor_groups=sum(
            1 for g in plan.groups if sum(graph.nodes[i].is_mac_anchor for i in g) > 1
        ),
    )
