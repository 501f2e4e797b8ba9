"""Policy layer: the PyG graph encoder, the MaskablePPO fusion policy, and training.

- :mod:`~fusion_rl.policy.layers`: message-passing layers (:class:`GATv2Block`);
- :mod:`~fusion_rl.policy.encoder`: :class:`GraphFeaturesExtractor` (padded Dict obs -> features);
- :mod:`~fusion_rl.policy.policy`: :class:`PPOConfig`, :func:`make_model`;
- :mod:`~fusion_rl.policy.training`: :class:`TrainConfig`, :func:`train` (used by
  ``scripts/train.py`` and ``fusion-rl train``);
- :mod:`~fusion_rl.policy.run_dir`: a run directory's files, checkpoints and snapshots, read and
  written without SB3 (``fusion-rl export`` and ``evaluate`` need no more);
- :mod:`~fusion_rl.policy.config`: strict dataclass-from-YAML loading (typed ``ConfigError``).

Observations come from :mod:`fusion_rl.decisions` (:func:`~fusion_rl.decisions.graph_observation`
builds one without an env). Submodules import torch / SB3; import them directly (this package
imports nothing heavy).
"""

from __future__ import annotations
