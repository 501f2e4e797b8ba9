"""Behaviour cloning: the best known plans, their decisions, and a policy that plays them after
cloning (on the real env with ``reward: model``: nothing is compiled)."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest

from fusion_rl.errors import ConfigError
from fusion_rl.fusion.rules import make_plan
from fusion_rl.policy.imitation import behaviour_clone, best_known_plans, demonstration_steps
from fusion_rl.policy.training import TrainConfig, warm_start

RULES = ["unfused", "tvm", "aggressive_1anchor"]


class KernelCount:
    """Latency = 1 ms per kernel + 0.1 per op: fewer kernels is better (deterministic)."""

    def predict(self, graph, plan) -> float:
        return plan.num_groups + 0.1 * plan.num_nodes


@pytest.fixture()
def env(tmp_path):
    import fusion_rl.env  # noqa: F401  registers the env

    env = gym.make("fusion_rl/Fusion-v0", spec="tiny", reward="model", cost_model=KernelCount(),
                   store=str(tmp_path / "store.sqlite")).unwrapped
    yield env
    env.close()


def test_best_known_plan_is_the_best_candidate_by_reward(env):
    demos = best_known_plans(env, RULES)
    assert [(d.model, d.target) for d in demos] == [(m, "host") for m in env.config.models]
    for demo in demos:
        model = env.model(demo.model)
        predicted = {r: KernelCount().predict(model.graph, make_plan(r, model.mod, model.graph)) for r in RULES}
        assert demo.source == min(predicted, key=predicted.get)
        assert demo.reward == pytest.approx(-math.log(predicted[demo.source] / predicted["tvm"]))
    with pytest.raises(ConfigError, match="at least one"):
        best_known_plans(env, [])


def test_demonstration_steps_are_the_plans_decisions(env):
    demos = best_known_plans(env, RULES)
    steps = demonstration_steps(env, demos)
    expected = [a for d in demos for a in env.actions_for_plan(d.plan, d.model)]
    assert steps.actions.tolist() == expected
    assert steps.masks[np.arange(len(expected)), steps.actions].all()  # every action was allowed
    assert {k: v.shape[0] for k, v in steps.observations.items()} == {k: len(expected) for k in steps.observations}


def test_a_cloned_policy_plays_the_best_known_plans(env, tmp_path):
    """After cloning, the greedy policy decides (measuring nothing) exactly the demonstrated
    plan on every model; an untrained one does not."""
    import torch

    from fusion_rl.policy.policy import PPOConfig, make_model

    torch.manual_seed(0)
    config = PPOConfig(features_extractor_kwargs={"hidden": 16, "heads": 2, "num_layers": 2, "hw_hidden": 8})
    model = make_model(env, config, seed=0)
    demos = best_known_plans(env, RULES)

    def plays(m) -> list[bool]:
        def choose(obs, mask):
            return int(m.predict(obs, action_masks=mask, deterministic=True)[0])
        return [env.decide(choose, d.model, d.target).hash == d.plan.hash for d in demos]

    assert not all(plays(model))
    losses = behaviour_clone(model, demonstration_steps(env, demos), epochs=60, learning_rate=3e-3, batch_size=32)
    assert losses[-1] < 0.2 * losses[0]
    assert all(plays(model))


def test_warm_start_records_what_was_imitated(env, tmp_path):
    from fusion_rl.policy.policy import PPOConfig, make_model

    config = TrainConfig.from_dict({"warm_start": {"epochs": 2, "rules": ["tvm", "aggressive_1anchor"]},
                                    "ppo": {"features_extractor_kwargs": {"hidden": 8, "heads": 1,
                                                                          "num_layers": 1, "hw_hidden": 4}}})
    model = make_model(env, config.ppo, seed=0)
    record = warm_start(model, env, config, tmp_path)
    assert json.loads((tmp_path / "warm_start.json").read_text()) == record
    assert [d["model"] for d in record["demonstrations"]] == list(env.config.models)
    assert len(record["losses"]) == 2 and record["decisions"] > 0 and record["measurements"] == 0


@pytest.mark.parametrize("section, match", [
    ({"epochs": -1}, "warm_start"), ({"learning_rate": 0}, "warm_start"), ({"epoch": 3}, "unknown key"),
])
def test_bad_warm_start_section_is_a_config_error(section, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({"warm_start": section})
