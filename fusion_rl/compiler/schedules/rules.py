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
   get a register tile, their elementwise epilogue computed at the tile while it is still in
   L1: a packed micro-kernel where one fits (:mod:`.microkernel`), else a plain register tile
   (:mod:`.tile`). A kernel with two or more anchors has each scheduled on its own, except a
   pointwise convolution feeding a depthwise or grouped one: that pair shares the consumer's
   channel blocks (:mod:`.chain`).
3. *Row reductions* (softmax, layer norm), with or without an anchor in the kernel: rows in
   parallel, every block computed per row, each row reduction factored by vector lanes, else
   dlight's ``cpu.Reduction`` (:mod:`.rows`).
4. *Everything else* left at the root gets its outer loops fused and parallelized and its
   innermost spatial loop vectorized.

A kernel that fails any step falls back to its unscheduled form (logged at debug level).

This module chooses the rules for a kernel and keys it (:class:`RulesSchedule`); rules 1 and 4,
and what every rule reads of a kernel's blocks, are in :mod:`.blocks`.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV

from fusion_rl.errors import first_line

from . import chain, microkernel, prepack, rows, tile, transpose_layout
from .base import SCHEDULE_ATTR, ScheduleProvider
from .blocks import (
    MIN_PARALLEL_MACS, Ctx, copies_anchor_input, dtype_bits, has_fused_reduction, has_ragged_row,
    has_short_row, has_single_row, inline_injective, is_mac, pads_epilogue, parallel_vectorize,
    root_blocks,
)

log = logging.getLogger(__name__)

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
#: The key of a pointwise -> depthwise pair, whose schedule v18 changed and v19 did not.
_V18 = "rules:v18"
#: The key of a kernel whose anchor reads a plain copy of its input, which v19 changed and v20
#: did not.
_V19 = "rules:v19"


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
        # materialized (schedule_row_runs), and the anchor's epilogue is computed at its tile,
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
        # its tile is full AVX-512 vectors; v19: an anchor reads its input itself where the
        # kernel only copies it (the pad_temp of a 1x1 convolution, blocks.is_identity_copy);
        # v20: the narrow (8-lane) micro-kernel's register tile may hold more than 4 vectors
        # (up to 64 lanes, with at least 4 rows, where that holds more accumulators), and it is
        # taken instead of padding a vector axis of whole 8-lane vectors to 16 lanes (ConvNeXt's
        # 40 channels).
        # Records of older schedules must not be served for the new one, so the version is part
        # of every measurement's key.
        return "rules:v20"

    def kernel_key(self, func: tirx.PrimFunc) -> str:
        """v13 changed only the kernels that are a pointwise -> grouped pair, v14 and v15 only
        those with one anchor and another reduction and (v15) row kernels whose rows are not a
        whole number of 16-lane vectors, v16 only those that transpose an anchor's output
        inside the kernel or reduce a single row, v17 only those that write an anchor's epilogue
        padded or have an injective row of 3-15 elements that is not whole vectors, v18 only
        the pointwise -> depthwise pairs, v19 only the other kernels whose anchor reads a plain
        copy of its input, v20 only kernels outside a pair whose anchor may take another
        register tile (:func:`.microkernel.widens_tile`); every other kernel keeps the key (and
        the timings) of the version that last changed its schedule."""
        kind = _chain_kind(func)
        if kind == "depthwise":
            return _V18  # chain.py inlined its input copy before v19 did it for every anchor
        sch = s_tir.Schedule(func)
        anchors = [b for b in root_blocks(sch) if is_mac(sch, b)]
        if kind is None and any(microkernel.widens_tile(sch, b, alone=len(anchors) == 1)
                                for b in anchors):
            return self.key
        fused, ragged = has_fused_reduction(sch), has_ragged_row(sch)
        single, pads = has_single_row(sch), pads_epilogue(sch)
        inline_injective(sch, fused, plain_copies=False)  # rule 1, as v18 applied it
        if kind is None and copies_anchor_input(sch):
            return _V19
        # Before the grouped pairs: v17 rescheduled those with a short row too.
        if pads or has_short_row(sch):
            return _V17
        if kind is not None:
            return _V13
        if single or _transposes_anchor(sch):
            return _V16
        return _V15 if fused or ragged else _V12

    @property
    def kernel_keys(self) -> tuple[str, ...]:
        return (_V12, _V13, _V15, _V16, _V17, _V18, _V19, self.key)

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


def _make_ctx(target: tvm.target.Target) -> Ctx:
    """Vector width from the instruction sets LLVM enables for ``mcpu`` (512 bits with AVX-512,
    256 with AVX/AVX2, else 128). ``llvm_get_vector_width`` is not used: it answers 512 for
    ``znver3``, which has no AVX-512, and tiles sized for 32 registers spill on 16."""
    bits = 128
    if target.kind.name == "llvm":
        from tvm.target import codegen

        features = set(codegen.llvm_get_cpu_features(target))
        bits = 512 if "avx512f" in features else 256 if "avx" in features else 128
    return Ctx(target, bits, 32 if bits == 512 else 16)


def _chain_kind(func: tirx.PrimFunc) -> str | None:
    """The consumer kind (``"depthwise"`` or ``"grouped"``) when ``func`` is a pair that
    :mod:`.chain` schedules with one shared tile, else ``None``.

    Every kernel of every build passes here: anchors are counted before anything is inlined
    (inlining neither makes nor removes one), so a kernel without two costs no inlining."""
    try:
        sch = s_tir.Schedule(func)
        if sum(is_mac(sch, b) for b in root_blocks(sch)) != 2:
            return None
        inline_injective(sch)
        pair = chain.match(sch, [b for b in root_blocks(sch) if is_mac(sch, b)])
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
               for b in root_blocks(sch) if is_mac(sch, b))


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def schedule_prim_func(func: tirx.PrimFunc, ctx: Ctx, name: str = "") -> tirx.PrimFunc:
    """Schedule one PrimFunc; never raises.

    The result carries the attribute ``fusion_rl.schedule``: the rule that scheduled it
    (``microkernel``, ``tile``, ``reduction``, ``elementwise``), or ``fallback: <reason>`` when
    every rule failed and the kernel is left as naive loops (see :func:`.base.schedule_report`).
    """
    reasons: list[str] = []

    def attempt(rule: str, rule_ctx: Ctx) -> tuple | None:
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
        narrow = attempt("microkernel", Ctx(ctx.target, ctx.vector_bits // 2, ctx.registers,
                                                 ctx.tile_lanes))
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


def _schedule_with(func: tirx.PrimFunc, ctx: Ctx,
                   rule: str) -> tuple[s_tir.Schedule, str, dict[int, prepack.WeightPack], bool]:
    """Apply the rules with anchors scheduled by ``rule``; returns the schedule, its kind, the
    parameters given a packed layout, and whether every anchor got a layout with register reuse
    (a packed panel or the depthwise path, not the plain vectorized loop)."""
    sch = s_tir.Schedule(func)
    # One anchor: never a chain pair, whose schedule v14 left as v13 made it.
    fused_reduction = has_fused_reduction(sch)
    inline_injective(sch, fused_reduction)
    anchors = [b for b in root_blocks(sch) if is_mac(sch, b)]
    if rule == "chain":
        pair = chain.match(sch, anchors)
        if pair is None:
            raise ValueError("not a pointwise -> depthwise or grouped pair")
        done = chain.schedule_pair(sch, *pair, ctx.registers, MIN_PARALLEL_MACS,
                                   ctx.lanes(dtype_bits(sch, pair[0])))
        for block in root_blocks(sch):
            if sch.get(block).name_hint not in done:
                parallel_vectorize(sch, block, ctx)
        return sch, "chain", {}, True
    if not anchors:
        reduced = rows.try_dlight_reduction(sch, ctx)
        if reduced is not None:
            return reduced, "reduction", {}, True
        if rule != "microkernel":
            raise ValueError("nothing left to try")
    done: set[str] = set()
    packs: dict[int, prepack.WeightPack] = {}
    reuse = True
    for anchor in anchors:
        if rule == "microkernel":
            lanes = ctx.lanes(dtype_bits(sch, anchor))
            pulled = _pull_transpose(sch, anchor, lanes, ctx.registers)
            names, packed, layout = microkernel.schedule_anchor(sch, anchor, lanes, ctx.registers,
                                                                MIN_PARALLEL_MACS, pulled,
                                                                ctx.tile_lanes)
            done |= names
            packs.update(packed)
            reuse = reuse and layout.panel is not None
        else:
            done |= tile.schedule_anchor(sch, anchor, ctx)
    if fused_reduction:
        sch, done = rows.schedule_row_runs(sch, ctx, done)
    for block in root_blocks(sch):
        if sch.get(block).name_hint not in done:
            parallel_vectorize(sch, block, ctx)
    return sch, (rule if anchors else "elementwise"), packs, reuse
