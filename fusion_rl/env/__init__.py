"""The Gymnasium environment of fusion_rl; importing this package registers it.

>>> import gymnasium as gym
>>> import fusion_rl.env
>>> env = gym.make("fusion_rl/Fusion-v0", spec="tiny")  # doctest: +SKIP
>>> obs, info = env.reset(seed=0)                         # doctest: +SKIP
>>> env.action_masks(), env.validate().okay()            # doctest: +SKIP

See :class:`~fusion_rl.env.fusion_env.FusionEnv` for the episode, observations and rewards, and
:mod:`fusion_rl.env.spec` for the env-spec YAML keys. The decision process and the observations
themselves live, without gymnasium, in :mod:`fusion_rl.decisions`.
"""

from __future__ import annotations

import gymnasium
from gymnasium.envs.registration import WrapperSpec

from fusion_rl.env.fusion_env import INVALID_ACTION_PENALTY, FusionEnv
from fusion_rl.env.rewards import FAILURE_PENALTY
from fusion_rl.env.spec import EnvSpec
from fusion_rl.env.validation import ValidationResult
from fusion_rl.env.wrappers import FusionEnvAPI

ENV_ID = "fusion_rl/Fusion-v0"

# Measured latency is noisy, so the same actions need not give the same reward.
# FusionEnvAPI is the outermost wrapper of a made env, so `gym.make(...).action_masks()` works
# (Gymnasium 1.x wrappers do not forward attributes; see fusion_rl.env.wrappers).
if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        ENV_ID, entry_point="fusion_rl.env.fusion_env:FusionEnv", nondeterministic=True,
        additional_wrappers=(WrapperSpec("FusionEnvAPI", "fusion_rl.env.wrappers:FusionEnvAPI", {}),),
    )

__all__ = [
    "ENV_ID", "EnvSpec", "FusionEnv", "FusionEnvAPI", "INVALID_ACTION_PENALTY", "FAILURE_PENALTY",
    "ValidationResult",
]
