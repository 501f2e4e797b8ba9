"""The register-tiled, packed schedule of a multiply-accumulate anchor (conv2d, matmul, dense).

The anchor ``O[s...] += X[...] * W[...]`` is read as a GEMM-like micro-kernel, the design of
BLAS libraries (GotoBLAS, MLAS) and of TOPI's x86 ``conv2d_NCHWc`` / ``dense_pack`` schedules:

- the *vector axis* ``v`` is a spatial axis that only one operand (the *panel* operand ``W``)
  depends on; the other operand ``X`` is then a scalar broadcast along it;
- the *register axis* ``r`` is a spatial axis that ``W`` does not depend on, so one vector load
  of ``W`` feeds ``rb`` FMAs (``rb`` rows x ``nv`` vectors of accumulators);
- ``W`` is *packed* into a layout where ``v`` is innermost and contiguous
  (``[v_outer, reduction..., v_inner]``), so the micro-kernel streams it without strides, cache
  set conflicts or gathers. When ``W`` is a constant of the program (a model's weights), it is
  packed once at compile time (:mod:`.prepack`), and ``v`` is chosen among the axes only the
  constant depends on (a convolution's output channels); otherwise each call packs it, per
  panel inside the parallel loop when there are enough panels, else whole at the kernel's
  start;
- the accumulators live in a ``local`` tile whose layout is ``[r, v]``, written back once with
  the elementwise epilogue (bias, batch norm, activation, residual) inlined into the write-back.

Loop nest: ``parallel(outer tiles) / [pack] / reduction / r_inner (unrolled) / v_inner
(vectorized)``; prepacked panels are blocked to fit L2, the row blocks inside each block.
Depthwise convolutions (the channel axis indexes both operands) copy input and filter
channels-last and vectorize the channels (:func:`.depthwise.schedule_depthwise`). Matmuls whose
extents do not tile (ViT's 197 tokens) are padded first (``pad_einsum``).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV, ScheduleError

from fusion_rl.compiler.schedules.anchor_layout import (
    DATA_PAR, REDUCE, TILE_LANES, Layout, Unschedulable, analyze, channel_groups, einsum_padding,
    extent_of, is_channel, register_tile, simplified_indices, vars_of,
)
from fusion_rl.compiler.schedules.depthwise import schedule_depthwise
from fusion_rl.compiler.schedules.prepack import WeightPack, layout_free_params
from fusion_rl.compiler.schedules.register_tile import (
    cache_accumulators, index_map, loop_extent, split_tile, vectorize_by_registers,
    vectorize_contiguous_store, vectorize_inner,
)
from fusion_rl.compiler.schedules.transpose_layout import read_order, writes_in_order

#: Bytes of data that one cache block of a kernel may hold and still find in L2 when it is read
#: again: prepacked panels here, a pair's pointwise output in :mod:`.chain`. Half of the smallest
#: L2 of the x86 CPUs this runs on (Zen 3's 512 KiB): the rest of the working set uses the other.
L2_BLOCK_BYTES = 256 << 10


#: Vector lanes (fp32: one AVX2 register, half an AVX-512 one) that AVX-512 targets use where
#: 16 lanes do not pay: groups of 8 channels, and the depthwise path.
NARROW_LANES = 8


def schedule_anchor(sch: s_tir.Schedule, anchor: SBlockRV, lanes: int, registers: int,
                    min_work: int, vector_store: bool = False, tile_lanes: int = TILE_LANES,
                    ) -> tuple[set[str], dict[int, WeightPack], Layout]:
    """Schedule ``anchor`` (and its elementwise epilogue) as a packed micro-kernel.

    ``vector_store``: the anchor's output is laid out with its vector axis innermost
    (:mod:`.transpose_layout` gave it that layout), so the write-back stores along it.
    ``tile_lanes``: the widest register tile in lanes (:data:`.anchor_layout.TILE_LANES`; 0
    as ``rules:v19``, which also padded a vector axis of whole 8-lane vectors to 16 lanes).

    Returns the names of the blocks it scheduled, the parameters it gave a packed layout
    (:mod:`.prepack`; their callers must pass packed constants) and the layout it chose.
    Raises :class:`Unschedulable` or a TVM ``ScheduleError`` when the anchor does not fit; the
    caller reports it.
    """
    stmt = sch.get(anchor)
    loops = sch.get_loops(anchor)
    if len(loops) != len(stmt.iter_vars):
        raise Unschedulable("anchor loop nest is not one loop per block iterator")
    grouped = channel_groups(stmt, lanes)
    if grouped is None and lanes > NARROW_LANES and channel_groups(stmt, NARROW_LANES) is not None:
        # Groups narrower than a register (RegNetX's 8-channel groups under AVX-512's 16
        # lanes): half-width vectors keep the grouped micro-kernel; without it the anchor fell
        # to the plain tile rule at 1/4-1/10 of its AVX2 speed.
        lanes = NARROW_LANES
        grouped = channel_groups(stmt, lanes)
    vector_axis = None
    if grouped is not None:
        # Grouped convolution, ``G`` output channels per group: split the channel iterator into
        # (group, channel in group), so the channels of one group form a vector that only the
        # filter depends on (the input is then a broadcast per group), as in a dense conv.
        axis, group = grouped
        stmt = split_channel_groups(sch, anchor, axis, group)
        # Vectorize the group's channels against a packed filter, the input a broadcast per
        # row (NCHWc-style direct convolution). The default, output width against a packed
        # input, packs every input element for only G rows of reuse, and with stride 2 that
        # pack is a gather: RegNetX's stride-2 grouped convs ran at 4-7 GFLOP/s that way.
        vector_axis = axis + 1
    padding = einsum_padding(stmt, lanes, registers)
    if tile_lanes and lanes > NARROW_LANES and _pads_narrow_vectors(stmt, padding):
        # A vector axis of whole 8-lane vectors (ConvNeXt's 40 channels) takes the narrow
        # micro-kernel (the rules retry at 8 lanes): padded to 64 lanes, 3 of every 8 FMAs
        # worked on padding (rules:v20; before, the pad).
        raise Unschedulable("the vector axis is whole 8-lane vectors, not 16-lane ones")
    if padding:
        # Ragged extents (ViT's 197 tokens): compute on a padded copy rather than give up the
        # vector or register tile; the copies in and out cost O(inputs + output).
        sch.pad_einsum(anchor, padding)
        stmt = sch.get(anchor)
        # The epilogue reads the padded result directly (the un-pad copy inlined into it), so
        # that it can join the accumulator tile below instead of two more passes over memory.
        # An un-pad copy that writes the kernel's output stays, and joins the tile itself.
        for copy in sch.get_consumers(anchor):
            try:
                sch.compute_inline(copy)
            except ScheduleError:
                pass
    lay, lanes = _choose_layout(sch, stmt, lanes, registers, vector_axis, tile_lanes)
    if lay.panel == -1:
        return schedule_depthwise(sch, anchor, stmt, lay, lanes, min_work,
                                  vector_store=vector_store), {}, lay
    names = [iv.var.name for iv in stmt.iter_vars]
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    exts = [extent_of(iv) for iv in stmt.iter_vars]
    work = 1
    for e in exts:
        work *= e or min_work

    # A constant panel operand is packed once, at compile time (prepack.py): the kernel's
    # parameter takes the panel layout. Otherwise every call packs it (below).
    packs = _prepack(sch, anchor, stmt, lay)
    stmt = sch.get(anchor)
    # Accumulator tile in registers, layout [.., r, v]; the epilogue joins its write-back.
    out_block = cache_accumulators(sch, anchor, stmt, lay)
    # The packed copy is made while the anchor's loops are still plain (one per iterator):
    # its loop order can only be permuted then.
    pack = make_pack(sch, anchor, stmt, lay) if lay.panel is not None and not packs else None

    loops, spatial, reduce, (v_out, v_in), (r_out, r_in) = split_tile(sch, anchor, kinds, lay)
    others = [loops[i] for i in spatial if i not in (lay.v, lay.r)]
    # Panel operand dependence: outer loops the panel ignores go *inside* the pack point.
    if lay.panel is not None:
        op = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)][lay.panel]
        panel_vars = set().union(*(vars_of(rng.min) for rng in op.region))
        dep = [lp for i, lp in zip([i for i in spatial if i not in (lay.v, lay.r)], others)
               if names[i] in panel_vars]
        free = [lp for i, lp in zip([i for i in spatial if i not in (lay.v, lay.r)], others)
                if names[i] not in panel_vars]
    else:
        dep, free = others, []
    r_outer = [r_out] if r_out is not None else []
    rows = free + r_outer
    inner = ([r_in] if r_in is not None else []) + [v_in]
    pin: list[LoopRV] = []
    if packs:
        # Prepacked panels, blocked as GotoBLAS does: a block of panels that fits in L2
        # outside, the row blocks inside it, then each panel of the block. Every weight is
        # read from memory once per call (a model's weights do not stay in L3 between
        # layers), and a row block stays in L1 while it meets the panels of the block.
        nb = _panel_block(sch, v_out, stmt, lay.vec)
        if nb > 1:
            v_out, v_pin = sch.split(v_out, factors=[None, nb])
            pin = [v_pin]
    order = dep + [v_out] + rows + pin
    lead = len(dep) + 1
    sch.reorder(*order, *reduce, *inner)
    # Parallel: the panel (block) loops if they offer enough tiles, else everything outside
    # the reduction but a panel block's own loop (then a per-call pack is made once, at the
    # kernel's start).
    lead_ext = 1
    for lp in order[:lead]:
        lead_ext *= loop_extent(sch, lp) or 1
    split = lead_ext >= 8 and lead < len(order) and (pack is not None or bool(packs))
    # An epilogue that stores the tile transposed (rows innermost: a matmul's [.., pixel,
    # channel] tile into NCHW) runs once per row of tiles, not per tile (_transposed_epilogue).
    transposed = None
    rows_of_tiles = 1
    for lp in order[:-1]:
        rows_of_tiles *= loop_extent(sch, lp) or 1
    # Only with rows of tiles enough for the cores (the parallel loop no longer has the tiles).
    if not split and not pin and r_out is not None and not vector_store and rows_of_tiles >= 8:
        transposed = _transposed_epilogue(sch, out_block, stmt, lay)
    if transposed is not None:
        fused = sch.fuse(*order[:-1]) if len(order) > 2 else order[0]
        acc_loop = r_out
    elif split:
        fused = sch.fuse(*order[:lead]) if lead > 1 else order[0]
        rest = order[lead:]
        acc_loop = sch.fuse(*rest) if len(rest) > 1 else rest[0]
    else:
        par_loops = order[:-1] if pin else order
        fused = sch.fuse(*par_loops) if len(par_loops) > 1 else par_loops[0]
        acc_loop = pin[0] if pin else fused
    tile_loop = fused
    per_panel = split and not packs
    if work >= min_work and (loop_extent(sch, fused) or 2) > 1:
        sch.parallel(fused)
    if r_in is not None:
        sch.unroll(r_in)
    vectorize_by_registers(sch, v_in, lanes)
    done = {stmt.name_hint}
    # Write-back (+ epilogue) at the accumulator tile, vectorized along v.
    sch.reverse_compute_at(out_block, acc_loop, preserve_unit_loops=False)
    wb_loops = sch.get_loops(out_block)
    if wb_loops and not (vector_store and vectorize_contiguous_store(sch, out_block, acc_loop, lanes,
                                                                    max(4, lay.vec // lanes))):
        inner_wb = wb_loops[-1]
        ext = loop_extent(sch, inner_wb)
        if ext and ext % 4 == 0 and ext <= 4 * lanes * 4 and not inner_wb.same_as(acc_loop):
            vectorize_by_registers(sch, inner_wb, lanes)
    done.add(sch.get(out_block).name_hint)
    if padding:
        done |= _join_tile(sch, out_block, acc_loop, lanes, stop=transposed)
    if transposed is not None:
        done.add(_place_transposed(sch, transposed, fused, lanes))
    if pack is not None:
        done.add(_place_pack(sch, pack, tile_loop if per_panel else None, lanes))
    if reduce:
        done.add(sch.get(sch.decompose_reduction(anchor, reduce[0])).name_hint)
    done.add(sch.get(anchor).name_hint)
    return done, packs, lay


def reads_pointwise(stmt: tirx.SBlock, buffer: tirx.Buffer) -> bool:
    """Whether ``stmt`` reads ``buffer`` only at single points indexed by plain iterators or
    constants (no div/mod or sums that remap the tile)."""
    regions = [r.region for r in stmt.reads if r.source.same_as(buffer)]
    return bool(regions) and all(isinstance(rng.min, (tirx.Var, tirx.IntImm))
                                 for region in regions for rng in region)


def vector_iter(sch: s_tir.Schedule, anchor: SBlockRV, lanes: int, registers: int) -> int | None:
    """The block iterator :func:`schedule_anchor` vectorizes ``anchor`` along, for an anchor it
    schedules over its own iterators (neither regrouped nor padded); else ``None``."""
    stmt = sch.get(anchor)
    if channel_groups(stmt, lanes) is not None or channel_groups(stmt, NARROW_LANES) is not None \
            or einsum_padding(stmt, lanes, registers):
        return None
    try:
        return _choose_layout(sch, stmt, lanes, registers)[0].v
    except Unschedulable:
        return None


def widens_tile(sch: s_tir.Schedule, anchor: SBlockRV, registers: int = 32,
                alone: bool = True) -> bool:
    """Whether :func:`schedule_anchor` may schedule ``anchor`` otherwise than ``rules:v19``.

    v20 changed only the narrow (8-lane) micro-kernel of 32-register targets: it is taken where
    16 lanes would pad a vector axis of whole 8-lane vectors, and its tile may hold more than 4
    vectors. The rules try it only when the 16-lane micro-kernel fails or finds no packed
    layout, which an anchor ``alone`` in its kernel and with a 16-lane GEMM axis never does;
    otherwise every candidate vector axis is tried (which one is taken depends on the
    parameters the caller marks constant), so this errs towards yes, and the kernel table
    re-times what it says yes to (:meth:`.rules.RulesSchedule.kernel_key`)."""
    if registers <= 16:
        return False
    stmt = sch.get(anchor)
    if _pads_narrow_vectors(stmt, einsum_padding(stmt, 2 * NARROW_LANES, registers)):
        return True
    if alone and _gemm_axes(_prepared(sch, anchor, 2 * NARROW_LANES, registers), 2 * NARROW_LANES):
        return False
    narrow = _prepared(sch, anchor, NARROW_LANES, registers)
    return any(register_tile(narrow, ext, rows_axes, NARROW_LANES, registers)
               != register_tile(narrow, ext, rows_axes, NARROW_LANES, registers, tile_lanes=0)
               for ext, rows_axes in _gemm_axes(narrow, NARROW_LANES))


def _prepared(sch: s_tir.Schedule, anchor: SBlockRV, lanes: int, registers: int) -> tirx.SBlock:
    """``anchor`` as :func:`schedule_anchor` analyzes it at ``lanes`` (a grouped convolution's
    channels split by group, a ragged einsum padded), on a copy of ``sch``."""
    work = sch.copy()
    grouped = channel_groups(work.get(anchor), lanes)
    if grouped is not None:
        split_channel_groups(work, anchor, *grouped)
    padding = einsum_padding(work.get(anchor), lanes, registers)
    if padding:
        work.pad_einsum(anchor, padding)
    return work.get(anchor)


def split_channel_groups(sch: s_tir.Schedule, anchor: SBlockRV, axis: int, group: int) -> tirx.SBlock:
    """Split a grouped convolution's channel iterator ``axis`` into (group, channel in group),
    so that the channels of one group form a vector only the filter depends on; returns the
    anchor's new block."""
    sch.transform_block_layout(anchor, tirx.IndexMap.from_func(
        lambda *a: [*a[:axis], a[axis] // group, a[axis] % group, *a[axis + 1:]],
        ndim=len(sch.get(anchor).iter_vars), index_dtype="int64"))
    return sch.get(anchor)


def _pads_narrow_vectors(stmt: tirx.SBlock, padding: list[int] | None) -> bool:
    """Whether ``padding`` (:func:`.anchor_layout.einsum_padding` at 16 lanes) pads an axis
    that whole 8-lane vectors tile."""
    return bool(padding) and any(pad > 1 and (extent_of(iv) or 0) % NARROW_LANES == 0
                                 for pad, iv in zip(padding, stmt.iter_vars) if iv.iter_type == DATA_PAR)


def _gemm_axes(stmt: tirx.SBlock, lanes: int) -> list[tuple[int, list[int]]]:
    """``(extent, row axes)`` of each axis :func:`.anchor_layout.analyze` could vectorize as a
    GEMM (one operand depends on it, whole vectors, some axis to block rows on)."""
    out = stmt.writes[0].source
    uses = [set().union(*(vars_of(e) for e in simplified_indices(op, stmt)))
            for op in stmt.reads if not op.source.same_as(out)]
    if len(uses) != 2:
        return []
    names = [iv.var.name for iv in stmt.iter_vars]
    spatial = [i for i, iv in enumerate(stmt.iter_vars)
               if iv.iter_type == DATA_PAR and (extent_of(iv) or 0) > 1]
    axes = []
    for v in spatial:
        owners = [k for k in (0, 1) if names[v] in uses[k]]
        ext = extent_of(stmt.iter_vars[v])
        rows_axes = [j for j in spatial if j != v and names[j] not in uses[owners[0]]] if owners else []
        if len(owners) == 1 and ext % lanes == 0 and rows_axes:
            axes.append((ext, rows_axes))
    return axes


def _choose_layout(sch: s_tir.Schedule, stmt: tirx.SBlock, lanes: int, registers: int,
                   vector_axis: int | None = None, tile_lanes: int = TILE_LANES) -> tuple[Layout, int]:
    """The anchor's layout (:func:`analyze`; the vector axis, if not given, the one only a
    constant operand depends on) and the lanes it runs at. Raises :class:`Unschedulable`."""
    if vector_axis is None:
        vector_axis = _constant_operand_axis(sch, stmt, lanes)
    lay = analyze(stmt, lanes, registers, vector_axis, tile_lanes)
    if lay.panel == -1 and lanes > NARROW_LANES:
        # Depthwise at 8 lanes under AVX-512 too: its per-call channels-last copies are per
        # block of ``lanes`` channels, and half-width blocks made MobileNetV2 9% faster end to
        # end, head to head (1.087 and 1.091, IQR 0.014-0.029, on a Zen 5 host; ConvNeXt's 7x7
        # depthwise unchanged, 1.001).
        lanes = NARROW_LANES
        lay = analyze(stmt, lanes, registers, vector_axis, tile_lanes)
    return lay, lanes


def _transposed_epilogue(sch: s_tir.Schedule, out_block: SBlockRV, stmt: tirx.SBlock,
                         lay: Layout) -> str | None:
    """The write-back's sole consumer when it stores the tile transposed with the register
    axis ``r`` innermost (a matmul's ``[.., w, c]`` tile, its epilogue writing NCHW), else
    ``None``. Computed per tile, such an epilogue stores ``rows`` pixels per channel (4 floats
    at a time, a plane apart; ConvNeXt's matmul + transpose + residual ran slower fused than
    the matmul and a transpose kernel apart); per row of tiles, a whole row of pixels per
    channel, contiguous."""
    if lay.r is None:
        return None
    r_var = stmt.iter_vars[lay.r].var
    r_dims = [d for d, rng in enumerate(stmt.writes[0].region) if rng.min.same_as(r_var)]
    consumers = sch.get_consumers(out_block)
    if len(r_dims) != 1 or len(consumers) != 1:
        return None
    consumer = sch.get(consumers[0])
    if any(iv.iter_type != DATA_PAR for iv in consumer.iter_vars) or not writes_in_order(consumer):
        return None
    # Through the un-pad copy a padded anchor's epilogue reads (inlined into it) or directly.
    order = read_order(consumer, sch.get(out_block).writes[0].source)
    if order is None or order[-1] != r_dims[0] or order == tuple(range(len(order))):
        return None
    return consumer.name_hint


def _place_transposed(sch: s_tir.Schedule, name: str, row_loop: LoopRV, lanes: int) -> str:
    """Compute the transposed epilogue ``name`` at ``row_loop`` (a row of tiles), its
    innermost loop (the pixels of the row, contiguous in its output) vectorized when it is a
    multiple of 4 long."""
    block = sch.get_sblock(name)
    sch.reverse_compute_at(block, row_loop, preserve_unit_loops=False)
    loops = sch.get_loops(block)
    ext = loop_extent(sch, loops[-1]) if loops else None
    if ext and ext % 4 == 0 and not loops[-1].same_as(row_loop):
        vectorize_by_registers(sch, loops[-1], lanes)
    return name


def _join_tile(sch: s_tir.Schedule, out_block: SBlockRV, acc_loop: LoopRV, lanes: int,
               stop: str | None = None) -> set[str]:
    """Compute a padded anchor's elementwise consumers (epilogue, un-pad copy) at its
    accumulator tile; returns their names.

    Their domain is the unpadded one, so they cannot be inlined into the padded write-back
    (:func:`cache_accumulators` inlines only same-shape consumers); at the tile they read the
    padded result while it is in L1, the rows past the real extent skipped by a predicate.
    Without this, ViT's fused dense + GELU wrote the padded result, copied it, and ran its
    epilogue as separate passes, and was slower fused than unfused.
    """
    names: set[str] = set()
    block = out_block
    while len(consumers := sch.get_consumers(block)) == 1:
        nxt = consumers[0]
        if sch.get(nxt).name_hint == stop:
            break  # placed per row of tiles (_place_transposed)
        if any(iv.iter_type != DATA_PAR for iv in sch.get(nxt).iter_vars):
            break
        if not reads_pointwise(sch.get(nxt), sch.get(block).writes[0].source):
            # A reshape folded into the consumer (ViT-style head split: ``(h * 32 + d) % 96``)
            # maps a tile to a region TVM's bound inference does not cover exactly: joined at a
            # 48-wide AVX-512 tile, such a consumer computed wrong values. Only a consumer that
            # reads the tile element by element joins it.
            break
        try:
            sch.reverse_compute_at(nxt, acc_loop, preserve_unit_loops=False)
        except ScheduleError:
            break
        loops = sch.get_loops(nxt)
        ext = loop_extent(sch, loops[-1]) if loops else None
        if ext and ext % lanes == 0 and ext <= 4 * lanes and not loops[-1].same_as(acc_loop):
            vectorize_by_registers(sch, loops[-1], lanes)
        names.add(sch.get(nxt).name_hint)
        block = nxt
    return names


def _constant_operand_axis(sch: s_tir.Schedule, stmt: tirx.SBlock, lanes: int) -> int | None:
    """The innermost spatial axis that only a compile-time-constant operand (a layout-free
    parameter) depends on, or None: vectorized against that operand, it is prepacked, and
    the other operand is broadcast (NCHWc-style direct convolution: no per-call pack)."""
    consts = list(layout_free_params(sch.mod["main"]).values())
    if not consts:
        return None
    out = stmt.writes[0].source
    operands = [r for r in stmt.reads if not r.source.same_as(out)]
    if len(operands) != 2:
        return None
    uses = [set().union(*(vars_of(e) for e in simplified_indices(op, stmt))) for op in operands]
    const = [any(c.same_as(op.source) for c in consts) for op in operands]
    for i in reversed(range(len(stmt.iter_vars))):
        iv = stmt.iter_vars[i]
        owners = [k for k in (0, 1) if iv.var.name in uses[k]]
        if iv.iter_type == DATA_PAR and len(owners) == 1 and const[owners[0]] \
                and (extent_of(iv) or 1) % lanes == 0:
            return i
    return None


def _panel_block(sch: s_tir.Schedule, v_out: LoopRV, stmt: tirx.SBlock, vec: int) -> int:
    """Panels per L2 block: the largest divisor of the panel count whose panels fit in
    :data:`L2_BLOCK_BYTES`."""
    panels = loop_extent(sch, v_out) or 1
    depth = 1
    for iv in stmt.iter_vars:
        if iv.iter_type == REDUCE:
            depth *= extent_of(iv) or 1
    panel_bytes = depth * vec * stmt.writes[0].source.dtype.bits // 8
    return max((d for d in range(1, panels + 1)
                if panels % d == 0 and d * panel_bytes <= L2_BLOCK_BYTES), default=1)


def _prepack(sch: s_tir.Schedule, anchor: SBlockRV, stmt: tirx.SBlock,
             lay: Layout) -> dict[int, WeightPack]:
    """Give the panel operand's parameter the panel layout when every caller passes a
    constant (``layout_free_buffers``); returns ``{param index: pack}`` (empty: not packed)."""
    free = layout_free_params(sch.mod["main"])
    if lay.panel is None or not free:
        return {}
    out = stmt.writes[0].source
    reads = [i for i, r in enumerate(stmt.reads) if not r.source.same_as(out)]
    idx = reads[lay.panel]
    region = stmt.reads[idx]
    param = next((i for i, p in free.items() if p.same_as(region.source)), None)
    if param is None:
        return {}
    v = stmt.iter_vars[lay.v]
    index = simplified_indices(region, stmt)
    dims = [d for d, e in enumerate(index) if v.var.name in vars_of(e)]
    if len(dims) != 1 or not is_channel(index[dims[0]], v):
        return {}
    pack = WeightPack(dims[0], lay.vec)
    if not pack.fits(tuple(int(n) for n in region.source.shape)):
        return {}
    dtype = str(region.source.shape[0].ty) if region.source.shape else "int64"
    sch.transform_layout(anchor, ("read", idx), pack.index_map(len(index), dtype))
    return {param: pack}


def make_pack(sch: s_tir.Schedule, anchor: SBlockRV, stmt: tirx.SBlock, lay: Layout) -> SBlockRV:
    """Copy the panel operand into ``[reduction/other..., v]`` order (contiguous ``v``)."""
    out = stmt.writes[0].source
    reads = list(stmt.reads)
    idx = [i for i, r in enumerate(reads) if not r.source.same_as(out)][lay.panel]
    # Index the copy by the block iterators the operand uses, v last.
    used = set().union(*(vars_of(rng.min) for rng in reads[idx].region))
    ivs = [i for i, iv in enumerate(stmt.iter_vars) if iv.var.name in used]
    perm = [i for i in ivs if i != lay.v] + [lay.v]
    pack = sch.reindex_cache_read(anchor, idx, "global",
                                  index_map(lambda *a: [a[i] for i in perm], stmt))
    # The copy's loops follow the anchor's iterator order; put v innermost so that the copy
    # writes (and, for dense weights, reads) whole vectors instead of striding by a row.
    order = [ivs.index(i) for i in perm]
    if order != sorted(order):
        sch.transform_block_layout(
            pack, tirx.IndexMap.from_func(lambda *a: [a[k] for k in order], ndim=len(ivs),
                                          index_dtype="int64"))
    return pack


def _place_pack(sch: s_tir.Schedule, pack: SBlockRV, at: LoopRV | None, lanes: int) -> str:
    """Pack per panel under ``at`` (inside the parallel loop), or whole at the kernel's start
    (parallel over its outer loop); vectorize the copy's innermost loop."""
    if at is not None:
        sch.compute_at(pack, at, preserve_unit_loops=False)
    loops = sch.get_loops(pack)
    vectorize_inner(sch, pack, lanes)
    if at is None and len(loops) > 1 and (loop_extent(sch, loops[0]) or 1) > 1:
        sch.parallel(loops[0])
    return sch.get(pack).name_hint

