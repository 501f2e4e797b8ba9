"""The decision core: per-edge fusion decisions, their masks and their observations.

Used by the Gymnasium env (:mod:`fusion_rl.env`), the policy (:mod:`fusion_rl.policy`) and the
exported compiler plugin (:mod:`fusion_rl.export`), so that all three decide through one
implementation. It sits just above :mod:`fusion_rl.fusion` and needs only numpy, the OpGraph and
the legality rules: no gymnasium, no SB3, no torch.

- :mod:`.layout`: the observation layout (keys, dynamic features, sizes, action values);
- :mod:`.process`: :class:`DecisionProcess`, its :class:`DecisionOptions`, :func:`actions_for_plan`;
- :mod:`.observation`: :class:`ObservationBuilder` and :func:`graph_observation`.
"""

from __future__ import annotations

from fusion_rl.decisions.layout import ACTION_FUSE, ACTION_KEEP, EDGE_DIM, NODE_DIM, OBSERVATION_KEYS
from fusion_rl.decisions.observation import ObservationBuilder, graph_observation
from fusion_rl.decisions.process import DecisionOptions, DecisionProcess, actions_for_plan

__all__ = [
    "ACTION_FUSE", "ACTION_KEEP", "EDGE_DIM", "NODE_DIM", "OBSERVATION_KEYS",
    "DecisionOptions", "DecisionProcess", "ObservationBuilder", "actions_for_plan", "graph_observation",
]
