"""The wrapper that ``gymnasium.make`` puts around :class:`FusionEnv`.

Gymnasium 1.x wrappers no longer forward attributes, so ``env.action_masks()`` on the env that
``gym.make`` returns would need ``env.unwrapped``. ``fusion_rl/Fusion-v0`` is registered with
:class:`FusionEnvAPI` as an additional wrapper: it is the outermost wrapper of a made env and
exposes the env's own methods. Under further wrappers of your own, reach them with
``env.get_wrapper_attr("action_masks")()``, which is what sb3-contrib's ``MaskablePPO`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import gymnasium as gym
import numpy as np

if TYPE_CHECKING:
    from fusion_rl.env.spec import EnvSpec
    from fusion_rl.env.validation import ValidationResult
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.graph.datasets import ModelDataset


class FusionEnvAPI(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Forward :class:`~fusion_rl.env.fusion_env.FusionEnv`'s own methods through wrappers.

    Each method calls the innermost env's method of the same name (``get_wrapper_attr``), so it
    also works when other wrappers sit between this one and the env.
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.env.get_wrapper_attr(name)(*args, **kwargs)

    def action_masks(self) -> np.ndarray:
        """``[KEEP allowed, FUSE allowed]`` (for ``MaskablePPO``)."""
        return self._call("action_masks")

    def validate(self, check_latency: bool = False) -> ValidationResult:
        """Re-verify the current plan (:meth:`FusionEnv.validate`)."""
        return self._call("validate", check_latency=check_latency)

    def current_plan(self) -> FusionPlan:
        """The (partial) plan of this episode so far."""
        return self._call("current_plan")

    def tvm_plan(self, model: str | None = None) -> FusionPlan:
        """TVM FuseOps' plan of ``model`` (default: this episode's)."""
        return self._call("tvm_plan", model)

    def actions_for_plan(self, plan: FusionPlan, model: str | None = None) -> list[int]:
        """The actions that make an episode end in ``plan``."""
        return self._call("actions_for_plan", plan, model)

    def decide(self, choose: Callable[[dict[str, np.ndarray], np.ndarray], int], model: str,
               target: str, name: str = "decided") -> FusionPlan:
        """Play one episode with ``choose(obs, mask)`` and return its plan, measuring nothing."""
        return self._call("decide", choose, model, target, name)

    @property
    def dataset(self) -> ModelDataset:
        """The models this env can be reset on by name, with versions."""
        return self.env.get_wrapper_attr("dataset")

    @property
    def config(self) -> EnvSpec:
        """The env spec."""
        return self.env.get_wrapper_attr("config")
