"""Policy layer: the PyG graph encoder, the MaskablePPO fusion policy, and training.

- :mod:`~fusion_rl.policy.layers`: message-passing layers (:class:`GATv2Block`);
- :mod:`~fusion_rl.policy.encoder`: :class:`GraphFeaturesExtractor` (padded Dict obs -> features);
- :mod:`~fusion_rl.policy.policy`: :class:`PPOConfig`, :func:`make_model`;
- :mod:`~fusion_rl.policy.training`: :class:`TrainConfig`, :func:`train` (used by
  ``scripts/train.py`` and ``fusion-rl train``);
- :mod:`~fusion_rl.policy.obs`: :func:`graph_observation`, a padded observation of an OpGraph
  without an env (tests, inference outside the env);
- :mod:`~fusion_rl.policy.config`: strict dataclass-from-YAML loading (typed ``ConfigError``).

Submodules import torch / SB3; import them directly (this package imports nothing heavy).
"""

from __future__ import annotations
