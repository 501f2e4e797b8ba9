"""The decision core (fusion_rl.decisions): gym-free, one decision process, strict options."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusion_rl.decisions import DecisionOptions
from fusion_rl.errors import ConfigError

from conftest import REPO_ROOT

RL_STACK = ("gymnasium", "stable_baselines3", "sb3_contrib", "wandb")


def _modules_loaded_by(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints a JSON object as its last line."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600)
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


@pytest.mark.slow  # ~1 min: every zoo model is loaded and decided three ways (no compiling)
def test_plugin_cli_and_env_make_the_same_plan_on_every_zoo_model(tmp_path, model_cache):
    """One decision process for training, evaluation and the plugin: with the shipped policy,
    `plan --policy`, the LearnedFusion pass and FusionEnv.decide (what evaluation runs, on the
    env spec the policy was trained on) give the same plan on every zoo model. Plans only:
    nothing is compiled or measured."""
    import numpy as np
    import torch

    from fusion_rl.cli import main
    from fusion_rl.env.fusion_env import FusionEnv
    from fusion_rl.export import LearnedFusion
    from fusion_rl.export.artifact import hardware_stats, load_network
    from fusion_rl.fusion.group_shapes import within_anchor_limit
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.graph.zoo import ZOO

    policy = REPO_ROOT / "policies" / "default"
    network, card = load_network(policy)
    # The env takes its masks from the training spec, the plugin from the card: this test
    # also checks that the two agree. Padding is raised so every zoo model fits (the network
    # strips padding, so its logits do not depend on it).
    env = FusionEnv(str(REPO_ROOT / card["training"]["env_spec"]), max_nodes=256, max_edges=512,
                    store=str(tmp_path / "store.sqlite"))
    # The mask the policy trained under, as the env spec and the card each record it (a capped
    # policy's plugin is held to its cap in tests/export/test_export.py).
    assert env.config.decision_options == DecisionOptions.from_dict(card["decisions"])

    @torch.no_grad()
    def choose(obs: dict, mask: np.ndarray) -> int:  # deterministic masked action, as SB3's predict
        logits = network({k: torch.as_tensor(v)[None] for k, v in obs.items()})[0].numpy()
        return int(np.argmax(np.where(mask, logits, -np.inf)))

    learned = LearnedFusion(str(policy), "host")
    try:
        for name in ZOO:
            model = model_cache(name)
            assert main(["plan", name, "--policy", str(policy), "-o", str(tmp_path / f"{name}.json")]) == 0
            cli = FusionPlan.load(tmp_path / f"{name}.json")
            learned(model.mod)
            # The policy's hardware statistics, as the plugin applies them (identity: an old card).
            decided = env.decide(choose, name, "host", hardware_stats=hardware_stats(card))
            assert cli.hash == learned.last_plan.hash == decided.hash, name
            # Every group within the card's mask: the anchor cap, or a declared group shape.
            options = DecisionOptions.from_dict(card["decisions"])
            assert all(within_anchor_limit(model.graph, g, options.max_mac_anchors, options.group_shapes)
                       for g in cli.groups), name
    finally:
        env.close()
