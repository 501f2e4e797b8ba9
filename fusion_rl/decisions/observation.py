"""Padded observations of a decision state, in the layout of :mod:`fusion_rl.decisions.layout`.

The one implementation of the observation: the env builds its observations here, so does the
compiler pass that runs an exported policy (:mod:`fusion_rl.export`), and so does
:func:`graph_observation`, which tests use to observe an arbitrary grouping without an env. A
trained policy therefore sees exactly the same inputs in deployment as in training. Numpy only:
importing this module loads neither gymnasium nor the RL stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fusion_rl.decisions.layout import (
    DEFAULT_MAX_EDGES,
    DEFAULT_MAX_NODES,
    DYNAMIC_EDGE,
    DYNAMIC_NODE,
    EDGE_DIM,
    NODE_DIM,
)
from fusion_rl.decisions.process import DecisionProcess
from fusion_rl.errors import ConfigError
from fusion_rl.graph.features import NUM_EDGE_FEATURES, NUM_NODE_FEATURES, edge_index_and_features, node_features
from fusion_rl.graph.opgraph import OpGraph

__all__ = ["ObservationBuilder", "graph_observation"]

# Columns of the dynamic features, after the static ones.
_N = {name: NUM_NODE_FEATURES + i for i, name in enumerate(DYNAMIC_NODE)}
_E = {name: NUM_EDGE_FEATURES + i for i, name in enumerate(DYNAMIC_EDGE)}


class ObservationBuilder:
    """The static, padded part of one graph's observations (computed once), and the methods
    that add the dynamic features of a decision state.

    Parameters
    ----------
    graph : OpGraph
        The graph to observe (at least one edge).
    max_nodes, max_edges : int
        Padding sizes; the graph must fit them.

    Raises
    ------
    ConfigError
        If the graph does not fit the padding, or has no edge (no decision to make).
    """

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
        self.num_nodes, self.num_edges = n, m
        self.max_nodes, self.max_edges = max_nodes, max_edges
        self.node_static = np.zeros((max_nodes, NODE_DIM), dtype=np.float32)
        self.node_static[:n, :NUM_NODE_FEATURES] = node_features(graph)
        index, attr = edge_index_and_features(graph)
        self.src, self.dst = index[0].astype(np.int64), index[1].astype(np.int64)
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
        """The observation of ``process``'s current state (decision zeros once it is done)."""
        return self.observe_state(process.label, process.decided, process.current, hardware)

    def observe_state(
        self, label: np.ndarray, decided: np.ndarray, current: int | None, hardware: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The observation of a decision state given by its arrays.

        Parameters
        ----------
        label : ndarray of int, shape (num_nodes,)
            Group label of each node: the smallest node id of its group.
        decided : ndarray of bool, shape (num_edges,)
            Which edges are decided (or skipped).
        current : int or None
            Index into ``graph.edges`` of the edge being decided; ``None`` when done.
        hardware : ndarray
            The target's hardware feature vector.
        """
        n, m = self.num_nodes, self.num_edges
        label = np.asarray(label, dtype=np.int64)
        decided = np.asarray(decided, dtype=bool)
        nodes = self.node_static.copy()
        size = np.bincount(label, minlength=n)[label]
        nodes[:n, _N["log_group_size"]] = np.log2(1.0 + size) / 8.0
        nodes[:n, _N["group_has_mac_anchor"]] = np.bincount(label, weights=self.mac, minlength=n)[label] > 0
        if current is not None:
            nodes[:n, _N["in_src_group"]] = label == label[self.src[current]]
            nodes[:n, _N["in_dst_group"]] = label == label[self.dst[current]]
        undecided_in = np.bincount(self.dst[~decided], minlength=n)
        nodes[:n, _N["decided"]] = undecided_in == 0
        edges = self.edge_static.copy()
        edges[:m, _E["fused"]] = label[self.src] == label[self.dst]
        edges[:m, _E["decided"]] = decided
        if current is not None:
            edges[current, _E["current"]] = 1.0
        group = np.zeros(self.max_nodes, dtype=np.int64)
        group[:n] = label
        decision = np.zeros(3, dtype=np.int64)
        if current is not None:
            decision[:] = (current, self.src[current], self.dst[current])
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


def graph_observation(
    graph: OpGraph,
    hardware: Sequence[float] | np.ndarray,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_edges: int = DEFAULT_MAX_EDGES,
    decision_edge: int = 0,
    groups: Sequence[int] | np.ndarray | None = None,
    decided: Sequence[bool] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """A padded observation of ``graph`` deciding edge ``decision_edge``, without an env.

    Any grouping can be observed, also one no decision process would reach, so that policies
    can be tested (and their padding invariance checked) on real graphs without compiling.

    Parameters
    ----------
    graph : OpGraph
        The graph (at least one edge).
    hardware : array-like
        The hardware feature vector.
    max_nodes, max_edges : int
        Padding sizes; the graph must fit them.
    decision_edge : int
        Index into ``graph.edges`` of the edge being decided.
    groups : array-like of int, optional
        Group label of each node (default: every node its own group). Labels are normalized to
        the smallest node id of each group, as the decision process keeps them.
    decided : array-like of bool, optional
        Which edges are decided (default: those with a smaller index than ``decision_edge``).

    Raises
    ------
    ConfigError
        If the graph does not fit the padding or has no edge.
    ValueError
        If ``decision_edge`` is out of range.
    """
    builder = ObservationBuilder(graph, max_nodes, max_edges)
    n, e = len(graph), len(graph.edges)
    if not 0 <= decision_edge < e:
        raise ValueError(f"decision_edge {decision_edge} out of range for {e} edges")
    labels = np.arange(n) if groups is None else np.asarray(groups, dtype=np.int64)
    smallest = {g: int(np.flatnonzero(labels == g).min()) for g in set(labels.tolist())}
    labels = np.array([smallest[g] for g in labels.tolist()], dtype=np.int64)
    done = np.arange(e) < decision_edge if decided is None else np.asarray(decided, dtype=bool)
    return builder.observe_state(labels, done, decision_edge, np.asarray(hardware))
