"""``rules``: a fast, deterministic, search-free CPU schedule for fused Relax modules.

TVM 0.27's CPU pipeline schedules nothing, so every kernel runs naive loops and fusion decisions
change nothing measurable. This provider applies a handful of fixed rules to every PrimFunc
(well under a second per model, no measurement, same output for the same input):

1. *Inline* injective blocks into their consumers (``compute_inline``), then injective consumers
   into injective producers (``reverse_compute_inline``), so a fused kernel does not materialize
   its intermediates. Producers of a multiply-accumulate *anchor* are never inlined into it: the
   anchor reads each input element O(K) times, so inlining would recompute the producer (e.g. the
   ``if_then_else`` of a ``pad_temp`` block) in the innermost loop.
2. *Anchors* (conv2d / matmul / dense / batch_matmul: a reduction whose update is ``C += A * B``)
   get a register-tiled schedule: the innermost output axis is split into a vector of ``lanes``,
   one other output axis (one the vector operand does not depend on, so the vector load is reused)
   into a small register block, the reduction loops sit between the outer tiles and that
   ``block x vector`` micro-tile, the outer tiles are fused and parallelized (anchors of at least
   ``_MIN_PARALLEL_MACS`` multiply-accumulates only), the init is split out
   with ``decompose_reduction``, and the elementwise epilogue is moved into the tile with
   ``reverse_compute_at`` so it runs while the tile is still in L1.
3. *Plain reductions* (softmax, layer norm) in a kernel without an anchor: rows in parallel,
   every block computed per row, each row reduction factored into one partial result per
   vector lane (``rfactor``, the lanes vectorized); where that does not fit (ragged rows),
   dlight's ``cpu.Reduction``, which keeps each reduction one scalar chain. Neither is used on
   kernels with an anchor (it makes them slower).
   A kernel with two or more anchors has each scheduled on its own, except a pointwise
   convolution feeding a depthwise one: that pair shares the depthwise channel blocks
   (:mod:`.chain`).
4. *Everything else* left at the root gets its outer loops fused and parallelized and its
   innermost spatial loop vectorized.

A kernel that fails any step falls back to its unscheduled form (logged at debug level).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV, ScheduleError

from fusion_rl.errors import first_line
from fusion_rl.graph.fast_math import ROW_BLOCK

from . import chain, microkernel, prepack, transpose_layout
from .anchor_layout import extent_of
from .base import SCHEDULE_ATTR, ScheduleProvider

log = logging.getLogger(__name__)

_DATA_PAR = tirx.IterVar.DataPar
_REDUCE = tirx.IterVar.CommReduce
#: Below this many output elements a ``parallel`` loop costs more (thread-pool wake-up, a few
#: microseconds) than it saves, so tiny kernels run serially.
_MIN_PARALLEL_ELEMS = 4096
#: Below this many multiply-accumulates an anchor runs serially: mlp_tiny's 1x64x128 and
#: 1x128x128 matmuls (8K, 16K MACs) take about a microsecond on one core, less than waking the
#: thread pool. Measured (2 threads, tvm plan, median of 15): mlp_tiny 4.4 us with the threshold
#: vs 6.6-11.7 us always parallel; se_cnn 0.080 ms at 32K but 0.131-0.139 ms at 128K (its
#: 32K-128K-MAC convs need the second core).
_MIN_PARALLEL_MACS = 1 << 15
#: Accumulator rows per micro-tile: ``_REG_BLOCK x lanes`` accumulators fit the 16/32 vector
#: registers of AVX2/AVX-512 with room left for the operands.
_REG_BLOCK = 8


@dataclass(frozen=True)
class _Ctx:
    """Per-target constants shared by the rules."""

    target: tvm.target.Target
    vector_bits: int
    registers: int  #: vector registers (32 with AVX-512, 16 with AVX2)

    def lanes(self, dtype_bits: int) -> int:
        """Vector lanes of one register for elements of ``dtype_bits`` bits."""
        return max(self.vector_bits // dtype_bits, 1)


#: The key of every kernel whose schedule v13 left as it was (:meth:`RulesSchedule.kernel_key`).
_V12 = "rules:v12"
#: The key of a pointwise -> grouped pair, whose schedule v13 changed and v14-v18 did not.
_V13 = "rules:v13"
#: The key of a kernel with a fused reduction or a ragged row that v16 schedules as v15 did.
_V15 = "rules:v15"
#: The key of a kernel that transposes an anchor's output or reduces a single row, whose
#: schedule v16 changed and v17 did not.
_V16 = "rules:v16"
#: The key of a kernel that writes an anchor's epilogue padded or has a short ragged row,
#: whose schedule v17 changed and v18 did not.
_V17 = "rules:v17"


class RulesSchedule(ScheduleProvider):
    """Rule-based CPU schedule: inline, tile anchors, parallelize and vectorize. No search."""

    name = "rules"
    # chain.py; tests/compiler/schedules/test_chain.py holds the provider to this declaration.
    group_shapes = ("pointwise_depthwise", "pointwise_grouped")

    @property
    def key(self) -> str:
        # v2: packed micro-kernels (microkernel.py); v3: grouped convs as NCHWc micro-kernels,
        # serial ragged inner loops; v4: constant weights packed at compile time (prepack.py);
        # v5: a padded anchor's epilogue runs at its accumulator tile; v6: row reductions as
        # vectorized partial results (rfactor); v7: v6 without its two keepdims bugs (a mean
        # whose last block has no loop of its own did not build; a kept unit axis was counted
        # as a row, so RMSNorm recomputed its mean per element); v8: vectors one register wide,
        # the registers unrolled (AVX-512's 48-lane tiles were 13-30x slow); 8-lane
        # micro-kernels where 16 lanes find no packed layout; a padded tile joins only
        # consumers that read it point by point (a head-split reshape computed wrong values);
        # v9: depthwise convolutions vectorize 8 lanes under AVX-512 too; v10: register tiles
        # leave room for the panel vectors and the broadcast (AVX-512's 7 x 4 tile spilled);
        # v11: a reduction kernel whose output rows are not the statistics' rows (a layer_norm
        # fused with a transpose) runs each block over its own domain, not per output row;
        # v12: a pointwise conv fused with the depthwise conv it feeds is computed in the
        # depthwise channel blocks (chain.py), not anchor by anchor; v13: the same for a
        # pointwise conv fused with a grouped conv of 8 channels per group (chain.py); v14: in
        # a kernel with one anchor and another reduction, the row reductions (a layer norm or
        # softmax fused after a matmul or conv) are scheduled as rows, their inputs
        # materialized (_schedule_row_runs), and the anchor's epilogue is computed at its tile,
        # not inlined into a transpose or a pooling window; v15: rows that are not a whole
        # number of vectors (ViT's 197 keys, ConvNeXt's 40 channels under AVX-512) are
        # factored too, by a narrower vector or as a main part and a scalar tail
        # (fast_math's ragged softmax), and a row run of a fused kernel computes its
        # elementwise steps per row, inlined, as a row kernel of its own does; v16: a transpose
        # of an anchor's output inside a kernel is pulled into the anchor's write-back
        # (transpose_layout.py), and a depthwise tile stored channels-last is stored by vectors;
        # a row reduction of one row ([1, C]) runs as a row, serially; v17: an epilogue whose
        # result the kernel writes padded (the next conv's explicit zero pad) is computed at the
        # anchor's tile, and rows of 3-15 elements that are not whole vectors run serially
        # instead of paying a div/mod per element in the parallel loop; v18: the pointwise
        # convolution of a depthwise pair (chain.py) accumulates in registers, not in its workspace
        # output, and one step of a depthwise pair's parallel loop covers up to 32 channels, so
        # its tile is full AVX-512 vectors. Records of older schedules must not be served for
        # the new one, so the version is part of every measurement's key.
        return "rules:v18"

    def kernel_key(self, func: tirx.PrimFunc) -> str:
        """v13 changed only the kernels that are a pointwise -> grouped pair, v14 and v15 only
        those with one anchor and another reduction and (v15) row kernels whose rows are not a
        whole number of 16-lane vectors, v16 only those that transpose an anchor's output
        inside the kernel or reduce a single row, v17 only those that write an anchor's epilogue
        padded or have an injective row of 3-15 elements that is not whole vectors, v18 only
        the pointwise -> depthwise pairs; every other kernel keeps the key (and the timings) of
        the version that last changed its schedule."""
        kind = _chain_kind(func)
        if kind == "depthwise":
            return self.key
        sch = s_tir.Schedule(func)
        fused, ragged = _has_fused_reduction(sch), _has_ragged_row(sch)
        single, pads = _has_single_row(sch), _pads_epilogue(sch)
        _inline_injective(sch, fused)  # rule 1, as _schedule_with applies it
        # Before the grouped pairs: v17 rescheduled those with a short row too.
        if pads or _has_short_row(sch):
            return _V17
        if kind is not None:
            return _V13
        if single or _transposes_anchor(sch):
            return _V16
        return _V15 if fused or ragged else _V12

    @property
    def kernel_keys(self) -> tuple[str, ...]:
        return (_V12, _V13, _V15, _V16, _V17, self.key)

    def schedule(self, mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
        ctx = _make_ctx(target)
        # Never touch the caller's module (dlight edits modules in place): mark_layout_free
        # returns a copy.
        marked = prepack.mark_layout_free(mod)
        out = marked.clone()
        for gvar, func in marked.functions_items():
            if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
                out[gvar] = schedule_prim_func(func, ctx, gvar.name_hint)
        return prepack.pack_constants(out)


def _make_ctx(target: tvm.target.Target) -> _Ctx:
    """Vector width from the instruction sets LLVM enables for ``mcpu`` (512 bits with AVX-512,
    256 with AVX/AVX2, else 128). ``llvm_get_vector_width`` is not used: it answers 512 for
    ``znver3``, which has no AVX-512, and tiles sized for 32 registers spill on 16."""
    bits = 128
    if target.kind.name == "llvm":
        from tvm.target import codegen

        features = set(codegen.llvm_get_cpu_features(target))
        bits = 512 if "avx512f" in features else 256 if "avx" in features else 128
    return _Ctx(target, bits, 32 if bits == 512 else 16)


def _chain_kind(func: tirx.PrimFunc) -> str | None:
    """The consumer kind (``"depthwise"`` or ``"grouped"``) when ``func`` is a pair that
    :mod:`.chain` schedules with one shared tile, else ``None``.

    Every kernel of every build passes here: anchors are counted before anything is inlined
    (inlining neither makes nor removes one), so a kernel without two costs no inlining."""
    try:
        sch = s_tir.Schedule(func)
        if sum(_is_mac(sch, b) for b in _root_blocks(sch)) != 2:
            return None
        _inline_injective(sch)
        pair = chain.match(sch, [b for b in _root_blocks(sch) if _is_mac(sch, b)])
        return None if pair is None else chain.consumer_kind(sch, pair[1])
    except Exception:  # noqa: BLE001 - a kernel the analysis cannot read is simply not a pair
        return None


def _pull_transpose(sch: s_tir.Schedule, anchor: SBlockRV, lanes: int, registers: int) -> bool:
    """Give the buffers between ``anchor`` and a transpose of its output in this kernel the
    transpose's layout, when that stores the anchor's vector axis contiguously
    (:mod:`.transpose_layout`). Returns whether it did."""
    found = transpose_layout.find_transpose(sch, anchor)
    if found is None:
        return False
    vector = microkernel.vector_iter(sch, anchor, lanes, registers)
    return vector is not None and transpose_layout.pull_transpose(sch, found, vector)


def _transposes_anchor(sch: s_tir.Schedule) -> bool:
    """Whether a kernel transposes an anchor's output internally (``sch`` after rule 1's
    inlining): the kernels v16 may schedule differently from v15, on any target, so that the
    key does not depend on it."""
    return any(transpose_layout.find_transpose(sch, b) is not None
               for b in _root_blocks(sch) if _is_mac(sch, b))


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def schedule_prim_func(func: tirx.PrimFunc, ctx: _Ctx, name: str = "") -> tirx.PrimFunc:
    """Schedule one PrimFunc; never raises.

    The result carries the attribute ``fusion_rl.schedule``: the rule that scheduled it
    (``microkernel``, ``tile``, ``reduction``, ``elementwise``), or ``fallback: <reason>`` when
    every rule failed and the kernel is left as naive loops (see :func:`schedule_report`).
    """
    reasons: list[str] = []

    def attempt(rule: str, rule_ctx: _Ctx) -> tuple | None:
        try:
            return (*_schedule_with(func, rule_ctx, rule), list(reasons))
        except Exception as err:  # noqa: BLE001 - a failed rule falls through to the next one
            reasons.append(f"{rule} at {rule_ctx.vector_bits} bits: {first_line(err)}")
            return None

    chosen = attempt("chain", ctx) if _chain_kind(func) is not None else None
    if chosen is None:
        chosen = attempt("microkernel", ctx)
    if ctx.vector_bits > 256 and (chosen is None or not chosen[3]):
        # Extents that are multiples of 8 but not of 16 (RegNetX's 152 channels, MobileNet's
        # 24) have no 16-lane axis to pack against: at 16 lanes the anchor either fails or
        # falls to a layout without register reuse, where 8-lane vectors keep the packed
        # micro-kernel (3-10x faster on those convolutions on a Zen 5 host).
        narrow = attempt("microkernel", _Ctx(ctx.target, ctx.vector_bits // 2, ctx.registers))
        if narrow is not None and (chosen is None or narrow[3]):
            chosen = narrow
    if chosen is None:
        chosen = attempt("tile", ctx)
    if chosen is not None:
        sch, kind, packs, _, before = chosen
        out = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        if packs:
            out = out.with_attr(prepack.WEIGHT_PACKS_ATTR,
                                {i: [p.dim, p.vec] for i, p in packs.items()})
        label = kind if not before else f"{kind} ({'; '.join(before)})"
        return out.with_attr(SCHEDULE_ATTR, label)
    log.debug("rules: kernel %s left unscheduled: %s", name, reasons)
    return func.with_attr(SCHEDULE_ATTR, "fallback: " + "; ".join(reasons))


def _schedule_with(func: tirx.PrimFunc, ctx: _Ctx,
                   rule: str) -> tuple[s_tir.Schedule, str, dict[int, prepack.WeightPack], bool]:
    """Apply the rules with anchors scheduled by ``rule``; returns the schedule, its kind, the
    parameters given a packed layout, and whether every anchor got a layout with register reuse
    (a packed panel or the depthwise path, not the plain vectorized loop)."""
    sch = s_tir.Schedule(func)
    # One anchor: never a chain pair, whose schedule v14 left as v13 made it.
    fused_reduction = _has_fused_reduction(sch)
    _inline_injective(sch, fused_reduction)
    anchors = [b for b in _root_blocks(sch) if _is_mac(sch, b)]
    if rule == "chain":
        pair = chain.match(sch, anchors)
        if pair is None:
            raise ValueError("not a pointwise -> depthwise or grouped pair")
        done = chain.schedule_pair(sch, *pair, ctx.registers, _MIN_PARALLEL_MACS,
                                   ctx.lanes(_dtype_bits(sch, pair[0])))
        for block in _root_blocks(sch):
            if sch.get(block).name_hint not in done:
                _parallel_vectorize(sch, block, ctx)
        return sch, "chain", {}, True
    if not anchors:
        reduced = _try_dlight_reduction(sch, ctx)
        if reduced is not None:
            return reduced, "reduction", {}, True
        if rule != "microkernel":
            raise ValueError("nothing left to try")
    done: set[str] = set()
    packs: dict[int, prepack.WeightPack] = {}
    reuse = True
    for anchor in anchors:
        if rule == "microkernel":
            lanes = ctx.lanes(_dtype_bits(sch, anchor))
            pulled = _pull_transpose(sch, anchor, lanes, ctx.registers)
            names, packed, layout = microkernel.schedule_anchor(sch, anchor, lanes, ctx.registers,
                                                                _MIN_PARALLEL_MACS, pulled)
            done |= names
            packs.update(packed)
            reuse = reuse and layout.panel is not None
        else:
            done |= _schedule_anchor(sch, anchor, ctx)
    if fused_reduction:
        sch, done = _schedule_row_runs(sch, ctx, done)
    for block in _root_blocks(sch):
        if sch.get(block).name_hint not in done:
            _parallel_vectorize(sch, block, ctx)
    return sch, (rule if anchors else "elementwise"), packs, reuse



# --------------------------------------------------------------------------------------------
# Block analysis


def _root_blocks(sch: s_tir.Schedule) -> list[SBlockRV]:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_injective(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    return all(iv.iter_type == _DATA_PAR for iv in sch.get(block).iter_vars)


def _is_mac(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """A reduction whose update is ``C[...] = C[...] + A * B`` (casts allowed): an anchor."""
    stmt = sch.get(block)
    if not any(iv.iter_type == _REDUCE for iv in stmt.iter_vars):
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


def _is_row_reduction(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """A reduction over its innermost axis alone that is not an anchor: a softmax's max or sum,
    a layer norm's statistics (not a pooling window nor a mean over the pixels)."""
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    return kinds.count(_REDUCE) == 1 and kinds[-1] == _REDUCE and not _is_mac(sch, block)


def _reads_row_reduction(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether ``block`` reads a row reduction's result, directly or through an injective
    block of the row's shape that combines several (fast_math's ragged softmax: the max of the
    row's main part and of its tail)."""
    for p in sch.get_producers(block):
        if _is_row_reduction(sch, p):
            return True
        inputs = sch.get_producers(p)
        if inputs and _is_injective(sch, p) and all(_is_row_reduction(sch, q) for q in inputs):
            return True
    return False


def _has_ragged_row(sch: s_tir.Schedule) -> bool:
    """Whether a row reduction's row is not a whole number of :data:`fast_math.ROW_BLOCK`
    (16-lane) vectors: the rows v15 factors that v14 left to dlight (on any target, so that
    the key does not depend on it)."""
    for block in _root_blocks(sch):
        if _is_row_reduction(sch, block):
            extent = extent_of(sch.get(block).iter_vars[-1])
            if extent is None or extent % ROW_BLOCK:
                return True
    return False


def _has_single_row(sch: s_tir.Schedule) -> bool:
    """Whether a row reduction has one row (no row axis but unit ones): the rows v16 schedules
    as rows (:func:`_schedule_rows`) that v15 left to dlight or to the generic rule."""
    return any(_is_row_reduction(sch, b) and _row_count(sch.get(b)) == 0
               and len(sch.get(b).iter_vars) > 1 for b in _root_blocks(sch))


def _has_short_row(sch: s_tir.Schedule) -> bool:
    """Whether an injective block (``sch`` after rule 1's inlining) has an innermost extent
    that v17 runs as a serial loop and v16 fused into the parallel loop: from
    :data:`_MIN_SERIAL_INNER` to 15, and not a whole number of 4-lane vectors (on any target,
    so that the key does not depend on it)."""
    for block in _root_blocks(sch):
        stmt = sch.get(block)
        if _is_injective(sch, block) and len(stmt.iter_vars) > 1:
            extent = extent_of(stmt.iter_vars[-1])
            outer = [extent_of(iv) for iv in stmt.iter_vars[:-1]]
            if (extent is not None and _MIN_SERIAL_INNER <= extent < 16 and extent % 4
                    and any(e != 1 for e in outer)):  # a row of its own: nothing to fuse
                return True
    return False


def _has_fused_reduction(sch: s_tir.Schedule) -> bool:
    """Whether a kernel has one anchor and another reduction (a matmul with the layer norm or
    softmax after it, a convolution with the layer norm of its channels or a pooling). Kernels
    of several anchors are scheduled anchor by anchor as before: keeping an epilogue that feeds
    the next anchor's padding materialized left a buffer used before its allocation there
    (`aggressive` on resnet_tiny did not build)."""
    blocks = _root_blocks(sch)
    return sum(_is_mac(sch, b) for b in blocks) == 1 and any(
        not _is_injective(sch, b) and not _is_mac(sch, b) for b in blocks)


def _epilogues(sch: s_tir.Schedule) -> set[str]:
    """The anchors' elementwise epilogues: injective blocks of an anchor's output shape that
    read it, directly or through one another (bias, activation, residual)."""
    names: set[str] = set()
    for anchor in [b for b in _root_blocks(sch) if _is_mac(sch, b)]:
        shape = [int(d) for d in sch.get(anchor).writes[0].source.shape]
        frontier = list(sch.get_consumers(anchor))
        while frontier:
            block = frontier.pop()
            stmt = sch.get(block)
            if (stmt.name_hint in names or not _is_injective(sch, block) or not stmt.writes
                    or [int(d) for d in stmt.writes[0].source.shape] != shape):
                continue
            names.add(stmt.name_hint)
            frontier += list(sch.get_consumers(block))
    return names


def _pads_epilogue(sch: s_tir.Schedule) -> bool:
    """Whether a kernel of one anchor writes an epilogue's result padded: a zero pad of an
    anchor epilogue (:func:`_epilogues`; the next convolution's explicit padding, as
    TensorFlow-style "same" convolutions export: EfficientNet-B0's ``ZeroPad2d``) is the
    kernel's output.

    Inlined into the pad, the epilogue ran as a scalar pass of its own over the padded
    domain, its activation under the pad's condition, after the anchor had stored its
    result (``rules:v17`` keeps it at the anchor's tile instead, :func:`_inline_injective`)."""
    if sum(_is_mac(sch, b) for b in _root_blocks(sch)) != 1:
        return False
    for name in _epilogues(sch):
        block = sch.get_sblock(name)
        shape = [int(d) for d in sch.get(block).writes[0].source.shape]
        for consumer in sch.get_consumers(block):
            stmt = sch.get(consumer)
            if not _is_injective(sch, consumer) or not stmt.writes or sch.get_consumers(consumer):
                continue
            out = [int(d) for d in stmt.writes[0].source.shape]
            if len(out) == len(shape) and out != shape and all(o >= d for o, d in zip(out, shape)):
                return True
    return False


def _same_shape(sch: s_tir.Schedule, a: SBlockRV, b: SBlockRV) -> bool:
    wa, wb = sch.get(a).writes, sch.get(b).writes
    return bool(wa and wb) and list(wa[0].source.shape) == list(wb[0].source.shape)


def _const_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _dtype_bits(sch: s_tir.Schedule, block: SBlockRV) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if writes else 32


def _vector_factor(extent: int | None, lanes: int) -> int:
    """Largest power-of-two divisor of ``extent`` that is at most ``lanes`` (1: do not vectorize).

    Only exact divisors are used: a ragged split adds a predicate that blocks vectorization.
    """
    if extent is None:
        return 1
    factor = lanes
    while factor > 1 and extent % factor:
        factor //= 2
    return factor if factor >= 4 or factor == extent else 1


# --------------------------------------------------------------------------------------------
# Rule 1: inlining


def _inline_injective(sch: s_tir.Schedule, fused_reduction: bool = False) -> None:
    """Inline injective blocks until nothing changes, keeping anchor inputs materialized.

    With ``fused_reduction`` (a kernel with an anchor and another reduction,
    :func:`_has_fused_reduction`), more blocks stay materialized:

    - the row reductions' inputs and the blocks that read their results, so that
      :func:`_schedule_row_runs` finds the reductions reading whole rows of one buffer and can
      schedule them as rows;
    - the anchors' epilogues (:func:`_epilogues`) where their consumer has another shape (a
      transpose, a padded pooling window), so that the epilogue is computed once per element
      at the anchor's tile. Inlined into a pooling window instead, EfficientNet-B0's swish
      was evaluated inside a 1280 x 1280 window per channel (its head's pooling, fused with
      the last conv: 3.5 ms, against 0.2 ms for the pooling as a kernel of its own).

    The anchors' epilogues also stay where the kernel writes them padded
    (:func:`_pads_epilogue`, ``rules:v17``), for the same reason: inlined into the pad, the
    epilogue ran as a scalar pass over the padded domain.
    """
    epilogues = _epilogues(sch) if fused_reduction or _pads_epilogue(sch) else set()
    changed = True
    while changed:
        changed = False
        for block in _root_blocks(sch):
            if not _is_injective(sch, block):
                continue
            consumers = sch.get_consumers(block)
            if not consumers or any(_is_mac(sch, c) for c in consumers):
                continue  # outputs stay; anchor inputs stay (see module docstring)
            if fused_reduction and (_reads_row_reduction(sch, block) or any(
                    _is_row_reduction(sch, c)
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
        for block in _root_blocks(sch):
            producers = sch.get_producers(block)
            if (
                _is_injective(sch, block)
                and len(producers) == 1
                and _is_injective(sch, producers[0])
                and not any(_is_mac(sch, c) for c in sch.get_consumers(producers[0]))
                and not (fused_reduction and _reads_row_reduction(sch, producers[0]))
                and not (sch.get(producers[0]).name_hint in epilogues
                         and not _same_shape(sch, block, producers[0]))
            ):
                try:
                    sch.reverse_compute_inline(block)
                    changed = True
                except ScheduleError:
                    pass


# --------------------------------------------------------------------------------------------
# Rule 2: anchors


def _schedule_anchor(sch: s_tir.Schedule, anchor: SBlockRV, ctx: _Ctx) -> set[str]:
    """Register-tile a multiply-accumulate block and pull its epilogue into the tile.

    Returns the names of the blocks it scheduled (anchor, its init, attached epilogues).
    """
    stmt = sch.get(anchor)
    done = {stmt.name_hint}
    loops = sch.get_loops(anchor)
    if len(loops) != len(stmt.iter_vars):
        raise ValueError("anchor loop nest is not one loop per block iterator")
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    spatial = [lp for lp, k in zip(loops, kinds) if k == _DATA_PAR]
    reduce = [lp for lp, k in zip(loops, kinds) if k == _REDUCE]
    if not spatial:
        raise ValueError("anchor without spatial axes")
    # Which block iterator each loop drives (legalized kernels bind iterators to loops 1:1).
    sp_vars = [iv.var for iv, k in zip(stmt.iter_vars, kinds) if k == _DATA_PAR]

    lanes = ctx.lanes(_dtype_bits(sch, anchor))
    vec_idx = len(spatial) - 1
    vec = _vector_factor(_const_extent(sch, spatial[vec_idx]), lanes)
    blk_idx = _register_block_axis(sch, stmt, sp_vars, vec_idx)

    outer: list[LoopRV] = []
    block_inner: list[LoopRV] = []  # register-block axis: unrolled
    vec_inner: list[LoopRV] = []  # vector axis: innermost
    for i, loop in enumerate(spatial):
        ext = _const_extent(sch, loop)
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
    if tile is not None and _const_extent(sch, tile) not in (None, 1) \
            and _block_work(stmt) >= _MIN_PARALLEL_MACS:
        sch.parallel(tile)
    if reduce:
        done.add(sch.get(sch.decompose_reduction(anchor, reduce[0])).name_hint)
        done.add(sch.get(anchor).name_hint)  # renamed "<name>_update" by decompose_reduction
    if tile is not None:
        done |= _attach_epilogue(sch, anchor, tile, ctx)
    return done


def _block_work(stmt: tirx.SBlock) -> int:
    """Iterations of a block (output elements x reduction extent); symbolic extents count large."""
    work = 1
    for iv in stmt.iter_vars:
        ext = iv.dom.extent
        work *= int(ext) if isinstance(ext, tirx.IntImm) else _MIN_PARALLEL_MACS
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
    vector_reads = [r for r in stmt.reads if _uses_var(r, vec_var) and not r.source.same_as(out)]
    used: set[str] = set()
    for region in vector_reads:
        for rng in region.region:
            used |= {v.name for v in _vars_of(rng.min)}
    for i in range(len(sp_vars) - 1, -1, -1):
        if i != vec_idx and sp_vars[i].name not in used:
            dom = stmt.iter_vars[_iter_index(stmt, sp_vars[i])].dom.extent
            if not isinstance(dom, tirx.IntImm) or int(dom) > 1:
                return i
    return None


def _iter_index(stmt: tirx.SBlock, var: tirx.Var) -> int:
    return next(i for i, iv in enumerate(stmt.iter_vars) if iv.var.same_as(var))


def _vars_of(expr: tirx.PrimExpr) -> list[tirx.Var]:
    return list(tirx.analysis.undefined_vars(expr, []))


def _uses_var(region: tirx.BufferRegion, var: tirx.Var) -> bool:
    return any(var.name in {v.name for v in _vars_of(r.min)} for r in region.region)


def _block_factor(extent: int | None) -> int:
    if extent is None:
        return 1
    for factor in (_REG_BLOCK, 6, 4, 3, 2):
        if extent % factor == 0:
            return factor
    return 1


def _attach_epilogue(sch: s_tir.Schedule, anchor: SBlockRV, tile: LoopRV, ctx: _Ctx) -> set[str]:
    """Move elementwise consumers of the anchor's output into the anchor's outer tile loop.

    Only consumers that write a buffer of the anchor's output shape move: a ``pad_temp`` of the
    next convolution has a larger shape and must be computed in full before that conv runs.
    """
    out_shape = [int(s) for s in sch.get(anchor).writes[0].source.shape]
    attached: set[str] = set()
    for consumer in sch.get_consumers(anchor):
        stmt = sch.get(consumer)
        if not _is_injective(sch, consumer) or not stmt.writes:
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
        lanes = ctx.lanes(_dtype_bits(sch, consumer))
        if inner is not None and not inner.same_as(tile):
            ext = _const_extent(sch, inner)
            # The epilogue's inner loop is the anchor's vector tile: vectorize it whole.
            if ext is not None and 1 < ext <= lanes * 4 and _vector_factor(ext, lanes) > 1:
                microkernel.vectorize_by_registers(sch, inner, lanes)
    return attached


# --------------------------------------------------------------------------------------------
# Rules 3 and 4: plain reductions and everything else


def _try_dlight_reduction(sch: s_tir.Schedule, ctx: _Ctx) -> s_tir.Schedule | None:
    """Row reductions (softmax, layer_norm) of an anchor-free kernel, or ``None``.

    First :func:`_schedule_rows`: each row reduction factored into one partial result per
    vector lane. dlight's ``cpu.Reduction`` (its fallback) leaves reductions scalar, one
    dependent ``max`` or ``add`` per element, and that chain, not memory, bounded softmax and
    layer_norm (a 197-wide softmax row: 197 dependent ``max``, then 197 dependent ``add``).
    """
    blocks = _root_blocks(sch)
    if all(_is_injective(sch, b) for b in blocks) or not _rows_aligned(sch, blocks):
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


def _row_count(reduction: tirx.SBlock) -> int:
    """How many leading axes are rows of a row reduction: its spatial iterators but trailing
    unit ones (a keepdims reduction's kept axis is not a row)."""
    dims = [extent_of(iv) for iv in reduction.iter_vars if iv.iter_type == _DATA_PAR]
    while dims and dims[-1] == 1:
        dims.pop()
    return len(dims)


def _rows_aligned(sch: s_tir.Schedule, blocks: list[SBlockRV]) -> bool:
    """Whether every row axis of the last block (its first :func:`_row_count` axes) indexes
    each reduction result it reads. Both row schedules compute every block per row *of the
    last block*, so a row axis the statistics do not depend on recomputes them once per value.

    A layer_norm fused with the transpose after it (ConvNeXt's channels-last block back to
    NCHW: output rows are channels, the statistics are per pixel) recomputed both reductions
    once per channel under dlight: 40x the work, 2.7 ms alone for a 0.5 MB tensor.
    """
    reductions = [sch.get(b) for b in blocks if any(iv.iter_type == _REDUCE for iv in sch.get(b).iter_vars)]
    if not reductions:
        return True
    stmt = sch.get(blocks[-1])
    rows = [iv.var for iv in stmt.iter_vars[:_row_count(reductions[0])] if (extent_of(iv) or 2) > 1]
    reduced = [r.writes[0].source for r in reductions]
    return all(all(_uses_var(region, var) for var in rows)
               for region in stmt.reads if any(region.source.same_as(buf) for buf in reduced))


def _row_runs(sch: s_tir.Schedule, done: set[str]) -> list[list[str]]:
    """The row reductions of an anchor kernel with the blocks that read their results, as runs
    of consecutive root blocks (names) that :func:`_schedule_rows` may take: each starts at a
    row reduction and ends at the last block that reads one (the layer norm's output, the
    softmax's normalization)."""
    runs, run = [], []
    for block in _root_blocks(sch) + [None]:
        name = sch.get(block).name_hint if block is not None else None
        if name is not None and name not in done and (
                _is_row_reduction(sch, block) or (run and (
                    _reads_row_reduction(sch, block) or _continues_row(sch, block, run)))):
            run.append(block)
            continue
        while run and not _is_injective(sch, run[-1]):
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
    if not _is_injective(sch, block):
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
        if _is_injective(sch, block):
            try:
                sch.compute_inline(block)
                continue
            except ScheduleError:
                pass
        kept.append(name)
    return kept + run[-1:]


def _schedule_row_runs(sch: s_tir.Schedule, ctx: _Ctx,
                       done: set[str]) -> tuple[s_tir.Schedule, set[str]]:
    """Schedule each row run (:func:`_row_runs`) of an anchor kernel as the rows of an
    anchor-free one are (:func:`_schedule_rows`), apart from the anchors' loop nests. Left to
    :func:`_parallel_vectorize` instead, a layer norm's statistics were one scalar chain per row
    of strided loads from the anchor's NCHW output (ConvNeXt's depthwise -> layer norm kernels
    ran 1.3-1.6x slower than the convolution, transpose and layer norm as three kernels).

    Returns the schedule (a new one if any run was scheduled) and ``done`` with the blocks it
    scheduled."""
    done = set(done)
    for run in _row_runs(sch, done):
        if not _rows_aligned(sch, [sch.get_sblock(n) for n in run]):
            continue
        trial = sch.copy()
        before = {trial.get(b).name_hint for b in _root_blocks(trial)}
        try:
            run = _inline_in_run(trial, run)
            if not _schedule_rows(trial, ctx, run):
                continue
        except Exception as err:  # noqa: BLE001 - the run is then scheduled as other blocks are
            log.debug("rules: row run %s not scheduled as rows: %s", run, first_line(err))
            continue
        sch = trial
        done |= set(run) | ({sch.get(b).name_hint for b in _root_blocks(sch)} - before)
    return sch, done


def _schedule_rows(sch: s_tir.Schedule, ctx: _Ctx, names: list[str] | None = None) -> bool:
    """dlight's row schedule (rows parallel, every block computed per row, elementwise blocks
    vectorized), with each row reduction ``rfactor``-ed by the vector width: ``lanes``
    independent partial results (the rf block, its lane loop vectorized), then one short
    reduction over the lanes. ``names``: the blocks to schedule so, in order (default: every
    root block). Returns False when they are not rows of reductions over their innermost axis,
    a whole number of vectors long (``sch`` may then be half changed: pass a copy)."""
    blocks = _root_blocks(sch) if names is None else [sch.get_sblock(n) for n in names]
    last = blocks[-1]
    if not _is_injective(sch, last) or len(sch.get_loops(last)) != len(sch.get(last).iter_vars):
        return False
    factored, rows = [], None
    for block in blocks:
        stmt = sch.get(block)
        kinds = [iv.iter_type for iv in stmt.iter_vars]
        if all(k == _DATA_PAR for k in kinds):
            continue
        loops = sch.get_loops(block)
        if kinds.count(_REDUCE) != 1 or kinds[-1] != _REDUCE or len(loops) != len(kinds):
            return False
        extent = _const_extent(sch, loops[-1])
        # A keepdims reduction's kept unit axis is no row: counting it would take the last
        # block's element loop for a row loop.
        count = _row_count(stmt)
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
        sch.reorder_block_iter_var(rf, [i for i in range(1, len(ivs)) if ivs[i].iter_type == _DATA_PAR]
                                   + [i for i in range(1, len(ivs)) if ivs[i].iter_type != _DATA_PAR] + [0])
        factored.append(rf)
    if rows is None:
        return False
    single = rows == 0
    if single:
        # One row ([1, C]: a pooled head's layer norm): the last block's unit first loop is
        # the row loop, run serially. Left to dlight, the statistics were recomputed for every
        # output element under a parallel loop, each thread writing the same scalar.
        loops = sch.get_loops(last)
        if len(loops) < 2 or _const_extent(sch, loops[0]) != 1:
            return False
        rows = 1
    rf_names = {sch.get(b).name_hint for b in factored}
    last_name = sch.get(last).name_hint
    # The blocks of the rows in program order, the rf blocks among them.
    mine = [b for b in _root_blocks(sch)
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
    for block in [b for b in _root_blocks(sch) if sch.get(b).name_hint in mine_names]:
        stmt = sch.get(block)
        lanes = ctx.lanes(stmt.writes[0].source.dtype.bits)
        inner = sch.get_loops(block)[-1]
        if sch.get(inner).same_as(sch.get(spatial)):  # no loop of its own (a keepdims mean)
            continue
        if stmt.name_hint in rf_names:
            microkernel.vectorize_by_registers(sch, inner, lanes)
        elif all(iv.iter_type == _DATA_PAR for iv in stmt.iter_vars):
            ext = _const_extent(sch, inner)
            exact = _vector_factor(ext, lanes)
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


#: Innermost extent worth a serial loop of its own when it is not a whole number of vectors.
#: Fused into the parallel loop, every element pays a div/mod for its address: a pad of
#: EfficientNet-B0's 7 x 7 maps to 11 x 11 took 0.129 ms that way, against 0.007 ms with the
#: 11-wide rows serial (rules:v17; v16 kept only rows of 16 or more serial).
_MIN_SERIAL_INNER = 3


def _parallel_vectorize(sch: s_tir.Schedule, block: SBlockRV, ctx: _Ctx) -> None:
    """Fuse the leading spatial loops into one parallel loop; vectorize the innermost one."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if not loops or len(loops) != len(stmt.iter_vars):
        return  # already placed under another block's loops (an attached epilogue)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    n_lead = next((i for i, k in enumerate(kinds) if k != _DATA_PAR), len(kinds))
    lanes = ctx.lanes(_dtype_bits(sch, block))
    lead = list(loops[:n_lead])
    if n_lead == len(loops) and lead:
        # Injective: split off a vector from the innermost loop.
        ext = _const_extent(sch, lead[-1])
        vec = _vector_factor(ext, lanes)
        if vec > 1:
            if ext is not None and ext > vec:
                lo, li = sch.split(lead[-1], factors=[None, vec])
                lead[-1] = lo
                sch.vectorize(li)
            else:
                sch.vectorize(lead.pop())
        elif len(lead) > 1 and (ext or 0) >= _MIN_SERIAL_INNER:
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
        total *= int(ext) if isinstance(ext, tirx.IntImm) else _MIN_PARALLEL_ELEMS
    if total >= _MIN_PARALLEL_ELEMS and _const_extent(sch, fused) != 1:
        sch.parallel(fused)
