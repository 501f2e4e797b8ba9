"""The decision core (fusion_rl.decisions): gym-free, one decision process, strict options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_rl.decisions import DecisionOptions
from fusion_rl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
RL_STACK = ("gymnasium", "stable_baselines3", "sb3_contrib", "wandb")


def _modules_loaded_by(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints a JSON object as its last line."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_plugin_loads_and_plans_without_the_rl_stack():
    """Compiler users get LearnedFusion with torch and TVM only: importing fusion_rl.export, and
    even loading the shipped policy and planning a model with it, never imports gymnasium, SB3
    or wandb (nor registers the Gym env as a side effect)."""
    stack = list(RL_STACK)
    loaded = _modules_loaded_by(
        "import json, sys\n"
        "import fusion_rl.export\n"
        f"after_import = [m for m in {stack!r} if m in sys.modules]\n"
        "from fusion_rl.graph.model import load_model\n"
        "planner = fusion_rl.export.LearnedPlanner('policies/default', 'host')\n"
        "planner.plan(load_model('mlp_tiny').graph)\n"
        f"after_plan = [m for m in {stack!r} if m in sys.modules]\n"
        "print(json.dumps({'import': after_import, 'plan': after_plan}))\n"
    )
    assert loaded == {"import": [], "plan": []}


def test_decision_options_round_trip_and_are_strict():
    opts = DecisionOptions(max_mac_anchors=1)
    assert DecisionOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    assert DecisionOptions.from_dict({"max_mac_anchors": None}) == DecisionOptions()
    with pytest.raises(ConfigError, match="'max_mac_anchors' is not recorded"):
        DecisionOptions.from_dict({})
    with pytest.raises(ConfigError, match="unknown decision option 'max_anchors'"):
        DecisionOptions.from_dict({"max_mac_anchors": 1, "max_anchors": 1})
    for bad in (0, True, "1", 1.0):
        with pytest.raises(ConfigError, match="int >= 1 or null"):
            DecisionOptions.from_dict({"max_mac_anchors": bad})
    with pytest.raises(ConfigError, match="expected a mapping"):
        DecisionOptions.from_dict([1])
