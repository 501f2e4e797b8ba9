"""A transpose of an anchor's output inside a kernel (``rules:v16``): pulled into the anchor's
write-back (transpose_layout.py; ConvNeXt's depthwise conv -> channels-last -> layer norm), or,
where the anchor keeps its layout, its epilogue run per row of tiles (microkernel.py; ConvNeXt's
MLP matmul back to NCHW)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import te, tirx, topi  # noqa: E402

from fusion_rl.compiler.schedules import blocks, rules, transpose_layout  # noqa: E402
from fusion_rl.compiler.schedules.base import SCHEDULE_ATTR  # noqa: E402
from fusion_rl.compiler.schedules.rules import RulesSchedule  # noqa: E402
from fusion_rl.compiler.target import parse_target  # noqa: E402

TARGET = parse_target("host").to_tvm()
C, H = 40, 16  # 16: no row under 16 wide, so the key is v16's, not v17's (short rows)


def _depthwise_layer_norm() -> tirx.PrimFunc:
    """ConvNeXt's block head: 7x7 depthwise conv + bias (NCHW), transposed to NHWC, then the
    layer norm of each pixel's channels."""
    x, w = te.placeholder((1, C, H, H), name="x"), te.placeholder((C, 1, 7, 7), name="w")
    bias = te.placeholder((1, C, 1, 1), name="bias")
    gamma, beta = te.placeholder((C,), name="g"), te.placeholder((C,), name="b")
    conv = topi.nn.group_conv2d_nchw(x, w, 1, 3, 1, C)
    nhwc = topi.transpose(topi.add(conv, bias), [0, 2, 3, 1])
    out = topi.nn.layer_norm(nhwc, gamma, beta, axis=[3], epsilon=1e-6)
    return te.create_prim_func([x, w, bias, gamma, beta, out])


def _matmul_transposed_layer_norm() -> tirx.PrimFunc:
    """A matmul whose output ``[m, n]`` is transposed, then normalized over ``m``: its vector
    axis ``n`` is innermost already, so the transpose stays where it is."""
    a, b = te.placeholder((64, 48), name="a"), te.placeholder((48, 32), name="b")
    gamma, beta = te.placeholder((64,), name="g"), te.placeholder((64,), name="beta")
    out = topi.nn.layer_norm(topi.transpose(topi.matmul(a, b), [1, 0]), gamma, beta, axis=[1], epsilon=1e-6)
    return te.create_prim_func([a, b, gamma, beta, out])


def _run(func: tirx.PrimFunc, args: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    res = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), res)
    return res.numpy()


def _inputs(func: tirx.PrimFunc) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in func.params[:-1]]


def _root(func: tirx.PrimFunc) -> tuple[tvm.s_tir.Schedule, list]:
    sch = tvm.s_tir.Schedule(func)
    return sch, list(sch.get_child_blocks(sch.get_sblock("root")))


def test_the_transpose_of_a_depthwise_conv_is_pulled_into_its_write_back() -> None:
    """The convolution's accumulators (pixels x a vector of channels) are stored channels-last,
    one vector per pixel, into the buffer the layer norm reads: no NCHW intermediate, no
    transpose pass. Under v15 the write-back stored each channel a plane apart and the
    transpose read it back so. Keyed anew; exact against the unscheduled kernel."""
    kernel = _depthwise_layer_norm()
    assert RulesSchedule().kernel_key(kernel) == "rules:v16"
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    assert scheduled.attrs[SCHEDULE_ATTR].startswith("microkernel"), scheduled.attrs[SCHEDULE_ATTR]
    sch, root = _root(scheduled)
    names = [sch.get(b).name_hint for b in root]
    assert "T_transpose" not in names, names
    nchw = [b for b in root if [int(d) for d in sch.get(b).writes[0].source.shape] == [1, C, H, H]]
    assert not nchw, scheduled.script()
    stores = [b for b in root if any(r.source.scope() == "local" for r in sch.get(b).reads)
              and sch.get(b).writes[0].source.scope() == "global"]
    assert stores, scheduled.script()
    for block in stores:
        inner = sch.get(sch.get_loops(block)[-1])
        assert inner.kind == tirx.ForKind.VECTORIZED, scheduled.script()
    args = _inputs(kernel)
    np.testing.assert_allclose(_run(scheduled, args, (1, H, H, C)), _run(kernel, args, (1, H, H, C)),
                               rtol=1e-4, atol=1e-4)


def test_a_matmul_keeps_its_output_layout_when_the_transpose_would_move_its_vector() -> None:
    """The rule is found (the key moves to v16) but not applied: the matmul's vector axis is
    its output's innermost dimension, and the transposed layout would store it strided."""
    kernel = _matmul_transposed_layer_norm()
    assert RulesSchedule().kernel_key(kernel) == "rules:v16"
    sch = tvm.s_tir.Schedule(kernel)
    blocks.inline_injective(sch, blocks.has_fused_reduction(sch))
    (anchor,) = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if blocks.is_mac(sch, b)]
    found = transpose_layout.find_transpose(sch, anchor)
    assert found is not None and found.order == (1, 0)
    assert not rules._pull_transpose(sch, anchor, 16, 32)
    assert transpose_layout.find_transpose(sch, anchor) == found  # left as it was
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    args = _inputs(kernel)
    np.testing.assert_allclose(_run(scheduled, args, (32, 64)), _run(kernel, args, (32, 64)),
                               rtol=1e-4, atol=1e-4)


def test_a_conv_transposed_into_the_kernels_output_stores_it_channels_last() -> None:
    """The transposed buffer is the kernel's result (its layout is the graph's): the conv's
    own buffer takes it, the copy joins the write-back, and the write-back stores the output
    one vector of channels per pixel. Exact against the unscheduled kernel."""
    x, w = te.placeholder((1, 16, 8, 8), name="x"), te.placeholder((16, 16, 1, 1), name="w")
    out = topi.transpose(topi.nn.conv2d_nchw(x, w, 1, 0, 1), [0, 2, 3, 1])
    kernel = te.create_prim_func([x, w, out])
    # Keyed anew under v16, and under v19 since: its 1x1 conv reads the input itself (test_blocks).
    assert RulesSchedule().kernel_key(kernel) == "rules:v19"
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    sch, root = _root(scheduled)
    assert "T_transpose" not in [sch.get(b).name_hint for b in root], scheduled.script()
    (store,) = [b for b in root if sch.get(b).writes[0].source.same_as(scheduled.params[-1])]
    inner = sch.get(sch.get_loops(store)[-1])
    index = sch.get(store).writes[0].region[-1].min
    assert inner.kind == tirx.ForKind.VECTORIZED and int(inner.extent) in (4, 8, 16), scheduled.script()
    assert "ff" in index.name, index  # the output channel, the conv's vector axis
    args = _inputs(kernel)
    np.testing.assert_allclose(_run(scheduled, args, (1, 8, 8, 16)), _run(kernel, args, (1, 8, 8, 16)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels", [40, 48])  # padded to the tile, and not
def test_a_matmul_epilogue_into_nchw_runs_per_row_of_tiles(channels: int) -> None:
    """ConvNeXt's second MLP matmul ``[1, h, w, c]`` with its layer scale, transposed back to
    NCHW and added to the residual: the epilogue stores a whole row of pixels per channel,
    vectors along the row (per tile, as v15 ran it, it stored 4 pixels per channel, scalar,
    and the kernel was slower than the matmul and a transpose kernel apart). Exact."""
    x, w = te.placeholder((1, 8, 16, 64), name="x"), te.placeholder((64, channels), name="w")
    scale = te.placeholder((channels,), name="scale")
    residual = te.placeholder((1, channels, 8, 16), name="residual")
    k = te.reduce_axis((0, 64), name="k")
    matmul = te.compute((1, 8, 16, channels), lambda n, h, p, c: te.sum(x[n, h, p, k] * w[k, c], axis=k),
                        name="matmul")
    nchw = topi.transpose(topi.multiply(matmul, scale), [0, 3, 1, 2])
    kernel = te.create_prim_func([x, w, scale, residual, topi.add(nchw, residual)])
    # 40 channels: v20's narrow micro-kernel (five 8-lane vectors) instead of a pad to 64.
    assert RulesSchedule().kernel_key(kernel) == ("rules:v20" if channels == 40 else "rules:v16")
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    assert scheduled.attrs[SCHEDULE_ATTR].startswith("microkernel"), scheduled.attrs[SCHEDULE_ATTR]
    sch, root = _root(scheduled)
    (store,) = [b for b in root if sch.get(b).writes[0].source.same_as(scheduled.params[-1])]
    loops = [sch.get(lp) for lp in sch.get_loops(store)]
    assert loops[-1].kind == tirx.ForKind.VECTORIZED, scheduled.script()
    # The row of tiles: one parallel loop over the rows, the 16 pixels of a row in the store.
    assert loops[0].kind == tirx.ForKind.PARALLEL and int(loops[0].extent) % 8 == 0
    assert np.prod([int(lp.extent) for lp in loops[1:]]) == 16 * channels, scheduled.script()
    args = _inputs(kernel)
    shape = (1, channels, 8, 16)
    np.testing.assert_allclose(_run(scheduled, args, shape), _run(kernel, args, shape), rtol=1e-4, atol=1e-4)
