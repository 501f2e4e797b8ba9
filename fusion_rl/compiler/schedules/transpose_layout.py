"""A transpose inside a kernel, pulled back into the anchor whose output it reorders.

ConvNeXt's block runs a depthwise convolution in NCHW, then a transpose to channels-last for
the layer norm over channels. Fused into one kernel, the convolution's micro-kernel accumulates
a tile of pixels x channels with the channels in the vector; its write-back then stored that
tile into the NCHW intermediate element by element (a channel is 3136 floats away from the
next), and the transpose read it back the same way to make the channels-last copy the layer
norm reads. Apart, as three kernels, the same steps were faster than fused.

Here the intermediate buffers between the anchor and the transpose take the transpose's
layout instead (``transform_layout``). The transpose is then a plain copy, inlined, and the
write-back stores whole vectors of channels. The layout only moves when it makes the anchor's
vector axis (the one its micro-kernel vectorizes) the innermost dimension, so a matmul whose
output is already ``[.., n]`` with ``n`` in the vector keeps it.

Only buffers that the kernel allocates move; a kernel's parameters keep the layout the graph
gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV, ScheduleError

from .anchor_layout import DATA_PAR

__all__ = ["Transpose", "find_transpose", "pull_transpose", "read_order", "writes_in_order"]


@dataclass(frozen=True)
class Transpose:
    """An anchor's output reordered in the same kernel: ``chain`` is the anchor then the
    elementwise blocks between it and the transpose (each writes one allocated buffer, read
    only by the next, at the same indices), ``transpose`` the block that reorders the last of
    those buffers, and ``order[e]`` the dimension of that buffer that its output dimension ``e``
    reads."""

    chain: tuple[str, ...]
    transpose: str
    order: tuple[int, ...]


def find_transpose(sch: s_tir.Schedule, anchor: SBlockRV) -> Transpose | None:
    """The transpose that reorders ``anchor``'s output in this kernel, or ``None``."""
    params = list(sch.mod["main"].params)  # the kernel's buffers (TVM 0.27: no buffer_map)
    chain, block = [anchor], anchor
    while True:
        buf = sch.get(block).writes[0].source
        if any(buf.same_as(p) for p in params):
            return None  # the kernel's output: its layout is fixed
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            return None
        nxt = sch.get(consumers[0])
        if any(iv.iter_type != DATA_PAR for iv in nxt.iter_vars) or not writes_in_order(nxt):
            return None
        order = read_order(nxt, buf)
        if order is None:
            return None
        if order == tuple(range(len(order))):
            chain.append(consumers[0])  # an elementwise step at the same indices
            block = consumers[0]
            continue
        return Transpose(tuple(sch.get(b).name_hint for b in chain), nxt.name_hint, order)


def pull_transpose(sch: s_tir.Schedule, found: Transpose, vector_iter: int) -> bool:
    """Give every buffer of ``found.chain`` the transpose's layout, then inline the transpose
    (now a copy), when that puts the anchor's iterator ``vector_iter`` innermost. Returns
    whether it did; ``sch`` is unchanged when not."""
    anchor = sch.get(sch.get_sblock(found.chain[0]))
    var = anchor.iter_vars[vector_iter].var
    index = anchor.writes[0].region
    inner = found.order[-1]
    if not (inner < len(index) and index[inner].min.same_as(var)):
        return False
    if index[-1].min.same_as(var):
        return False  # already innermost
    order = found.order
    for name in found.chain:
        sch.transform_layout(sch.get_sblock(name), ("write", 0),
                             lambda *idx: [idx[d] for d in order])
    # The transpose is now a copy: inlined into its readers, or else (it writes the kernel's
    # output) it stays, a contiguous copy that the anchor's write-back absorbs as it does any
    # same-shape epilogue.
    try:
        sch.compute_inline(sch.get_sblock(found.transpose))
    except ScheduleError:
        pass
    return True


def writes_in_order(stmt: tirx.SBlock) -> bool:
    """Whether ``stmt`` writes its one buffer at its iterators, in order (so that its iterator
    ``e`` is its output's dimension ``e``)."""
    ivars = [iv.var for iv in stmt.iter_vars]
    write = stmt.writes[0].region if len(stmt.writes) == 1 else []
    return len(write) == len(ivars) and all(r.min.same_as(v) for r, v in zip(write, ivars))


def read_order(stmt: tirx.SBlock, buf: tirx.Buffer) -> tuple[int, ...] | None:
    """For each iterator ``e`` of ``stmt``, the dimension of ``buf`` it indexes: ``stmt`` reads
    ``buf`` at a permutation of its iterators (identity: element for element). ``None`` unless
    every read of ``buf`` is the same such permutation."""
    ivars = [iv.var for iv in stmt.iter_vars]
    regions = [r.region for r in stmt.reads if r.source.same_as(buf)]
    if not regions:
        return None
    orders = set()
    for region in regions:
        if len(region) != len(ivars):
            return None
        dims = {}
        for d, rng in enumerate(region):
            hit = [e for e, v in enumerate(ivars) if rng.min.same_as(v)]
            if len(hit) != 1:
                return None
            dims[hit[0]] = d
        if len(dims) != len(ivars):
            return None
        orders.add(tuple(dims[e] for e in range(len(ivars))))
    return orders.pop() if len(orders) == 1 else None
