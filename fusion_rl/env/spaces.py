"""The Gymnasium spaces of :class:`~fusion_rl.env.fusion_env.FusionEnv`.

The layout they describe (keys, shapes, dynamic features, action values) is defined once, without
gymnasium, in :mod:`fusion_rl.decisions.layout`; this module only wraps it in ``gymnasium.spaces``
for SB3: a ``Dict`` of ``Box``es for observations and ``Discrete(2)`` for actions.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from fusion_rl.decisions.layout import (
    DEFAULT_MAX_EDGES,
    DEFAULT_MAX_NODES,
    EDGE_DIM,
    NODE_DIM,
)


def observation_space(
    hw_dim: int, max_nodes: int = DEFAULT_MAX_NODES, max_edges: int = DEFAULT_MAX_EDGES
) -> spaces.Dict:
    """The padded observation space (see :mod:`fusion_rl.decisions.layout` for its keys).

    Parameters
    ----------
    hw_dim : int
        Length of the hardware feature vector.
    max_nodes, max_edges : int
        Padding sizes.
    """
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
    """``Discrete(2)``: :data:`~fusion_rl.decisions.layout.ACTION_KEEP` or ``ACTION_FUSE``."""
    return spaces.Discrete(2)
