"""Rule 3 of the ``rules`` schedule: row reductions (softmax, layer norm), in a kernel without an
anchor (:func:`try_dlight_reduction`) or after one (:func:`schedule_row_runs`). Rows run in
parallel, every block is computed per row, and each row reduction is factored into one partial
result per vector lane (``rfactor``); where that does not fit, dlight's ``cpu.Reduction``.
"""

from __future__ import annotations

import logging

from tvm import s_tir
from tvm.s_tir.schedule import SBlockRV, ScheduleError

from fusion_rl.errors import first_line

from . import register_tile, transpose_layout
from .anchor_layout import DATA_PAR, REDUCE, extent_of
from .blocks import (
    Ctx, is_injective, is_row_reduction, reads_row_reduction,
    root_blocks, row_count, uses_var, vector_factor,
)

log = logging.getLogger(__name__)


def try_dlight_reduction(sch: s_tir.Schedule, ctx: Ctx) -> s_tir.Schedule | None:
    """Row reductions (softmax, layer_norm) of an anchor-free kernel, or ``None``.

    First :func:`_schedule_rows`: each row reduction factored into one partial result per
    vector lane. dlight's ``cpu.Reduction`` (its fallback) leaves reductions scalar, one
    dependent ``max`` or ``add`` per element, and that chain, not memory, bounded softmax and
    layer_norm (a 197-wide softmax row: 197 dependent ``max``, then 197 dependent ``add``).
    """
    blocks = root_blocks(sch)
    if all(is_injective(sch, b) for b in blocks) or not _rows_aligned(sch, blocks):
        return None
    trial = sch.copy()
    try:
        if _schedule_rows(trial, ctx):
            return trial
    except Exception as err:  # noqa: BLE001 - any failure here leaves the kernel to dlight
        log.debug("rules: row reductions not factored: %s", err)
    from tvm.s_tir.dlight.cpu import Reduction  # local: dlight import is slow-ish

    func = sch.mod["main"]
    try:
        with ctx.target:
            result = Reduction().apply(func, ctx.target, False)
    except Exception as err:  # noqa: BLE001
        log.debug("rules: dlight Reduction failed: %s", err)
        return None
    return result[0] if isinstance(result, list) else result


def _rows_aligned(sch: s_tir.Schedule, blocks: list[SBlockRV]) -> bool:
    """Whether every row axis of the last block (its first :func:`.blocks.row_count` axes) indexes
    each reduction result it reads. Both row schedules compute every block per row *of the
    last block*, so a row axis the statistics do not depend on recomputes them once per value.

    A layer_norm fused with the transpose after it (ConvNeXt's channels-last block back to
    NCHW: output rows are channels, the statistics are per pixel) recomputed both reductions
    once per channel under dlight: 40x the work, 2.7 ms alone for a 0.5 MB tensor.
    """
    reductions = [sch.get(b) for b in blocks if any(iv.iter_type == REDUCE for iv in sch.get(b).iter_vars)]
    if not reductions:
        return True
    stmt = sch.get(blocks[-1])
    rows = [iv.var for iv in stmt.iter_vars[:row_count(reductions[0])] if (extent_of(iv) or 2) > 1]
    reduced = [r.writes[0].source for r in reductions]
    return all(all(uses_var(region, var) for var in rows)
               for region in stmt.reads if any(region.source.same_as(buf) for buf in reduced))


def _row_runs(sch: s_tir.Schedule, done: set[str]) -> list[list[str]]:
    """The row reductions of an anchor kernel with the blocks that read their results, as runs
    of consecutive root blocks (names) that :func:`_schedule_rows` may take: each starts at a
    row reduction and ends at the last block that reads one (the layer norm's output, the
    softmax's normalization)."""
    runs, run = [], []
    for block in root_blocks(sch) + [None]:
        name = sch.get(block).name_hint if block is not None else None
        if name is not None and name not in done and (
                is_row_reduction(sch, block) or (run and (
                    reads_row_reduction(sch, block) or _continues_row(sch, block, run)))):
            run.append(block)
            continue
        while run and not is_injective(sch, run[-1]):
            run.pop()
        if run:
            runs.append([sch.get(b).name_hint for b in run])
        run = []
    return runs


def _continues_row(sch: s_tir.Schedule, block: SBlockRV, run: list[SBlockRV]) -> bool:
    """Whether injective ``block`` reads a block of ``run`` element for element (same indices
    in the same order), so it can be computed per row with the run: a softmax's exponential
    between its two reductions, its output copies. Without it the exponential was a kernel-wide
    pass of its own, and over ViT's ragged 197 keys a scalar one."""
    if not is_injective(sch, block):
        return False
    stmt = sch.get(block)
    in_order = tuple(range(len(stmt.iter_vars)))
    names = {sch.get(b).name_hint for b in run}
    return any(transpose_layout.read_order(stmt, sch.get(p).writes[0].source) == in_order
               for p in sch.get_producers(block) if sch.get(p).name_hint in names)


def _inline_in_run(sch: s_tir.Schedule, run: list[str]) -> list[str]:
    """Inline the run's injective blocks but its last into their consumers, as an anchor-free
    row kernel has them; returns the run without them. Materialized, each (a softmax's shift
    and exponential, a layer norm's centring) wrote and re-read a kernel-sized buffer per row,
    and ViT's matmul + softmax kernel ran 1.6x slower than the two kernels apart."""
    kept = []
    for name in run[:-1]:
        block = sch.get_sblock(name)
        if is_injective(sch, block):
            try:
                sch.compute_inline(block)
                continue
            except ScheduleError:
                pass
        kept.append(name)
    return kept + run[-1:]


def schedule_row_runs(sch: s_tir.Schedule, ctx: Ctx,
                       done: set[str]) -> tuple[s_tir.Schedule, set[str]]:
    """Schedule each row run (:func:`_row_runs`) of an anchor kernel as the rows of an
    anchor-free one are (:func:`_schedule_rows`), apart from the anchors' loop nests. Left to
    :func:`.blocks.parallel_vectorize` instead, a layer norm's statistics were one scalar chain per row
    of strided loads from the anchor's NCHW output (ConvNeXt's depthwise -> layer norm kernels
    ran 1.3-1.6x slower than the convolution, transpose and layer norm as three kernels).

    Returns the schedule (a new one if any run was scheduled) and ``done`` with the blocks it
    scheduled."""
    done = set(done)
    for run in _row_runs(sch, done):
        if not _rows_aligned(sch, [sch.get_sblock(n) for n in run]):
            continue
        trial = sch.copy()
        before = {trial.get(b).name_hint for b in root_blocks(trial)}
        try:
            run = _inline_in_run(trial, run)
            if not _schedule_rows(trial, ctx, run):
                continue
        except Exception as err:  # noqa: BLE001 - the run is then scheduled as other blocks are
            log.debug("rules: row run %s not scheduled as rows: %s", run, first_line(err))
            continue
        sch = trial
        done |= set(run) | ({sch.get(b).name_hint for b in root_blocks(sch)} - before)
    return sch, done


def _schedule_rows(sch: s_tir.Schedule, ctx: Ctx, names: list[str] | None = None) -> bool:
    """dlight's row schedule (rows parallel, every block computed per row, elementwise blocks
    vectorized), with each row reduction ``rfactor``-ed by the vector width: ``lanes``
    independent partial results (the rf block, its lane loop vectorized), then one short
    reduction over the lanes. ``names``: the blocks to schedule so, in order (default: every
    root block). Returns False when they are not rows of reductions over their innermost axis,
    a whole number of vectors long (``sch`` may then be half changed: pass a copy)."""
    blocks = root_blocks(sch) if names is None else [sch.get_sblock(n) for n in names]
    last = blocks[-1]
    if not is_injective(sch, last) or len(sch.get_loops(last)) != len(sch.get(last).iter_vars):
        return False
    factored, rows = [], None
    for block in blocks:
        stmt = sch.get(block)
        kinds = [iv.iter_type for iv in stmt.iter_vars]
        if all(k == DATA_PAR for k in kinds):
            continue
        loops = sch.get_loops(block)
        if kinds.count(REDUCE) != 1 or kinds[-1] != REDUCE or len(loops) != len(kinds):
            return False
        extent = register_tile.loop_extent(sch, loops[-1])
        # A keepdims reduction's kept unit axis is no row: counting it would take the last
        # block's element loop for a row loop.
        count = row_count(stmt)
        if rows not in (None, count) or not extent:
            return False
        rows = count
        if extent < _MIN_FACTORED_ROW:
            continue  # a short tail (fast_math's ragged softmax) stays one scalar chain
        lanes = _row_lanes(extent, ctx.lanes(stmt.writes[0].source.dtype.bits))
        if lanes is None:
            # Ragged rows stay with dlight: compute_at drops the predicate that the split
            # gives the last partial vector, and the rows then read past their end.
            return False
        _, lane = sch.split(loops[-1], factors=[None, lanes])
        rf = sch.rfactor(lane, factor_axis=len(stmt.writes[0].region))
        # rfactor makes the lane the first iterator of the rf block: put it innermost, so that
        # compute_at below gives it the innermost loop, the one that is vectorized.
        ivs = sch.get(rf).iter_vars
        sch.reorder_block_iter_var(rf, [i for i in range(1, len(ivs)) if ivs[i].iter_type == DATA_PAR]
                                   + [i for i in range(1, len(ivs)) if ivs[i].iter_type != DATA_PAR] + [0])
        factored.append(rf)
    if rows is None:
        return False
    single = rows == 0
    if single:
        # One row ([1, C]: a pooled head's layer norm): the last block's unit first loop is
        # the row loop, run serially. Left to dlight, the statistics were recomputed for every
        # output element under a parallel loop, each thread writing the same scalar.
        loops = sch.get_loops(last)
        if len(loops) < 2 or register_tile.loop_extent(sch, loops[0]) != 1:
            return False
        rows = 1
    rf_names = {sch.get(b).name_hint for b in factored}
    last_name = sch.get(last).name_hint
    # The blocks of the rows in program order, the rf blocks among them.
    mine = [b for b in root_blocks(sch)
            if names is None or sch.get(b).name_hint in rf_names or sch.get(b).name_hint in names]
    head = sch.get_loops(last)[:rows]
    spatial = sch.fuse(*head) if rows > 1 else head[0]
    if not single:
        sch.parallel(spatial)
    # Every other block computed per row, consumers before producers (compute_at's order).
    for block in reversed(mine):
        if sch.get(block).name_hint != last_name:
            sch.compute_at(block, spatial, preserve_unit_loops=False)
    mine_names = {sch.get(b).name_hint for b in mine}
    for block in [b for b in root_blocks(sch) if sch.get(b).name_hint in mine_names]:
        stmt = sch.get(block)
        lanes = ctx.lanes(stmt.writes[0].source.dtype.bits)
        inner = sch.get_loops(block)[-1]
        if sch.get(inner).same_as(sch.get(spatial)):  # no loop of its own (a keepdims mean)
            continue
        if stmt.name_hint in rf_names:
            register_tile.vectorize_by_registers(sch, inner, lanes)
        elif all(iv.iter_type == DATA_PAR for iv in stmt.iter_vars):
            ext = register_tile.loop_extent(sch, inner)
            exact = vector_factor(ext, lanes)
            if ext and ext > lanes:
                # An exact divisor if there is one (40 channels: 8 lanes), else whole
                # vectors and a predicated tail (197 keys).
                inner = sch.split(inner, factors=[None, exact if exact > 1 else lanes])[1]
            if ext and ext >= 2:
                sch.vectorize(inner)
    return True


#: Row reductions shorter than this stay one scalar chain: the tail of a row split into vector
#: blocks (fast_math's ragged softmax), too short to factor by lanes.
_MIN_FACTORED_ROW = 8


def _row_lanes(extent: int, lanes: int) -> int | None:
    """The vector width a row of ``extent`` is factored by: the target's, or the widest
    narrower power of two (at least 4) that divides the row at least twice; ``None`` if none.
    ConvNeXt's first stage normalizes rows of 40 channels: no 16-lane factor under AVX-512,
    so its layer norms ran as dlight's scalar chains, 8 lanes apart."""
    while lanes >= 4:
        if extent % lanes == 0 and extent >= 2 * lanes:
            return lanes
        lanes //= 2
    return None
