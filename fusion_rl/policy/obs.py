"""Build valid padded observations from an :class:`~fusion_rl.graph.opgraph.OpGraph`.

The env (:mod:`fusion_rl.env.fusion_env`) is the real producer of observations; this helper
makes the same layout without an env, with the *static* features of :mod:`fusion_rl.graph.features`
and the dynamic ones derived from a grouping, so that the policy can be tested (and its padding
invariance checked) on real graphs without compiling anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fusion_rl.env.spaces import (
    DEFAULT_MAX_EDGES,
    DEFAULT_MAX_NODES,
    DYNAMIC_EDGE,
    DYNAMIC_NODE,
    EDGE_DIM,
    NODE_DIM,
)
from fusion_rl.graph.features import edge_index_and_features, node_features
from fusion_rl.graph.opgraph import OpGraph

__all__ = ["graph_observation"]


def graph_observation(
    graph: OpGraph,
    hardware: Sequence[float] | np.ndarray,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_edges: int = DEFAULT_MAX_EDGES,
    decision_edge: int = 0,
    groups: Sequence[int] | None = None,
    dynamic: bool = True,
    decided: Sequence[bool] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """A padded observation of ``graph`` deciding edge ``decision_edge``.

    :param graph: The OpGraph (needs at least one edge).
    :param hardware: The hardware feature vector.
    :param max_nodes: Node padding size; must be >= ``len(graph)``.
    :param max_edges: Edge padding size; must be >= the number of edges.
    :param decision_edge: Index into ``graph.edges`` of the edge being decided.
    :param groups: Group label of each node (default: every node its own group). Labels are
        normalized to the smallest node id of each group, as the env does.
    :param dynamic: Fill the dynamic features from ``groups``; ``False`` leaves them zero.
    :param decided: Which edges are decided (default: those with a smaller index than
        ``decision_edge``).
    """
    n, e = len(graph), len(graph.edges)
    if n > max_nodes or e > max_edges:
        raise ValueError(f"{graph.name}: {n} nodes / {e} edges exceed max_nodes={max_nodes} / max_edges={max_edges}")
    if not 0 <= decision_edge < e:
        raise ValueError(f"decision_edge {decision_edge} out of range for {e} edges")
    labels = np.arange(n) if groups is None else np.asarray(groups, dtype=np.int64)
    smallest = {g: int(np.flatnonzero(labels == g).min()) for g in set(labels.tolist())}
    labels = np.array([smallest[g] for g in labels.tolist()], dtype=np.int64)

    x_static = node_features(graph)
    index, attr_static = edge_index_and_features(graph)
    src, dst = int(index[0, decision_edge]), int(index[1, decision_edge])

    x = np.zeros((max_nodes, NODE_DIM), np.float32)
    x[:n, : x_static.shape[1]] = x_static
    edge_attr = np.zeros((max_edges, EDGE_DIM), np.float32)
    edge_attr[:e, : attr_static.shape[1]] = attr_static
    if dynamic:
        base = x_static.shape[1]
        sizes = {g: int((labels == g).sum()) for g in smallest.values()}
        mac = {g: any(graph.nodes[i].is_mac_anchor for i in np.flatnonzero(labels == g)) for g in sizes}
        dyn = DYNAMIC_NODE.index
        for i in range(n):
            g = int(labels[i])
            x[i, base + dyn("log_group_size")] = math.log2(1 + sizes[g]) / 8.0
            x[i, base + dyn("group_has_mac_anchor")] = float(mac[g])
            x[i, base + dyn("in_src_group")] = float(g == labels[src])
            x[i, base + dyn("in_dst_group")] = float(g == labels[dst])
        done = np.arange(e) < decision_edge if decided is None else np.asarray(decided, bool)
        into = np.zeros(n, bool)  # node with an undecided incoming edge
        for k in range(e):
            if not done[k]:
                into[int(index[1, k])] = True
        x[:n, base + dyn("decided")] = (~into).astype(np.float32)
        ebase = attr_static.shape[1]
        for k in range(e):
            a, b = int(index[0, k]), int(index[1, k])
            edge_attr[k, ebase + DYNAMIC_EDGE.index("fused")] = float(labels[a] == labels[b])
            edge_attr[k, ebase + DYNAMIC_EDGE.index("decided")] = float(done[k])
        edge_attr[decision_edge, ebase + DYNAMIC_EDGE.index("current")] = 1.0

    edge_index = np.zeros((2, max_edges), np.int64)
    edge_index[:, :e] = index
    node_mask = np.zeros(max_nodes, np.float32)
    node_mask[:n] = 1.0
    edge_mask = np.zeros(max_edges, np.float32)
    edge_mask[:e] = 1.0
    group = np.zeros(max_nodes, np.int64)
    group[:n] = labels
    return {
        "node_features": x,
        "edge_index": edge_index,
        "edge_features": edge_attr,
        "node_mask": node_mask,
        "edge_mask": edge_mask,
        "group": group,
        "decision": np.array([decision_edge, src, dst], np.int64),
        "hardware": np.asarray(hardware, np.float32),
    }
