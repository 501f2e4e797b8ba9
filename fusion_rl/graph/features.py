"""Static node and edge features of an OpGraph, and its conversion to PyTorch Geometric.

The feature layout is a contract with trained policies: a policy artifact records
:data:`FEATURE_SCHEMA_VERSION` and :func:`feature_schema`, and loading one with another schema is
an error. Bump the version whenever a feature is added, removed or re-scaled.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fusion_rl.graph.opgraph import OpGraph

FEATURE_SCHEMA_VERSION = 1

#: Operator types with their own one-hot slot; everything else shares "other". Chosen from
#: what LegalizeOps emits for CNNs and transformers.
OP_VOCAB: tuple[str, ...] = (
    "conv2d", "matmul", "dense", "batch_matmul", "add", "subtract", "multiply", "divide",
    "relu", "erf", "tir_tanh", "tir_sigmoid", "exp", "power", "sqrt", "rsqrt", "maximum",
    "minimum", "clip", "cast", "where", "less", "layer_norm", "softmax", "mean", "sum", "max",
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "reshape", "transpose", "concatenate",
    "split", "strided_slice", "take", "other",
)
PATTERN_SLOTS: tuple[int, ...] = (0, 1, 2, 3, 4, 8)  # elemwise ... opaque; 7 (tuple) -> 8

NODE_FEATURE_NAMES: tuple[str, ...] = (
    *(f"op={o}" for o in OP_VOCAB),
    *(f"pattern={p}" for p in PATTERN_SLOTS),
    "log_flops", "log_bytes_read", "log_bytes_written", "log_weight_bytes", "log_out_numel",
    "out_rank", "num_outputs", "is_anchor", "is_mac_anchor", "arith_intensity", "is_output",
)
EDGE_FEATURE_NAMES: tuple[str, ...] = ("log_bytes", "tuple_index")

NUM_NODE_FEATURES = len(NODE_FEATURE_NAMES)
NUM_EDGE_FEATURES = len(EDGE_FEATURE_NAMES)


def log_scale(x: float) -> float:
    """``log2(1 + x) / 32``, negatives clipped to 0: the scale of every size and count feature.

    It keeps every size up to 4 GiB (and 4 GFLOP) in [0, 1]; the cost model's group features
    use the same scale so that node and group features are comparable.
    """
    return math.log2(1.0 + max(0.0, float(x))) / 32.0


def node_features(graph: OpGraph) -> np.ndarray:
    """``[num_nodes, NUM_NODE_FEATURES]`` float32."""
    x = np.zeros((len(graph), NUM_NODE_FEATURES), dtype=np.float32)
    op_index = {o: i for i, o in enumerate(OP_VOCAB)}
    base = len(OP_VOCAB)
    outputs = set(graph.outputs)
    for n in graph.nodes:
        row = x[n.id]
        row[op_index.get(n.op, op_index["other"])] = 1.0
        pattern = n.pattern if n.pattern in PATTERN_SLOTS else 8
        row[base + PATTERN_SLOTS.index(pattern)] = 1.0
        k = base + len(PATTERN_SLOTS)
        numel = sum(math.prod(s) for s in n.shapes)
        moved = n.bytes_read + n.bytes_written
        row[k:k + 11] = (
            log_scale(n.flops),
            log_scale(n.bytes_read),
            log_scale(n.bytes_written),
            log_scale(n.weight_bytes),
            log_scale(numel),
            max((len(s) for s in n.shapes), default=0) / 8.0,
            min(len(n.shapes), 8) / 8.0,
            float(n.is_anchor),
            float(n.is_mac_anchor),
            log_scale(n.flops / moved if moved else 0.0) * 4.0,
            float(n.id in outputs),
        )
    return x


def edge_index_and_features(graph: OpGraph) -> tuple[np.ndarray, np.ndarray]:
    """``edge_index [2, E]`` int64 (src, dst) and ``edge_attr [E, NUM_EDGE_FEATURES]`` float32."""
    if not graph.edges:
        return np.zeros((2, 0), dtype=np.int64), np.zeros((0, NUM_EDGE_FEATURES), dtype=np.float32)
    index = np.array([[e.src for e in graph.edges], [e.dst for e in graph.edges]], dtype=np.int64)
    attr = np.array([[log_scale(e.bytes), min(e.index, 8) / 8.0] for e in graph.edges], dtype=np.float32)
    return index, attr


def to_pyg(graph: OpGraph) -> "torch_geometric.data.Data":
    import torch
    from torch_geometric.data import Data

    edge_index, edge_attr = edge_index_and_features(graph)
    return Data(
        x=torch.from_numpy(node_features(graph)),
        edge_index=torch.from_numpy(edge_index),
        edge_attr=torch.from_numpy(edge_attr),
        num_nodes=len(graph),
    )


def feature_schema() -> dict[str, Any]:
    """What a policy artifact records to check compatibility."""
    return {
        "version": FEATURE_SCHEMA_VERSION,
        "node_features": list(NODE_FEATURE_NAMES),
        "edge_features": list(EDGE_FEATURE_NAMES),
    }
