"""Rows that are not a whole number of vectors (``rules:v15``): ViT's 197-key softmax, ConvNeXt's
40-channel layer norms under AVX-512, and a softmax fused after its matmul."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax, te, tirx, topi  # noqa: E402

from fusion_rl.compiler.schedules import blocks, rules  # noqa: E402
from fusion_rl.compiler.schedules.base import SCHEDULE_ATTR  # noqa: E402
from fusion_rl.compiler.schedules.rules import RulesSchedule  # noqa: E402
from fusion_rl.compiler.target import parse_target  # noqa: E402
from fusion_rl.graph.fast_math import FAST_MATH_LEGALIZE, ROW_BLOCK, ragged_softmax  # noqa: E402

TARGET = parse_target("host").to_tvm()


def _softmax_kernel(shape: tuple) -> tirx.PrimFunc:
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.softmax(x, axis=-1))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps(FAST_MATH_LEGALIZE)(bb.get())
    (kernel,) = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    return kernel


def _call(func: tirx.PrimFunc, *args: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    res = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), res)
    return res.numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _blocks(func: tirx.PrimFunc) -> list[str]:
    sch = tvm.s_tir.Schedule(func)
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


def test_a_ragged_softmax_is_split_into_whole_vectors_and_a_tail() -> None:
    """fast_math legalizes a softmax whose rows are not a whole number of :data:`ROW_BLOCK`
    lanes as a main part and a tail for each reduction; a row that is, as TOPI's softmax."""
    ragged, whole = _blocks(_softmax_kernel((2, 197))), _blocks(_softmax_kernel((2, 128)))
    assert {"T_softmax_maxelem_tail", "T_softmax_expsum_tail"} <= set(ragged)
    assert not any(n.endswith("_tail") for n in whole)
    assert 197 % ROW_BLOCK and 128 % ROW_BLOCK == 0


def test_a_softmax_of_symbolic_width_keeps_topis_legalization() -> None:
    n = tirx.Var("n", "int64")
    names = _blocks(_softmax_kernel((2, n)))
    assert "T_softmax_maxelem" in names and not any(name.endswith("_tail") for name in names)


def test_ragged_rows_are_keyed_anew_and_whole_rows_keep_v12() -> None:
    provider = RulesSchedule()
    assert provider.key == "rules:v20"  # later versions changed other kernels (test_pad_epilogue, test_chain, test_blocks, test_wide_tile)
    assert provider.kernel_key(_softmax_kernel((2, 197))) == "rules:v15"
    assert provider.kernel_key(_softmax_kernel((2, 128))) == "rules:v12"


@pytest.mark.parametrize("width", [64, 37, 197])
def test_a_softmax_runs_as_rows_and_is_exact(width: int) -> None:
    """A softmax's row max and row sum are factored into one partial result per vector lane
    (rfactor), the lanes vectorized and the rows parallel, instead of one dependent scalar
    chain per row; a ragged row (37, ViT's 197) over its whole vectors, its tail a short
    scalar chain. Exact against numpy."""
    kernel = _softmax_kernel((3, 5, width))
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    assert scheduled.attrs[SCHEDULE_ATTR] == "reduction"
    sch = tvm.s_tir.Schedule(scheduled)
    root = sch.get_child_blocks(sch.get_sblock("root"))
    partial = [b for b in root if sch.get(b).name_hint.endswith("_rf")]
    assert len(partial) == 2, scheduled.script()
    for block in partial:
        assert sch.get(sch.get_loops(block)[-1]).kind == tirx.ForKind.VECTORIZED
        assert sch.get(sch.get_loops(block)[0]).kind == tirx.ForKind.PARALLEL
    data = np.random.default_rng(0).standard_normal((3, 5, width)).astype("float32") * 4
    np.testing.assert_allclose(_call(scheduled, data, out_shape=data.shape), _softmax(data), rtol=1e-5, atol=1e-6)


def test_a_layer_norm_of_40_channels_is_factored_by_8_lanes_under_avx512() -> None:
    """No 16-lane factor: the rows are factored by the widest narrower vector that divides
    them (v14 left them to dlight, one scalar chain per statistic). Exact on the host."""
    x = te.placeholder((1, 7, 7, 40), name="x")
    gamma, beta = te.placeholder((40,), name="g"), te.placeholder((40,), name="b")
    kernel = te.create_prim_func([x, gamma, beta, topi.nn.layer_norm(x, gamma, beta, axis=[3], epsilon=1e-6)])
    assert RulesSchedule().kernel_key(kernel) == "rules:v15"
    avx512 = blocks.Ctx(TARGET, 512, 32)  # the schedule a Zen 4/5 or Sapphire Rapids host gets
    scheduled = rules.schedule_prim_func(kernel, avx512)
    sch = tvm.s_tir.Schedule(scheduled)
    partial = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint.endswith("_rf")]
    assert len(partial) == 2, scheduled.script()  # the sum and the sum of squares
    for block in partial:
        inner = sch.get(sch.get_loops(block)[-1])
        assert inner.kind == tirx.ForKind.VECTORIZED and int(inner.extent) == 8
    rng = np.random.default_rng(0)
    data, g, b = (rng.standard_normal(s).astype("float32") for s in ((1, 7, 7, 40), (40,), (40,)))
    norm = (data - data.mean(-1, keepdims=True)) / np.sqrt(data.var(-1, keepdims=True) + 1e-6) * g + b
    np.testing.assert_allclose(_call(scheduled, data, g, b, out_shape=data.shape), norm, rtol=1e-4, atol=1e-4)


def test_a_softmax_fused_after_its_matmul_runs_as_one_row_run() -> None:
    """Attention's scores, scale and a ragged softmax in one kernel (a one-anchor plan on ViT):
    the softmax's shift, exponential and output copy are computed per row, inlined, under the
    same parallel row loop as its reductions. Materialized (v14), each was a kernel-wide pass
    of its own and the fused kernel ran slower than the matmul and softmax apart. Exact."""
    q, k = te.placeholder((2, 37, 16), name="q"), te.placeholder((2, 37, 16), name="k")
    scores = topi.multiply(topi.nn.batch_matmul(q, k), 0.25)
    out = topi.identity(ragged_softmax(scores))
    kernel = te.create_prim_func([q, k, out])
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    assert scheduled.attrs[SCHEDULE_ATTR] == "microkernel", scheduled.script()
    sch = tvm.s_tir.Schedule(scheduled)
    root = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    assert not {"T_softmax_delta", "T_fast_exp", "T_softmax_norm"} & set(root), root
    rows = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
            if sch.get(b).name_hint.startswith("T_softmax_") or sch.get(b).name_hint.endswith("_rf")]
    assert {sch.get(sch.get_loops(b)[0]).loop_var.name for b in rows} == {
        sch.get(sch.get_loops(rows[0])[0]).loop_var.name}  # one row loop
    rng = np.random.default_rng(0)
    qa, ka = (rng.standard_normal((2, 37, 16)).astype("float32") for _ in range(2))
    expected = _softmax(np.einsum("bik,bjk->bij", qa, ka) * 0.25)
    np.testing.assert_allclose(_call(scheduled, qa, ka, out_shape=(2, 37, 37)), expected, rtol=1e-5, atol=1e-6)


def test_a_layer_norm_of_one_row_runs_serially_as_a_row() -> None:
    """A pooled head's layer norm over ``[1, C]``: one row, factored by lanes and run serially.
    dlight's fallback (v15) recomputed both statistics for every output element under a
    parallel loop, each thread accumulating into the same scalar. Keyed v16; exact."""
    x = te.placeholder((1, 320), name="x")
    gamma, beta = te.placeholder((320,), name="g"), te.placeholder((320,), name="b")
    kernel = te.create_prim_func([x, gamma, beta, topi.nn.layer_norm(x, gamma, beta, axis=[1], epsilon=1e-6)])
    assert RulesSchedule().kernel_key(kernel) == "rules:v16"
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    assert scheduled.attrs[SCHEDULE_ATTR] == "reduction"
    assert "T.parallel" not in scheduled.script()
    sch = tvm.s_tir.Schedule(scheduled)
    partial = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint.endswith("_rf")]
    assert len(partial) == 2, scheduled.script()
    rng = np.random.default_rng(0)
    data, g, b = (rng.standard_normal(s).astype("float32") for s in ((1, 320), (320,), (320,)))
    norm = (data - data.mean(-1, keepdims=True)) / np.sqrt(data.var(-1, keepdims=True) + 1e-6) * g + b
    np.testing.assert_allclose(_call(scheduled, data, g, b, out_shape=data.shape), norm, rtol=1e-4, atol=1e-4)
