"""Export a training run (``runs/<run>/``) as a self-contained policy artifact."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fusion_rl.decisions.process import DecisionOptions
from fusion_rl.errors import ConfigError
from fusion_rl.export.artifact import PolicyCard, save_artifact
from fusion_rl.paths import relative_to_repo


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    evaluation: dict[str, Any] | None = None,
    command: str = "",
    train_command: str = "",
) -> Path:
    """Write ``out_dir/{weights.safetensors, card.json}`` from the run's final model."""
    from sb3_contrib import MaskablePPO

    from fusion_rl.compiler.store import library_versions
    from fusion_rl.graph.features import feature_schema
    from fusion_rl.policy.network import PolicyNetwork
    from fusion_rl.policy.training import run_model_path

    run = Path(run_dir)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{run} is not a training run: config.json is missing")
    config = json.loads(config_path.read_text())
    # Before the path is made portable: the run recorded where its spec was.
    decisions = _decision_options(config)
    if config.get("env_spec"):
        # The run resolved it to an absolute path; a card must not name the exporting machine.
        config["env_spec"] = _portable(config["env_spec"])
    model_path = run_model_path(run)
    if model_path is None:
        raise ConfigError(f"{run} has neither final_model.zip nor a checkpoint to export")
    # The run directory is our own training output, so loading its SB3 zip is trusted here;
    # the artifact written below is safetensors + JSON, which never unpickles.
    model = MaskablePPO.load(str(model_path), device="cpu")
    network = PolicyNetwork.from_sb3(model)
    obs_space = model.observation_space
    training = {
        "run": run.name,
        "checkpoint": model_path.name,
        "timesteps": int(model.num_timesteps),
        "env_spec": config.get("env_spec"),
        "seed": config.get("seed"),
        "config": config,
        "command": train_command or f"python scripts/train.py --config CONFIG --seed {config.get('seed')}",
    }
    spec = _env_spec(config.get("env_spec"))
    if spec is not None:
        training.update(models=list(spec.models), targets=list(spec.targets),
                        schedule=spec.schedule, reward=spec.reward)
    card = PolicyCard(
        architecture={"class": f"{PolicyNetwork.__module__}.{PolicyNetwork.__name__}", "kwargs": network.config},
        feature_schema=feature_schema(),
        observation={
            "max_nodes": int(obs_space["node_features"].shape[0]),
            "max_edges": int(obs_space["edge_features"].shape[0]),
            "hw_dim": int(obs_space["hardware"].shape[0]),
        },
        decisions=decisions.to_dict(),
        training=training,
        evaluation=dict(evaluation or {}),
        versions=dict(kv.split("=", 1) for kv in library_versions().split(";")),
    )
    if command:
        card.training["export_command"] = command
    return save_artifact(out_dir, network, card)


def _portable(path: str) -> str:
    """``path`` relative to the repository when it lies inside it, else unchanged."""
    return relative_to_repo(path)


def _decision_options(config: dict[str, Any]) -> DecisionOptions:
    """The decision options the run trained under: its env spec with its ``env_kwargs`` applied,
    exactly as :func:`fusion_rl.policy.training.make_env` built the env.

    :raises ConfigError: if the spec cannot be read; a card without the options would be refused.
    """
    import dataclasses

    from fusion_rl.env.spec import EnvSpec

    kwargs = dict(config.get("env_kwargs") or {})
    spec_keys = {f.name for f in dataclasses.fields(EnvSpec)}
    overrides = {k: v for k, v in kwargs.items() if k in spec_keys}  # the rest are FusionEnv's own
    try:
        spec = EnvSpec.resolve(kwargs.get("spec", config.get("env_spec")), **overrides)
    except (ConfigError, OSError) as exc:
        raise ConfigError(
            f"cannot export: the run's env spec cannot be read ({str(exc).splitlines()[0]}), so the "
            "decision options it trained under (e.g. max_mac_anchors) are unknown"
        ) from None
    return spec.decision_options


def _env_spec(path: str | None):
    if not path:
        return None
    from fusion_rl.env.spec import EnvSpec

    try:
        return EnvSpec.resolve(path)
    except (ConfigError, OSError):  # the card is still useful without the suite; the config is in it
        return None
