"""The run directory: atomic checkpoints, the newest one, and what export and evaluate may read."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fusion_rl.errors import ConfigError
from fusion_rl.policy.run_dir import latest_checkpoint, run_snapshot, save_atomic, truncate_episodes


def test_latest_checkpoint_ignores_partial_writes(tmp_path):
    """A kill during a save leaves only a hidden temp file, which is never taken as a checkpoint."""
    assert latest_checkpoint(tmp_path) is None
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / ".step_512.zip.1234.tmp").write_bytes(b"PK\x03\x04 half a zip")
    (ckpts / "step_x.zip").write_bytes(b"")

    class Saved:
        def save(self, f) -> None:
            f.write(b"complete")

    save_atomic(Saved(), ckpts / "step_256.zip")
    assert latest_checkpoint(tmp_path) == (256, ckpts / "step_256.zip")
    assert (ckpts / "step_256.zip").read_bytes() == b"complete"


def test_run_snapshot_prefers_the_final_snapshot_and_never_offers_a_zip(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (128, 256):
        (ckpts / f"step_{step}.json").write_text("{}")
        (ckpts / f"step_{step}.safetensors").write_bytes(b"")
    (ckpts / "step_512.json").write_text("{}")  # no weights beside it: not a snapshot
    assert run_snapshot(tmp_path) == ckpts / "step_256.json"  # an interrupted run: its newest
    (tmp_path / "final_model.json").write_text("{}")
    assert run_snapshot(tmp_path) == tmp_path / "final_model.json"

    zips_only = tmp_path / "old"
    (zips_only / "checkpoints").mkdir(parents=True)
    (zips_only / "checkpoints" / "step_128.zip").write_bytes(b"PK")
    with pytest.raises(ConfigError, match="only SB3 zips"):
        run_snapshot(zips_only)
    with pytest.raises(ConfigError, match="never finished a rollout"):
        run_snapshot(tmp_path / "empty")


def test_truncate_episodes_keeps_lines_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "episodes.jsonl"
    log.write_text('{"global_step": 100}\n{"global_step": 300}\n{"global_st')  # the last cut by a kill
    truncate_episodes(log, 200)
    assert log.read_text() == '{"global_step": 100}\n'
    truncate_episodes(tmp_path / "missing.jsonl", 0)  # nothing logged yet: nothing to do


def test_run_dir_reads_runs_without_the_training_extras(tmp_path):
    """`fusion-rl export` and `evaluate` read runs through this module; it must not pull in SB3."""
    (tmp_path / "final_model.json").write_text("{}")
    code = (
        "import sys\n"
        "for name in ('stable_baselines3', 'sb3_contrib', 'wandb', 'tensorboard'):\n"
        "    sys.modules[name] = None\n"
        "from fusion_rl.policy.run_dir import run_snapshot\n"
        f"print(run_snapshot({str(tmp_path)!r}).name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "final_model.json"
