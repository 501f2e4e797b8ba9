"""The fusion policy: MaskablePPO over the GNN features of :mod:`fusion_rl.policy.encoder`.

The actor and the critic share one :class:`~fusion_rl.policy.encoder.GraphFeaturesExtractor`
(SB3's ``share_features_extractor=True``: one GNN pass per observation) and put small MLP heads
on top; the actor's two logits (keep / fuse) are masked with the env's ``action_masks()``, so a
fuse that legality forbids is never sampled (MLGO's split: the policy proposes, legality
disposes).

The extractor is chosen by name + kwargs, as SB3 does by class: :class:`PPOConfig` names one of
:data:`FEATURES_EXTRACTORS`. A config (and a run folder's ``config.json``, which ``evaluate``
reads) names data, never an import path, so reading one imports nothing; Python code that wants
another encoder registers it with :func:`register_features_extractor` first.

Example
-------
>>> model = make_model(env, PPOConfig(n_steps=32))  # doctest: +SKIP
>>> model.learn(1_000)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
from sb3_contrib import MaskablePPO
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from fusion_rl.errors import ConfigError
from fusion_rl.policy.config import from_mapping

__all__ = ["FEATURES_EXTRACTORS", "PPOConfig", "make_model", "register_features_extractor", "resolve_extractor"]


def _graph_features_extractor() -> type:
    from fusion_rl.policy.encoder import GraphFeaturesExtractor

    return GraphFeaturesExtractor


#: Features extractors a config may name: name -> a function returning the class. A closed list
#: that this package (and Python code through :func:`register_features_extractor`) fills; a
#: config file can only pick from it.
FEATURES_EXTRACTORS: dict[str, Callable[[], type]] = {
    "fusion_rl.policy.encoder.GraphFeaturesExtractor": _graph_features_extractor,
}


def register_features_extractor(cls: type, name: str | None = None) -> str:
    """Let configs name ``cls`` (a ``BaseFeaturesExtractor`` subclass); returns its name
    (default ``module.Class``). Call it from your own code before building the config."""
    if not (isinstance(cls, type) and issubclass(cls, BaseFeaturesExtractor)):
        raise ConfigError(f"{cls!r} is not a subclass of BaseFeaturesExtractor")
    key = name or f"{cls.__module__}.{cls.__qualname__}"
    FEATURES_EXTRACTORS[key] = lambda: cls
    return key


def resolve_extractor(name: str, where: str = "features_extractor") -> type:
    """The registered extractor class called ``name``; nothing outside the registry is imported."""
    factory = FEATURES_EXTRACTORS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise _unknown_extractor(name, where)
    return factory()


def _unknown_extractor(name: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}: {str(name)[:100]!r} is not a registered features extractor; choose one of "
                       f"{', '.join(sorted(FEATURES_EXTRACTORS))} (or register one in Python with "
                       "register_features_extractor)")


@dataclass
class PPOConfig:
    """Hyperparameters of :func:`make_model`; every field has the default used by our runs.

    PPO's defaults are X-RLflow's (γ 0.99, λ 0.95, lr 5e-4, clip 0.2). ``n_steps`` is small
    because episodes are short (one step per undecided edge: 10-100 steps on the zoo models) and
    each terminal step may cost a measurement.
    """

    learning_rate: float = 5e-4
    n_steps: int = 64
    batch_size: int = 32
    n_epochs: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    normalize_advantage: bool = True
    #: Hidden sizes of the actor and the critic heads, on top of the shared extractor.
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    #: Name of a registered ``BaseFeaturesExtractor`` subclass (:data:`FEATURES_EXTRACTORS`).
    features_extractor: str = "fusion_rl.policy.encoder.GraphFeaturesExtractor"
    features_extractor_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"hidden": 32, "heads": 4, "num_layers": 5, "hw_hidden": 16}
    )
    device: str = "cpu"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "ppo") -> PPOConfig:
        """Strict: unknown keys and wrong types raise :class:`~fusion_rl.errors.ConfigError`."""
        config = from_mapping(cls, data or {}, where)
        if config.n_steps < 2 or config.batch_size < 2:
            raise ConfigError(f"{where}: n_steps and batch_size must be >= 2 (PPO normalizes advantages per batch)")
        if config.features_extractor not in FEATURES_EXTRACTORS:  # checked by name: nothing imported
            raise _unknown_extractor(config.features_extractor, f"{where}.features_extractor")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_model(
    env: gym.Env | Any,
    config: PPOConfig | Mapping[str, Any] | None = None,
    *,
    seed: int | None = None,
    tensorboard_log: str | None = None,
    verbose: int = 0,
) -> MaskablePPO:
    """A fresh ``MaskablePPO`` with the graph encoder, for ``env`` (a Gymnasium env or VecEnv).

    Parameters
    ----------
    env
        Must expose the :mod:`fusion_rl.decisions.layout` ``Dict`` observation and
        ``action_masks()``.
    config
        A :class:`PPOConfig` or its dict form (validated strictly).
    seed
        Seeds torch, numpy and the env's action space (SB3's ``seed``).
    tensorboard_log
        Directory for TensorBoard event files, or ``None``.
    """
    if not isinstance(config, PPOConfig):
        config = PPOConfig.from_dict(config)
    extractor = resolve_extractor(config.features_extractor, "ppo.features_extractor")
    policy_kwargs = dict(
        features_extractor_class=extractor,
        features_extractor_kwargs=dict(config.features_extractor_kwargs),
        net_arch=dict(pi=list(config.net_arch), vf=list(config.net_arch)),
        share_features_extractor=True,
    )
    return MaskablePPO(
        "MultiInputPolicy",
        env,
        learning_rate=config.learning_rate,
        n_steps=config.n_steps,
        batch_size=config.batch_size,
        n_epochs=config.n_epochs,
        gamma=config.gamma,
        gae_lambda=config.gae_lambda,
        clip_range=config.clip_range,
        ent_coef=config.ent_coef,
        vf_coef=config.vf_coef,
        max_grad_norm=config.max_grad_norm,
        normalize_advantage=config.normalize_advantage,
        policy_kwargs=policy_kwargs,
        tensorboard_log=tensorboard_log,
        seed=seed,
        device=config.device,
        verbose=verbose,
    )
