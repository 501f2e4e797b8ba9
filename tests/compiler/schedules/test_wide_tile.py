"""``rules:v20``: the narrow (8-lane) micro-kernel of AVX-512 targets takes register tiles of more
than 4 vectors, and a matmul whose vector axis is whole 8-lane vectors (40 columns: ConvNeXt's
second MLP matmul) takes it instead of being padded to 64 columns. Only those kernels are keyed
anew. The schedules are built for a Zen 4 target on any host; they run where the host has AVX-512.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import s_tir, te, tirx, topi

from fusion_rl.compiler.schedules import blocks, rules
from fusion_rl.compiler.schedules.anchor_layout import TILE_LANES, register_tile
from fusion_rl.compiler.schedules.base import SCHEDULE_ATTR
from fusion_rl.compiler.schedules.rules import RulesSchedule

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
HOST_HAS_AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
CTX = blocks.Ctx(AVX512, 512, 32)
V19 = blocks.Ctx(AVX512, 512, 32, tile_lanes=0)


def _matmul(rows: int, k: int, n: int) -> tirx.PrimFunc:
    """``relu(x @ w + b)``, ``w`` a parameter as a model's weights are."""
    x, w = te.placeholder((rows, k), name="x"), te.placeholder((k, n), name="w")
    b = te.placeholder((n,), name="b")
    return te.create_prim_func([x, w, b, topi.nn.relu(topi.add(topi.matmul(x, w), b))])


def _accumulator_tile(func: tirx.PrimFunc) -> tuple[int, ...]:
    """The extents of the loops around the anchor's update inside its reduction: the register
    tile (rows, then vectors, then lanes)."""
    sch = s_tir.Schedule(func)
    update = sch.get_sblock("T_matmul_update")
    loops = [sch.get(lp) for lp in sch.get_loops(update)]
    inner = []
    for loop in reversed(loops):
        if loop.kind not in (tirx.ForKind.UNROLLED, tirx.ForKind.VECTORIZED):
            break
        inner.append(int(loop.extent))
    return tuple(reversed(inner))


def _run(func: tirx.PrimFunc, *arrays: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=AVX512)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in arrays], out)
    return out.numpy()


def test_forty_columns_take_five_narrow_vectors_not_a_pad() -> None:
    kernel = _matmul(112, 160, 40)
    wide = rules.schedule_prim_func(kernel, CTX)
    old = rules.schedule_prim_func(kernel, V19)
    # v20: 4 rows x 5 vectors of 8 lanes, all 40 columns; v19 padded them to 64 (4 x 16 lanes).
    assert _accumulator_tile(wide) == (4, 5, 8), wide.script()
    assert "pad" not in wide.script() and "_pad" in old.script()
    assert "8-lane vectors" in wide.attrs[SCHEDULE_ATTR]  # the 16-lane attempt says why it gave way
    assert RulesSchedule().kernel_key(kernel) == "rules:v20"


def test_a_narrow_tile_widens_only_with_four_rows_and_more_accumulators() -> None:
    sch = s_tir.Schedule(_matmul(56, 32, 40))
    stmt = sch.get(sch.get_sblock("T_matmul"))
    # 40 columns at 8 lanes: v19's rule allows 1 vector (4 does not divide 5): 8 rows x 1.
    assert register_tile(stmt, 40, [0], 8, 32, tile_lanes=0)[::2] == (1, 8)
    assert register_tile(stmt, 40, [0], 8, 32)[::2] == (5, 4)
    # 16-lane vectors: at most 4 (TILE_LANES), as v19; 16 registers (AVX2): at most 2.
    assert TILE_LANES // 16 == 4
    assert register_tile(stmt, 80, [0], 16, 32) == register_tile(stmt, 80, [0], 16, 32, tile_lanes=0)
    assert register_tile(stmt, 40, [0], 8, 16) == register_tile(stmt, 40, [0], 8, 16, tile_lanes=0)
    # A 14-row map: 5 vectors would leave 2 rows (a 10-accumulator tile ran at 0.8x of 7 x 1).
    short = s_tir.Schedule(_matmul(14, 32, 40))
    short_stmt = short.get(short.get_sblock("T_matmul"))
    assert register_tile(short_stmt, 40, [0], 8, 32)[::2] == (1, 7)


def test_kernels_v20_leaves_alone_keep_their_key() -> None:
    # 768 columns: 16-lane tiles, as v19 (a transformer's matmuls keep their timings).
    wide, old = (rules.schedule_prim_func(_matmul(128, 64, 768), c) for c in (CTX, V19))
    assert tvm_ffi.structural_equal(wide, old)
    assert RulesSchedule().kernel_key(_matmul(128, 64, 768)) != "rules:v20"


@pytest.mark.skipif(not HOST_HAS_AVX512, reason="the host has no AVX-512 to run the kernels on")
@pytest.mark.parametrize("rows,k,n", [(112, 160, 40), (56, 24, 40), (98, 40, 24)])
def test_wide_narrow_tiles_are_exact(rows: int, k: int, n: int) -> None:
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype("float32") for s in ((rows, k), (k, n), (n,)))
    out = _run(rules.schedule_prim_func(_matmul(rows, k, n), CTX), x, w, b, out_shape=(rows, n))
    np.testing.assert_allclose(out, np.maximum(x @ w + b, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HOST_HAS_AVX512, reason="the host has no AVX-512 to run the kernels on")
def test_a_batched_matmul_of_40_columns_and_ragged_rows_is_exact() -> None:
    """Attention's probabilities x values with 40-wide heads and 37 tokens: ragged rows padded,
    40 columns on the narrow micro-kernel."""
    p, v = te.placeholder((2, 37, 37), name="p"), te.placeholder((2, 37, 40), name="v")
    k = te.reduce_axis((0, 37), name="k")
    out = te.compute((2, 37, 40), lambda b, i, j: te.sum(p[b, i, k] * v[b, k, j], axis=k), name="pv")
    kernel = te.create_prim_func([p, v, out])  # not TOPI's, which marks v a constant to prepack
    scheduled = rules.schedule_prim_func(kernel, CTX)
    label = scheduled.attrs[SCHEDULE_ATTR]
    assert label.startswith("microkernel") and "8-lane vectors" in label, label
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 37, 37)).astype("float32"), rng.standard_normal((2, 37, 40)).astype("float32")
    np.testing.assert_allclose(_run(scheduled, a, b, out_shape=(2, 37, 40)), a @ b, rtol=1e-4, atol=1e-4)
