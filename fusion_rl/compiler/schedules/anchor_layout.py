"""How a multiply-accumulate anchor maps onto a micro-kernel: its vector axis, register axis and
packed operand (:func:`analyze`), read from the block's iterators and (simplified) indices.

:mod:`fusion_rl.compiler.schedules.microkernel` applies the :class:`Layout` chosen here.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx

DATA_PAR = tirx.IterVar.DataPar
REDUCE = tirx.IterVar.CommReduce
#: Register-tile rows tried, best first (7 divides every ResNet-style feature map width).
ROW_BLOCKS = (8, 7, 6, 5, 4, 3, 2)
#: The widest register tile in lanes (4 AVX-512 registers of fp32). Up to 4 vectors any tile
#: (v19's rule, whatever their width); the narrow micro-kernel's 8-lane vectors may take up to
#: 8 (``rules:v20``): 5 of them cover 40 channels (ConvNeXt's first stage, EfficientNet-B0's
#: 40-channel projections) where v19's tile was 8 rows of one half-width vector.
TILE_LANES = 64
#: Rows a tile of more than 4 vectors needs. Measured while 16-lane tiles could widen too (dev,
#: Zen 4): 2 rows x 5 vectors on a 14-wide map ran at 0.77-0.81x of 7 rows x 1.
WIDE_MIN_ROWS = 4


class Unschedulable(ValueError):
    """The anchor does not fit the micro-kernel; the message says why (reported upstream)."""


@dataclass(frozen=True)
class Layout:
    """Roles of the anchor's loops: which axis is vectorized, which is register-blocked."""

    v: int  #: index (among block iterators) of the vector axis
    r: int | None  #: index of the register-block axis, or None
    #: index among the two operands of the packed one; None: no packing; -1: depthwise (both
    #: operands copied channels-last, :func:`schedule_depthwise`)
    panel: int | None
    vec: int  #: vector tile: elements of ``v`` per micro-kernel (a multiple of the lanes)
    rows: int  #: register rows along ``r``


def vars_of(expr: tirx.PrimExpr) -> set[str]:
    return {v.name for v in tirx.analysis.undefined_vars(expr, [])}


def simplified_indices(region: tirx.BufferRegion, stmt: tirx.SBlock) -> list:
    """``region``'s start indices, simplified within the block iterators' domains.

    Splitting a grouped convolution's channel iterator ``c`` into ``(g, ci)`` leaves the
    input indexed by ``(g * G + ci) // G * G + rc``, which names ``ci`` although it equals
    ``g * G + rc``; unsimplified, the input looked as if it depended on the vector axis and
    the micro-kernel gave up ("no axis to vectorize").
    """
    from tvm.sym import Analyzer

    ana = Analyzer()
    for iv in stmt.iter_vars:
        ana.bind(iv.var, iv.dom)
    return [ana.simplify(rng.min) for rng in region.region]


def extent_of(iv: tirx.IterVar) -> int | None:
    ext = iv.dom.extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def is_depthwise(stmt: tirx.SBlock, lanes: int) -> bool:
    """Whether :func:`analyze` gives ``stmt`` the depthwise layout (the channel axis indexes
    both operands: ``panel == -1``)."""
    try:
        return analyze(stmt, lanes).panel == -1
    except Unschedulable:
        return False


def analyze(stmt: tirx.SBlock, lanes: int, registers: int = 16,
            vector_axis: int | None = None, tile_lanes: int = TILE_LANES) -> Layout:
    """Pick the vector axis, register axis and packed operand of a MAC block (or raise).

    ``vector_axis``, when it qualifies as a GEMM vector axis, wins over the default choice.
    ``tile_lanes``: :data:`TILE_LANES`; 0 keeps every tile within 4 vectors (``rules:v19``).
    """
    out = stmt.writes[0].source
    operands = [r for r in stmt.reads if not r.source.same_as(out)]
    if len(operands) != 2:
        raise Unschedulable(f"{len(operands)} operands, not 2")
    index = [simplified_indices(op, stmt) for op in operands]
    uses = [set().union(*(vars_of(e) for e in idx)) for idx in index]
    last = [vars_of(idx[-1]) for idx in index]
    names = [iv.var.name for iv in stmt.iter_vars]
    spatial = [i for i, iv in enumerate(stmt.iter_vars)
               if iv.iter_type == DATA_PAR and (extent_of(iv) or 0) > 1]
    if not spatial:
        raise Unschedulable("no spatial axis of constant extent > 1")

    def vec_tile(ext: int) -> int:
        for nv in (4, 3, 2, 1) if registers > 16 else (2, 1):  # prefer wide tiles: fewer broadcasts per FMA
            if ext % (lanes * nv) == 0:
                return lanes * nv
        return 0

    # 1. GEMM-like: a spatial axis used by exactly one operand; that operand is the panel.
    best: tuple | None = None
    for i in spatial:
        owners = [k for k in (0, 1) if names[i] in uses[k]]
        if len(owners) != 1:
            continue
        w = owners[0]
        vec = vec_tile(extent_of(stmt.iter_vars[i]))
        if not vec:
            continue
        # Register axis: a spatial axis the panel ignores (its vector is reused across rows).
        # Without one, packing buys nothing (each panel element is used once per output):
        # that is a depthwise-like anchor, scheduled below.
        rows_axes = [j for j in spatial if j != i and names[j] not in uses[w]]
        if not rows_axes:
            continue
        score = (i == vector_axis, bool(rows_axes), i == spatial[-1], vec)
        if best is None or score > best[0]:
            best = (score, i, w, rows_axes)
    if best is not None:
        _, v, w, rows_axes = best
        # Vector width and rows together: the most accumulators that fit (a 7-wide feature
        # map takes 7 rows of one vector, not 1 row of two), wider vectors on ties.
        nv, r, rows = register_tile(stmt, extent_of(stmt.iter_vars[v]), rows_axes, lanes,
                                    registers, tile_lanes)
        return Layout(v, r, w, nv * lanes, rows)
    # 2. Depthwise: a channel axis that both operands index by itself (X[c, ...], W[c, ...]);
    # vectorize it in a channels-last copy of both (see :func:`schedule_depthwise`).
    for i in spatial:
        ext = extent_of(stmt.iter_vars[i])
        if ext % lanes or not all(
                any(is_channel(e, stmt.iter_vars[i]) for e in idx) for idx in index):
            continue
        x_only = [j for j in spatial if names[j] in uses[x_operand(operands, names[i], uses)]
                  and not any(names[j] in uses[k] for k in (0, 1)
                              if k != x_operand(operands, names[i], uses))]
        r, rows = pick_rows(stmt, x_only, 1, registers)
        return Layout(i, r, -1, lanes, rows)
    # 3. Otherwise: vectorize the innermost spatial axis that some operand reads
    # contiguously; no packing, no reuse across rows (every axis is used by that operand).
    for i in reversed(spatial):
        if any(names[i] in last[k] and stride_one(index[k][-1], stmt.iter_vars[i])
               for k in (0, 1)):
            vec = vec_tile(extent_of(stmt.iter_vars[i])) or pow2_tile(extent_of(stmt.iter_vars[i]), lanes)
            if vec:
                others = [j for j in spatial if j != i]
                r, rows = pick_rows(stmt, others[-1:], max(vec // lanes, 1), registers, cap=4)
                return Layout(i, r, None, vec, rows)
    raise Unschedulable("no axis to vectorize (no operand is contiguous along a spatial axis)")


def register_tile(stmt: tirx.SBlock, ext: int, rows_axes: list[int], lanes: int, registers: int,
                  tile_lanes: int = TILE_LANES) -> tuple[int, int | None, int]:
    """``(vectors, row axis, rows)`` of the register tile of a vector axis of ``ext`` elements:
    the most accumulators, the wider vector tile on ties. Up to 4 vectors any tile (2 with 16
    registers, which must leave room for the panel vectors); more, up to ``tile_lanes`` lanes
    (``rules:v20``), only with :data:`WIDE_MIN_ROWS` rows and strictly more accumulators."""
    standard = 4 if registers > 16 else 2
    widest = max(standard, tile_lanes // lanes) if registers > 16 else standard
    tiles, wide = [], []
    for nv in range(1, widest + 1):
        if ext % (nv * lanes) == 0:
            r, rows = pick_rows(stmt, rows_axes, nv, registers)
            if nv <= standard:
                tiles.append((rows * nv, nv, r, rows))
            elif rows >= WIDE_MIN_ROWS:
                wide.append((rows * nv, nv, r, rows))
    best = max(tiles)
    if wide and max(wide)[0] > best[0]:
        best = max(wide)
    return best[1:]


def pow2_tile(ext: int | None, lanes: int) -> int:
    f = lanes
    while ext and f >= 4 and ext % f:
        f //= 2
    return f if ext and f >= 4 and ext % f == 0 else 0


def channel_groups(stmt: tirx.SBlock, lanes: int) -> tuple[int, int] | None:
    """(iterator index, channels per group) of a grouped convolution whose groups hold a whole
    number of vectors, or None. Recognized by the input's channel index ``c // G * G + rc``
    (how TOPI's ``group_conv2d_nchw`` indexes it); depthwise (``G == 1``) has its own path."""
    out = stmt.writes[0].source
    names = {iv.var.name: i for i, iv in enumerate(stmt.iter_vars) if iv.iter_type == DATA_PAR}
    for op in stmt.reads:
        if op.source.same_as(out):
            continue
        for rng in op.region:
            for node in subexprs(rng.min):
                if isinstance(node, tirx.FloorDiv) and isinstance(node.a, tirx.Var) \
                        and isinstance(node.b, tirx.IntImm) and node.a.name in names:
                    group, axis = int(node.b), names[node.a.name]
                    ext = extent_of(stmt.iter_vars[axis])
                    if group > 1 and group % lanes == 0 and ext and ext > group and ext % group == 0:
                        return axis, group
    return None


def subexprs(expr: "tvm.ir.expr.Expr") -> list:
    """``expr`` and its arithmetic operands, recursively."""
    out, todo = [], [expr]
    while todo:
        e = todo.pop()
        out.append(e)
        for field in ("a", "b"):
            child = getattr(e, field, None)
            if isinstance(child, tvm.ir.expr.Expr):
                todo.append(child)
    return out


def einsum_padding(stmt: tirx.SBlock, lanes: int, registers: int) -> list[int] | None:
    """Padding factors that make a matmul-like block's vector and row axes tile exactly, or
    None when nothing needs padding (or the block is not an einsum: convolutions index with
    ``oh * s + kh``, and their widths tile already)."""
    regions = [*stmt.reads, *stmt.writes]
    if not all(isinstance(r.min, (tirx.Var, tirx.IntImm)) for reg in regions for r in reg.region):
        return None
    out = stmt.writes[0].source
    operands = [r for r in stmt.reads if not r.source.same_as(out)]
    if len(operands) != 2:
        return None
    uses = [set().union(*(vars_of(rng.min) for rng in op.region)) for op in operands]
    names = [iv.var.name for iv in stmt.iter_vars]
    spatial = [i for i, iv in enumerate(stmt.iter_vars)
               if iv.iter_type == DATA_PAR and (extent_of(iv) or 0) > 1]
    owned = [i for i in spatial if sum(names[i] in u for u in uses) == 1]
    if not owned:
        return None
    v = owned[-1]
    w = next(k for k in (0, 1) if names[v] in uses[k])
    rows_axes = [j for j in spatial if j != v and names[j] not in uses[w]]
    pad = [1] * len(stmt.iter_vars)
    if extent_of(stmt.iter_vars[v]) % lanes:
        pad[v] = 2 * lanes if registers <= 16 else 4 * lanes
    if rows_axes:
        r = rows_axes[-1]
        ext = extent_of(stmt.iter_vars[r])
        if not any(ext % rows == 0 for rows in ROW_BLOCKS if rows >= 4):
            pad[r] = 4
    return pad if any(p > 1 for p in pad) else None


def is_channel(index: tirx.PrimExpr, iv: tirx.IterVar) -> bool:
    """Does ``index`` step by one with ``iv`` (``c``, or ``c + rc`` with a unit ``rc``)?"""
    return iv.var.name in vars_of(index) and stride_one(index, iv)


def x_operand(operands: list, name: str, uses: list[set[str]]) -> int:
    """The operand with more iterators (the data; the other is the depthwise filter)."""
    return 0 if len(uses[0]) >= len(uses[1]) else 1


def stride_one(index: tirx.PrimExpr, iv: tirx.IterVar) -> bool:
    """Is ``index`` = ``iv + (terms without iv)``? (contiguous along ``iv``)."""
    from tvm.sym import Analyzer

    at = []
    for value in (0, 1):
        ana = Analyzer()
        ana.bind(iv.var, tirx.const(value, "int64"))  # legalized kernels index in int64
        at.append(ana.simplify(index))
    return bool(Analyzer().can_prove_equal(at[1] - at[0], 1))


def pick_rows(stmt: tirx.SBlock, axes: list[int], nvec: int, registers: int,
              cap: int | None = None) -> tuple[int | None, int]:
    """Innermost candidate axis and the largest row block dividing it such that the tile's
    accumulators (``rows x nvec``), the ``nvec`` panel vectors of one reduction step and the
    broadcast are all live in ``registers`` vector registers at once."""
    # One register short and LLVM spills accumulators inside the reduction loop: 7 rows x 4
    # AVX-512 vectors (28 + 4 + 1 = 33 of 32 registers) ran ResNet-18's 7x7 and 14x14 convs
    # at half speed (end to end, head to head on a Zen 5 host: ResNet-18 1.28x, ConvNeXt
    # 1.41x, MobileNetV2 1.12x faster with 6 rows; transformers unchanged; AVX2 tiles are
    # the same under either rule).
    nvec = max(nvec, 1)
    limit = max((registers - nvec - 1) // nvec, 1)
    if cap:
        limit = min(limit, cap)
    for j in reversed(axes):
        ext = extent_of(stmt.iter_vars[j])
        for rows in ROW_BLOCKS:
            if rows <= limit and ext and ext % rows == 0:
                return j, rows
    return (axes[-1], 1) if axes else (None, 1)
