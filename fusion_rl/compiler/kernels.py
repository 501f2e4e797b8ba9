"""Map per-kernel times back to plan groups (for kernel-level rewards and cost models)."""

from __future__ import annotations

from collections import Counter

from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph


def group_kernel_times(
    graph: OpGraph, plan: FusionPlan, kernel_times_ms: dict[str, float]
) -> dict[tuple[int, ...], float]:
    """ms of each group's kernel, from :func:`fusion_rl.compiler.timing.kernel_times`.

    A fused group's kernel is named ``..._n<first node>`` (see
    :func:`fusion_rl.fusion.apply.group_function_name`). A singleton runs its op's own PrimFunc,
    which LegalizeOps shares between identical ops (same op, same shapes): their summed time is
    split evenly between them, as they run the same code on the same sizes. A group with no
    kernel time (a reshape the VM turned into a view) gets 0.
    """
    by_suffix = {}
    for name, ms in kernel_times_ms.items():
        if name.startswith("fused_") and "_n" in name:
            try:
                by_suffix[int(name.rsplit("_n", 1)[1])] = ms
            except ValueError:
                pass
    singles = [g for g in plan.groups if len(g) == 1]
    shared = Counter(graph.nodes[g[0]].callee for g in singles)
    out: dict[tuple[int, ...], float] = {}
    for group in plan.groups:
        if len(group) > 1:
            out[group] = float(by_suffix.get(group[0], 0.0))
        else:
            callee = graph.nodes[group[0]].callee
            out[group] = float(kernel_times_ms.get(callee, 0.0)) / shared[callee]
    return out
