"""A two-anchor group with one shared tile: a pointwise convolution computed inside the channel
blocks of the depthwise convolution it feeds (MobileNet's inverted residual, expand -> depthwise).

The rules schedule every other multi-anchor kernel anchor by anchor: each anchor gets its own
loop nest and the intermediate between them goes through memory, so such a group is never faster
than its anchors as separate kernels. This pair is different, and is the shape AGO (INFOCOM'23)
fuses on mobile CPUs:

- output channel ``c`` of a depthwise convolution reads input channel ``c`` only, so a block of
  ``lanes`` depthwise channels needs the same ``lanes`` channels of the pointwise output and
  nothing else. Computing the pointwise convolution per block recomputes nothing;
- the depthwise schedule (:func:`~.microkernel.schedule_depthwise`) copies each channel block of
  its input channels-last before the taps. Here the pointwise convolution writes that block
  channels-last itself, so the copy is a contiguous one and the intermediate (4.8 MB for
  MobileNetV2's first expand) stays in the cache, never a round trip through memory.

The pointwise convolution inside a block is a register tile of ``rows`` pixels x one vector of
channels, accumulated over its input channels, its weights copied ``[input channel, channel]``
once per block.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV

from fusion_rl.compiler.schedules import microkernel
from fusion_rl.compiler.schedules.anchor_layout import DATA_PAR, REDUCE, Unschedulable, analyze, extent_of, vars_of

#: Pixels per register tile of the pointwise convolution (x one vector of channels each).
_ROWS = (8, 7, 4, 2)


def match(sch: s_tir.Schedule, anchors: list[SBlockRV]) -> tuple[SBlockRV, SBlockRV] | None:
    """``(pointwise, depthwise)`` when ``anchors`` are a 1x1 convolution whose output reaches a
    depthwise convolution through elementwise blocks only; else ``None``."""
    if len(anchors) != 2:
        return None
    pw, dw = anchors
    p_stmt, d_stmt = sch.get(pw), sch.get(dw)
    if not (_is_pointwise_conv(p_stmt) and len(d_stmt.writes[0].source.shape) == 4):
        return None
    try:
        if analyze(d_stmt, microkernel.NARROW_LANES).panel != -1:
            return None  # not a depthwise convolution
    except Unschedulable:
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


def _is_pointwise_conv(stmt: tirx.SBlock) -> bool:
    """A 4-D (NCHW) convolution whose reduction is over input channels only (1x1 kernel)."""
    if len(stmt.writes[0].source.shape) != 4:
        return False
    reduce = [iv for iv in stmt.iter_vars if iv.iter_type == REDUCE]
    return sum((extent_of(iv) or 0) > 1 for iv in reduce) == 1


def schedule_pair(sch: s_tir.Schedule, pw: SBlockRV, dw: SBlockRV, registers: int, min_work: int) -> set[str]:
    """Schedule the depthwise convolution, then compute the pointwise one (and its epilogue) in
    each of its channel blocks. Returns the names of the blocks scheduled.

    Raises :class:`Unschedulable` or a TVM ``ScheduleError`` when the pair does not fit.
    """
    pw_name = sch.get(pw).name_hint
    lanes = microkernel.NARROW_LANES
    d_stmt = sch.get(dw)
    lay = analyze(d_stmt, lanes, registers)
    done = microkernel.schedule_depthwise(sch, dw, d_stmt, lay, lanes, min_work, channels_inner=True)
    # The pointwise input's padding block (1x1: a plain copy): read directly.
    for producer in sch.get_producers(pw):
        sch.compute_inline(producer)
    pw = sch.get_sblock(pw_name)
    consumers = sch.get_consumers(pw)
    if len(consumers) != 1:
        raise Unschedulable("the pointwise output is read by more than the depthwise copy")
    head = sch.get_loops(consumers[0])[0]  # one depthwise channel block
    # Channels-last in blocks of `lanes`, as the depthwise copy reads it; one block per
    # depthwise block.
    sch.transform_layout(pw, ("write", 0), lambda n, c, h, w: [n, c // lanes, h, w, c % lanes])
    sch.compute_at(pw, head, preserve_unit_loops=False)
    pw = sch.get_sblock(pw_name)
    stmt = sch.get(pw)
    loops = [lp for lp in sch.get_loops(pw)[1:] if (microkernel.loop_extent(sch, lp) or 0) > 1]
    if len(loops) != 4 or microkernel.loop_extent(sch, loops[0]) != lanes:
        raise Unschedulable("the pointwise loops in a depthwise block are not (channel, h, w, k)")
    channel, row, col, red = loops
    width = microkernel.loop_extent(sch, col) or 0
    rows = next((r for r in _ROWS if width % r == 0), None)
    if rows is None:
        raise Unschedulable(f"no register tile divides the width {width}")
    c_out, c_in = sch.split(col, factors=[None, rows])
    sch.reorder(row, c_out, red, c_in, channel)
    sch.unroll(c_in)
    sch.vectorize(channel)
    # Weights [c, k, 1, 1] -> [c // lanes, k, 1, 1, c % lanes]: one vector load per (k, tile).
    # The weight is the operand that no pixel (the output's h and w iterators) indexes.
    out = stmt.writes[0].source
    pixel = {iv.var.name for iv in [iv for iv in stmt.iter_vars if iv.iter_type == DATA_PAR][2:]}
    w_idx = next(i for i, r in enumerate(stmt.reads) if not r.source.same_as(out)
                 and not set().union(*(vars_of(rng.min) for rng in r.region)) & pixel)
    w_pack = sch.cache_read(pw, w_idx, "global")
    sch.transform_layout(w_pack, ("write", 0), lambda o, i, a, b: [o // lanes, i, a, b, o % lanes])
    sch.compute_at(w_pack, head, preserve_unit_loops=False)
    done.add(sch.get(sch.decompose_reduction(pw, red)).name_hint)
    return done | {pw_name, sch.get(w_pack).name_hint}
