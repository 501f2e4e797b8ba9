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
(vectorized)``; prepacked panels are blocked to fit L2, the row blocks inside each block. Depthwise convolutions (the channel axis indexes both operands) copy input and
filter channels-last and vectorize the channels (:func:`schedule_depthwise`). Matmuls whose
extents do not tile (ViT's 197 tokens) are padded first (``pad_einsum``).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV, ScheduleError

from fusion_rl.compiler.schedules.anchor_layout import (
    DATA_PAR, REDUCE, Layout, Unschedulable, analyze, channel_groups, einsum_padding, extent_of,
    is_channel, simplified_indices, vars_of, x_operand,
)
from fusion_rl.compiler.schedules.prepack import WeightPack, layout_free_params
from fusion_rl.compiler.schedules.transpose_layout import read_order, writes_in_order

#: Bytes of data that one cache block of a kernel may hold and still find in L2 when it is read
#: again: prepacked panels here, a pair's pointwise output in :mod:`.chain`. Half of the smallest
#: L2 of the x86 CPUs this runs on (Zen 3's 512 KiB): the rest of the working set uses the other.
L2_BLOCK_BYTES = 256 << 10


#: Vector lanes (fp32: one AVX2 register, half an AVX-512 one) that AVX-512 targets use where
#: 16 lanes do not pay: groups of 8 channels, and the depthwise path.
NARROW_LANES = 8


def schedule_anchor(sch: s_tir.Schedule, anchor: SBlockRV, lanes: int, registers: int,
                    min_work: int, vector_store: bool = False) -> tuple[set[str], dict[int, WeightPack], Layout]:
    """Schedule ``anchor`` (and its elementwise epilogue) as a packed micro-kernel.

    ``vector_store``: the anchor's output is laid out with its vector axis innermost
    (:mod:`.transpose_layout` gave it that layout), so the write-back stores along it.

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
        n = len(stmt.iter_vars)
        sch.transform_block_layout(anchor, tirx.IndexMap.from_func(
            lambda *a: [*a[:axis], a[axis] // group, a[axis] % group, *a[axis + 1:]],
            ndim=n, index_dtype="int64"))
        stmt = sch.get(anchor)
        # Vectorize the group's channels against a packed filter, the input a broadcast per
        # row (NCHWc-style direct convolution). The default, output width against a packed
        # input, packs every input element for only G rows of reuse, and with stride 2 that
        # pack is a gather: RegNetX's stride-2 grouped convs ran at 4-7 GFLOP/s that way.
        vector_axis = axis + 1
    padding = einsum_padding(stmt, lanes, registers)
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
    lay, lanes = _choose_layout(sch, stmt, lanes, registers, vector_axis)
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
    if wb_loops and not (vector_store and _vectorize_contiguous_store(sch, out_block, acc_loop, lanes)):
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


def vectorize_by_registers(sch: s_tir.Schedule, loop: LoopRV, lanes: int) -> None:
    """Vectorize ``loop`` one register (``lanes`` elements) at a time, the registers unrolled.

    A loop vectorized whole becomes one LLVM vector of its full width. For widths that are not
    a power of two (3 x 16 = 48 lanes with AVX-512), LLVM's code (target ``znver4``, on a Zen 5
    host) was 13-30x slower than for 64 lanes (bench_bert's dense: 9.4 ms, 0.30 ms split) and,
    on ViT, wrong (inf in every output). Split per register
    (or per the largest power of two >= 4 dividing the extent), every width is plain vectors.
    """
    ext = loop_extent(sch, loop)
    if ext and ext > lanes:
        factor = lanes
        while factor > 4 and ext % factor:
            factor //= 2
        if ext % factor == 0:
            outer, loop = sch.split(loop, factors=[None, factor])
            sch.unroll(outer)
    sch.vectorize(loop)


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


def _choose_layout(sch: s_tir.Schedule, stmt: tirx.SBlock, lanes: int, registers: int,
                   vector_axis: int | None = None) -> tuple[Layout, int]:
    """The anchor's layout (:func:`analyze`; the vector axis, if not given, the one only a
    constant operand depends on) and the lanes it runs at. Raises :class:`Unschedulable`."""
    if vector_axis is None:
        vector_axis = _constant_operand_axis(sch, stmt, lanes)
    lay = analyze(stmt, lanes, registers, vector_axis)
    if lay.panel == -1 and lanes > NARROW_LANES:
        # Depthwise at 8 lanes under AVX-512 too: its per-call channels-last copies are per
        # block of ``lanes`` channels, and half-width blocks made MobileNetV2 9% faster end to
        # end, head to head (1.087 and 1.091, IQR 0.014-0.029, on a Zen 5 host; ConvNeXt's 7x7
        # depthwise unchanged, 1.001).
        lanes = NARROW_LANES
        lay = analyze(stmt, lanes, registers, vector_axis)
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


def split_tile(sch: s_tir.Schedule, anchor: SBlockRV, kinds: list, lay: Layout) -> tuple:
    """Split the vector axis by ``vec`` and the register axis by ``rows``.

    Returns (loops before the split, spatial iterator indices, reduction loops, (v_outer,
    v_inner), (r_outer or None, r_inner or None)).
    """
    loops = sch.get_loops(anchor)
    spatial = [i for i, k in enumerate(kinds) if k == DATA_PAR]
    reduce = [loops[i] for i, k in enumerate(kinds) if k == REDUCE]
    v_out, v_in = sch.split(loops[lay.v], factors=[None, lay.vec])
    r_out = r_in = None
    if lay.r is not None and lay.rows > 1:
        r_out, r_in = sch.split(loops[lay.r], factors=[None, lay.rows])
    elif lay.r is not None:
        r_out = loops[lay.r]
    return loops, spatial, reduce, (v_out, v_in), (r_out, r_in)


def _index_map(fn, stmt: tirx.SBlock) -> tirx.IndexMap:
    """An index map over all of ``stmt``'s block iterators, in their dtype."""
    # Legalized Relax kernels index with int64 (TVM's default for ``from_func`` too).
    return tirx.IndexMap.from_func(fn, ndim=len(stmt.iter_vars), index_dtype="int64")


def loop_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def cache_accumulators(sch: s_tir.Schedule, anchor: SBlockRV, stmt: tirx.SBlock, lay: Layout) -> SBlockRV:
    """``local`` accumulators indexed in block-iterator order with ``v`` last; returns the
    write-back block with every single-producer elementwise consumer inlined into it."""
    spatial = [i for i, iv in enumerate(stmt.iter_vars) if iv.iter_type == DATA_PAR]
    perm = [i for i in spatial if i != lay.v] + [lay.v]

    def index_map(*axes):  # maps *all* block iterators to the accumulator's index
        return [axes[i] for i in perm]

    wb = sch.reindex_cache_write(anchor, 0, "local", _index_map(index_map, stmt))
    out_shape = [int(s) for s in stmt.writes[0].source.shape]
    changed = True
    while changed:
        changed = False
        consumers = sch.get_consumers(wb)
        # Only a sole consumer joins the write-back: with several, inlining one of them left
        # the others reading a buffer whose allocation was gone ("used before its
        # definition" at build time; found by the plan fuzzer on a whole-network group).
        for consumer in consumers if len(consumers) == 1 else []:
            c = sch.get(consumer)
            if not c.writes or [int(s) for s in c.writes[0].source.shape] != out_shape:
                continue
            if any(iv.iter_type != DATA_PAR for iv in c.iter_vars):
                continue
            try:
                sch.reverse_compute_inline(consumer)
                changed = True
                break
            except ScheduleError:
                continue
    return wb


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
                                  _index_map(lambda *a: [a[i] for i in perm], stmt))
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
    if loops:
        inner = loops[-1]
        ext = loop_extent(sch, inner)
        if ext and ext % 4 == 0 and ext <= 256:
            try:
                vectorize_by_registers(sch, inner, lanes)
            except ScheduleError:
                pass
        if at is None and len(loops) > 1 and (loop_extent(sch, loops[0]) or 1) > 1:
            sch.parallel(loops[0])
    return sch.get(pack).name_hint


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
                                    _index_map(lambda *a: [a[i] for i in w_perm], stmt))
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
        _vectorize_contiguous_store(sch, out_block, acc_loop, lanes)
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
        _vectorize_inner(sch, x_pack, lanes)
    sch.compute_at(w_pack, step, preserve_unit_loops=False)
    _vectorize_inner(sch, w_pack, lanes)
    done |= {sch.get(x_pack).name_hint, sch.get(w_pack).name_hint}
    if reduce:
        done.add(sch.get(sch.decompose_reduction(anchor, reduce[0])).name_hint)
    done.add(sch.get(anchor).name_hint)
    return done


def _vectorize_inner(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> None:
    loops = sch.get_loops(block)
    ext = loop_extent(sch, loops[-1]) if loops else None
    if ext and ext % 4 == 0 and ext <= 256:
        try:
            vectorize_by_registers(sch, loops[-1], lanes)
        except ScheduleError:
            pass


def _vectorize_contiguous_store(sch: s_tir.Schedule, block: SBlockRV, tile: LoopRV, lanes: int) -> bool:
    """Vectorize a write-back (computed at loop ``tile``) along its buffer's last dimension:
    the one of its own loops that drives that index, if it is a whole number of vectors (at
    most four), moved innermost and vectorized a register at a time. Returns whether it did.
    Used where :mod:`.transpose_layout` put the anchor's vector axis last: the write-back's
    loops still follow the old layout (a depthwise tile's pixels innermost), and vectorized so
    they would scatter."""
    loops = sch.get_loops(block)
    at = next((i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(tile))), None)
    own = loops[at + 1:] if at is not None else []
    if not own:
        return False
    realize = sch.get(own[-1]).body
    if not isinstance(realize, s_tir.SBlockRealize):
        return False
    last = realize.block.writes[0].region[-1].min
    value = next((v for iv, v in zip(realize.block.iter_vars, realize.iter_values)
                  if iv.var.same_as(last)), None)
    if value is None:
        return False
    names = vars_of(value)
    driving = [lp for lp in own if sch.get(lp).loop_var.name in names]
    ext = loop_extent(sch, driving[0]) if len(driving) == 1 else None
    if not ext or ext % lanes or ext > 4 * lanes:
        return False
    sch.reorder(*[lp for lp in own if not lp.same_as(driving[0])], driving[0])
    vectorize_by_registers(sch, driving[0], lanes)
    return True
