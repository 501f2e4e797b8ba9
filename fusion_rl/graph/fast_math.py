"""Legalize transcendental ops to TOPI's vectorizable approximations.

TVM lowers ``exp``, ``erf``, ``tanh`` and ``sigmoid`` to LLVM intrinsics that LLVM expands into
one libm call per lane when there is no vector math library (this wheel has none): a
vectorized ``erf`` loop ran about 175x slower than TOPI's ``fast_erf`` on 0.5 M elements
(1 thread, AVX2), so GELU epilogues, attention softmaxes and SiLU gates cost more than the
matrix products around them. ONNX Runtime's MLAS uses polynomial approximations too.

The replacements are TOPI's ``fast_exp`` (range-reduced polynomial), ``fast_erf`` and
``fast_tanh`` (rational approximations); every compiled plan is still verified against ONNX
Runtime at the usual tolerance (see :mod:`fusion_rl.compiler.verify`). The PrimFuncs keep the
names TVM's default legalization gives them (``exp``, ``erf``, ``tir_tanh``, ``tir_sigmoid``,
``softmax``, ``power``), so operator kinds and graph features do not change.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax, te, topi


def _fast_sigmoid(x):
    # 1 / (1 + exp(-x)) with the fast exponential; TOPI has no fast_sigmoid.
    return topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x))))


def _unary(fn: Callable, name: str) -> Callable[[relax.BlockBuilder, relax.Call], relax.Expr]:
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if call.ty.dtype != "float32":
            # The approximations are written for fp32; other dtypes keep TVM's lowering.
            return bb.call_te(_DEFAULT[name], call.args[0], primfunc_name_hint=name)
        return bb.call_te(fn, call.args[0], primfunc_name_hint=name)

    return legalize


#: Rows are split into a whole number of these (the widest vector, 16 fp32 lanes of AVX-512;
#: a multiple of every narrower one) and a tail: see :func:`ragged_softmax`.
ROW_BLOCK = 16


def ragged_softmax(x: te.Tensor) -> te.Tensor:
    """TOPI's ``fast_softmax`` over the last axis, each reduction split into a part a whole
    number of :data:`ROW_BLOCK` long and a short tail.

    A row of ViT's 197 keys has no vector-wide factor, so the schedule could not factor its
    ``max`` and ``sum`` by lanes (``rfactor`` needs a split, the split a predicate, and
    ``compute_at`` drops that predicate), and each row ran as two scalar chains of 197
    dependent operations. The split keeps every reduction's extent exact: the main part is
    factored by lanes, the tail (under one vector) stays scalar. Same values up to float
    reassociation, which the lane factoring already brings.
    """
    shape = x.shape
    n = int(shape[-1])
    main = n - n % ROW_BLOCK
    k_main = te.reduce_axis((0, main), name="k")
    k_tail = te.reduce_axis((0, n - main), name="k")

    def reduced(name, reducer, src, combine):
        head = te.compute(shape[:-1], lambda *i: reducer(src(*i, k_main), axis=k_main), name=name)
        tail = te.compute(shape[:-1], lambda *i: reducer(src(*i, main + k_tail), axis=k_tail), name=name + "_tail")
        return te.compute(shape[:-1], lambda *i: combine(head(*i), tail(*i)), name=name + "_all")

    max_elem = reduced("T_softmax_maxelem", te.max, x, tvm.tirx.max)
    delta = te.compute(shape, lambda *i: x(*i) - max_elem(*i[:-1]), name="T_softmax_delta")
    exp = topi.math.fast_exp(delta)
    expsum = reduced("T_softmax_expsum", te.sum, exp, lambda a, b: a + b)
    return te.compute(shape, lambda *i: exp(*i) / expsum(*i[:-1]), name="T_softmax_norm",
                      attrs={"axis": len(shape) - 1})


def _softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    x = call.args[0]
    if call.ty.dtype != "float32":
        return bb.call_te(topi.nn.softmax, x, call.attrs.axis, primfunc_name_hint="softmax")
    shape = getattr(getattr(x.ty, "shape", None), "values", None)  # None when the rank is unknown
    last = shape[-1] if shape else None
    if (isinstance(last, tvm.tirx.IntImm) and int(call.attrs.axis) % len(shape) == len(shape) - 1
            and int(last) % ROW_BLOCK and int(last) >= 2 * ROW_BLOCK):
        return bb.call_te(ragged_softmax, x, primfunc_name_hint="softmax")
    return bb.call_te(topi.nn.fast_softmax, x, call.attrs.axis, primfunc_name_hint="softmax")


def _power(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``x ** n`` for a constant n in 2..4 as n - 1 multiplications: ``powf`` is a scalar libm
    call per element (GPT-2's GELU, ``x + 0.044715 * x ** 3``, ran its whole fused kernel
    lane by lane). Other exponents keep TOPI's ``power``."""
    x, y = call.args
    n = None
    if isinstance(y, tvm.ir.expr.Constant) and str(x.ty.dtype).startswith("float"):
        value = y.value.numpy()
        if value.size == 1 and float(value.reshape(())) in (2.0, 3.0, 4.0):
            n = int(value.reshape(()))
    if n is None:
        return bb.call_te(topi.power, x, y, primfunc_name_hint="power")
    dims = [tuple(int(d) for d in t.ty.shape.values) for t in (x, y)]
    shape = list(np.broadcast_shapes(*dims))

    def fn(t):
        def body(*i):
            v = t(*i[len(i) - len(t.shape):]) if len(t.shape) else t()
            out = v
            for _ in range(n - 1):
                out = out * v
            return out
        return te.compute(shape, body, name="T_power")

    return bb.call_te(fn, x, primfunc_name_hint="power")


_DEFAULT = {"exp": topi.exp, "erf": topi.erf, "tir_tanh": topi.tanh, "tir_sigmoid": topi.sigmoid}

#: ``customize_legalize_map`` for :func:`tvm.relax.transform.LegalizeOps`.
FAST_MATH_LEGALIZE: dict[str, Callable[[relax.BlockBuilder, relax.Call], relax.Expr]] = {
    "relax.exp": _unary(topi.fast_exp, "exp"),
    "relax.erf": _unary(topi.fast_erf, "erf"),
    "relax.tanh": _unary(topi.fast_tanh, "tir_tanh"),
    "relax.sigmoid": _unary(_fast_sigmoid, "tir_sigmoid"),
    "relax.nn.softmax": _softmax,
    "relax.power": _power,
}
