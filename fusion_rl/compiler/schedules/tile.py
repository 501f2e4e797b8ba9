"""Rule 2's fallback for an anchor (``tile``): a register tile without packing, for the anchors
the packed micro-kernel (:mod:`.microkernel`) does not fit.

The innermost output axis is split into a vector of ``lanes``, one other output axis (one the
vector operand does not depend on, so the vector load is reused) into a small register block,
the reduction loops sit between the outer tiles and that ``block x vector`` micro-tile, the outer
tiles are fused and parallelized (anchors of at least ``MIN_PARALLEL_MACS`` multiply-accumulates
only), the init is split out with ``decompose_reduction``, and the elementwise epilogue is moved
into the tile with ``reverse_compute_at``, so it runs while the tile is still in L1.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV, ScheduleError

from . import register_tile
from .anchor_layout import DATA_PAR, REDUCE, vars_of
from .blocks import (
    MIN_PARALLEL_MACS, Ctx, dtype_bits, is_injective, uses_var, vector_factor,
)


#: Accumulator rows per micro-tile: ``_REG_BLOCK x lanes`` accumulators fit the 16/32 vector
#: registers of AVX2/AVX-512 with room left for the operands.
_REG_BLOCK = 8


def schedule_anchor(sch: s_tir.Schedule, anchor: SBlockRV, ctx: Ctx) -> set[str]:
    """Register-tile a multiply-accumulate block and pull its epilogue into the tile.

    Returns the names of the blocks it scheduled (anchor, its init, attached epilogues).
    """
    stmt = sch.get(anchor)
    done = {stmt.name_hint}
    loops = sch.get_loops(anchor)
    if len(loops) != len(stmt.iter_vars):
        raise ValueError("anchor loop nest is not one loop per block iterator")
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    spatial = [lp for lp, k in zip(loops, kinds) if k == DATA_PAR]
    reduce = [lp for lp, k in zip(loops, kinds) if k == REDUCE]
    if not spatial:
        raise ValueError("anchor without spatial axes")
    # Which block iterator each loop drives (legalized kernels bind iterators to loops 1:1).
    sp_vars = [iv.var for iv, k in zip(stmt.iter_vars, kinds) if k == DATA_PAR]

    lanes = ctx.lanes(dtype_bits(sch, anchor))
    vec_idx = len(spatial) - 1
    vec = vector_factor(register_tile.loop_extent(sch, spatial[vec_idx]), lanes)
    blk_idx = _register_block_axis(sch, stmt, sp_vars, vec_idx)

    outer: list[LoopRV] = []
    block_inner: list[LoopRV] = []  # register-block axis: unrolled
    vec_inner: list[LoopRV] = []  # vector axis: innermost
    for i, loop in enumerate(spatial):
        ext = register_tile.loop_extent(sch, loop)
        factor = vec if i == vec_idx else _block_factor(ext) if i == blk_idx else 1
        dest = vec_inner if i == vec_idx else block_inner
        if factor > 1 and ext is not None and ext > factor:
            lo, li = sch.split(loop, factors=[None, factor])
            outer.append(lo)
            dest.append(li)
        elif factor > 1:
            dest.append(loop)  # the whole axis fits in the micro-tile
        else:
            outer.append(loop)
    # Micro-tile order: register-block axis then vector axis innermost; reduction between.
    inner = block_inner + vec_inner
    sch.reorder(*outer, *reduce, *inner)
    tile = sch.fuse(*outer) if len(outer) > 1 else outer[0] if outer else None
    # Loop kinds first: vectorize refuses a loop under the reduction loops once the init has
    # been split off, and decompose_reduction copies the kinds onto the init loops.
    for loop in vec_inner:
        sch.vectorize(loop)
    for loop in block_inner:
        sch.unroll(loop)  # independent accumulators for the FMA pipelines
    if tile is not None and register_tile.loop_extent(sch, tile) not in (None, 1) \
            and block_work(stmt) >= MIN_PARALLEL_MACS:
        sch.parallel(tile)
    if reduce:
        done.add(sch.get(sch.decompose_reduction(anchor, reduce[0])).name_hint)
        done.add(sch.get(anchor).name_hint)  # renamed "<name>_update" by decompose_reduction
    if tile is not None:
        done |= _attach_epilogue(sch, anchor, tile, ctx)
    return done


def block_work(stmt: tirx.SBlock) -> int:
    """Iterations of a block (output elements x reduction extent); symbolic extents count large."""
    work = 1
    for iv in stmt.iter_vars:
        ext = iv.dom.extent
        work *= int(ext) if isinstance(ext, tirx.IntImm) else MIN_PARALLEL_MACS
    return work


def _register_block_axis(
    sch: s_tir.Schedule, stmt: tirx.SBlock, sp_vars: list[tirx.Var], vec_idx: int
) -> int | None:
    """Pick the spatial axis to block in registers: innermost one the vector operand ignores.

    For conv2d NCHW that is the output channel (the input row vector is reused for every
    channel); for ``C[i, j] += A[i, k] * B[k, j]`` it is ``i``.
    """
    vec_var = sp_vars[vec_idx]
    out = stmt.writes[0].source
    vector_reads = [r for r in stmt.reads if uses_var(r, vec_var) and not r.source.same_as(out)]
    used: set[str] = set()
    for region in vector_reads:
        for rng in region.region:
            used |= vars_of(rng.min)
    for i in range(len(sp_vars) - 1, -1, -1):
        if i != vec_idx and sp_vars[i].name not in used:
            dom = stmt.iter_vars[_iter_index(stmt, sp_vars[i])].dom.extent
            if not isinstance(dom, tirx.IntImm) or int(dom) > 1:
                return i
    return None


def _iter_index(stmt: tirx.SBlock, var: tirx.Var) -> int:
    return next(i for i, iv in enumerate(stmt.iter_vars) if iv.var.same_as(var))


def _block_factor(extent: int | None) -> int:
    if extent is None:
        return 1
    for factor in (_REG_BLOCK, 6, 4, 3, 2):
        if extent % factor == 0:
            return factor
    return 1


def _attach_epilogue(sch: s_tir.Schedule, anchor: SBlockRV, tile: LoopRV, ctx: Ctx) -> set[str]:
    """Move elementwise consumers of the anchor's output into the anchor's outer tile loop.

    Only consumers that write a buffer of the anchor's output shape move: a ``pad_temp`` of the
    next convolution has a larger shape and must be computed in full before that conv runs.
    """
    out_shape = [int(s) for s in sch.get(anchor).writes[0].source.shape]
    attached: set[str] = set()
    for consumer in sch.get_consumers(anchor):
        stmt = sch.get(consumer)
        if not is_injective(sch, consumer) or not stmt.writes:
            continue
        if [int(s) for s in stmt.writes[0].source.shape] != out_shape:
            continue
        try:
            sch.reverse_compute_at(consumer, tile, preserve_unit_loops=False)
        except ScheduleError:
            continue
        attached.add(stmt.name_hint)
        loops = sch.get_loops(consumer)
        inner = loops[-1] if loops else None
        lanes = ctx.lanes(dtype_bits(sch, consumer))
        if inner is not None and not inner.same_as(tile):
            ext = register_tile.loop_extent(sch, inner)
            # The epilogue's inner loop is the anchor's vector tile: vectorize it whole.
            if ext is not None and 1 < ext <= lanes * 4 and vector_factor(ext, lanes) > 1:
                register_tile.vectorize_by_registers(sch, inner, lanes)
    return attached
