"""Ship a trained policy as a compiler plugin.

- :mod:`.artifact`: the policy folder (safetensors weights + ``card.json``), its content hash
  and feature-schema check;
- :mod:`.exporter`: :func:`export_run` (training run -> policy folder);
- :mod:`.passes`: :class:`LearnedFusion`, a TVM module pass, also registered under the global
  name ``fusion_rl.transform.LearnedFusion`` when this package is imported.
"""

from __future__ import annotations

from fusion_rl.export.artifact import PolicyArtifactError, load_network
from fusion_rl.export.passes import PASS_NAME, LearnedFusion, LearnedPlanner

__all__ = ["PASS_NAME", "LearnedFusion", "LearnedPlanner", "PolicyArtifactError", "load_network"]
