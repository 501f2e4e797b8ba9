"""A training run's directory: its files, and writing and reading them safely.

A run directory ``runs/<env>__<exp>__<seed>__<time>/`` (:func:`fusion_rl.policy.training.train`
writes it) holds:

==========================  ===================================================================
``config.json``             the full, resolved config (what ``train`` ran with)
``checkpoints/step_N.zip``  model + optimizer after ``N`` env steps, written via temp + rename
``checkpoints/step_N.{safetensors,json}``  the actor alone, in files that never execute
                            (:mod:`fusion_rl.policy.snapshot`), written before the zip
``final_model.zip``         the model after ``total_timesteps`` and ``fine_tune`` (and
                            ``final_model.{safetensors,json}``)
``warm_start.json``,        what behaviour cloning imitated before and after PPO, its losses
``fine_tune.json``          and the measurements it spent (when configured)
``episodes.jsonl``          one line per finished episode: reward, latency, speedup vs ``tvm``,
                            measurements spent
``tb/``                     TensorBoard event files (SB3's logger + episode scalars)
``wandb/``                  Weights & Biases files (offline by default; ``wandb sync`` later)
==========================  ===================================================================

Trust: an SB3 zip is a pickle, and loading it runs code. Only ``--resume`` loads one, and it
says so: resume only run folders you made. ``fusion-rl export`` and ``fusion-rl evaluate`` read
the ``.safetensors`` + ``.json`` snapshots and ``config.json`` (:func:`run_snapshot`), never a zip.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from fusion_rl.errors import ConfigError
from fusion_rl.io import write_atomic

__all__ = ["count_lines", "latest_checkpoint", "run_snapshot", "save_atomic", "save_checkpoint", "truncate_episodes"]

_STEP_RE = re.compile(r"^step_(\d+)\.[a-z]+$")


def save_atomic(model: Any, path: Path) -> None:
    """Save an SB3 model to ``path`` so that ``path`` is either absent, old or complete.

    The zip is built in memory and written with :func:`fusion_rl.io.write_atomic` (temp file,
    fsync, rename): a kill at any point leaves at most a stray hidden temp file.
    """
    buffer = io.BytesIO()
    model.save(buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue(), what="checkpoint")


def save_checkpoint(model: Any, path: Path) -> None:
    """The snapshot (:func:`fusion_rl.policy.snapshot.save_snapshot`), then the SB3 zip: a zip
    on disk always has its safe snapshot beside it."""
    from fusion_rl.policy.snapshot import save_snapshot

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_snapshot(model, path)
    except (ValueError, AttributeError) as exc:  # an extractor or head PolicyNetwork cannot copy
        print(f"warning: no policy snapshot beside {path.name} ({exc}); export and evaluate will "
              "refuse this run", file=sys.stderr, flush=True)
    save_atomic(model, path)


def run_snapshot(run_dir: str | os.PathLike[str]) -> Path:
    """The policy description a run offers for export and evaluation: ``final_model.json``,
    else the newest ``checkpoints/step_N.json`` (an interrupted run). Never a zip.

    Raises
    ------
    ConfigError
        for a run without one; a run written before snapshots existed is told
        how to get them without unpickling anything it does not trust.
    """
    run = Path(run_dir)
    final = run / "final_model.zip"
    if final.with_suffix(".json").is_file():
        return final.with_suffix(".json")
    steps = [(n, p) for n, p in _steps(run, ".json") if p.with_suffix(".safetensors").is_file()]
    if steps and not final.exists():
        return max(steps)[1]
    if final.exists() or latest_checkpoint(run) is not None:
        raise ConfigError(
            f"{run} has only SB3 zips (pickles), which export and evaluate never load: it was "
            "written before runs saved their policy as safetensors + JSON. If you trust the run "
            f"(you trained it), write those files with `fusion-rl train --resume {run}` (no further "
            "training when it is complete); otherwise train it again"
        )
    raise ConfigError(f"{run} has neither final_model.json nor a checkpoint to read; the run never "
                      "finished a rollout")


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[int, Path] | None:
    """``(step, path)`` of the newest ``checkpoints/step_N.zip``, or ``None``."""
    return max(_steps(Path(run_dir), ".zip"), default=None)


def _steps(run: Path, suffix: str) -> list[tuple[int, Path]]:
    """``(N, path)`` of every ``checkpoints/step_N<suffix>`` (a temp file or another name is none)."""
    found = []
    for p in (run / "checkpoints").glob(f"step_*{suffix}"):
        m = _STEP_RE.match(p.name)
        if m and p.suffix == suffix:
            found.append((int(m.group(1)), p))
    return found


def count_lines(path: Path) -> int:
    """Lines in ``path`` (0 when it does not exist): the episodes a run has logged."""
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def truncate_episodes(path: Path, step: int) -> None:
    """Drop episode lines logged after ``step`` (by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["global_step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the kill
    write_atomic(path, "".join(line + "\n" for line in kept), what="episode log")
