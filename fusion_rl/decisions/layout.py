"""The observation layout shared by the env, the policy and the exported plugin.

Decisions are made **per edge**: the decision process walks the OpGraph's edges in topological
order (by consumer, then producer) and asks, for each edge whose two ends are still in different
groups, *fuse the producer's group with the consumer's group?* (0 = keep apart, 1 = fuse). Edges
whose ends already share a group are skipped. Every plan whose groups are connected subgraphs
(all rule sets, every FuseOps plan) is reachable, and the legality mask forbids a fuse that
would make the plan illegal, so every episode ends in a legal plan.

An observation is a ``dict`` of fixed-size arrays (the graph padded to ``max_nodes`` /
``max_edges``; SB3 cannot take ``gymnasium.spaces.Graph``, and index tensors stay int64 because
SB3 one-hot encodes ``Discrete`` observations):

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

A model with more than ``max_nodes`` nodes or ``max_edges`` edges cannot be observed at that
size: :class:`~fusion_rl.decisions.observation.ObservationBuilder` raises
:class:`~fusion_rl.errors.ConfigError` naming the model and the sizes to raise.

This module is plain constants (no gymnasium): the Gymnasium spaces that describe the same
layout are built from them in :mod:`fusion_rl.env.spaces`.
"""

from __future__ import annotations

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

#: The keys of an observation, in the order of the table above.
OBSERVATION_KEYS = (
    "node_features", "edge_index", "edge_features", "node_mask", "edge_mask", "group",
    "decision", "hardware",
)

ACTION_KEEP = 0
ACTION_FUSE = 1
