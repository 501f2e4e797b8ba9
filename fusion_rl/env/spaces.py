"""The observation contract between :class:`~fusion_rl.env.fusion_env.FusionEnv` and the policy.

Decisions are made **per edge**: the env walks the OpGraph's edges in topological order (by
consumer, then producer) and asks, for each edge whose two ends are still in different groups,
*fuse the producer's group with the consumer's group?* (``Discrete(2)``: 0 = keep apart,
1 = fuse). Edges whose ends already share a group are skipped. Every plan whose groups are
connected subgraphs (all rule sets, every FuseOps plan) is reachable, and ``action_masks()``
forbids a fuse that would make the plan illegal, so every episode ends in a legal plan.

SB3 cannot take ``gymnasium.spaces.Graph``, so the graph is padded into a ``Dict`` of ``Box``es
(index tensors stay ``Box`` int64: SB3 one-hot encodes ``Discrete`` observations):

==================  =====================================  =======================================
key                 shape / dtype                          meaning
==================  =====================================  =======================================
``node_features``   ``(max_nodes, NODE_DIM)`` float32      static features (graph.features) then
                                                           dynamic ones (:data:`DYNAMIC_NODE`)
``edge_index``      ``(2, max_edges)`` int64               (src, dst) per edge; 0 where padded
``edge_features``   ``(max_edges, EDGE_DIM)`` float32      static then :data:`DYNAMIC_EDGE`
``node_mask``       ``(max_nodes,)`` float32               1 for real nodes
``edge_mask``       ``(max_edges,)`` float32               1 for real edges
``group``           ``(max_nodes,)`` int64                 current group label of each node
                                                           (the smallest node id in its group)
``decision``        ``(3,)`` int64                         (edge index, src node, dst node) of
                                                           the edge being decided
``hardware``        ``(HW_DIM,)`` float32                  the target's hardware feature vector
==================  =====================================  =======================================

A model with more than ``max_nodes`` nodes or ``max_edges`` edges cannot be observed: ``reset``
raises :class:`~fusion_rl.errors.ConfigError` naming the model and the sizes to raise.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from fusion_rl.graph.features import NUM_EDGE_FEATURES, NUM_NODE_FEATURES

DEFAULT_MAX_NODES = 256
DEFAULT_MAX_EDGES = 512
#: Largest padding an env spec or a saved policy may ask for: observations are allocated at
#: this size before any model is looked at (65536 x NODE_DIM floats is 15 MiB).
MAX_PADDED_NODES = 1 << 16
MAX_PADDED_EDGES = 1 << 18

#: Dynamic node features appended to the static ones.
DYNAMIC_NODE = (
    "log_group_size",  # log2(1 + size of the node's current group) / 8
    "group_has_mac_anchor",  # the node's group holds a conv/matmul
    "in_src_group",  # the node is in the decision's producer group
    "in_dst_group",  # the node is in the decision's consumer group
    "decided",  # every edge into this node has been decided
)
#: Dynamic edge features appended to the static ones.
DYNAMIC_EDGE = (
    "fused",  # both ends are in one group
    "decided",  # the edge has been decided (or skipped)
    "current",  # the edge being decided now
)

NODE_DIM = NUM_NODE_FEATURES + len(DYNAMIC_NODE)
EDGE_DIM = NUM_EDGE_FEATURES + len(DYNAMIC_EDGE)

ACTION_KEEP = 0
ACTION_FUSE = 1


def observation_space(
    hw_dim: int, max_nodes: int = DEFAULT_MAX_NODES, max_edges: int = DEFAULT_MAX_EDGES
) -> spaces.Dict:
    big = np.iinfo(np.int64).max
    return spaces.Dict(
        {
            "node_features": spaces.Box(-np.inf, np.inf, (max_nodes, NODE_DIM), np.float32),
            "edge_index": spaces.Box(0, max_nodes - 1, (2, max_edges), np.int64),
            "edge_features": spaces.Box(-np.inf, np.inf, (max_edges, EDGE_DIM), np.float32),
            "node_mask": spaces.Box(0.0, 1.0, (max_nodes,), np.float32),
            "edge_mask": spaces.Box(0.0, 1.0, (max_edges,), np.float32),
            "group": spaces.Box(0, max_nodes - 1, (max_nodes,), np.int64),
            "decision": spaces.Box(0, max(max_nodes, max_edges) - 1, (3,), np.int64),
            "hardware": spaces.Box(-np.inf, np.inf, (hw_dim,), np.float32),
        }
    )


def action_space() -> spaces.Discrete:
    return spaces.Discrete(2)
