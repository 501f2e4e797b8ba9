"""The Gymnasium environment of fusion_rl; importing this package registers it.

>>> import gymnasium as gym
>>> import fusion_rl.env
>>> env = gym.make("fusion_rl/Fusion-v0", spec="tiny")  # doctest: +SKIP

See :class:`~fusion_rl.env.fusion_env.FusionEnv` for the episode, observations and rewards, and
:mod:`fusion_rl.env.spec` for the env-spec YAML keys. The decision process and the observations
themselves live, without gymnasium, in :mod:`fusion_rl.decisions`.
"""

from __future__ import annotations

import gymnasium

from fusion_rl.env.fusion_env import INVALID_ACTION_PENALTY, FusionEnv
from fusion_rl.env.rewards import FAILURE_PENALTY
from fusion_rl.env.spec import EnvSpec

ENV_ID = "fusion_rl/Fusion-v0"

# Measured latency is noisy, so the same actions need not give the same reward.
if ENV_ID not in gymnasium.registry:
    gymnasium.register(ENV_ID, entry_point="fusion_rl.env.fusion_env:FusionEnv", nondeterministic=True)

__all__ = [
    "ENV_ID", "EnvSpec", "FusionEnv", "INVALID_ACTION_PENALTY", "FAILURE_PENALTY",
]
