"""Two-anchor groups with one shared tile: a pointwise convolution computed inside the channel
blocks of the depthwise or grouped convolution it feeds (MobileNet's inverted residual, expand ->
depthwise; RegNetX's 1x1 -> grouped 3x3 with 8 channels per group).

The rules schedule every other multi-anchor kernel anchor by anchor: each anchor gets its own
loop nest and the intermediate between them goes through memory, so such a group is never faster
than its anchors as separate kernels. These pairs are different, and are the shape AGO
(INFOCOM'23) fuses on mobile CPUs:

- output channel ``c`` of a depthwise convolution reads input channel ``c`` only, and a group of
  a grouped convolution reads its own input channels only; so a block of ``lanes`` output
  channels (one depthwise block, or one group of ``lanes`` channels) needs the same ``lanes``
  channels of the pointwise output and nothing else. Computing the pointwise convolution per
  block recomputes nothing;
- the consumer copies each channel block of its input channels-last before the taps
  (:func:`~.depthwise.schedule_depthwise`, :func:`schedule_grouped`). Here the pointwise
  convolution writes that block channels-last itself, so the copy is a contiguous one and the
  intermediate (4.8 MB for MobileNetV2's first expand) stays in the cache, never a round trip
  through memory.

The pointwise convolution inside a block is a register tile of ``rows`` pixels x one or more
vectors of channels, accumulated over its input channels, its weights copied
``[input channel, channel]`` once per block. For a depthwise consumer (``rules:v18``) the
accumulators are registers, and one step of the parallel loop may cover several depthwise blocks
(:func:`pointwise_block`), so that the tile's vectors are as wide as the target's.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV

from fusion_rl.compiler.schedules import depthwise, microkernel, register_tile
from fusion_rl.compiler.schedules.anchor_layout import (
    DATA_PAR, REDUCE, Unschedulable, analyze, channel_groups, extent_of, is_depthwise,
    simplified_indices, vars_of,
)

#: Pixels per register tile of the pointwise convolution (x one or more vectors of channels).
_ROWS = (8, 7, 4, 2)


def match(sch: s_tir.Schedule, anchors: list[SBlockRV]) -> tuple[SBlockRV, SBlockRV] | None:
    """``(pointwise, consumer)`` when ``anchors`` are a 1x1 convolution whose output reaches a
    depthwise convolution, or a grouped one of ``NARROW_LANES`` channels per group, through
    elementwise blocks only; else ``None``."""
    if len(anchors) != 2:
        return None
    pw, dw = anchors
    p_stmt, d_stmt = sch.get(pw), sch.get(dw)
    if not (_is_pointwise_conv(p_stmt) and len(d_stmt.writes[0].source.shape) == 4):
        return None
    lanes = microkernel.NARROW_LANES
    if not (is_depthwise(d_stmt, lanes) or _group_width(d_stmt) == lanes):
        return None
    # Every block between them must be elementwise (the epilogue and the padding), one path.
    frontier, seen = list(sch.get_consumers(pw)), set()
    while frontier:
        block = frontier.pop()
        name = sch.get(block).name_hint
        if name in seen:
            continue
        seen.add(name)
        if name == d_stmt.name_hint:
            continue
        if any(iv.iter_type != DATA_PAR for iv in sch.get(block).iter_vars):
            return None
        frontier += list(sch.get_consumers(block))
    return (pw, dw) if d_stmt.name_hint in seen else None


def consumer_kind(sch: s_tir.Schedule, consumer: SBlockRV) -> str:
    """``"depthwise"`` or ``"grouped"``: the kind of a pair's consumer (:func:`match`)."""
    return "depthwise" if is_depthwise(sch.get(consumer), microkernel.NARROW_LANES) else "grouped"


def _group_width(stmt: tirx.SBlock) -> int | None:
    """Channels per group of a grouped convolution with as many input as output channels per
    group (``None``: not one). Its first reduction iterator is the group's input channel."""
    grouped = channel_groups(stmt, microkernel.NARROW_LANES)
    reduce = [iv for iv in stmt.iter_vars if iv.iter_type == REDUCE]
    if grouped is None or not reduce or extent_of(reduce[0]) != grouped[1]:
        return None
    return grouped[1]


def _is_pointwise_conv(stmt: tirx.SBlock) -> bool:
    """A 4-D (NCHW) convolution whose reduction is over input channels only (1x1 kernel)."""
    if len(stmt.writes[0].source.shape) != 4:
        return False
    reduce = [iv for iv in stmt.iter_vars if iv.iter_type == REDUCE]
    return sum((extent_of(iv) or 0) > 1 for iv in reduce) == 1


def schedule_pair(sch: s_tir.Schedule, pw: SBlockRV, dw: SBlockRV, registers: int, min_work: int,
                  vector_lanes: int = microkernel.NARROW_LANES) -> set[str]:
    """Schedule the consumer convolution (depthwise or grouped), then compute the pointwise one
    (and its epilogue) in each of its channel blocks. Returns the names of the blocks scheduled.

    ``vector_lanes``: the target's widest vector for the pointwise tile (:func:`pointwise_block`).

    Raises :class:`Unschedulable` or a TVM ``ScheduleError`` when the pair does not fit.
    """
    pw_name = sch.get(pw).name_hint
    lanes = microkernel.NARROW_LANES
    d_stmt = sch.get(dw)
    block = lanes
    depthwise_consumer = is_depthwise(d_stmt, lanes)
    if depthwise_consumer:
        lay = analyze(d_stmt, lanes, registers)
        out = sch.get(pw).writes[0].source
        _, channels, height, width = (int(d) for d in out.shape)
        channel_bytes = height * width * out.dtype.bits // 8
        block = pointwise_block(channels, channel_bytes, width, registers, vector_lanes)
        done = depthwise.schedule_depthwise(sch, dw, d_stmt, lay, lanes, min_work, channels_inner=True,
                                            blocks=block // lanes)
    else:
        done = schedule_grouped(sch, dw, lanes, registers, min_work)
    vec = min(vector_lanes, block)
    # The pointwise input's padding block (1x1: a plain copy) is gone: rule 1 inlines plain
    # copies of an anchor's input (blocks.inline_injective, rules:v19).
    if sch.get_producers(pw):
        raise Unschedulable("the pointwise convolution reads a block of the kernel")
    consumers = sch.get_consumers(pw)
    if len(consumers) != 1:
        raise Unschedulable("the pointwise output is read by more than the depthwise copy")
    head = sch.get_loops(consumers[0])[0]  # one step of the parallel loop: `block` channels
    # Channels-last in blocks of `block`, read by the consumer's copy a channel block at a time.
    sch.transform_layout(pw, ("write", 0), lambda n, c, h, w: [n, c // block, h, w, c % block])
    sch.compute_at(pw, head, preserve_unit_loops=False)
    pw = sch.get_sblock(pw_name)
    stmt = sch.get(pw)
    loops = [lp for lp in sch.get_loops(pw)[1:] if (register_tile.loop_extent(sch, lp) or 0) > 1]
    if len(loops) != 4 or register_tile.loop_extent(sch, loops[0]) != block:
        raise Unschedulable("the pointwise loops in a channel block are not (channel, h, w, k)")
    channel, row, col, red = loops
    width = register_tile.loop_extent(sch, col) or 0
    rows = _tile_rows(width, block // vec, registers)
    if rows is None:
        raise Unschedulable(f"no register tile divides the width {width}")
    # The accumulators in registers (depthwise pairs, rules:v18): the pointwise output is a
    # workspace buffer that LLVM cannot prove apart from the input, so it would load and store
    # them at every FMA. The grouped pairs keep v13's schedule: a local cache made no
    # difference there (within 3-6%, slower on all six of RegNetX's pairs).
    acc = sch.cache_write(pw, 0, "local") if depthwise_consumer else None
    c_out, c_in = sch.split(col, factors=[None, rows])
    # Per input channel: one weight vector per `vec` channels, one broadcast per pixel, and
    # rows x vectors accumulators.
    if block > vec:
        vectors, channel = sch.split(channel, factors=[None, vec])
        sch.reorder(row, c_out, red, vectors, c_in, channel)
        sch.unroll(vectors)
    else:
        sch.reorder(row, c_out, red, c_in, channel)
    sch.unroll(c_in)
    sch.vectorize(channel)
    if acc is not None:
        sch.reverse_compute_at(acc, c_out, preserve_unit_loops=False)
        wb = [lp for lp in sch.get_loops(acc) if (register_tile.loop_extent(sch, lp) or 0) > 1]
        if wb and register_tile.loop_extent(sch, wb[-1]) == block:
            _, wb_lanes = sch.split(wb[-1], factors=[None, vec])
            sch.vectorize(wb_lanes)
    # Weights [c, k, 1, 1] -> [c // block, k, 1, 1, c % block]: the block's weights of one
    # input channel are contiguous. The weight is the operand that no pixel (the output's h and
    # w iterators) indexes.
    out = stmt.writes[0].source
    pixel = {iv.var.name for iv in [iv for iv in stmt.iter_vars if iv.iter_type == DATA_PAR][2:]}
    w_idx = next(i for i, r in enumerate(stmt.reads) if not r.source.same_as(out)
                 and not set().union(*(vars_of(rng.min) for rng in r.region)) & pixel)
    w_pack = sch.cache_read(pw, w_idx, "global")
    sch.transform_layout(w_pack, ("write", 0), lambda o, i, a, b: [o // block, i, a, b, o % block])
    sch.compute_at(w_pack, head, preserve_unit_loops=False)
    done.add(sch.get(sch.decompose_reduction(pw, red)).name_hint)
    # The reduction block is renamed `<name>_update` by the decomposition when it writes a
    # cache; every name it had counts as scheduled.
    done |= {pw_name, sch.get(pw).name_hint, sch.get(w_pack).name_hint}
    return done | ({sch.get(acc).name_hint} if acc is not None else set())


def _tile_rows(width: int, vectors: int, registers: int) -> int | None:
    """Pixels per register tile: the widest of :data:`_ROWS` that divides ``width`` and leaves,
    beside ``vectors`` accumulators per pixel, registers for the weights and a broadcast."""
    return next((r for r in _ROWS if width % r == 0 and r * vectors + vectors + 1 <= registers), None)


def pointwise_block(channels: int, channel_bytes: int, width: int, registers: int, vector_lanes: int) -> int:
    """How many channels of a pointwise -> depthwise pair's pointwise output (``channel_bytes``
    per channel, rows ``width`` wide) one step of the parallel loop computes.

    One depthwise channel block (``NARROW_LANES``) gives the pointwise tile a single vector per
    input channel: one FMA per broadcast, at half an AVX-512 register. Several blocks per step
    give it ``block / vector_lanes`` full vectors per broadcast, as long as the step's output
    stays in the L2 cache (:data:`~.microkernel.L2_BLOCK_BYTES`), the parallel loop keeps
    :data:`_MIN_STEPS` steps, and a register tile still divides the width."""
    best = microkernel.NARROW_LANES
    for block in _BLOCKS:
        if (channels % block == 0 and channels // block >= _MIN_STEPS
                and block * channel_bytes <= microkernel.L2_BLOCK_BYTES
                and _tile_rows(width, block // min(vector_lanes, block), registers) is not None):
            best = block
    return best


#: Channels per step that :func:`pointwise_block` tries, in increasing order (multiples of the
#: depthwise block and of every vector width).
_BLOCKS = (16, 32)
#: At least this many steps of the parallel loop, so two to four threads stay balanced.
_MIN_STEPS = 6


def schedule_grouped(sch: s_tir.Schedule, anchor: SBlockRV, lanes: int, registers: int,
                     min_work: int) -> set[str]:
    """A grouped convolution of ``lanes`` channels per group, one group per block: the group's
    output channels are one vector against its filter, copied ``[rc, kh, kw, channel]``, and the
    input is a broadcast per output pixel from a channels-last copy of the group's input
    channels (made per block, as the depthwise schedule does), so that :func:`schedule_pair`
    can compute the pointwise convolution into that copy.

    The standalone grouped micro-kernel (:func:`~.microkernel.schedule_anchor`) packs the filter
    at compile time and fuses the group loop with the rows when there are fewer than 8 groups;
    here the group loop must stay the outer loop, since the pointwise tile is computed in it.
    """
    stmt = sch.get(anchor)
    if _group_width(stmt) != lanes:
        raise Unschedulable(f"not a grouped convolution of {lanes} channels per group")
    axis, group = channel_groups(stmt, lanes)
    stmt = microkernel.split_channel_groups(sch, anchor, axis, group)
    lay = analyze(stmt, lanes, registers, vector_axis=axis + 1)
    if lay.v != axis + 1 or lay.vec != lanes or lay.panel in (None, -1):
        raise Unschedulable("the grouped convolution has no per-group vector layout")
    out = stmt.writes[0].source
    operands = [i for i, r in enumerate(stmt.reads) if not r.source.same_as(out)]
    x_idx = operands[1 - lay.panel]
    # The input's channel dimension: the one the group iterator indexes.
    g_name = stmt.iter_vars[axis].var.name
    c_dim = next(d for d, e in enumerate(simplified_indices(stmt.reads[x_idx], stmt))
                 if g_name in vars_of(e))
    out_block = register_tile.cache_accumulators(sch, anchor, stmt, lay)
    w_pack = microkernel.make_pack(sch, anchor, stmt, lay)
    done = depthwise.tile_channel_blocks(sch, anchor, stmt, lay, lanes, min_work, out_block, w_pack,
                                           x_idx, c_dim, channels_inner=True)
    out_block = sch.get_sblock(sch.get(out_block).name_hint)
    wb_loops = sch.get_loops(out_block)
    if wb_loops and register_tile.loop_extent(sch, wb_loops[-1]) == lanes:
        sch.vectorize(wb_loops[-1])  # the group's channels, one vector store per pixel
    return done
