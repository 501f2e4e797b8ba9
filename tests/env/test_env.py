"""FusionEnv: the Gymnasium contract, masks, rewards, specs and vector envs (tiny models only)."""

from __future__ import annotations

import doctest
import itertools
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.store import MeasurementStore
from fusion_rl.decisions import ACTION_FUSE, DecisionOptions, DecisionProcess, actions_for_plan, graph_observation
from fusion_rl.env import ENV_ID, INVALID_ACTION_PENALTY, EnvSpec, FusionEnv
from fusion_rl.env.rewards import FAILURE_PENALTY
from fusion_rl.errors import ConfigError, IllegalPlanError
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.plan_space import is_connected
from fusion_rl.fusion.rules import make_plan
from tests._tiny import diamond

# The observation contract has unbounded feature boxes on purpose; check_env warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:.*Box observation space:UserWarning")


class CountingCostModel:
    """A stand-in LatencyCostModel: latency = 1 ms per kernel + 0.1 ms per op."""

    def predict(self, graph, plan: FusionPlan) -> float:
        return plan.num_groups + 0.1 * plan.num_nodes


@pytest.fixture()
def store_path(tmp_path):
    return str(tmp_path / "m.sqlite")


def make_env(store_path: str, **overrides) -> FusionEnv:
    return FusionEnv("tiny", store=store_path, **overrides)


def no_measure_env(**overrides) -> FusionEnv:
    """The tiny suite with the cost-model reward: nothing is compiled."""
    return FusionEnv("tiny", reward="model", cost_model=CountingCostModel(), **overrides)


def run_episode(env: FusionEnv, actions=None, rng=None):
    """Play to the end (given actions, or random masked ones); returns (rewards, last info)."""
    rewards, info, t = [], {}, 0
    terminated = False
    while not terminated:
        if actions is not None:
            action = actions[t]
        else:
            action = int(rng.choice(np.flatnonzero(env.action_masks())))
        _, reward, terminated, _, info = env.step(action)
        rewards.append(reward)
        t += 1
    return rewards, info


def merged_plan_is_legal(process: DecisionProcess) -> bool:
    """check_plan on the plan that fusing the current edge would give."""
    k = process.current
    label = process.label.copy()
    a, b = label[process.src[k]], label[process.dst[k]]
    label[label == b] = a
    return check_plan(process.graph, FusionPlan.from_assignment(label.tolist())).legal


# ---- the decision process --------------------------------------------------------------------


def test_diamond_masks_equal_check_plan_and_reach_every_connected_legal_plan():
    graph = diamond()
    reached = set()
    for actions in itertools.product((0, 1), repeat=len(graph.edges)):
        process = DecisionProcess(graph)
        for action in actions:
            if process.done:
                break
            assert process.can_fuse() == merged_plan_is_legal(process)
            process.decide(bool(action) and process.can_fuse())
        assert process.done and check_plan(graph, process.plan()).legal
        reached.add(process.plan().hash)
    # Every legal partition whose groups are connected is reachable, and nothing else.
    expected = set()
    for labels in itertools.product(range(4), repeat=4):
        plan = FusionPlan.from_assignment(labels)
        connected = all(
            len(g) == 1 or is_connected(set(g), graph) for g in plan.groups
        )
        if connected and check_plan(graph, plan).legal:
            expected.add(plan.hash)
    assert reached == expected
    # {0, 3} alone is the classic non-convex group: after fusing 0->1 and keeping 0->2,
    # fusing 1->3 would give {0, 1, 3}, which skips node 2.
    process = DecisionProcess(graph)
    process.decide(True)
    process.decide(False)
    assert process.current == 2 and not process.can_fuse()


@pytest.mark.parametrize("name", ["cnn_plain", "resnet_tiny", "transformer_encoder"])
def test_random_masked_episodes_end_legal_and_masks_equal_check_plan(model_cache, name):
    graph = model_cache(name).graph
    rng = np.random.default_rng(0)
    process = DecisionProcess(graph)
    masked = 0
    for _ in range(8):
        process.reset()
        while not process.done:
            legal = merged_plan_is_legal(process)
            assert process.can_fuse() == legal
            masked += not legal
            process.decide(process.can_fuse() and bool(rng.integers(2)))
        assert check_plan(graph, process.plan()).legal
    if name != "cnn_plain":  # residuals and attention make some fuses illegal
        assert masked > 0


@pytest.mark.parametrize("name", ["mlp_tiny", "cnn_plain", "resnet_tiny", "transformer_encoder"])
@pytest.mark.parametrize("rules", ["tvm", "tensorrt", "aggressive"])
def test_rule_set_plans_are_reachable(model_cache, name, rules):
    model = model_cache(name)
    plan = make_plan(rules, model.mod, model.graph)
    process = DecisionProcess(model.graph)
    for action in actions_for_plan(model.graph, plan):
        process.decide(bool(action))
    assert process.done and process.plan().hash == plan.hash


def test_unreachable_plan_raises(model_cache):
    graph = model_cache("mlp_tiny").graph
    split = FusionPlan.from_groups([[0, 2]] + [[i] for i in range(len(graph)) if i not in (0, 2)], len(graph))
    with pytest.raises(IllegalPlanError, match="not reachable"):
        actions_for_plan(graph, split)


def test_max_mac_anchors_masks_second_anchor(model_cache):
    graph = model_cache("mlp_tiny").graph
    process = DecisionProcess(graph, DecisionOptions(max_mac_anchors=1))
    while not process.done:
        process.decide(process.can_fuse())
    plan = process.plan()
    assert all(sum(graph.nodes[i].is_mac_anchor for i in g) <= 1 for g in plan.groups)
    assert plan.num_groups == 4  # matmul+add+relu x3, matmul+add


def test_spec_group_shapes_come_from_the_schedule_provider():
    from fusion_rl.compiler.schedules.rules import RulesSchedule

    spec = EnvSpec.resolve("tiny", schedule="rules", max_mac_anchors=1, group_shapes="provider")
    assert spec.decision_options == DecisionOptions(max_mac_anchors=1, group_shapes=RulesSchedule.group_shapes)
    assert EnvSpec.from_dict(spec.to_dict()) == spec  # "provider" stays the spec's word
    naive = EnvSpec.resolve("tiny", schedule="naive", max_mac_anchors=1, group_shapes="provider")
    assert naive.decision_options.group_shapes == ()  # naive declares nothing
    listed = EnvSpec.resolve("tiny", max_mac_anchors=1, group_shapes=["pointwise_grouped", "pointwise_depthwise"])
    assert listed.decision_options == spec.decision_options
    with pytest.raises(ConfigError, match="unknown group shape 'attention'"):
        EnvSpec.resolve("tiny", max_mac_anchors=1, group_shapes=["attention"])
    with pytest.raises(ConfigError, match="needs 'max_mac_anchors'"):
        EnvSpec.resolve("tiny", group_shapes="provider")
    with pytest.raises(ConfigError, match="'group_shapes'.*list of group shape names"):
        EnvSpec.resolve("tiny", max_mac_anchors=1, group_shapes="all")


def test_spec_prefuse_epilogues_reaches_the_env(store_path):
    """The spec key builds the env's decision process: a policy that always keeps gets the
    tensorrt plan, and is asked fewer decisions than without it."""
    spec = EnvSpec.resolve("tiny", max_mac_anchors=1, prefuse_epilogues=True)
    assert spec.decision_options == DecisionOptions(max_mac_anchors=1, prefuse_epilogues=True)
    assert EnvSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="'prefuse_epilogues' must be true or false"):
        EnvSpec.resolve("tiny", prefuse_epilogues=1)
    asked = {}
    for prefuse in (False, True):
        env = FusionEnv("tiny", max_mac_anchors=1, prefuse_epilogues=prefuse, store=store_path)
        try:
            calls = []
            plan = env.decide(lambda obs, mask: calls.append(1) or 0, "cnn_plain", "host")
            asked[prefuse] = len(calls)
            model = env.model("cnn_plain")
            if prefuse:
                assert plan.hash == make_plan("tensorrt", model.mod, model.graph).hash
        finally:
            env.close()
    assert asked[True] < asked[False]


# ---- the Gymnasium contract -------------------------------------------------------------------


def test_check_env_passes(store_path):
    from gymnasium.utils.env_checker import check_env

    # Through gym.make, so that check_env also tries the other render modes from the spec.
    check_env(gym.make(ENV_ID, spec="tiny", store=store_path).unwrapped)


def test_make_by_id_with_name_path_or_envspec(store_path):
    from fusion_rl.env.spec import ENVS_DIR

    for spec in ("tiny", str(ENVS_DIR / "tiny.yaml"), EnvSpec.from_yaml(ENVS_DIR / "tiny.yaml")):
        env = gym.make(ENV_ID, spec=spec, reward="model", cost_model=CountingCostModel())
        obs, _ = env.reset(seed=1)
        assert env.observation_space.contains(obs)
        assert env.unwrapped.config.models == ("mlp_tiny", "cnn_plain")
        env.close()
    assert gym.spec(ENV_ID).nondeterministic


def test_doctest_of_fusion_env(monkeypatch, tmp_path):
    from fusion_rl.env import fusion_env

    monkeypatch.setattr(fusion_env, "default_store_path", lambda: tmp_path / "doctest.sqlite")
    result = doctest.testmod(fusion_env, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_invalid_actions_are_penalized_keeps(model_cache):
    env = no_measure_env()
    env.reset(seed=0, options={"model": "resnet_tiny"})
    # Out of range, wrong type: a penalized KEEP.
    for bad in (2, -1, np.int64(7), 0.5, True):
        before = env.current_plan().hash
        _, reward, terminated, _, info = env.step(bad)
        assert reward == INVALID_ACTION_PENALTY and info["invalid_action"] and not terminated
        assert env.current_plan().hash == before
    # A masked FUSE: walk with KEEP to the first illegal fuse of the residual graph.
    # With every edge kept, the residual's skip edge (x -> add) is the first illegal fuse.
    while env.action_masks()[1]:
        assert not env.step(0)[2], "resnet_tiny has a residual: some fuse must be masked"
    before = env.current_plan().hash
    _, reward, _, _, info = env.step(1)
    assert reward == INVALID_ACTION_PENALTY and info["invalid_action"]
    assert env.current_plan().hash == before
    _, info = run_episode(env, rng=np.random.default_rng(0))
    assert info["invalid_actions"] == 6 and check_plan(env._current().model.graph, info["plan"]).legal


def test_step_after_termination_warns():
    env = no_measure_env()
    env.reset(options={"model": "mlp_tiny"})
    _, info = run_episode(env, rng=np.random.default_rng(0))
    with pytest.warns(UserWarning, match="after the episode terminated"):
        obs, reward, terminated, _, _ = env.step(0)
    assert terminated and reward == 0.0 and not env.action_masks()[1]


def test_same_seed_same_pairs_and_observations():
    def trace(seed: int):
        env = no_measure_env(targets=["host", "x86-64-t1"])
        obs, info = env.reset(seed=seed)
        pairs, observations = [(info["model"], info["target"])], [obs]
        for _ in range(5):
            obs, info = env.reset()
            pairs.append((info["model"], info["target"]))
            observations.append(obs)
            obs, *_ = env.step(0)
            observations.append(obs)
        return pairs, observations

    pairs_a, obs_a = trace(3)
    pairs_b, obs_b = trace(3)
    assert pairs_a == pairs_b and len(set(pairs_a)) > 1
    for a, b in zip(obs_a, obs_b):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_reset_options_pick_the_pair():
    env = no_measure_env(targets=["host", "x86-64-t1"])
    obs, info = env.reset(seed=0, options={"model": "cnn_plain", "target": "x86-64-t1"})
    assert (info["model"], info["target"]) == ("cnn_plain", "x86-64-t1")
    n = len(env._current().model.graph)
    assert obs["node_mask"].sum() == n and obs["decision"][2] > 0
    with pytest.raises(ConfigError, match="unknown reset option"):
        env.reset(options={"modle": "mlp_tiny"})


def test_observation_dynamic_features_follow_the_plan():
    env = no_measure_env()
    obs, _ = env.reset(options={"model": "mlp_tiny"})
    assert tuple(obs["decision"]) == (0, 0, 1)
    obs, *_ = env.step(1)  # fuse 0 -> 1
    assert obs["group"][:3].tolist() == [0, 0, 2]
    k = obs["node_features"].shape[1] - 5
    assert obs["node_features"][0, k] == obs["node_features"][1, k] > obs["node_features"][2, k]
    assert obs["node_features"][0, k + 1] == 1.0  # the group holds the matmul
    e = obs["edge_features"].shape[1] - 3
    assert obs["edge_features"][0, e:].tolist() == [1.0, 1.0, 0.0]  # fused, decided, not current


def test_observations_match_the_policy_helper():
    """The env and fusion_rl.decisions.graph_observation (used to test policies offline)
    build the same observation for the same state."""
    env = no_measure_env()
    rng = np.random.default_rng(0)
    for name in ("mlp_tiny", "cnn_plain"):
        obs, _ = env.reset(options={"model": name})
        process = env._current().process
        while not process.done:
            expected = graph_observation(
                process.graph, obs["hardware"], env.config.max_nodes, env.config.max_edges,
                decision_edge=process.current, groups=process.label, decided=process.decided,
            )
            for key in obs:
                np.testing.assert_allclose(obs[key], expected[key], err_msg=key, rtol=1e-6)
            obs, *_ = env.step(int(rng.choice(np.flatnonzero(env.action_masks()))))


def test_tvm_plan_reachable_in_the_env_and_scores_zero(store_path):
    env = make_env(store_path)
    for name in ("mlp_tiny", "cnn_plain"):
        env.reset(seed=0, options={"model": name})
        rewards, info = run_episode(env, env.actions_for_plan(env.tvm_plan()))
        assert info["plan_hash"] == env.tvm_plan().hash
        assert sum(rewards) == 0.0 and info["speedup_vs_tvm"] == 1.0  # the stored reference record


def test_decide_replays_a_plan_without_measuring(store_path):
    """decide() reaches the plan its choices spell, creates no measurer and spends nothing."""
    env = make_env(store_path)
    try:
        for name in ("mlp_tiny", "cnn_plain"):
            target = env.tvm_plan(name)
            actions = iter(env.actions_for_plan(target, name))
            plan = env.decide(lambda obs, mask: next(actions), name, "host", name="replayed")
            assert plan.hash == target.hash and plan.name == "replayed"
            # Always asking to fuse: masked FUSE is taken as KEEP, so the plan stays legal.
            greedy = env.decide(lambda obs, mask: ACTION_FUSE, name, "host")
            assert check_plan(env.model(name).graph, greedy).legal and greedy.num_groups < greedy.num_nodes
        assert env.measurements_spent == 0 and not Path(store_path).exists()
        with pytest.raises(ConfigError):
            env.decide(lambda obs, mask: 0, "mlp_tiny", "no-such-target")
    finally:
        env.close()


def test_oversize_model_is_a_config_error():
    env = no_measure_env(max_nodes=8)
    with pytest.raises(ConfigError, match=r"'mlp_tiny' has 11 ops .*max_nodes=8"):
        env.reset(options={"model": "mlp_tiny"})


# ---- rewards -------------------------------------------------------------------------------


def test_e2e_reward_is_minus_log_latency_ratio_of_the_store_records(store_path, model_cache):
    env = make_env(store_path)
    env.reset(seed=0, options={"model": "cnn_plain"})
    rewards, info = run_episode(env, rng=np.random.default_rng(1))
    assert all(r == 0.0 for r in rewards[:-1])
    model = model_cache("cnn_plain")
    cfg = env.config
    keys = Measurer("host", cfg.schedule, protocol=cfg.protocol, isolate=False)
    with MeasurementStore(store_path) as store:
        latency = store.get(keys.key(model, info["plan"])).median_ms
        reference = store.get(keys.key(model, make_plan("tvm", model.mod, model.graph))).median_ms
    assert rewards[-1] == pytest.approx(-math.log(latency / reference), abs=1e-12)
    assert info["latency_ms"] == latency and info["reference_latency_ms"] == reference
    # Both the reference (first use of the pair) and the plan were measured in this episode.
    assert info["measurements"] == 2 and info["model"] == "cnn_plain" and info["target"] == "host"
    # The same plan again is served by the store: no measurement.
    env.reset(options={"model": "cnn_plain"})
    _, again = run_episode(env, env.actions_for_plan(info["plan"]))
    assert again["measurements"] == 0 and again["latency_ms"] == latency


def test_failed_measurement_gives_the_failure_penalty(store_path, monkeypatch):
    env = make_env(store_path)
    env.reset(options={"model": "mlp_tiny"})  # the reference is measured (and verified) here
    model = env._current().model
    from fusion_rl.compiler.verify import reference_outputs

    expected, ref = reference_outputs(model)
    monkeypatch.setattr(model, "reference", ([e + 1.0 for e in expected], ref))
    rewards, info = run_episode(env, [0] * 10)  # the unfused plan: not yet measured
    assert rewards[-1] == FAILURE_PENALTY and info["measurement_status"] == "wrong_output"
    assert info["latency_ms"] is None and "wrong output" in info["measurement_error"]


def test_kernel_reward_return_equals_e2e_and_table_rebuilds_from_store(store_path):
    env = make_env(store_path, reward="kernel", models=["mlp_tiny"])
    tvm = None
    shaped_seen = False
    for actions in ("unfused", "first", "tvm"):
        env.reset(options={"model": "mlp_tiny"})
        tvm = env.tvm_plan()
        steps = {"unfused": [0] * 10, "first": [1] + [0] * 9, "tvm": env.actions_for_plan(tvm)}[actions]
        rewards, info = run_episode(env, steps)
        assert sum(rewards) == pytest.approx(info["e2e_reward"], abs=1e-12)
        ratio = info["latency_ms"] / info["reference_latency_ms"]
        assert info["e2e_reward"] == pytest.approx(-math.log(ratio), abs=1e-12)
        shaped_seen |= any(r != 0.0 for r in rewards[:-1])
    # In the tvm episode, {0} + {1} merged with t({0}), t({1}) (unfused) and t({0,1}) known.
    assert shaped_seen
    env.close()
    # A new env (a new process, as far as the table knows) rebuilds it from store + plan index.
    fresh = make_env(store_path, reward="kernel", models=["mlp_tiny"])
    fresh.reset(options={"model": "mlp_tiny"})
    rewards, info = run_episode(fresh, fresh.actions_for_plan(tvm))
    assert rewards[0] != 0.0 and info["measurements"] == 0
    assert sum(rewards) == pytest.approx(info["e2e_reward"], abs=1e-12)


def test_model_reward_uses_the_cost_model_without_measuring():
    env = no_measure_env()
    env.reset(options={"model": "mlp_tiny"})
    rewards, info = run_episode(env, [0] * 10)
    predict = CountingCostModel().predict
    expected = -math.log(predict(None, info["plan"]) / predict(None, env.tvm_plan()))
    assert rewards[-1] == pytest.approx(expected) and info["measurements"] == 0
    with pytest.raises(ConfigError, match="needs a cost model"):
        FusionEnv("tiny", reward="model")


# ---- specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key",
    [
        ("models: [mlp_tiny]\nmodles: [cnn_plain]\n", "modles"),
        ("models: [mlp_tiny]\nmax_nodes: big\n", "max_nodes"),
        ("models: mlp_tiny\n", "models"),
        ("models: [mlp_tiny]\nisolate: 1\n", "isolate"),
        ("models: [mlp_tiny]\nreward: speed\n", "reward"),
        ("models: [mlp_tiny]\nprotocol: {repeat: 3, min_repeat: 5}\n", "protocol.min_repeat"),
        ("targets: [host]\n", "models"),
    ],
)
def test_spec_errors_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        EnvSpec.from_yaml(path)


def test_spec_round_trip_and_relative_paths(tmp_path):
    from fusion_rl.env.spec import ENVS_DIR

    for name in ("tiny", "default"):
        spec = EnvSpec.from_yaml(ENVS_DIR / f"{name}.yaml")
        assert EnvSpec.from_dict(spec.to_dict()) == spec
    (tmp_path / "s.yaml").write_text("models: [mlp_tiny, nets/m.onnx]\nstore: runs/m.sqlite\n")
    spec = EnvSpec.from_yaml(tmp_path / "s.yaml")
    assert spec.models == ("mlp_tiny", str(tmp_path / "nets/m.onnx"))
    assert spec.store == str(tmp_path / "runs/m.sqlite")
    with pytest.raises(ConfigError, match="unknown target"):
        FusionEnv("tiny", targets=["pentium-t9"])


# ---- vector envs ------------------------------------------------------------------------------


def _make_vec_member(store: str):
    return lambda: FusionEnv("tiny", store=store, models=["mlp_tiny"])


def test_subprocess_vector_env_with_action_masks(store_path):
    from sb3_contrib.common.maskable.utils import get_action_masks
    from stable_baselines3.common.vec_env import SubprocVecEnv

    vec = SubprocVecEnv([_make_vec_member(store_path) for _ in range(2)], start_method="forkserver")
    try:
        vec.seed(0)
        vec.reset()
        rng = np.random.default_rng(0)
        finished = []
        for _ in range(12):  # mlp_tiny episodes have 10 steps
            masks = get_action_masks(vec)
            assert masks.shape == (2, 2) and masks[:, 0].all()
            actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
            _, _, dones, infos = vec.step(actions)
            finished += [info for done, info in zip(dones, infos) if done]
        assert len(finished) >= 2 and all(info["latency_ms"] > 0 for info in finished)
    finally:
        vec.close()
    with MeasurementStore(store_path) as store:
        assert len(store) >= 2  # the reference and the plans, one store for both processes


def test_mask_forbids_a_cycle_through_a_group_entered_late():
    """{0, 4} then 1 -> 2 would close 1 -> 3 -> 4 ~ 0 -> 2: a group-level cycle the masks must
    see although node 3 comes after node 2 (the env once pruned such paths by node order)."""
    from fusion_rl.fusion.legality import check_plan

    from _tiny import crossed_groups

    g = crossed_groups()
    for actions in __import__("itertools").product([0, 1], repeat=len(g.edges)):
        process = DecisionProcess(g)
        for act in actions:
            if process.done:
                break
            process.decide(bool(act) and process.can_fuse())
        assert check_plan(g, process.plan()).legal, actions
