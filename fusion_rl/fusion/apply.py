"""Apply a FusionPlan to a legalized Relax module: grouped Primitive functions, then FuseTIR.

FuseOps' own grouping (``MakeGroupedFunctions``) is not reachable from Python, so this pass does
the same job for an arbitrary partition: each group of two or more ``call_tir`` bindings in
``main``'s dataflow block becomes a private Relax function with ``Primitive=1``, called from
``main``; ``FuseTIR`` then merges each such function into one PrimFunc (one kernel).
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field

import tvm
from tvm import relax

from fusion_rl.errors import CompileError, first_line
from fusion_rl.fusion.legality import require_legal
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpGraph, extract_opgraph

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


@dataclass
class _Item:
    """A unit of emission: a fused group, a single op, or a glue binding (tuple, alias)."""

    bindings: list = field(default_factory=list)
    group: int | None = None  # plan group index for fused groups
    position: int = 0  # first binding's program position: tie-break keeps program order


@tvm.transform.module_pass(opt_level=0, name="fusion_rl.GroupByPlan")
class GroupByPlan:
    """Wrap each fused group of ``plan`` in a ``Primitive`` Relax function (no FuseTIR).

    Before::

        lv = R.call_tir(conv2d, (x, w), ...)
        lv1 = R.call_tir(add, (lv, b), ...)
        gv = R.call_tir(relu, (lv1,), ...)

    After, with plan ``[[0, 1, 2]]``::

        @R.function(private=True)
        def fused_conv2d_add_relu(p0, p1, p2):  # Primitive=1; weights lifted to params
            ...
        gv = fused_conv2d_add_relu(x, w, b)
    """

    def __init__(self, plan: FusionPlan, graph: OpGraph | None = None) -> None:
        self.plan = plan
        self.graph = graph

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        graph = self.graph if self.graph is not None else extract_opgraph(mod)
        require_legal(graph, self.plan)
        if not self.plan.fused_groups:
            return mod
        return group_module(mod, self.plan, graph)


def ApplyFusionPlan(plan: FusionPlan, graph: OpGraph | None = None) -> tvm.transform.Pass:
    """The full pass: :class:`GroupByPlan`, then ``FuseTIR`` and dead-code elimination.

    Use it in place of ``FuseOps`` + ``FuseTIR`` in a Relax pipeline.
    """
    return tvm.transform.Sequential(
        [
            GroupByPlan(plan, graph),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ],
        name="fusion_rl.ApplyFusionPlan",
    )


def apply_plan(mod: tvm.IRModule, plan: FusionPlan, graph: OpGraph | None = None) -> tvm.IRModule:
    """Apply ``plan`` to a legalized module; user errors raise typed fusion_rl errors."""
    from fusion_rl.errors import FusionRLError

    if graph is None:
        from fusion_rl.graph.importer import check_legalized

        try:
            check_legalized(mod)
        except FusionRLError as exc:
            raise CompileError(f"apply_plan needs a legalized module (fusion_rl.graph.importer.legalize): {exc}") from None
        graph = extract_opgraph(mod)
    # Checked here, in Python, as well as in the pass: an exception raised inside a pass comes
    # back through TVM's FFI as a generic error, and users need the typed IllegalPlanError.
    require_legal(graph, plan)
    try:
        return ApplyFusionPlan(plan, graph)(mod)
    except FusionRLError:
        raise
    except Exception as exc:  # a TVM-internal failure on a plan that legality accepted
        raise CompileError(f"applying plan {plan.hash} failed inside TVM: {first_line(exc)}") from exc


# --------------------------------------------------------------------------------------------


def group_module(
    mod: tvm.IRModule, plan: FusionPlan, graph: OpGraph, program_order_on_cycle: bool = False
) -> tvm.IRModule:
    """Group ``plan``'s fused groups into ``Primitive`` functions, *without* a legality check.

    Parameters
    ----------
    mod
        A legalized module whose ``main`` holds one dataflow block.
    plan
        The partition to emit; callers normally check it first (:class:`GroupByPlan` does).
    graph
        The OpGraph of ``mod`` (node ids in program order).
    program_order_on_cycle
        If the grouped items form a dependency cycle (a non-convex group), emit them in program
        order instead of raising. The result is ill-formed on purpose: the fuzzer uses it to
        force rejected plans through the build and see at which stage they fail.

    Returns
    -------
    tvm.IRModule
        The module with one private ``Primitive`` function per fused group, called from ``main``.
    """
    main = mod["main"]
    if len(main.body.blocks) != 1 or not isinstance(main.body.blocks[0], relax.DataflowBlock):
        raise CompileError("expected main to hold exactly one dataflow block (legalize first)")
    bindings = list(main.body.blocks[0].bindings)
    group_of = plan.group_of()

    # 1. Cut the block into items: one per fused group, one per other binding.
    items: list[_Item] = []
    item_of_group: dict[int, _Item] = {}
    item_of_var: dict[relax.Var, _Item] = {}
    node = 0
    for pos, binding in enumerate(bindings):
        value = binding.value
        item: _Item | None = None
        if isinstance(value, relax.Call) and value.op == _CALL_TIR:
            g = group_of[node]
            node += 1
            if len(plan.groups[g]) > 1:
                item = item_of_group.get(g)
                if item is None:
                    item = item_of_group[g] = _Item(group=g, position=pos)
                    items.append(item)
        elif isinstance(value, relax.TupleGetItem) and value.tuple_value in item_of_var:
            owner = item_of_var[value.tuple_value]
            if owner.group is not None:
                item = owner  # a TupleGetItem stays with its tuple producer (docs/design.md §4)
        if item is None:
            item = _Item(position=pos)
            items.append(item)
        item.bindings.append(binding)
        item_of_var[binding.var] = item
    if node != len(graph):
        raise CompileError("the module does not match the OpGraph the plan was checked on")

    # 2. Inputs read and outputs used by each item.
    reads: dict[int, list] = {}
    for item in items:
        defined = {b.var for b in item.bindings}
        ins: list = []
        for b in item.bindings:
            for x in _free_operands(b.value):
                if x not in defined and not any(x.same_as(y) for y in ins):
                    ins.append(x)
        reads[id(item)] = ins
    used_outside: dict[int, list[relax.Var]] = {id(it): [] for it in items}
    ret = main.body.body
    for item in items:
        for x in reads[id(item)]:
            owner = item_of_var.get(x) if isinstance(x, relax.Var) else None
            if owner is not None and x not in used_outside[id(owner)]:
                used_outside[id(owner)].append(x)
    for x in _free_operands(ret):
        owner = item_of_var.get(x)
        if owner is not None and x not in used_outside[id(owner)]:
            used_outside[id(owner)].append(x)

    # 3. Emit: group functions first, then main in a dependency order of the items.
    bb = relax.BlockBuilder()
    gvars: dict[int, tvm.ir.GlobalVar] = {}
    names: set[str] = set()
    for item in items:
        if item.group is None:
            continue
        outs = [b.var for b in item.bindings if b.var in used_outside[id(item)]]
        first = plan.groups[item.group][0]
        gvars[id(item)] = _emit_group_function(bb, mod, item, reads[id(item)], outs, names, first)

    try:
        order = _item_order(items, reads, item_of_var)
    except CompileError:
        if not program_order_on_cycle:
            raise
        order = sorted(items, key=lambda it: it.position)
    main_attrs = dict(main.attrs.items()) if main.attrs else {}
    with bb.function("main", list(main.params), attrs=main_attrs):
        with bb.dataflow():
            vmap: dict = {}
            for item in order:
                if item.group is None:
                    for b in item.bindings:
                        value = _substitute(b.value, vmap)
                        vmap[b.var] = _emit(bb, value, b.var)
                    continue
                args = [vmap.get(x, x) if isinstance(x, relax.Var) else x for x in reads[id(item)]]
                outs = [b.var for b in item.bindings if b.var in used_outside[id(item)]]
                call = relax.Call(gvars[id(item)], args)
                if len(outs) == 1:
                    vmap[outs[0]] = _emit(bb, call, outs[0])
                else:
                    tup = bb.emit(call, name_hint=f"grp{item.group}")
                    for k, v in enumerate(outs):
                        vmap[v] = _emit(bb, relax.TupleGetItem(tup, k), v)
        new_main_gv = bb.emit_func_output(_substitute(ret, vmap))
    out = bb.get()
    new_main = out[new_main_gv]
    functions = {gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}
    functions.update({gv: f for gv, f in out.functions.items() if gv.name_hint != "main"})
    functions[mod.get_global_var("main")] = new_main
    result = tvm.IRModule(functions)
    for key, value in (mod.attrs.items() if mod.attrs else []):
        result = result.with_attr(key, value)
    return result


def group_function_name(ops: list[str], first_node: int) -> str:
    """The name of a fused group's kernel: its ops, then ``_n<first node id>``.

    FuseTIR names the fused PrimFunc after this function, so per-kernel times map back to plan
    groups by name (:func:`fusion_rl.compiler.kernels.group_kernel_times`).
    """
    return "fused_" + "_".join(ops[:6]) + ("_etc" if len(ops) > 6 else "") + f"_n{first_node}"


def _emit_group_function(bb, mod, item: _Item, inputs: list, outputs: list, names: set, first_node: int) -> tvm.ir.GlobalVar:
    ops = [re.sub(r"_?\d+$", "", b.value.args[0].name_hint) for b in item.bindings
           if isinstance(b.value, relax.Call) and b.value.op == _CALL_TIR]
    name = group_function_name(ops, first_node)
    if name in names or name in [gv.name_hint for gv in mod.get_global_vars()]:
        raise CompileError(f"internal: kernel name {name} is not unique")
    names.add(name)
    # Every input, constants included, becomes a parameter: FuseTIR cannot keep a constant
    # inside a Primitive function (docs/design.md §4).
    params = [relax.Var(f"p{i}", x.ty) for i, x in enumerate(inputs)]
    with bb.function(name, params, attrs={"Primitive": True}, private=True):
        with bb.dataflow():
            vmap = {x: p for x, p in zip(inputs, params)}
            for b in item.bindings:
                vmap[b.var] = bb.emit(_substitute(b.value, vmap, consts=True), name_hint=b.var.name)
            result = [vmap[v] for v in outputs]
            out = bb.emit_output(result[0] if len(result) == 1 else relax.Tuple(result))
        return bb.emit_func_output(out)


def _emit(bb, value, old_var):
    if isinstance(old_var, relax.DataflowVar):
        return bb.emit(value, name_hint=old_var.name)
    return bb.emit_output(value, name_hint=old_var.name)


def _item_order(items: list[_Item], reads: dict, item_of_var: dict) -> list[_Item]:
    deps: dict[int, set[int]] = {id(it): set() for it in items}
    for it in items:
        for x in reads[id(it)]:
            owner = item_of_var.get(x) if isinstance(x, relax.Var) else None
            if owner is not None and owner is not it:
                deps[id(it)].add(id(owner))
    users: dict[int, list[_Item]] = {id(it): [] for it in items}
    for it in items:
        for d in deps[id(it)]:
            users[d].append(it)
    indeg = {id(it): len(deps[id(it)]) for it in items}
    heap = [(it.position, i, it) for i, it in enumerate(items) if indeg[id(it)] == 0]
    index = {id(it): i for i, it in enumerate(items)}
    heapq.heapify(heap)
    order = []
    while heap:
        _, _, it = heapq.heappop(heap)
        order.append(it)
        for u in users[id(it)]:
            indeg[id(u)] -= 1
            if indeg[id(u)] == 0:
                heapq.heappush(heap, (u.position, index[id(u)], u))
    if len(order) != len(items):
        raise CompileError("internal: grouped items form a cycle although legality passed")
    return order


def _free_operands(expr) -> list:
    """Vars and constants an expression reads (call_tir args, tuple fields, getitem tuples)."""
    if isinstance(expr, relax.Call):
        if expr.op == _CALL_TIR:
            return _free_operands(expr.args[1])
        out = []
        for a in expr.args:
            out.extend(_free_operands(a))
        return out
    if isinstance(expr, relax.Tuple):
        out = []
        for f in expr.fields:
            out.extend(_free_operands(f))
        return out
    if isinstance(expr, relax.TupleGetItem):
        return _free_operands(expr.tuple_value)
    if isinstance(expr, (relax.Var, tvm.ir.expr.Constant)):
        return [expr]
    return []


def _substitute(expr, vmap: dict, consts: bool = False):
    """Rebuild ``expr`` with operands replaced through ``vmap`` (vars, and constants if asked)."""
    if isinstance(expr, relax.Var):
        return vmap.get(expr, expr)
    if isinstance(expr, tvm.ir.expr.Constant):
        if consts:
            for k, v in vmap.items():
                if k.same_as(expr):
                    return v
        return expr
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_substitute(f, vmap, consts) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(_substitute(expr.tuple_value, vmap, consts), expr.index)
    if isinstance(expr, relax.Call):
        args = list(expr.args)
        if expr.op == _CALL_TIR:
            args[1] = _substitute(args[1], vmap, consts)
        else:
            args = [_substitute(a, vmap, consts) for a in args]
        return relax.Call(expr.op, args, expr.attrs, expr.ty_args)
    return expr

