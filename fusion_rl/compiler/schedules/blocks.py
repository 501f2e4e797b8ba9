"""What the ``rules`` schedule (:mod:`.rules`) knows of a kernel's blocks, and the two rules every
kernel goes through: rule 1, inlining injective blocks (:func:`inline_injective`), and rule 4,
a parallel loop and a vector for every block left at the root (:func:`parallel_vectorize`).

The predicates here also decide a kernel's key (:meth:`.rules.RulesSchedule.kernel_key`), so
they read the kernel as written, on any target.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV, ScheduleError

from fusion_rl.graph.fast_math import ROW_BLOCK

from . import microkernel
from .anchor_layout import DATA_PAR, REDUCE, TILE_LANES, extent_of, is_depthwise, vars_of
from .register_tile import loop_extent

#: Below this many output elements a ``parallel`` loop costs more (thread-pool wake-up, a few
#: microseconds) than it saves, so tiny kernels run serially.
MIN_PARALLEL_ELEMS = 4096
#: Below this many multiply-accumulates an anchor runs serially: mlp_tiny's 1x64x128 and
#: 1x128x128 matmuls (8K, 16K MACs) take about a microsecond on one core, less than waking the
#: thread pool. Measured (2 threads, tvm plan, median of 15): mlp_tiny 4.4 us with the threshold
#: vs 6.6-11.7 us always parallel; se_cnn 0.080 ms at 32K but 0.131-0.139 ms at 128K (its
#: 32K-128K-MAC convs need the second core).
MIN_PARALLEL_MACS = 1 << 15


@dataclass(frozen=True)
class Ctx:
    """Per-target constants shared by the rules."""

    target: tvm.target.Target
    vector_bits: int
    registers: int  #: vector registers (32 with AVX-512, 16 with AVX2)
    #: The widest register tile in lanes (:data:`.anchor_layout.TILE_LANES`); 0 schedules as
    #: ``rules:v19`` did (what :func:`.microkernel.widens_tile` compares against).
    tile_lanes: int = TILE_LANES

    def lanes(self, dtype_bits: int) -> int:
        """Vector lanes of one register for elements of ``dtype_bits`` bits."""
        return max(self.vector_bits // dtype_bits, 1)


def root_blocks(sch: s_tir.Schedule) -> list[SBlockRV]:
    """The blocks at the kernel's root, in program order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def is_injective(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether every iterator of ``block`` is data-parallel (no reduction)."""
    return all(iv.iter_type == DATA_PAR for iv in sch.get(block).iter_vars)


def is_mac(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """A reduction whose update is ``C[...] = C[...] + A * B`` (casts allowed): an anchor."""
    stmt = sch.get(block)
    if not any(iv.iter_type == REDUCE for iv in stmt.iter_vars):
        return False
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return False

    def strip(e: tirx.PrimExpr) -> tirx.PrimExpr:
        return e.value if isinstance(e, tirx.Cast) else e

    a, b = strip(body.value.a), strip(body.value.b)
    for acc, prod in ((a, b), (b, a)):
        if isinstance(acc, tvm.ir.expr.TensorLoad) and acc.source.same_as(body.buffer):
            if not isinstance(prod, tirx.Mul):
                return False
            # ``sum += d * d`` (a layer norm's variance) is a plain reduction, not an anchor:
            # there is no second operand to pack or reuse.
            return not tvm_ffi.structural_equal(prod.a, prod.b)
    return False


def is_row_reduction(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """A reduction over its innermost axis alone that is not an anchor: a softmax's max or sum,
    a layer norm's statistics (not a pooling window nor a mean over the pixels)."""
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    return kinds.count(REDUCE) == 1 and kinds[-1] == REDUCE and not is_mac(sch, block)


def reads_row_reduction(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether ``block`` reads a row reduction's result, directly or through an injective
    block of the row's shape that combines several (fast_math's ragged softmax: the max of the
    row's main part and of its tail)."""
    for p in sch.get_producers(block):
        if is_row_reduction(sch, p):
            return True
        inputs = sch.get_producers(p)
        if inputs and is_injective(sch, p) and all(is_row_reduction(sch, q) for q in inputs):
            return True
    return False


def row_count(reduction: tirx.SBlock) -> int:
    """How many leading axes are rows of a row reduction: its spatial iterators but trailing
    unit ones (a keepdims reduction's kept axis is not a row)."""
    dims = [extent_of(iv) for iv in reduction.iter_vars if iv.iter_type == DATA_PAR]
    while dims and dims[-1] == 1:
        dims.pop()
    return len(dims)


def has_ragged_row(sch: s_tir.Schedule) -> bool:
    """Whether a row reduction's row is not a whole number of :data:`fast_math.ROW_BLOCK`
    (16-lane) vectors: the rows v15 factors that v14 left to dlight (on any target, so that
    the key does not depend on it)."""
    for block in root_blocks(sch):
        if is_row_reduction(sch, block):
            extent = extent_of(sch.get(block).iter_vars[-1])
            if extent is None or extent % ROW_BLOCK:
                return True
    return False


def has_single_row(sch: s_tir.Schedule) -> bool:
    """Whether a row reduction has one row (no row axis but unit ones): the rows v16 schedules
    as rows (:func:`.rows._schedule_rows`) that v15 left to dlight or to the generic rule."""
    return any(is_row_reduction(sch, b) and row_count(sch.get(b)) == 0
               and len(sch.get(b).iter_vars) > 1 for b in root_blocks(sch))


def has_short_row(sch: s_tir.Schedule) -> bool:
    """Whether an injective block (``sch`` after rule 1's inlining) has an innermost extent
    that v17 runs as a serial loop and v16 fused into the parallel loop: from
    :data:`MIN_SERIAL_INNER` to 15, and not a whole number of 4-lane vectors (on any target,
    so that the key does not depend on it)."""
    for block in root_blocks(sch):
        stmt = sch.get(block)
        if is_injective(sch, block) and len(stmt.iter_vars) > 1:
            extent = extent_of(stmt.iter_vars[-1])
            outer = [extent_of(iv) for iv in stmt.iter_vars[:-1]]
            if (extent is not None and MIN_SERIAL_INNER <= extent < 16 and extent % 4
                    and any(e != 1 for e in outer)):  # a row of its own: nothing to fuse
                return True
    return False


def has_fused_reduction(sch: s_tir.Schedule) -> bool:
    """Whether a kernel has one anchor and another reduction (a matmul with the layer norm or
    softmax after it, a convolution with the layer norm of its channels or a pooling). Kernels
    of several anchors are scheduled anchor by anchor as before: keeping an epilogue that feeds
    the next anchor's padding materialized left a buffer used before its allocation there
    (`aggressive` on resnet_tiny did not build)."""
    blocks = root_blocks(sch)
    return sum(is_mac(sch, b) for b in blocks) == 1 and any(
        not is_injective(sch, b) and not is_mac(sch, b) for b in blocks)


def _epilogues(sch: s_tir.Schedule) -> set[str]:
    """The anchors' elementwise epilogues: injective blocks of an anchor's output shape that
    read it, directly or through one another (bias, activation, residual)."""
    names: set[str] = set()
    for anchor in [b for b in root_blocks(sch) if is_mac(sch, b)]:
        shape = [int(d) for d in sch.get(anchor).writes[0].source.shape]
        frontier = list(sch.get_consumers(anchor))
        while frontier:
            block = frontier.pop()
            stmt = sch.get(block)
            if (stmt.name_hint in names or not is_injective(sch, block) or not stmt.writes
                    or [int(d) for d in stmt.writes[0].source.shape] != shape):
                continue
            names.add(stmt.name_hint)
            frontier += list(sch.get_consumers(block))
    return names


def pads_epilogue(sch: s_tir.Schedule) -> bool:
    """Whether a kernel of one anchor writes an epilogue's result padded: a zero pad of an
    anchor epilogue (:func:`_epilogues`; the next convolution's explicit padding, as
    TensorFlow-style "same" convolutions export: EfficientNet-B0's ``ZeroPad2d``) is the
    kernel's output.

    Inlined into the pad, the epilogue ran as a scalar pass of its own over the padded
    domain, its activation under the pad's condition, after the anchor had stored its
    result (``rules:v17`` keeps it at the anchor's tile instead, :func:`inline_injective`)."""
    if sum(is_mac(sch, b) for b in root_blocks(sch)) != 1:
        return False
    for name in _epilogues(sch):
        block = sch.get_sblock(name)
        shape = [int(d) for d in sch.get(block).writes[0].source.shape]
        for consumer in sch.get_consumers(block):
            stmt = sch.get(consumer)
            if not is_injective(sch, consumer) or not stmt.writes or sch.get_consumers(consumer):
                continue
            out = [int(d) for d in stmt.writes[0].source.shape]
            if len(out) == len(shape) and out != shape and all(o >= d for o, d in zip(out, shape)):
                return True
    return False


def _same_shape(sch: s_tir.Schedule, a: SBlockRV, b: SBlockRV) -> bool:
    wa, wb = sch.get(a).writes, sch.get(b).writes
    return bool(wa and wb) and list(wa[0].source.shape) == list(wb[0].source.shape)


def dtype_bits(sch: s_tir.Schedule, block: SBlockRV) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if writes else 32


def vector_factor(extent: int | None, lanes: int) -> int:
    """Largest power-of-two divisor of ``extent`` that is at most ``lanes`` (1: do not vectorize).

    Only exact divisors are used: a ragged split adds a predicate that blocks vectorization.
    """
    if extent is None:
        return 1
    factor = lanes
    while factor > 1 and extent % factor:
        factor //= 2
    return factor if factor >= 4 or factor == extent else 1


def uses_var(region: tirx.BufferRegion, var: tirx.Var) -> bool:
    """Whether a start index of ``region`` depends on ``var``."""
    return any(var.name in vars_of(r.min) for r in region.region)


def is_identity_copy(stmt: tirx.SBlock) -> bool:
    """Whether ``stmt`` copies a buffer of its own shape element for element: ``B[i, j] = A[i, j]``
    with its iterators as the indices of both, in order (a ``pad_temp`` with no padding)."""
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tvm.ir.expr.TensorLoad):
        return False
    load = body.value
    ivs = [iv.var for iv in stmt.iter_vars]

    def identity(indices: list) -> bool:
        return len(indices) == len(ivs) and all(isinstance(i, tirx.Var) and i.same_as(v)
                                                 for i, v in zip(indices, ivs))

    same_shape = [str(d) for d in load.source.shape] == [str(d) for d in body.buffer.shape]
    return same_shape and identity(list(load.indices)) and identity(list(body.indices))


def copies_anchor_input(sch: s_tir.Schedule) -> bool:
    """Whether an anchor reads a plain copy (:func:`is_identity_copy`) of its input. After
    v18's inlining (:func:`inline_injective` with ``plain_copies=False``) these are the kernels
    that ``rules:v19`` schedules differently, on any target, so that the key does not depend
    on it. Depthwise anchors are not counted: their schedule copies each channel block of the
    input channels-last itself (:func:`.depthwise.schedule_depthwise`), through the copy or
    not alike."""
    return any(is_identity_copy(sch.get(b)) and any(
        is_mac(sch, c) and not is_depthwise(sch.get(c), microkernel.NARROW_LANES)
        for c in sch.get_consumers(b)) for b in root_blocks(sch))


# --------------------------------------------------------------------------------------------
# Rule 1: inlining


def inline_injective(sch: s_tir.Schedule, fused_reduction: bool = False,
                     plain_copies: bool = True) -> None:
    """Inline injective blocks until nothing changes, keeping anchor inputs materialized.

    With ``fused_reduction`` (a kernel with an anchor and another reduction,
    :func:`has_fused_reduction`), more blocks stay materialized:

    - the row reductions' inputs and the blocks that read their results, so that
      :func:`.rows.schedule_row_runs` finds the reductions reading whole rows of one buffer and can
      schedule them as rows;
    - the anchors' epilogues (:func:`_epilogues`) where their consumer has another shape (a
      transpose, a padded pooling window), so that the epilogue is computed once per element
      at the anchor's tile. Inlined into a pooling window instead, EfficientNet-B0's swish
      was evaluated inside a 1280 x 1280 window per channel (its head's pooling, fused with
      the last conv: 3.5 ms, against 0.2 ms for the pooling as a kernel of its own).

    The anchors' epilogues also stay where the kernel writes them padded
    (:func:`pads_epilogue`, ``rules:v17``), for the same reason: inlined into the pad, the
    epilogue ran as a scalar pass over the padded domain.

    An anchor's input stays materialized, but for a plain copy (:func:`is_identity_copy`;
    ``rules:v19``, and ``plain_copies=False`` keeps those too, as v18 did): the ``pad_temp`` of
    a convolution without padding (every 1x1 conv) copies its input element for element, and
    the anchor can read the input itself. Kept, the copy was a scalar pass over the whole input
    before every such conv (over MobileNetV2's 576 x 14 x 14 projection input, more than a
    third of that kernel's time).
    """
    epilogues = _epilogues(sch) if fused_reduction or pads_epilogue(sch) else set()
    changed = True
    while changed:
        changed = False
        for block in root_blocks(sch):
            if not is_injective(sch, block):
                continue
            consumers = sch.get_consumers(block)
            if not consumers:
                continue  # outputs stay
            if any(is_mac(sch, c) for c in consumers) and not (
                    plain_copies and is_identity_copy(sch.get(block))):
                continue  # anchor inputs stay (see .rules), but for a plain copy
            if fused_reduction and (reads_row_reduction(sch, block) or any(
                    is_row_reduction(sch, c)
                    and microkernel.reads_pointwise(sch.get(c), sch.get(block).writes[0].source)
                    for c in consumers)):
                continue
            if (sch.get(block).name_hint in epilogues
                    and not all(_same_shape(sch, block, c) for c in consumers)):
                continue
            try:
                sch.compute_inline(block)
                changed = True
            except ScheduleError:
                pass
        for block in root_blocks(sch):
            producers = sch.get_producers(block)
            if (
                is_injective(sch, block)
                and len(producers) == 1
                and is_injective(sch, producers[0])
                and not any(is_mac(sch, c) for c in sch.get_consumers(producers[0]))
                and not (fused_reduction and reads_row_reduction(sch, producers[0]))
                and not (sch.get(producers[0]).name_hint in epilogues
                         and not _same_shape(sch, block, producers[0]))
            ):
                try:
                    sch.reverse_compute_inline(block)
                    changed = True
                except ScheduleError:
                    pass


# --------------------------------------------------------------------------------------------
# Rule 4: everything else


#: Innermost extent worth a serial loop of its own when it is not a whole number of vectors.
#: Fused into the parallel loop, every element pays a div/mod for its address: a pad of
#: EfficientNet-B0's 7 x 7 maps to 11 x 11 took 0.129 ms that way, against 0.007 ms with the
#: 11-wide rows serial (rules:v17; v16 kept only rows of 16 or more serial).
MIN_SERIAL_INNER = 3


def parallel_vectorize(sch: s_tir.Schedule, block: SBlockRV, ctx: Ctx) -> None:
    """Fuse the leading spatial loops into one parallel loop; vectorize the innermost one."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if not loops or len(loops) != len(stmt.iter_vars):
        return  # already placed under another block's loops (an attached epilogue)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    n_lead = next((i for i, k in enumerate(kinds) if k != DATA_PAR), len(kinds))
    lanes = ctx.lanes(dtype_bits(sch, block))
    lead = list(loops[:n_lead])
    if n_lead == len(loops) and lead:
        # Injective: split off a vector from the innermost loop.
        ext = loop_extent(sch, lead[-1])
        vec = vector_factor(ext, lanes)
        if vec > 1:
            if ext is not None and ext > vec:
                lo, li = sch.split(lead[-1], factors=[None, vec])
                lead[-1] = lo
                sch.vectorize(li)
            else:
                sch.vectorize(lead.pop())
        elif len(lead) > 1 and (ext or 0) >= MIN_SERIAL_INNER:
            # A ragged innermost loop (a padded 114-wide row) stays a serial loop of its own:
            # fused into the parallel loop, every element paid a div/mod for its address
            # (1.2 MB of RegNetX's stem padding took longer than the convolution reading it).
            lead.pop()
    if not lead:
        return
    fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    total = 1
    for iv in stmt.iter_vars:
        ext = iv.dom.extent
        total *= int(ext) if isinstance(ext, tirx.IntImm) else MIN_PARALLEL_ELEMS
    if total >= MIN_PARALLEL_ELEMS and loop_extent(sch, fused) != 1:
        sch.parallel(fused)
