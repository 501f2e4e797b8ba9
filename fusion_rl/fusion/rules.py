"""Hand-written fusion rule sets, expressed as plan generators.

Every baseline lives in the same representation as a learned plan (a :class:`FusionPlan`), so
all of them are applied, compiled and measured by exactly the same code.

- ``unfused``: one kernel per operator.
- ``tvm``: TVM's own ``relax.transform.FuseOps``, read back group for group.
- ``tensorrt``: conv/matmul + bias + activation epilogues, and elementwise chains
  (what TensorRT-style engines fuse).
- ``aggressive``: the largest legal groups, merged greedily along edges (no anchor cap).
- ``aggressive_1anchor``: the same greedy merge with at most one conv/matmul anchor per group,
  the fusion TVM-style schedules are built for. It is exactly the plan a policy makes that
  answers "fuse" on every decision under ``max_mac_anchors: 1``, so a learned policy trained
  with that mask has *collapsed* to a fixed rule when its plans equal this one (or
  ``aggressive`` without the mask); :mod:`fusion_rl.evaluate` reports that.
- ``aggressive_shapes``: ``aggressive_1anchor``, except that a group may also be any named
  multi-anchor shape of :mod:`fusion_rl.fusion.group_shapes` (a pointwise conv with the
  depthwise conv it feeds). The plan of "fuse on every decision" under ``max_mac_anchors: 1``
  with every shape declared.
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax

from fusion_rl.errors import ConfigError
from fusion_rl.fusion.epilogues import epilogue_edges
from fusion_rl.fusion.legality import require_legal
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_NODE_PREFIX = "__fusion_rl_node_"

RuleSet = Callable[[tvm.IRModule, OpGraph], FusionPlan]


def unfused(mod: tvm.IRModule, graph: OpGraph) -> FusionPlan:
    """One group per operator."""
    return FusionPlan.singletons(len(graph), graph.fingerprint, "unfused")


def tvm_fuseops(mod: tvm.IRModule, graph: OpGraph) -> FusionPlan:
    """The partition that ``relax.transform.FuseOps`` chooses, as a FusionPlan.

    FuseOps decides from pattern kinds and a post-dominator tree; we let it run on a copy of the
    module in which every ``call_tir`` calls its own uniquely named PrimFunc, then read back which
    node landed in which fused function. Its decisions do not depend on callee names.
    """
    unique = _uniquify_callees(mod)
    with tvm.transform.PassContext(opt_level=3):
        fused = relax.transform.FuseOps()(unique)
    assignment = [-1] * len(graph)
    label = 0
    for binding in fused["main"].body.blocks[0].bindings:
        value = binding.value
        if not isinstance(value, relax.Call):
            continue
        if value.op == _CALL_TIR:
            assignment[_node_of(value.args[0])] = label
            label += 1
        elif isinstance(value.op, tvm.ir.GlobalVar):
            func = fused[value.op]
            for block in func.body.blocks:
                for inner in block.bindings:
                    v = inner.value
                    if isinstance(v, relax.Call) and v.op == _CALL_TIR:
                        assignment[_node_of(v.args[0])] = label
            label += 1
    if -1 in assignment:
        raise RuntimeError(f"FuseOps lost node {assignment.index(-1)}")  # internal invariant
    return FusionPlan.from_assignment(assignment, graph.fingerprint, "tvm")


def tensorrt(mod: tvm.IRModule, graph: OpGraph) -> FusionPlan:
    """Conv/matmul with their elementwise epilogue (bias, BN, activation, residual add), and
    chains of elementwise ops: the :func:`~fusion_rl.fusion.epilogues.epilogue_edges`. An op
    joins its producer's group only if it is that producer's sole consumer, so no intermediate
    escapes a kernel (the TensorRT rule)."""
    group = list(range(len(graph)))  # union-find over node ids

    def root(n: int) -> int:
        while group[n] != n:
            n = group[n]
        return n

    for k in epilogue_edges(graph):
        edge = graph.edges[k]
        a, b = root(edge.src), root(edge.dst)
        group[max(a, b)] = min(a, b)
    assignment = [root(n) for n in range(len(graph))]
    return FusionPlan.from_assignment(assignment, graph.fingerprint, "tensorrt")


def aggressive(mod: tvm.IRModule, graph: OpGraph) -> FusionPlan:
    """Greedy maximal fusion: merge along every edge, in program order, while the merged group
    stays legal (convex, acyclic between groups, no opaque op). Anchors are not limited: this is the upper bound on
    fusion, not a recommendation."""
    from fusion_rl.fusion.random_plans import grow_plan

    return grow_plan(graph, _decision_order(graph), name="aggressive")


def aggressive_1anchor(mod: tvm.IRModule, graph: OpGraph) -> FusionPlan:
    """:func:`aggressive` with at most one conv/matmul anchor per group: merge along every edge,
    in program order, while the merged group stays legal and holds at most one anchor. Every
    conv/matmul keeps its whole legal epilogue and prologue, but two never share a kernel."""
    from fusion_rl.fusion.random_plans import grow_plan

    return grow_plan(graph, _decision_order(graph), max_anchors=1, name="aggressive_1anchor")


def aggressive_shapes(mod: tvm.IRModule, graph: OpGraph) -> FusionPlan:
    """:func:`aggressive_1anchor`, letting a group past one anchor when it is a named group shape
    (every one of :data:`~fusion_rl.fusion.group_shapes.GROUP_SHAPES`)."""
    from fusion_rl.fusion.group_shapes import GROUP_SHAPES
    from fusion_rl.fusion.random_plans import grow_plan

    return grow_plan(graph, _decision_order(graph), max_anchors=1, name="aggressive_shapes",
                     shapes=tuple(GROUP_SHAPES))


def _decision_order(graph: OpGraph) -> list[int]:
    """Edges by (consumer, producer): the order the decision process asks about them, so that
    the greedy rules equal "fuse on every decision"."""
    return sorted(range(len(graph.edges)), key=lambda k: (graph.edges[k].dst, graph.edges[k].src))


RULE_SETS: dict[str, RuleSet] = {
    "unfused": unfused,
    "tvm": tvm_fuseops,
    "tensorrt": tensorrt,
    "aggressive": aggressive,
    "aggressive_1anchor": aggressive_1anchor,
    "aggressive_shapes": aggressive_shapes,
}


def make_plan(rules: str, mod: tvm.IRModule, graph: OpGraph) -> FusionPlan:
    """The plan of rule set ``rules`` for a legalized module, checked legal."""
    try:
        generator = RULE_SETS[rules]
    except KeyError:
        raise ConfigError(
            f"unknown rule set '{rules}'; choose one of {', '.join(RULE_SETS)}"
        ) from None
    plan = generator(mod, graph)
    require_legal(graph, plan)
    return plan


# --------------------------------------------------------------------------------------------


def _uniquify_callees(mod: tvm.IRModule) -> tvm.IRModule:
    """A copy of ``mod`` where call_tir number ``i`` calls its own PrimFunc ``__fusion_rl_node_i``."""
    bb = relax.BlockBuilder(mod)  # add_func gives GlobalVars their type, as FuseOps needs
    main = mod["main"]
    new_bindings = []
    i = 0
    for b in main.body.blocks[0].bindings:
        value = b.value
        if isinstance(value, relax.Call) and value.op == _CALL_TIR:
            # The attr makes each copy structurally distinct; add_func would otherwise merge
            # identical PrimFuncs back into one callee.
            func = mod[value.args[0]].with_attr("fusion_rl.node", i)
            gv = bb.add_func(func, f"{_NODE_PREFIX}{i}")
            args = list(value.args)
            args[0] = gv
            value = relax.Call(value.op, args, value.attrs, value.ty_args)
            i += 1
        new_bindings.append(relax.VarBinding(b.var, value))
    body = relax.SeqExpr([relax.DataflowBlock(new_bindings)], main.body.body)
    new_main = relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs)
    functions = dict(bb.get().functions.items())
    functions[mod.get_global_var("main")] = new_main
    # Normalize fills in the types of the rebuilt main; FuseOps' BlockBuilder hashes functions
    # and fails to find a main whose hash changes under it.
    return relax.transform.Normalize()(tvm.IRModule(functions))


def _node_of(gvar: tvm.ir.GlobalVar) -> int:
    return int(gvar.name_hint[len(_NODE_PREFIX):])
