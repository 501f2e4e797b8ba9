"""The register tile that the micro-kernels share (:mod:`.microkernel`, :mod:`.depthwise`,
:mod:`.chain`): the vector and register splits of an anchor, its ``local`` accumulators with the
epilogue in their write-back, and the loop helpers that vectorize one register at a time."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV, ScheduleError

from fusion_rl.compiler.schedules.anchor_layout import DATA_PAR, REDUCE, Layout, vars_of


def loop_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


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


def index_map(fn, stmt: tirx.SBlock) -> tirx.IndexMap:
    """An index map over all of ``stmt``'s block iterators, in their dtype."""
    # Legalized Relax kernels index with int64 (TVM's default for ``from_func`` too).
    return tirx.IndexMap.from_func(fn, ndim=len(stmt.iter_vars), index_dtype="int64")


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


def cache_accumulators(sch: s_tir.Schedule, anchor: SBlockRV, stmt: tirx.SBlock, lay: Layout) -> SBlockRV:
    """``local`` accumulators indexed in block-iterator order with ``v`` last; returns the
    write-back block with every single-producer elementwise consumer inlined into it."""
    spatial = [i for i, iv in enumerate(stmt.iter_vars) if iv.iter_type == DATA_PAR]
    perm = [i for i in spatial if i != lay.v] + [lay.v]

    def to_accumulator(*axes):  # maps *all* block iterators to the accumulator's index
        return [axes[i] for i in perm]

    wb = sch.reindex_cache_write(anchor, 0, "local", index_map(to_accumulator, stmt))
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


def vectorize_inner(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> None:
    """Vectorize ``block``'s innermost loop a register at a time when it is a whole number of
    4-lane steps, at most 256 (a copy's contiguous run); leave it scalar where TVM refuses."""
    loops = sch.get_loops(block)
    ext = loop_extent(sch, loops[-1]) if loops else None
    if ext and ext % 4 == 0 and ext <= 256:
        try:
            vectorize_by_registers(sch, loops[-1], lanes)
        except ScheduleError:
            pass


def vectorize_contiguous_store(sch: s_tir.Schedule, block: SBlockRV, tile: LoopRV, lanes: int,
                               max_vectors: int = 4) -> bool:
    """Vectorize a write-back (computed at loop ``tile``) along its buffer's last dimension:
    the one of its own loops that drives that index, if it is a whole number of vectors (at
    most ``max_vectors``: the register tile's), moved innermost and vectorized a register at a
    time. Returns whether it did.
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
    if not ext or ext % lanes or ext > max_vectors * lanes:
        return False
    sch.reorder(*[lp for lp in own if not lp.same_as(driving[0])], driving[0])
    vectorize_by_registers(sch, driving[0], lanes)
    return True
