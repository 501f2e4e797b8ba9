"""Map per-kernel times back to plan groups (for kernel-level rewards and cost models)."""

from __future__ import annotations

from collections import defaultdict

from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph


def group_signature(graph: OpGraph, group: tuple[int, ...]) -> tuple:
    """What makes two groups the same kernel: their callees (LegalizeOps shares one PrimFunc
    between identical ops, so equal callees mean equal ops, shapes and dtypes), wired alike."""
    index = {n: i for i, n in enumerate(group)}
    members = tuple(graph.nodes[n].callee for n in group)
    inside = tuple(sorted((index[e.src], index[e.dst], e.index) for e in graph.edges
                          if e.src in index and e.dst in index))
    return members, inside


def group_kernel_times(
    graph: OpGraph, plan: FusionPlan, kernel_times_ms: dict[str, float]
) -> dict[tuple[int, ...], float]:
    """ms of each group's kernel, from :func:`fusion_rl.compiler.timing.kernel_times`.

    A fused group's kernel is named ``..._n<first node>`` (see
    :func:`fusion_rl.fusion.apply.group_function_name`); a singleton runs its op's PrimFunc.
    Identical kernels are shared (LegalizeOps shares PrimFuncs between identical ops, FuseTIR
    merges identical fused kernels), so only one name carries their summed time: it is split
    evenly between the groups with the same signature, which run the same code on the same
    sizes. A group with no kernel time (a reshape the VM turned into a view) gets 0.
    """
    by_first = {}
    for name, ms in kernel_times_ms.items():
        if name.startswith("fused_") and "_n" in name:
            try:
                by_first[int(name.rsplit("_n", 1)[1])] = ms
            except ValueError:
                pass
    pooled: dict[tuple, float] = defaultdict(float)
    members: dict[tuple, int] = defaultdict(int)
    seen_callees: set[str] = set()
    for group in plan.groups:
        sig = group_signature(graph, group)
        members[sig] += 1
        if len(group) > 1:
            pooled[sig] += float(by_first.get(group[0], 0.0))
        else:
            callee = graph.nodes[group[0]].callee
            if callee not in seen_callees:  # a shared PrimFunc's time is summed over its calls
                seen_callees.add(callee)
                pooled[sig] += float(kernel_times_ms.get(callee, 0.0))
    return {g: pooled[group_signature(graph, g)] / members[group_signature(graph, g)] for g in plan.groups}
