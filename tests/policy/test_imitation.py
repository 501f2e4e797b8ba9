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


@pytest.mark.parametrize("section, match", [
    ({"epochs": -1}, "fine_tune"), ({"batch_size": 0}, "fine_tune"), ({"rules": ["tvm"]}, "unknown key"),
])
def test_bad_fine_tune_section_is_a_config_error(section, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({"fine_tune": section})


@pytest.fixture()
def table_env(tmp_path):
    """``reward: table`` with the pointwise -> depthwise shape declared: mobilenet_tiny has its
    instances, mlp_tiny none (kernels are timed under the tiny spec's naive schedule)."""
    from fusion_rl.env.fusion_env import FusionEnv

    env = FusionEnv("tiny", store=str(tmp_path / "m.sqlite"), reward="table", models=["mlp_tiny", "mobilenet_tiny"],
                    max_nodes=256, max_edges=512, max_mac_anchors=1, group_shapes=["pointwise_depthwise"])
    yield env
    env.close()


def test_credit_demonstrations_are_the_credit_plans_of_models_with_a_shape(table_env):
    from fusion_rl.policy.imitation import credit_demonstrations

    demos = credit_demonstrations(table_env)
    assert [(d.model, d.target) for d in demos] == [("mobilenet_tiny", "host")]  # mlp_tiny has no pair
    plan, formed = table_env.credit_plan("mobilenet_tiny", "host")
    assert demos[0].plan.hash == plan.hash and demos[0].source == f"credit plan of mobilenet_tiny ({formed} formed)"
    assert table_env.credit_plan("mlp_tiny", "host") is None


def test_credit_plans_need_the_table_reward(env):
    from fusion_rl.policy.imitation import credit_demonstrations

    with pytest.raises(ConfigError, match="reward: table"):
        credit_demonstrations(env)


def test_fine_tuning_clones_the_credit_plans_and_records_them(table_env, tmp_path):
    """After fine-tuning, the greedy policy decides the credit plan (measuring nothing); the
    record says what was cloned."""
    import torch

    from fusion_rl.evaluate import decide_plan
    from fusion_rl.policy.policy import make_model
    from fusion_rl.policy.training import fine_tune

    torch.manual_seed(0)
    config = TrainConfig.from_dict({"fine_tune": {"epochs": 150, "learning_rate": 3e-3, "batch_size": 32},
                                    "ppo": {"features_extractor_kwargs": {"hidden": 16, "heads": 2,
                                                                          "num_layers": 2, "hw_hidden": 8}}})
    model = make_model(table_env, config.ppo, seed=0)
    plan, _ = table_env.credit_plan("mobilenet_tiny", "host")
    assert decide_plan(model, table_env, "mobilenet_tiny", "host").hash != plan.hash
    record = fine_tune(model, table_env, config, tmp_path)
    assert json.loads((tmp_path / "fine_tune.json").read_text()) == record
    assert [d["plan_hash"] for d in record["demonstrations"]] == [plan.hash]
    assert len(record["losses"]) == 150 and record["losses"][-1] < 0.2 * record["losses"][0]
    assert decide_plan(model, table_env, "mobilenet_tiny", "host").hash == plan.hash
