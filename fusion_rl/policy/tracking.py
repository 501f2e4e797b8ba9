"""Weights & Biases for training runs, through SB3's own integration.

``wandb.init(sync_tensorboard=True)`` before SB3 creates its TensorBoard writer, so everything SB3
writes (``rollout/*``, ``time/*``, ``train/*``) reaches W&B; the seeds of one experiment share a
group; an exported policy folder is logged as a ``model`` artifact. Offline by default.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion_rl.errors import ConfigError, require_extra

if TYPE_CHECKING:
    from fusion_rl.policy.training import TrainConfig


def wandb_id(run_dir: Path) -> str:
    # Derived from the run directory, so a resumed run (and its export) append to the same run.
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[:64]


def init_wandb(config: "TrainConfig", run_dir: Path, mode: str, job_type: str = "train") -> Any:
    """A W&B run for ``run_dir`` (``None`` when disabled); TensorBoard is synced into it.

    Must run before SB3 creates its TensorBoard writer (in ``learn``): ``sync_tensorboard``
    patches the writer class.
    """
    if mode == "disabled":
        return None
    require_extra(f"W&B logging (wandb: {mode}; use disabled to train without it)", "train", "wandb")
    import wandb

    return wandb.init(
        project=config.wandb_project, name=run_dir.name, id=wandb_id(run_dir), resume="allow",
        group=config.group, job_type=job_type, dir=str(run_dir), mode=mode,
        config=config.to_dict(), sync_tensorboard=True, settings=wandb.Settings(console="off"),
    )


def finish_wandb(run: Any) -> None:
    import wandb

    run.finish()
    # The TensorBoard patch outlives the run; a later run in this process (or a TensorBoard
    # writer with W&B disabled) must not log into a finished one.
    wandb.tensorboard.unpatch()


def log_policy_artifact(run_dir: str | os.PathLike[str], policy_dir: str | os.PathLike[str],
                        mode: str | None = None) -> str | None:
    """Attach an exported policy folder to the run's W&B run as a ``model`` artifact.

    Parameters
    ----------
    run_dir
        The training run the policy was exported from (its ``config.json`` names the W&B
        project, group and mode).
    policy_dir
        The exported policy folder (``weights.safetensors`` + ``card.json``).
    mode
        ``offline``, ``online`` or ``disabled``; ``None``: the run's own mode.

    Returns
    -------
    str or None
        The artifact's name, or None when W&B is disabled for the run.
    """
    from fusion_rl.policy.training import WANDB_MODES, TrainConfig

    run_dir, policy_dir = Path(run_dir), Path(policy_dir)
    try:
        config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()),
                                       f"{run_dir}/config.json")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_dir}: cannot read config.json: {exc}") from None
    mode = mode or config.wandb
    if mode not in WANDB_MODES:
        raise ConfigError(f"wandb mode {mode!r} is not one of {WANDB_MODES}")
    if mode == "disabled":
        return None
    require_extra(f"W&B logging (wandb: {mode}; pass --wandb disabled to skip it)", "train", "wandb")
    import wandb

    card = json.loads((policy_dir / "card.json").read_text())
    name = f"policy-{wandb_id(run_dir)}"
    run = wandb.init(
        project=config.wandb_project, name=run_dir.name, id=wandb_id(run_dir), resume="allow",
        group=config.group, job_type="export", dir=str(run_dir), mode=mode,
        settings=wandb.Settings(console="off"),
    )
    try:
        artifact = wandb.Artifact(name, type="model", metadata={
            "content_hash": card.get("content_hash"),
            "feature_schema": (card.get("feature_schema") or {}).get("version"),
            "decisions": card.get("decisions"),
            "training": card.get("training"),
        })
        artifact.add_dir(str(policy_dir))
        run.log_artifact(artifact)
    finally:
        run.finish()
    return name
