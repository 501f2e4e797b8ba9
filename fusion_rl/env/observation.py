"""Observations of a decision process, padded as :mod:`fusion_rl.env.spaces` specifies.

Gym-free on purpose: the env builds its observations here, and so does the compiler pass that
runs an exported policy (:mod:`fusion_rl.export`), so a trained policy sees exactly the same
inputs in deployment as in training.
"""

from __future__ import annotations

import numpy as np

from fusion_rl.env.decisions import DecisionProcess
from fusion_rl.env.spaces import EDGE_DIM, NODE_DIM
from fusion_rl.errors import ConfigError
from fusion_rl.graph.features import NUM_EDGE_FEATURES, NUM_NODE_FEATURES, edge_index_and_features, node_features
from fusion_rl.graph.opgraph import OpGraph


class ObservationBuilder:
    """The static, padded part of one graph's observations (computed once), and
    :meth:`observe`, which adds the dynamic features of a decision state."""

    def __init__(self, graph: OpGraph, max_nodes: int, max_edges: int) -> None:
        n, m = len(graph), len(graph.edges)
        if n > max_nodes or m > max_edges:
            raise ConfigError(
                f"model {graph.name!r} has {n} ops and {m} edges, but observations hold at most "
                f"max_nodes={max_nodes} ops and max_edges={max_edges} edges; raise max_nodes/"
                "max_edges (the observation size changes with them)"
            )
        if m == 0:
            raise ConfigError(f"model {graph.name!r} has no edges, so there is no fusion decision to make")
        self.max_nodes, self.max_edges = max_nodes, max_edges
        self.node_static = np.zeros((max_nodes, NODE_DIM), dtype=np.float32)
        self.node_static[:n, :NUM_NODE_FEATURES] = node_features(graph)
        index, attr = edge_index_and_features(graph)
        self.edge_static = np.zeros((max_edges, EDGE_DIM), dtype=np.float32)
        self.edge_static[:m, :NUM_EDGE_FEATURES] = attr
        self.edge_index = np.zeros((2, max_edges), dtype=np.int64)
        self.edge_index[:, :m] = index
        self.node_mask = np.zeros(max_nodes, dtype=np.float32)
        self.node_mask[:n] = 1.0
        self.edge_mask = np.zeros(max_edges, dtype=np.float32)
        self.edge_mask[:m] = 1.0
        self.mac = np.array([node.is_mac_anchor for node in graph.nodes], dtype=np.float64)

    def observe(self, process: DecisionProcess, hardware: np.ndarray) -> dict[str, np.ndarray]:
        n, m = process.num_nodes, process.num_edges
        label = process.label
        k = NUM_NODE_FEATURES
        nodes = self.node_static.copy()
        size = np.bincount(label, minlength=n)[label]
        nodes[:n, k] = np.log2(1.0 + size) / 8.0
        nodes[:n, k + 1] = np.bincount(label, weights=self.mac, minlength=n)[label] > 0
        current = process.current
        if current is not None:
            nodes[:n, k + 2] = label == label[process.src[current]]
            nodes[:n, k + 3] = label == label[process.dst[current]]
        undecided_in = np.bincount(process.dst[~process.decided], minlength=n)
        nodes[:n, k + 4] = undecided_in == 0
        edges = self.edge_static.copy()
        j = NUM_EDGE_FEATURES
        edges[:m, j] = label[process.src] == label[process.dst]
        edges[:m, j + 1] = process.decided
        if current is not None:
            edges[current, j + 2] = 1.0
        group = np.zeros(self.max_nodes, dtype=np.int64)
        group[:n] = label
        decision = np.zeros(3, dtype=np.int64)
        if current is not None:
            decision[:] = (current, process.src[current], process.dst[current])
        return {
            "node_features": nodes,
            "edge_index": self.edge_index.copy(),
            "edge_features": edges,
            "node_mask": self.node_mask.copy(),
            "edge_mask": self.edge_mask.copy(),
            "group": group,
            "decision": decision,
            "hardware": np.asarray(hardware, dtype=np.float32).copy(),
        }
