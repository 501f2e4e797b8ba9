"""The operator graph (OpGraph): what a fusion decision sees of a model.

Nodes are the ``call_tir`` bindings of ``main``'s dataflow block of a legalized Relax module, in
program (topological) order; node ``i`` is the ``i``-th ``call_tir``. Edges are data
dependencies between them. A ``TupleGetItem`` is not a node: it is folded into the edge from the
tuple's producer, and :mod:`fusion_rl.fusion` keeps it with that producer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import tvm
from tvm import relax

#: TVM's ``OpPatternKind`` values (include/tvm/relax/op_attr_types.h).
PATTERN_NAMES = {
    0: "elemwise",
    1: "broadcast",
    2: "injective",
    3: "reduction",
    4: "out_ewise_fusable",
    7: "tuple",
    8: "opaque",
}
PATTERN_REDUCTION = 3
PATTERN_OUT_EWISE_FUSABLE = 4

#: Ops with a multiply-accumulate reduction (the ops schedules tile). Decided by op kind, not
#: pattern: AnnotateTIROpPattern also marks layer_norm, softmax, mean and pooling as pattern 4.
MAC_OPS = frozenset(
    {"conv1d", "conv2d", "conv3d", "conv1d_transpose", "conv2d_transpose", "matmul", "dense",
     "batch_matmul", "einsum"}
)

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


@dataclass(frozen=True)
class OpNode:
    """One operator (one ``call_tir``)."""

    id: int
    var: str  #: name of the Relax variable the op binds (for humans; not unique across modules)
    callee: str  #: name of the PrimFunc it calls (``conv2d1``)
    op: str  #: operator type, the callee name without its numeric suffix (``conv2d``)
    pattern: int  #: TVM pattern kind, see :data:`PATTERN_NAMES`
    shapes: tuple[tuple[int, ...], ...]  #: output shape(s); several for tuple outputs
    dtype: str
    flops: float
    bytes_read: int  #: all inputs, weights included
    bytes_written: int
    weight_bytes: int  #: bytes of constant inputs (weights)
    #: Shapes of the tensor arguments, in call order (a conv's data, then its weight; ``()`` for
    #: a non-tensor argument). Not in :attr:`OpGraph.fingerprint`: the output shapes, weight
    #: bytes, flops and edges there already pin them for every op fusion rules tell apart, and
    #: adding them would orphan every stored plan.
    arg_shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def is_anchor(self) -> bool:
        """Conv/matmul (``OutEWiseFusable``) or reduction: the op that dominates a kernel."""
        return self.pattern in (PATTERN_REDUCTION, PATTERN_OUT_EWISE_FUSABLE)

    @property
    def is_mac_anchor(self) -> bool:
        """A multiply-accumulate anchor (conv, matmul, dense): the ops schedules tile."""
        return self.op in MAC_OPS

    @property
    def pattern_name(self) -> str:
        return PATTERN_NAMES.get(self.pattern, str(self.pattern))


@dataclass(frozen=True)
class OpEdge:
    """Data flowing from ``src``'s output ``index`` into ``dst``."""

    src: int
    dst: int
    index: int  #: which output of a tuple-producing ``src`` (0 otherwise)
    bytes: int


@dataclass
class OpGraph:
    """Operators, their data dependencies, and which node outputs leave the model."""

    nodes: list[OpNode]
    edges: list[OpEdge]
    outputs: list[int] = field(default_factory=list)  #: nodes whose result ``main`` returns
    name: str = ""

    def __len__(self) -> int:
        return len(self.nodes)

    # ---- adjacency -------------------------------------------------------------------------
    def producers(self, node: int) -> list[int]:
        return sorted({e.src for e in self.edges if e.dst == node})

    def consumers(self, node: int) -> list[int]:
        return sorted({e.dst for e in self.edges if e.src == node})

    def successor_lists(self) -> list[list[int]]:
        succ: list[set[int]] = [set() for _ in self.nodes]
        for e in self.edges:
            succ[e.src].add(e.dst)
        return [sorted(s) for s in succ]

    def predecessor_lists(self) -> list[list[int]]:
        pred: list[set[int]] = [set() for _ in self.nodes]
        for e in self.edges:
            pred[e.dst].add(e.src)
        return [sorted(p) for p in pred]

    # ---- identity --------------------------------------------------------------------------
    @functools.cached_property
    def fingerprint(self) -> str:
        """A stable hash of the graph's *structure*: ops, patterns, shapes, dtypes and edges.

        Weights are deliberately left out: they change no latency and no legality, so a plan
        and a measurement carry over between two models that differ only in their weights.

        Computed once: legality checks, plans and stores ask for it on every call, and a graph is
        not changed once built (build a new one instead).
        """
        payload = {
            "nodes": [[n.op, n.pattern, n.shapes, n.dtype, n.weight_bytes] for n in self.nodes],
            "edges": sorted([e.src, e.dst, e.index] for e in self.edges),
            "outputs": sorted(self.outputs),
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "nodes": [asdict(n) for n in self.nodes],
            "edges": [asdict(e) for e in self.edges],
            "outputs": self.outputs,
        }

    def summary(self) -> str:
        anchors = sum(n.is_anchor for n in self.nodes)
        return (
            f"OpGraph({self.name or '?'}: {len(self.nodes)} ops, {len(self.edges)} edges, "
            f"{anchors} anchors, fingerprint {self.fingerprint})"
        )

    def to_pyg(self) -> "torch_geometric.data.Data":
        """Convert to a PyG ``Data`` with the static node/edge features of
        :mod:`fusion_rl.graph.features`."""
        from fusion_rl.graph.features import to_pyg

        return to_pyg(self)


def extract_opgraph(mod: tvm.IRModule, name: str = "") -> OpGraph:
    """Build the OpGraph of a legalized module's ``main`` (see :func:`~fusion_rl.graph.importer.legalize`)."""
    main = mod["main"]
    bindings = [b for block in main.body.blocks for b in block.bindings]
    # source of each Relax var: (node id, tuple index) or None for params/constants.
    source: dict[relax.Var, tuple[int, int] | tuple[tuple[int, int], ...]] = {}
    nodes: list[OpNode] = []
    edges: list[OpEdge] = []
    for binding in bindings:
        value = binding.value
        if isinstance(value, relax.Call) and value.op == _CALL_TIR:
            nid = len(nodes)
            gvar = value.args[0]
            func = mod[gvar]
            args = list(value.args[1].fields)
            read = 0
            weights = 0
            arg_shapes = []
            for arg in args:
                arg_shapes.append(_shape(arg.ty))
                nbytes = _nbytes(arg.ty)
                read += nbytes
                if isinstance(arg, tvm.ir.expr.Constant):
                    weights += nbytes
                for src in _sources(arg, source):
                    edges.append(OpEdge(src[0], nid, src[1], nbytes))
            shapes, dtype = _out_shapes(binding.var.ty)
            written = _nbytes(binding.var.ty)
            pattern = int(func.attrs["op_pattern"]) if func.attrs and "op_pattern" in func.attrs else 8
            nodes.append(
                OpNode(
                    id=nid,
                    var=binding.var.name,
                    callee=gvar.name_hint,
                    op=_op_name(gvar.name_hint),
                    pattern=pattern,
                    shapes=shapes,
                    dtype=dtype,
                    flops=_flops(func),
                    bytes_read=read,
                    bytes_written=written,
                    weight_bytes=weights,
                    arg_shapes=tuple(arg_shapes),
                )
            )
            source[binding.var] = (nid, 0)
        elif isinstance(value, relax.TupleGetItem):
            src = source.get(value.tuple_value)
            if isinstance(src, tuple) and src and isinstance(src[0], int):
                source[binding.var] = (src[0], int(value.index))
            elif isinstance(src, tuple) and src:  # getitem of a Relax tuple of vars
                source[binding.var] = src[int(value.index)]  # type: ignore[assignment]
        elif isinstance(value, relax.Tuple):
            source[binding.var] = tuple(  # type: ignore[assignment]
                s for f in value.fields for s in _sources(f, source)
            )
        elif isinstance(value, relax.Var) and value in source:
            source[binding.var] = source[value]
    outputs = sorted({s[0] for s in _sources(main.body.body, source)})
    # Duplicate (src, dst) pairs can arise when an op reads the same tensor twice; keep one.
    unique: dict[tuple[int, int, int], OpEdge] = {}
    for e in edges:
        unique.setdefault((e.src, e.dst, e.index), e)
    return OpGraph(nodes=nodes, edges=list(unique.values()), outputs=outputs, name=name)


# --------------------------------------------------------------------------------------------


def _sources(expr: relax.Expr, source: dict) -> list[tuple[int, int]]:
    """The (node, output index) pairs an argument expression reads."""
    if isinstance(expr, relax.Var):
        src = source.get(expr)
        if src is None:
            return []
        if src and isinstance(src[0], int):
            return [src]  # type: ignore[list-item]
        return list(src)  # a tuple of several sources
    if isinstance(expr, relax.Tuple):
        return [s for f in expr.fields for s in _sources(f, source)]
    if isinstance(expr, relax.TupleGetItem):
        inner = _sources(expr.tuple_value, source)
        if len(inner) == 1:
            return [(inner[0][0], int(expr.index))]
        return [inner[int(expr.index)]] if int(expr.index) < len(inner) else inner
    return []


def _op_name(callee: str) -> str:
    # LegalizeOps names PrimFuncs after the op and de-duplicates with a numeric suffix.
    return re.sub(r"_?\d+$", "", callee) or callee


def _out_shapes(sinfo: tvm.ir.Type) -> tuple[tuple[tuple[int, ...], ...], str]:
    if isinstance(sinfo, tvm.ir.type.TupleType):
        parts = [_out_shapes(f) for f in sinfo.fields]
        return tuple(s for p in parts for s in p[0]), parts[0][1] if parts else "float32"
    shape = tuple(int(d) for d in sinfo.shape) if sinfo.shape is not None else ()
    return (shape,), str(sinfo.dtype)


def _shape(sinfo: tvm.ir.Type) -> tuple[int, ...]:
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return ()
    return tuple(int(d) for d in sinfo.shape)


def _nbytes(sinfo: tvm.ir.Type) -> int:
    if isinstance(sinfo, tvm.ir.type.TupleType):
        return sum(_nbytes(f) for f in sinfo.fields)
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return 0
    numel = math.prod(int(d) for d in sinfo.shape)
    return numel * tvm.runtime.DataType(sinfo.dtype).bits // 8


def _flops(func: tvm.tirx.PrimFunc) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(tvm.IRModule({"main": func})))
    except Exception:  # some opaque kernels cannot be analysed; they count as memory-bound
        return 0.0
