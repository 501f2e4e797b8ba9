"""Training of the fusion policy: config, env, callbacks, warm start, PPO, fine-tuning, resume.

:func:`train` is the whole procedure and reads top to bottom, CleanRL style: config -> run
directory -> env -> model (fresh or from the latest checkpoint) -> callbacks -> ``learn`` ->
final model. ``scripts/train.py`` and ``fusion-rl train`` are thin wrappers around it.

The run directory's files and how they are written are :mod:`fusion_rl.policy.run_dir`'s.

W&B follows SB3's own integration: ``wandb.init(sync_tensorboard=True)`` plus
``wandb.integration.sb3.WandbCallback``, so everything SB3 writes to TensorBoard (``rollout/*``,
``train/*``, ``time/fps``) and the ``episode/*`` scalars reach W&B without hand-written logging.
Runs of one experiment (same env spec and ``exp_name``, any seed) share a W&B ``group``
(``wandb_group`` overrides it). :func:`log_policy_artifact` attaches an exported policy folder to
the run as a ``model`` artifact (``fusion-rl export`` calls it).

Checkpoints are taken at the start of a rollout, when the last PPO update has finished, so a
checkpoint never holds half an update; a kill at any moment leaves the previous complete
checkpoint. :func:`train` with ``resume=run_dir`` reloads the config and the latest checkpoint,
drops episode lines logged after it and continues to the same ``total_timesteps``. Latencies
measured before the kill are in the measurement store, so resuming costs no measurement twice.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from fusion_rl import paths
from fusion_rl.errors import ConfigError
from fusion_rl.io import read_json, read_yaml, write_atomic
from fusion_rl.policy.tracking import finish_wandb, init_wandb, log_policy_artifact  # noqa: F401 (re-exported)
from fusion_rl.policy.config import from_mapping
from fusion_rl.policy.imitation import FineTune, WarmStart
from fusion_rl.policy.policy import PPOConfig
from fusion_rl.policy.run_dir import count_lines, latest_checkpoint, save_checkpoint, truncate_episodes

__all__ = [
    "TrainConfig",
    "TrainingCallback",
    "load_config",
    "log_policy_artifact",
    "make_env",
    "train",
]

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` in the run directory."""

    #: Env spec YAML (``envs/*.yaml``), relative to the working directory, the config file or
    #: the repository root, in that order, or a spec name (``tiny``: ``envs/tiny.yaml``).
    #: ``None``: the env id's defaults.
    env_spec: str | None = "envs/tiny.yaml"
    #: Registered Gymnasium id; ``"module:Id-v0"`` imports ``module`` first.
    env_id: str = "fusion_rl/Fusion-v0"
    #: Extra keyword arguments of ``gymnasium.make``.
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    exp_name: str = "default"
    total_timesteps: int = 20_000
    seed: int = 0
    #: Env steps between checkpoints (rounded up to whole rollouts of ``ppo.n_steps``).
    checkpoint_every: int = 1_024
    #: ``offline`` (default: no network needed), ``online`` or ``disabled``.
    wandb: str = "offline"
    wandb_project: str = "fusion_rl"
    #: W&B group gathering the seeds of one experiment; ``None``: ``<env>__<exp_name>``.
    wandb_group: str | None = None
    #: Episodes in the running means of the progress bar.
    window: int = 20
    #: torch intra-op threads. The GNN runs on graphs of tens of nodes, where extra threads only
    #: contend (20x slower on a loaded 2-core machine) and take cores from TVM's measurements.
    torch_threads: int = 1
    ppo: PPOConfig = field(default_factory=PPOConfig)
    #: Behaviour cloning on the best known plans before PPO (off unless ``epochs`` > 0).
    warm_start: WarmStart = field(default_factory=WarmStart)
    #: Behaviour cloning on the training models' credit plans after PPO (off unless ``epochs`` > 0).
    fine_tune: FineTune = field(default_factory=FineTune)

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        ppo = PPOConfig.from_dict(data.pop("ppo", None), f"{where}.ppo")
        config = from_mapping(cls, {**data, "ppo": ppo}, where)
        if config.wandb not in WANDB_MODES:
            raise ConfigError(f"{where}.wandb: {config.wandb!r} is not one of {WANDB_MODES}")
        for name in ("total_timesteps", "checkpoint_every", "window", "torch_threads"):
            if getattr(config, name) <= 0:
                raise ConfigError(f"{where}.{name} must be > 0, got {getattr(config, name)}")
        for name in ("warm_start", "fine_tune"):
            section = getattr(config, name)
            if section.epochs < 0 or section.batch_size <= 0 or section.learning_rate <= 0:
                raise ConfigError(f"{where}.{name}: need epochs >= 0, batch_size > 0, learning_rate > 0")
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def group(self) -> str:
        """The W&B group of this run: :attr:`wandb_group`, else ``<env>__<exp_name>``."""
        return self.wandb_group or f"{self.env_name}__{self.exp_name}"

    @property
    def env_name(self) -> str:
        """Short env name for run names: the spec file's stem, else the env id's name."""
        if self.env_spec:
            return Path(self.env_spec).stem
        return self.env_id.split(":")[-1].split("/")[-1]


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read a YAML (or JSON) training config; paths in it are resolved (see :attr:`TrainConfig.env_spec`)."""
    path = Path(path)
    data = read_yaml(path, "training config")
    config = TrainConfig.from_dict(data if data is not None else {}, where=str(path))
    if config.env_spec:
        config.env_spec = str(_resolve(config.env_spec, path.parent))
    config.warm_start.plans = [str(_resolve(p, path.parent, "warm-start plan")) for p in config.warm_start.plans]
    return config


def _resolve(spec: str, config_dir: Path, what: str = "env spec") -> Path:
    candidates = [Path(spec), config_dir / spec]
    if paths.REPO_ROOT is not None:
        candidates.append(paths.REPO_ROOT / spec)
    candidates.append(paths.ENVS_DIR / f"{spec}.yaml")
    if Path(spec).parent == Path("envs"):  # "envs/tiny.yaml" from an installed wheel: its copy
        candidates.append(paths.ENVS_DIR / Path(spec).name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{what} {spec!r} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


def make_env(config: TrainConfig):
    """The training env, wrapped in SB3's ``Monitor`` (episode reward and length in ``info``)."""
    import gymnasium as gym
    from stable_baselines3.common.monitor import Monitor

    if ":" not in config.env_id and config.env_id.startswith("fusion_rl/"):
        import fusion_rl.env  # noqa: F401  registers fusion_rl/Fusion-v0
    kwargs = dict(config.env_kwargs)
    if config.env_spec:
        kwargs.setdefault("spec", config.env_spec)
    try:
        env = gym.make(config.env_id, **kwargs)
    except gym.error.Error as exc:
        raise ConfigError(f"cannot make env {config.env_id!r}: {exc}") from None
    return Monitor(env)


def _episode_record(info: dict[str, Any], step: int, episode: int) -> dict[str, Any]:
    """One ``episodes.jsonl`` line from the final ``info`` of an episode.

    The env reports its own metrics in ``info`` (see ``FusionEnv``); missing ones are ``None``.
    """
    monitor = info.get("episode", {})
    latency = info.get("latency_ms")
    tvm = info.get("reference_latency_ms")  # TVM's own fusion (FuseOps) of the same model
    speedup = info.get("speedup_vs_tvm")
    if speedup is None and latency and tvm:
        speedup = tvm / latency
    return {
        "global_step": step,
        "episode": episode,
        "reward": float(monitor.get("r", 0.0)),
        "length": int(monitor.get("l", 0)),
        "model": info.get("model"),
        "target": info.get("target"),
        "latency_ms": latency,
        "tvm_latency_ms": tvm,
        "speedup_vs_tvm": speedup,
        "measurements": info.get("measurements"),
        "status": info.get("measurement_status"),
        "invalid_actions": info.get("invalid_actions"),
        "plan_hash": info.get("plan_hash"),
        "time": time.time(),
    }


class TrainingCallback(BaseCallback):
    """Checkpoints, the episode log, TensorBoard episode scalars and the progress bar.

    The episode scalars go to SB3's logger (TensorBoard), which W&B syncs; see the module
    docstring.

    Parameters
    ----------
    run_dir
        The run directory.
    checkpoint_every
        Env steps between checkpoints; taken at rollout start, i.e. after
        a whole PPO update.
    total_timesteps
        For the progress bar.
    window
        Episodes in the running means shown in the bar.
    progress
        Show a tqdm bar.
    """

    def __init__(
        self, run_dir: Path, checkpoint_every: int, total_timesteps: int, window: int = 20,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.checkpoint_every = checkpoint_every
        self.total_timesteps = total_timesteps
        self.progress = progress
        self.rewards: deque[float] = deque(maxlen=window)
        self.speedups: deque[float] = deque(maxlen=window)
        self.episodes = 0
        self.last_checkpoint = 0
        self.bar = None
        self._log = None

    def _on_training_start(self) -> None:
        self.last_checkpoint = self.num_timesteps  # a resumed run has this checkpoint already
        self.episodes = count_lines(self.run_dir / "episodes.jsonl")
        self._log = open(self.run_dir / "episodes.jsonl", "a", buffering=1)
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_timesteps, initial=self.num_timesteps, unit="step",
                            dynamic_ncols=True, desc=self.run_dir.name[:40])

    def _on_rollout_start(self) -> None:
        if self.num_timesteps - self.last_checkpoint >= self.checkpoint_every:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        path = self.run_dir / "checkpoints" / f"step_{self.num_timesteps}.zip"
        save_checkpoint(self.model, path)
        self.last_checkpoint = self.num_timesteps
        return path

    def _on_step(self) -> bool:
        if self.bar is not None:
            self.bar.update(self.num_timesteps - self.bar.n)
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            if done:
                self._log_episode(info)
        return True

    def _log_episode(self, info: dict[str, Any]) -> None:
        self.episodes += 1
        record = _episode_record(info, self.num_timesteps, self.episodes)
        assert self._log is not None
        self._log.write(json.dumps(record) + "\n")
        self.rewards.append(record["reward"])
        if record["speedup_vs_tvm"] is not None:
            self.speedups.append(float(record["speedup_vs_tvm"]))
        scalars = {k: record[k] for k in ("reward", "length", "latency_ms", "speedup_vs_tvm", "measurements")
                   if record[k] is not None}
        for key, value in scalars.items():
            self.logger.record_mean(f"episode/{key}", value)
        if self.bar is not None:
            postfix = {"reward": f"{np.mean(self.rewards):.3f}"}
            if self.speedups:
                postfix["vs_tvm"] = f"{np.mean(self.speedups):.3f}x"
            self.bar.set_postfix(postfix, refresh=False)

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._log is not None:
            self._log.close()


def warm_start(model: Any, env: Any, config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Behaviour-clone ``model`` on the best known plans (:mod:`fusion_rl.policy.imitation`) and
    write what was imitated, the losses and the measurements spent to ``warm_start.json``."""
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.policy.imitation import best_known_plans

    ws = config.warm_start
    spent = env.measurements_spent
    demos = best_known_plans(env, ws.rules, [FusionPlan.load(p) for p in ws.plans])
    return _clone(model, env, demos, ws, config.seed, spent, run_dir / "warm_start.json")


def fine_tune(model: Any, env: Any, config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """After PPO: behaviour-clone ``model`` on the training models' credit plans
    (:func:`fusion_rl.policy.imitation.credit_demonstrations`) and write the record to
    ``fine_tune.json``."""
    from fusion_rl.policy.imitation import credit_demonstrations

    spent = env.measurements_spent
    demos = credit_demonstrations(env)
    return _clone(model, env, demos, config.fine_tune, config.seed, spent, run_dir / "fine_tune.json")


def _clone(model: Any, env: Any, demos: list[Any], section: WarmStart | FineTune, seed: int, spent: int,
           path: Path) -> dict[str, Any]:
    from fusion_rl.policy.imitation import behaviour_clone, demonstration_steps

    steps = demonstration_steps(env, demos)
    losses = behaviour_clone(model, steps, section.epochs, section.learning_rate, section.batch_size, seed)
    record = {
        "demonstrations": [{"model": d.model, "target": d.target, "source": d.source,
                            "plan_hash": d.plan.hash, "reward": d.reward} for d in demos],
        "decisions": int(len(steps.actions)), "losses": losses,
        "measurements": env.measurements_spent - spent,
    }
    write_atomic(path, json.dumps(record, indent=2), what=f"{path.stem} record")
    return record


def _finish(model: Any, env: Any, config: TrainConfig, run_dir: Path) -> None:
    """The fine-tuning stage, if configured, then the final model. The last checkpoint holds
    the model before fine-tuning, so a run killed during it (or resumed once complete) fine-tunes
    that model again: the stage is never applied twice."""
    if config.fine_tune.epochs > 0:
        fine_tune(model, env.unwrapped, config, run_dir)
    save_checkpoint(model, run_dir / "final_model.zip")


def run_name(config: TrainConfig) -> str:
    """``<env>__<exp>__<seed>__<unix time>``, CleanRL's deterministic run name."""
    return f"{config.env_name}__{config.exp_name}__{config.seed}__{int(time.time())}"


def train(
    config: TrainConfig | None = None,
    *,
    runs_dir: str | os.PathLike[str] = "runs",
    resume: str | os.PathLike[str] | None = None,
    wandb_mode: str | None = None,
    progress: bool = True,
    verbose: int = 0,
) -> Path:
    """Train (or resume training) a fusion policy; returns the run directory.

    Parameters
    ----------
    config
        The run's config; ignored with ``resume`` (the run's own ``config.json`` is
        used, so a resumed run cannot silently change hyperparameters).
    runs_dir
        Parent of new run directories.
    resume
        A run directory to continue from its latest checkpoint.
    wandb_mode
        Overrides ``config.wandb`` (e.g. ``"disabled"`` for tests).
    progress
        Show the progress bar.
    """
    import torch
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.utils import set_random_seed

    from fusion_rl.policy.policy import make_model

    # 1. Config and run directory: a new one, or the one being resumed.
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            raise ConfigError(f"--resume {run_dir}: not a run directory (no config.json)")
        config = TrainConfig.from_dict(read_json(run_dir / "config.json", "run config"), f"{run_dir}/config.json")
    else:
        config = config if config is not None else TrainConfig()
        run_dir = Path(runs_dir) / run_name(config)
        run_dir.mkdir(parents=True, exist_ok=False)
        write_atomic(run_dir / "config.json", json.dumps(config.to_dict(), indent=2), what="run config")
    mode = wandb_mode or config.wandb
    if mode not in WANDB_MODES:
        raise ConfigError(f"wandb mode {mode!r} is not one of {WANDB_MODES}")
    checkpoint = latest_checkpoint(run_dir) if resume is not None else None
    torch.set_num_threads(config.torch_threads)

    # 2. Env (seeded through the model: SB3 seeds the VecEnv's first reset).
    env = make_env(config)

    # 3. Model: fresh, or the latest checkpoint (weights, optimizer state and step count).
    if checkpoint is not None:
        step, path = checkpoint
        print(f"warning: --resume loads {path} with SB3, which unpickles it and so runs any code "
              "in it; resume only run folders you trust (your own)", file=sys.stderr, flush=True)
        print(f"resuming {run_dir} from {path.name} at step {step}", flush=True)
        model = MaskablePPO.load(path, env=env, device=config.ppo.device, tensorboard_log=str(run_dir / "tb"))
        # A fresh stream per resume point: reproducible, and not a replay of the first steps.
        model.set_random_seed(config.seed + step)
        truncate_episodes(run_dir / "episodes.jsonl", step)
    else:
        set_random_seed(config.seed)
        model = make_model(env, config.ppo, seed=config.seed, tensorboard_log=str(run_dir / "tb"), verbose=verbose)
        truncate_episodes(run_dir / "episodes.jsonl", 0)
        if config.warm_start.epochs > 0:
            warm_start(model, env.unwrapped, config, run_dir)
    remaining = config.total_timesteps - model.num_timesteps
    if remaining <= 0:
        print(f"{run_dir} is already trained to {model.num_timesteps} steps", flush=True)
        try:
            _finish(model, env, config, run_dir)
        finally:
            env.close()
        return run_dir

    # 4. Logging: episode JSONL + TensorBoard (SB3's logger) + W&B, and the progress bar.
    wandb_run = init_wandb(config, run_dir, mode)
    callback: Any = TrainingCallback(run_dir, config.checkpoint_every, config.total_timesteps,
                                     window=config.window, progress=progress)
    if wandb_run is not None:
        from stable_baselines3.common.callbacks import CallbackList
        from wandb.integration.sb3 import WandbCallback

        callback = CallbackList([callback, WandbCallback(verbose=0)])

    # 5. Learn. ``reset_num_timesteps=False`` keeps counting from the checkpoint's step.
    try:
        model.learn(remaining, callback=callback, reset_num_timesteps=checkpoint is None,
                    tb_log_name="ppo")
        save_checkpoint(model, run_dir / "checkpoints" / f"step_{model.num_timesteps}.zip")
        _finish(model, env, config, run_dir)
    finally:
        env.close()
        if wandb_run is not None:
            finish_wandb(wandb_run)
    return run_dir
