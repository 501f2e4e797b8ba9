"""Export a training run (``runs/<run>/``) as a self-contained policy artifact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fusion_rl.decisions.process import DecisionOptions
from fusion_rl.errors import ConfigError
from fusion_rl.export.artifact import PolicyCard, save_artifact
from fusion_rl.paths import relative_to_repo
from fusion_rl.policy.snapshot import NETWORK_CLASS


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    evaluation: dict[str, Any] | None = None,
    command: str = "",
    train_command: str = "",
) -> Path:
    """Write ``out_dir/{weights.safetensors, card.json}`` from the run's final policy.

    Reads the run's ``config.json`` and its policy snapshot (safetensors + JSON, see
    :mod:`fusion_rl.policy.snapshot`); the SB3 zips are pickles and are never loaded here.
    """
    from fusion_rl.compiler.store import library_versions
    from fusion_rl.graph.features import feature_schema
    from fusion_rl.io import read_json
    from fusion_rl.policy.run_dir import run_snapshot
    from fusion_rl.policy.snapshot import load_snapshot

    run = Path(run_dir)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{run} is not a training run: config.json is missing")
    config = read_json(config_path, "run config", ConfigError, 1 << 20)
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: a run config must be a JSON object")
    # Before the path is made portable: the run recorded where its spec was.
    decisions = _decision_options(config)
    # The run resolved its paths to absolute ones; a card must not name the exporting machine.
    if isinstance(config.get("env_spec"), str):
        config["env_spec"] = relative_to_repo(config["env_spec"])
    warm = config.get("warm_start")
    if isinstance(warm, dict) and isinstance(warm.get("plans"), list):
        warm["plans"] = [relative_to_repo(p) if isinstance(p, str) else p for p in warm["plans"]]
    snapshot = load_snapshot(run_snapshot(run))
    snapshot.check_decisions(decisions, f"the run's env spec ({config.get('env_spec')})")
    network = snapshot.network
    training = {
        "run": run.name,
        "checkpoint": snapshot.path.name,
        "timesteps": snapshot.num_timesteps,
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
        architecture={"class": NETWORK_CLASS, "kwargs": network.config},
        feature_schema=feature_schema(),
        observation=dict(snapshot.observation),
        decisions=decisions.to_dict(),
        training=training,
        evaluation=dict(evaluation or {}),
        versions=dict(kv.split("=", 1) for kv in library_versions().split(";")),
        # The statistics training normalised the hardware vector with; none for a run trained
        # before they existed (a format-1 card, read as raw vectors).
        hardware=None if snapshot.hardware_stats.is_identity else snapshot.hardware_stats.to_dict(),
    )
    if command:
        card.training["export_command"] = command
    return save_artifact(out_dir, network, card)


def _decision_options(config: dict[str, Any]) -> DecisionOptions:
    """The decision options the run trained under: its env spec with its ``env_kwargs`` applied,
    exactly as :func:`fusion_rl.policy.training.make_env` built the env.

    Raises
    ------
    ConfigError
        if the spec cannot be read; a card without the options would be refused.
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


def _env_spec(path: Any):
    if not isinstance(path, str) or not path:
        return None
    from fusion_rl.env.spec import EnvSpec

    try:
        return EnvSpec.resolve(path)
    except (ConfigError, OSError):  # the card is still useful without the suite; the config is in it
        return None
