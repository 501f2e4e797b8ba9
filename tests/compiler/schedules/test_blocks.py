"""What the ``rules`` schedule reads of a kernel's blocks (``blocks.py``): the plain copy of an
anchor's input that ``rules:v19`` no longer materializes.

A convolution without padding still gets a ``pad_temp`` block from TOPI, a copy of its input
element for element. v18 kept every anchor input materialized, so each 1x1 conv paid a scalar
pass over its whole input before the micro-kernel ran.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import s_tir, te, tirx, topi

from fusion_rl.compiler.schedules import blocks, rules
from fusion_rl.compiler.schedules.base import SCHEDULE_ATTR
from fusion_rl.compiler.schedules.rules import RulesSchedule
from fusion_rl.compiler.target import parse_target

TARGET = parse_target("host").to_tvm()


def _conv(cin: int, cout: int, size: int, kernel: int, pad: int, stride: int = 1,
          depthwise: bool = False) -> tirx.PrimFunc:
    """A convolution + bias, as Relax legalizes it (TOPI's NCHW computes)."""
    x = te.placeholder((1, cin, size, size), name="x")
    b = te.placeholder((1, cout, 1, 1), name="b")
    if depthwise:
        w = te.placeholder((cout, 1, kernel, kernel), name="w")
        y = topi.nn.group_conv2d_nchw(x, w, stride, pad, 1, cin)
    else:
        w = te.placeholder((cout, cin, kernel, kernel), name="w")
        y = topi.nn.conv2d_nchw(x, w, stride, pad, 1)
    return te.create_prim_func([x, w, b, topi.add(y, b)])


def _has_block(func: tirx.PrimFunc, name: str) -> bool:
    return f'T.sblock("{name}")' in func.script()


def _run(func: tirx.PrimFunc, args: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    return out.numpy()


def _stmt(func: tirx.PrimFunc, name: str) -> tirx.SBlock:
    sch = s_tir.Schedule(func)
    return sch.get(sch.get_sblock(name))


def test_only_an_unpadded_input_copy_is_an_identity_copy() -> None:
    assert blocks.is_identity_copy(_stmt(_conv(16, 32, 7, 1, 0), "pad_temp"))
    assert not blocks.is_identity_copy(_stmt(_conv(16, 32, 7, 3, 1), "pad_temp"))  # zero border
    x = te.placeholder((4, 8), name="x")
    sch = s_tir.Schedule(te.create_prim_func([x, topi.transpose(x, (1, 0))]))
    (transpose,) = blocks.root_blocks(sch)
    assert not blocks.is_identity_copy(sch.get(transpose))


@pytest.mark.parametrize("cin, cout, size, stride", [
    (96, 32, 14, 1),   # a MobileNet-style projection
    (64, 128, 14, 2),  # a ResNet downsample shortcut: strided, the copy still whole
])
def test_a_pointwise_conv_reads_its_input_itself(cin: int, cout: int, size: int, stride: int) -> None:
    kernel = _conv(cin, cout, size, 1, 0, stride)
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    assert scheduled.attrs[SCHEDULE_ATTR] == "microkernel", scheduled.attrs[SCHEDULE_ATTR]
    assert _has_block(kernel, "pad_temp") and not _has_block(scheduled, "pad_temp")
    rng = np.random.default_rng(0)
    shapes = ((1, cin, size, size), (cout, cin, 1, 1), (1, cout, 1, 1))
    args = [rng.standard_normal(s).astype("float32") for s in shapes]
    out = size // stride
    got = _run(scheduled, args, (1, cout, out, out))
    want = np.einsum("nchw,kc->nkhw", args[0][:, :, ::stride, ::stride], args[1][:, :, 0, 0]) + args[2]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_padded_input_stays_materialized() -> None:
    """A 3x3 conv's pad reads each input element up to 9 times: inlined, the border's condition
    would run in the innermost loop."""
    scheduled = rules.schedule_prim_func(_conv(16, 32, 14, 3, 1), rules._make_ctx(TARGET))
    assert _has_block(scheduled, "pad_temp")


def test_only_the_kernels_whose_schedule_v19_changed_are_keyed_v19() -> None:
    provider = RulesSchedule()
    assert provider.key == "rules:v20" and {"rules:v18", "rules:v19"} <= set(provider.kernel_keys)
    assert provider.kernel_key(_conv(96, 32, 14, 1, 0)) == "rules:v19"
    # Rows of 16 and more: no row that v17 keys anew (test_pad_epilogue).
    assert provider.kernel_key(_conv(16, 32, 16, 3, 1)) == "rules:v12"
    # A depthwise conv without padding copies its input channels-last by itself: unchanged.
    assert provider.kernel_key(_conv(32, 32, 18, 3, 0, depthwise=True)) == "rules:v12"
