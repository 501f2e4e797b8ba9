"""W&B through SB3's own integration: TensorBoard synced, one group per experiment, the
exported policy as an artifact; offline by default (no network)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from fusion_rl.policy.tracking import log_policy_artifact
from fusion_rl.policy.training import TrainConfig, load_config, train

from conftest import REPO_ROOT
from test_train import write_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                reason="wandb is not installed (the [train] extra)")


def _offline_runs(run_dir: Path) -> list[bytes]:
    """The record logs of the run's offline W&B runs (one per init: training, export)."""
    return [p.read_bytes() for p in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))]


def _settled_log(run_dir: Path, count: int = 1, timeout_s: float = 60.0) -> bytes:
    """The record log of the run's ``count``-th offline W&B run once its size stops changing
    (W&B writes it from its own service process, which may lag behind ``finish()`` on a loaded
    machine: a header-only log was read once under two test workers)."""
    import time

    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        logs = _offline_runs(run_dir)
        assert len(logs) <= count, f"{len(logs)} offline runs, expected {count}"
        log = logs[-1] if len(logs) == count else None
        if log is not None and log == last and len(log) > 64:
            return log
        last = log
        time.sleep(0.5)
    return last or b""


def test_group_gathers_the_seeds_of_an_experiment():
    a = TrainConfig(env_spec="envs/tiny.yaml", exp_name="sweep", seed=0)
    b = TrainConfig(env_spec="envs/tiny.yaml", exp_name="sweep", seed=7)
    assert a.group == b.group == "tiny__sweep"
    assert TrainConfig(exp_name="other").group != a.group
    assert TrainConfig(exp_name="sweep", wandb_group="ablation-1").group == "ablation-1"


def test_offline_run_syncs_tensorboard_and_logs_the_policy_artifact(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    calls = []
    real_init = wandb.init

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    config = load_config(write_config(tmp_path, wandb="offline", total_timesteps=128))
    assert config.wandb == "offline"
    run = train(config, runs_dir=tmp_path / "runs", progress=False)

    (init,) = calls
    assert init["mode"] == "offline" and init["sync_tensorboard"] is True
    assert init["group"] == "FakeFusion-v0__smoke" and init["job_type"] == "train"
    # W&B's service process writes the offline record log after finish() returns; wait for
    # it to settle (bounded), rather than read a header-only file.
    log = _settled_log(run)
    # SB3's rollout/* and time/* reach W&B only through the TensorBoard sync.
    for key in (b"rollout/ep_rew_mean", b"time/fps", b"train/value_loss", b"episode/reward"):
        assert key in log, key
    assert not wandb.patched["tensorboard"]  # unpatched after the run

    name = log_policy_artifact(run, REPO_ROOT / "policies" / "default")
    assert name == f"policy-{run.name}"
    assert calls[-1]["id"] == init["id"] and calls[-1]["group"] == init["group"]
    export_log = _settled_log(run, count=2)
    assert name.encode() in export_log and b"weights.safetensors" in export_log
    assert re.search(rb"card\.json", export_log)


def test_disabled_runs_log_nothing(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init called"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"wandb": "disabled"}')
    assert log_policy_artifact(run, REPO_ROOT / "policies" / "default") is None
    (run / "config.json").write_text('{"wandb": "offline"}')
    assert log_policy_artifact(run, REPO_ROOT / "policies" / "default", mode="disabled") is None
