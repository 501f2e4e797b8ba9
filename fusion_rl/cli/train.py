"""``fusion-rl train``: train a fusion policy with MaskablePPO (see :mod:`fusion_rl.policy.training`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusion_rl.cli.common import add_json, nonnegative, positive
from fusion_rl.cli.progress import wanted

DEFAULT_CONFIG = "experiments/train_default.yaml"


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The options of ``fusion-rl train`` and ``scripts/train.py`` (one definition for both)."""
    p.add_argument("--config", type=Path, default=None,
                   help=f"training config YAML (default: {DEFAULT_CONFIG})")
    p.add_argument("--seed", type=nonnegative(), default=None, help="overrides the config's seed")
    p.add_argument("--total-timesteps", type=positive(), default=None,
                   help="overrides the config's total_timesteps")
    p.add_argument("--exp-name", default=None, help="overrides the config's exp_name (run name part)")
    p.add_argument("--wandb", choices=("offline", "online", "disabled"), default=None,
                   help="W&B mode (default: the config's, normally offline)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="parent of run directories")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint, with its own config")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (drawn only when stderr is a terminal and --json is not given)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="SB3 verbosity (repeatable: -vv)")
    add_json(p, "the run directory")


def run_from_args(args: argparse.Namespace) -> Path:
    """Load the config, apply the command-line overrides and train; returns the run directory."""
    from fusion_rl.errors import ConfigError, require_extra
    from fusion_rl.paths import REPO_ROOT

    require_extra("fusion-rl train", "train", "stable_baselines3", "sb3_contrib", "tensorboard")
    from fusion_rl.policy.training import load_config, train

    if args.resume is not None:
        overrides = [n for n in ("config", "seed", "total_timesteps", "exp_name") if getattr(args, n) is not None]
        if overrides:
            raise ConfigError(
                f"--resume continues a run with its saved config; drop {', '.join('--' + o.replace('_', '-') for o in overrides)}"
            )
        config = None
    else:
        path = args.config
        if path is None:
            path = Path(DEFAULT_CONFIG)
            if not path.exists() and REPO_ROOT is not None:
                path = REPO_ROOT / DEFAULT_CONFIG
        config = load_config(path)
        if args.seed is not None:
            config.seed = args.seed
        if args.total_timesteps is not None:
            config.total_timesteps = args.total_timesteps
        if args.exp_name is not None:
            config.exp_name = args.exp_name
    run_dir = train(config, runs_dir=args.runs_dir, resume=args.resume, wandb_mode=args.wandb,
                    progress=wanted(args), verbose=args.verbose)
    if getattr(args, "json", False):
        from fusion_rl.io import dumps_json

        print(dumps_json({"run_dir": str(run_dir)}))
    else:
        print(f"run directory: {run_dir}")
    return run_dir


def cmd_train(args: argparse.Namespace) -> int:
    run_from_args(args)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a fusion policy (MaskablePPO + GNN); --resume RUN_DIR continues one")
    add_train_args(p)
    p.set_defaults(func=cmd_train)
