"""Channel-block schedules: a depthwise convolution, and the loop nest it shares with a grouped
convolution inside a pair (:mod:`.chain`). Per block of vector lanes of channels, the input and
the filter are copied channels-last and each output vector accumulates one input vector per
reduction step (ORT's MLAS does the same with NCHWc)."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV, ScheduleError

from fusion_rl.compiler.schedules.anchor_layout import (
    Layout, Unschedulable, extent_of, is_channel, vars_of, x_operand,
)
from fusion_rl.compiler.schedules.register_tile import (
    cache_accumulators, index_map, loop_extent, split_tile, vectorize_contiguous_store,
    vectorize_inner,
)


def schedule_depthwise(sch: s_tir.Schedule, anchor: SBlockRV, stmt: tirx.SBlock, lay: Layout,
                       lanes: int, min_work: int, channels_inner: bool = False,
                       vector_store: bool = False, blocks: int = 1) -> set[str]:
    """Depthwise convolution, channels-last inside the kernel (ORT's MLAS does the same with
    NCHWc): per block of ``lanes`` channels, the padded input is copied to ``[h, w, c]`` and the
    filter to ``[kh, kw, c]``; each (kh, kw) step is then one vector load of input per output
    vector and one filter vector shared by ``rows`` outputs, whatever the stride.

    The copy runs along the input's rows (vector reads, scattered writes), or with
    ``channels_inner`` along the channels (for an input that is channels-last already:
    :mod:`.chain` computes it so). ``vector_store``: as for :func:`schedule_anchor`. ``blocks``:
    channel blocks per step of the parallel loop (:func:`tile_channel_blocks`)."""
    names = [iv.var.name for iv in stmt.iter_vars]
    out = stmt.writes[0].source
    operands = [i for i, r in enumerate(stmt.reads) if not r.source.same_as(out)]
    uses = [set().union(*(vars_of(rng.min) for rng in stmt.reads[i].region)) for i in operands]
    xk = x_operand([stmt.reads[i] for i in operands], names[lay.v], uses)
    x_idx, w_idx = operands[xk], operands[1 - xk]
    c_dim = next(d for d, rng in enumerate(stmt.reads[x_idx].region)
                 if is_channel(rng.min, stmt.iter_vars[lay.v]))

    out_block = cache_accumulators(sch, anchor, stmt, lay)
    # Filter: [reduction..., c] through the block iterators (a single point per iteration).
    w_used = uses[1 - xk]
    w_ivs = [i for i, iv in enumerate(stmt.iter_vars) if iv.var.name in w_used]
    w_perm = [i for i in w_ivs if i != lay.v] + [lay.v]
    w_pack = sch.reindex_cache_read(anchor, w_idx, "global",
                                    index_map(lambda *a: [a[i] for i in w_perm], stmt))
    return tile_channel_blocks(sch, anchor, stmt, lay, lanes, min_work, out_block, w_pack,
                               x_idx, c_dim, channels_inner, vector_store, blocks)


def tile_channel_blocks(sch: s_tir.Schedule, anchor: SBlockRV, stmt: tirx.SBlock, lay: Layout,
                        lanes: int, min_work: int, out_block: SBlockRV, w_pack: SBlockRV,
                        x_idx: int, c_dim: int, channels_inner: bool,
                        vector_store: bool = False, blocks: int = 1) -> set[str]:
    """The loop nest that :func:`schedule_depthwise` and :func:`.chain.schedule_grouped` share:
    one parallel block of ``lanes`` channels outside, in it a channels-last copy of the input
    operand ``x_idx`` (its channel dimension ``c_dim`` moved last, padding computed in the copy)
    and the filter copy ``w_pack``, then ``rows`` outputs x one vector per reduction step, the
    accumulators ``out_block`` written back per row tile. With ``blocks`` > 1 each step of the
    parallel loop runs that many channel blocks in turn (a producer computed at the parallel
    loop, :mod:`.chain`, then covers them all). Returns the blocks scheduled."""
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    # Input: the buffer's own layout with the channel moved last, blocked by ``lanes``.
    x_pack = sch.cache_read(anchor, x_idx, "global")
    ndim = len(stmt.reads[x_idx].source.shape)

    def channels_last(*idx):
        rest = [idx[d] for d in range(ndim) if d != c_dim]
        return [idx[c_dim] // lanes, *rest, idx[c_dim] % lanes]

    sch.transform_layout(x_pack, ("write", 0), channels_last)
    producers = sch.get_producers(x_pack)
    for p in producers:  # the padding block: computed while copying, not materialized
        try:
            sch.compute_inline(p)
        except ScheduleError:
            pass

    loops, spatial, reduce, (v_out, v_in), (r_out, r_in) = split_tile(sch, anchor, kinds, lay)
    before = [loops[i] for i in spatial if i < lay.v]
    after = [loops[i] for i in spatial if i > lay.v and i != lay.r]
    rest = after + ([r_out] if r_out is not None else [])
    sch.reorder(*before, v_out, *rest, *reduce, *([r_in] if r_in is not None else []), v_in)
    head = sch.fuse(*before, v_out) if before else v_out
    step = head
    if blocks > 1:
        head, step = sch.split(head, factors=[None, blocks])
    acc_loop = sch.fuse(*rest) if len(rest) > 1 else (rest[0] if rest else step)
    work = 1
    for iv in stmt.iter_vars:
        work *= extent_of(iv) or min_work
    if work >= min_work and (loop_extent(sch, head) or 2) > 1:
        sch.parallel(head)
    if r_in is not None:
        sch.unroll(r_in)
    for lp in reduce:
        if (loop_extent(sch, lp) or 99) <= 7:
            sch.unroll(lp)
    sch.vectorize(v_in)
    sch.reverse_compute_at(out_block, acc_loop, preserve_unit_loops=False)
    if vector_store:
        vectorize_contiguous_store(sch, out_block, acc_loop, lanes)
    done = {stmt.name_hint, sch.get(out_block).name_hint}
    sch.compute_at(x_pack, step, preserve_unit_loops=False)
    if channels_inner:
        outer = sch.get_loops(x_pack)
        below = next(i for i, lp in enumerate(outer) if sch.get(lp).same_as(sch.get(step))) + 1
        copy = [lp for lp in outer[below:] if (loop_extent(sch, lp) or 0) > 1]
        if not copy or loop_extent(sch, copy[0]) != lanes:
            raise Unschedulable("the input copy's loops do not start with its channel block")
        sch.reorder(*copy[1:], copy[0])
        sch.vectorize(copy[0])
    else:
        vectorize_inner(sch, x_pack, lanes)
    sch.compute_at(w_pack, step, preserve_unit_loops=False)
    vectorize_inner(sch, w_pack, lanes)
    done |= {sch.get(x_pack).name_hint, sch.get(w_pack).name_hint}
    if reduce:
        done.add(sch.get(sch.decompose_reduction(anchor, reduce[0])).name_hint)
    done.add(sch.get(anchor).name_hint)
    return done
