"""Weights packed once, at compile time, instead of on every call.

A micro-kernel streams its *panel* operand (a dense layer's ``K x N`` weights, a convolution's
filter) as ``[v_outer, ..., v_inner]`` panels (:mod:`.microkernel`). When that operand is a
constant of the Relax program, the panel layout is given to the kernel's *parameter* (its buffer
is re-laid out with :class:`WeightPack`), and every call site passes a copy of the constant
packed in that layout (:func:`pack_constants`). This is what MLAS (ONNX Runtime) does when a
session is created, and what TVM's ``layout_free_buffers`` + ``SplitLayoutRewritePreproc`` +
``FoldConstant`` pipeline does for MetaSchedule. Here it is done directly, so that kernels keep
their names (per-kernel times are mapped back to plan groups by name).

Only parameters that receive a constant at *every* call site are packed: LegalizeOps shares one
PrimFunc between identical ops, and a shared kernel may be called with computed operands too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tvm
from tvm import relax, tirx

#: PrimFunc attribute: ``{param index: [dim, vec]}``, the parameters given a packed layout.
WEIGHT_PACKS_ATTR = "fusion_rl.weight_packs"
#: PrimFunc attribute (TVM's name): indices of the parameters that are constants everywhere.
LAYOUT_FREE_ATTR = "layout_free_buffers"
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


@dataclass(frozen=True)
class WeightPack:
    """Move buffer dimension ``dim`` last and split it into panels of ``vec`` elements:
    ``W[..., n, ...]`` becomes ``P[n // vec, ..., n % vec]``."""

    dim: int
    vec: int

    def index_map(self, ndim: int, index_dtype: str = "int64") -> tirx.IndexMap:
        """The map from an index of the weights to its index in the packed copy
        (``index_dtype``: the buffer's, int64 for legalized kernels, int32 in TVMScript)."""
        d, vec = self.dim, self.vec
        return tirx.IndexMap.from_func(
            lambda *i: [i[d] // vec, *(i[k] for k in range(ndim) if k != d), i[d] % vec],
            ndim=ndim, index_dtype=index_dtype)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return 0 <= self.dim < len(shape) and shape[self.dim] % self.vec == 0

    def packed_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        rest = tuple(n for k, n in enumerate(shape) if k != self.dim)
        return (shape[self.dim] // self.vec, *rest, self.vec)

    def pack(self, array: np.ndarray) -> np.ndarray:
        """``array`` in the packed layout (what :meth:`index_map` reads)."""
        moved = np.moveaxis(array, self.dim, -1)
        panels = moved.reshape(*moved.shape[:-1], moved.shape[-1] // self.vec, self.vec)
        return np.ascontiguousarray(np.moveaxis(panels, -2, 0))


def _call_sites(mod: tvm.IRModule) -> list[relax.Call]:
    calls: list[relax.Call] = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: calls.append(e) if isinstance(e, relax.Call) and e.op == _CALL_TIR
                else None)
    return calls


def mark_layout_free(mod: tvm.IRModule) -> tvm.IRModule:
    """Give each PrimFunc the ``layout_free_buffers`` attribute: its parameters that receive a
    constant at every ``call_tir`` site (the same rule as TVM's ``AttachAttrLayoutFreeBuffers``,
    without renaming functions)."""
    free: dict[str, set[int]] = {}
    for call in _call_sites(mod):
        args = call.args[1].fields
        consts = {i for i, a in enumerate(args) if isinstance(a, tvm.ir.expr.Constant)}
        name = call.args[0].name_hint
        free[name] = free[name] & consts if name in free else consts
    out = mod.clone()
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and free.get(gvar.name_hint):
            out[gvar] = func.with_attr(LAYOUT_FREE_ATTR, sorted(free[gvar.name_hint]))
    return out


def layout_free_params(func: tirx.PrimFunc) -> dict[int, "tvm.ir.expr.Var"]:
    """``{index: parameter}`` of the parameters :func:`mark_layout_free` marked on ``func``."""
    free = func.attrs.get(LAYOUT_FREE_ATTR) if func.attrs is not None else None
    return {int(i): func.params[int(i)] for i in free or ()}


def weight_packs(func: tirx.PrimFunc) -> dict[int, WeightPack]:
    attr = func.attrs.get(WEIGHT_PACKS_ATTR) if func.attrs is not None else None
    return {int(i): WeightPack(int(v[0]), int(v[1])) for i, v in (attr or {}).items()}


def packed_arg_specs(func: tirx.PrimFunc, specs: Sequence[tuple[Sequence[int], str]]
                     ) -> tuple[tuple[tuple[int, ...], str], ...]:
    """A call site's ``(shape, dtype)`` per argument, with the packed parameters' shapes as
    ``func`` (scheduled) takes them."""
    packs = weight_packs(func)
    return tuple((packs[i].packed_shape(tuple(shape)) if i in packs else tuple(shape), dtype)
                 for i, (shape, dtype) in enumerate(specs))


def pack_constants(mod: tvm.IRModule) -> tvm.IRModule:
    """Pass each packed parameter a packed copy of its constant, at every call site."""
    packs = {gvar.name_hint: weight_packs(func) for gvar, func in mod.functions_items()
             if isinstance(func, tirx.PrimFunc)}
    packs = {name: p for name, p in packs.items() if p}
    if not packs:
        return mod
    # A GlobalVar carries its function's signature, which packing changed: packed kernels get
    # new GlobalVars (same names). Not through BlockBuilder.add_func, which would merge two
    # structurally equal kernels under one name (Q, K and V projections with their prologues).
    gvars = {gvar.name_hint: _typed_global_var(gvar.name_hint, func) if gvar.name_hint in packs
             else gvar for gvar, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)}
    cache: dict[tuple[relax.Expr, WeightPack], relax.Expr] = {}  # a constant shared by calls packs once

    def packed(const: relax.Expr, pack: WeightPack) -> relax.Expr:
        key = (const, pack)  # TVM objects hash and compare by identity
        if key not in cache:
            cache[key] = relax.const(pack.pack(const.value.numpy()))
        return cache[key]

    def rewrite(expr: relax.Expr) -> relax.Expr:
        if not (isinstance(expr, relax.Call) and expr.op == _CALL_TIR):
            return expr
        name = expr.args[0].name_hint
        fields = list(expr.args[1].fields)
        for i, pack in packs.get(name, {}).items():
            fields[i] = packed(fields[i], pack)
        return relax.Call(expr.op, [gvars[name], relax.Tuple(fields), *expr.args[2:]],
                          expr.attrs, expr.ty_args)

    functions = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            functions[gvar] = _rewrite_bindings(func, rewrite)
        else:
            functions[gvars.get(gvar.name_hint, gvar)] = func
    out = tvm.IRModule(functions, attrs=mod.attrs)
    return relax.transform.Normalize()(out)  # types of the rebuilt calls


def _typed_global_var(name: str, func: tirx.PrimFunc) -> tvm.ir.GlobalVar:
    """A new GlobalVar typed by ``func``'s signature (what ``BlockBuilder.add_func`` sets)."""
    from tvm.relax.expr import _update_type

    gvar = tvm.ir.GlobalVar(name)
    _update_type(gvar, func.ty)
    return gvar


def _rewrite_bindings(func: relax.Function, rewrite) -> relax.Function:
    blocks = []
    for block in func.body.blocks:
        bindings = [relax.VarBinding(b.var, rewrite(b.value)) if isinstance(b, relax.VarBinding)
                    else b for b in block.bindings]
        blocks.append(type(block)(bindings))
    body = relax.SeqExpr(blocks, func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
