"""An anchor's epilogue written padded, and short rows (``rules:v17``).

TensorFlow-style "same" convolutions export an explicit zero pad before each convolution
(EfficientNet-B0's ``ZeroPad2d``), so a one-anchor plan ends a kernel with the pad of the next
convolution's input. Under v16 the epilogue was inlined into that pad and ran as a scalar pass
of its own, and a pad whose rows were under 16 elements paid a div/mod per element.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx, topi

from fusion_rl.compiler.schedules import rules
from fusion_rl.compiler.schedules.base import SCHEDULE_ATTR
from fusion_rl.compiler.schedules.rules import RulesSchedule
from fusion_rl.compiler.target import parse_target

TARGET = parse_target("host").to_tvm()


def _conv_swish_pad(cin: int, cout: int, size: int, pad: int) -> tirx.PrimFunc:
    """A pointwise conv + bias + swish, zero-padded by ``pad`` for the next convolution."""
    x = te.placeholder((1, cin, size, size), name="x")
    w = te.placeholder((cout, cin, 1, 1), name="w")
    b = te.placeholder((1, cout, 1, 1), name="b")
    y = topi.add(topi.nn.conv2d_nchw(x, w, 1, 0, 1), b)
    out = topi.nn.pad(topi.multiply(y, topi.sigmoid(y)), (0, 0, pad, pad), (0, 0, pad, pad))
    return te.create_prim_func([x, w, b, out])


def _pad(channels: int, size: int, pad: int) -> tirx.PrimFunc:
    x = te.placeholder((1, channels, size, size), name="x")
    return te.create_prim_func([x, topi.nn.pad(x, (0, 0, pad, pad), (0, 0, pad, pad))])


def _run(func: tirx.PrimFunc, args: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    return out.numpy()


def _block(func: tirx.PrimFunc, name: str) -> tuple[tvm.s_tir.Schedule, object]:
    sch = tvm.s_tir.Schedule(func)
    return sch, sch.get_sblock(name)


def test_the_epilogue_of_a_padded_result_runs_at_the_anchors_tile() -> None:
    """The swish is computed at the conv's tile (once per element, in its write-back), and the
    pad only copies: no activation inside the pad's condition. Keyed anew; exact."""
    kernel = _conv_swish_pad(32, 64, 7, 2)
    # v19 changed it again: its 1x1 conv reads the input itself (test_blocks).
    assert RulesSchedule().kernel_key(kernel) == "rules:v19"
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    assert scheduled.attrs[SCHEDULE_ATTR] == "microkernel", scheduled.attrs[SCHEDULE_ATTR]
    sch, pad = _block(scheduled, "PadInput")
    body = str(sch.get(pad).body)
    assert "exp" not in body and "T_multiply" in body, body
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype("float32") for s in ((1, 32, 7, 7), (64, 32, 1, 1), (1, 64, 1, 1))]
    got = _run(scheduled, args, (1, 64, 11, 11))
    conv = np.einsum("nchw,kc->nkhw", args[0], args[1][:, :, 0, 0]) + args[2]
    want = np.pad(conv / (1 + np.exp(-conv)), ((0, 0), (0, 0), (2, 2), (2, 2)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_pad_of_short_rows_runs_them_serially() -> None:
    """11-wide rows are no whole number of vectors: each row is a serial loop under the parallel
    loop, not 121 elements of a fused loop with a div/mod each. Exact."""
    kernel = _pad(64, 7, 2)
    assert RulesSchedule().kernel_key(kernel) == "rules:v17"
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    sch, pad = _block(scheduled, "PadInput")
    loops = [sch.get(lp) for lp in sch.get_loops(pad)]
    assert [int(lp.extent) for lp in loops][-1] == 11 and loops[-1].kind == tirx.ForKind.SERIAL
    assert loops[0].kind == tirx.ForKind.PARALLEL
    x = np.random.default_rng(1).standard_normal((1, 64, 7, 7)).astype("float32")
    np.testing.assert_array_equal(_run(scheduled, [x], (1, 64, 11, 11)),
                                  np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2))))


def test_rows_of_16_or_whole_vectors_keep_their_key() -> None:
    """Only the kernels v17 schedules differently are keyed anew."""
    assert RulesSchedule().kernel_key(_pad(64, 16, 2)) == "rules:v12"  # 20-wide rows
    assert RulesSchedule().kernel_key(_pad(64, 6, 1)) == "rules:v12"  # 8-wide: whole vectors
