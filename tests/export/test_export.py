"""The policy artifact and the LearnedFusion pass (issue: ship the policy as a TVM plugin)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import tvm

from fusion_rl.cli import main
from fusion_rl.compiler.build import compile_module
from fusion_rl.compiler.schedules import make_schedule
from fusion_rl.compiler.verify import reference_outputs, verify_executable
from fusion_rl.decisions import EDGE_DIM, NODE_DIM, DecisionOptions
from fusion_rl.errors import ConfigError
from fusion_rl.export import PASS_NAME, LearnedFusion, LearnedPlanner, PolicyArtifactError, load_network
from fusion_rl.export.artifact import CARD_FILE, WEIGHTS_FILE, PolicyCard, content_hash, save_artifact
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.features import feature_schema
from fusion_rl.graph.zoo import ZOO
from fusion_rl.policy.network import PolicyNetwork

from conftest import one_line_error, run_cli

FEATURES = dict(node_dim=NODE_DIM, edge_dim=EDGE_DIM, hw_dim=10, hidden=16, heads=2, num_layers=2, hw_hidden=8)


def _artifact(path, fuse_bias: float = 0.0, options: DecisionOptions = DecisionOptions()):
    torch.manual_seed(0)
    net = PolicyNetwork(FEATURES, [16])
    with torch.no_grad():  # bias the head so the plan has fused groups whatever the weights
        net.action.bias[1] += fuse_bias
    card = PolicyCard(
        architecture={"class": "fusion_rl.policy.network.PolicyNetwork", "kwargs": net.config},
        feature_schema=feature_schema(),
        observation={"max_nodes": 64, "max_edges": 128, "hw_dim": 10},
        decisions=options.to_dict(),
        training={"models": ["test"]},
    )
    return save_artifact(path, net, card)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return _artifact(tmp_path_factory.mktemp("policy") / "p", fuse_bias=5.0)


def test_artifact_round_trip_is_exact(policy_dir):
    net, card = load_network(policy_dir)
    again, _ = load_network(policy_dir)
    obs = {k: torch.as_tensor(v)[None] for k, v in _some_observation().items()}
    assert torch.equal(net(obs), again(obs))
    assert card["architecture"]["class"].endswith("PolicyNetwork")
    assert (policy_dir / WEIGHTS_FILE).read_bytes()[:8] != b"PK\x03\x04"  # not a pickle zip


def _some_observation():
    from fusion_rl.decisions import DecisionProcess, ObservationBuilder
    from _tiny import diamond

    g = diamond()
    return ObservationBuilder(g, 8, 8).observe(DecisionProcess(g), np.zeros(10, np.float32))


@pytest.mark.parametrize(
    "tamper, words",
    [
        (lambda d: (d / CARD_FILE).unlink(), "card.json is missing"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), "weights.safetensors is missing"),
        (lambda d: (d / CARD_FILE).write_text("{oops"), "not valid JSON"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-4] + b"\0\0\0\0"), "content hash mismatch"),
        (lambda d: _edit_card(d, lambda c: c["training"].update(models=["other"])), "content hash mismatch"),
        (lambda d: _edit_card(d, lambda c: c["architecture"].update({"class": "os.system"}), rehash=True), "not one of the classes"),
        (lambda d: _edit_card(d, lambda c: c["feature_schema"].update(version=99), rehash=True), "feature schema v99"),
        (lambda d: _edit_card(d, lambda c: c["feature_schema"]["node_features"].pop(), rehash=True), "different features"),
    ],
)
def test_bad_policy_folders_are_rejected(tmp_path, policy_dir, tamper, words):
    target = tmp_path / "p"
    shutil.copytree(policy_dir, target)
    tamper(target)
    with pytest.raises(PolicyArtifactError, match=words):
        load_network(target)


def _edit_card(folder, edit, rehash: bool = False):
    card = json.loads((folder / CARD_FILE).read_text())
    edit(card)
    if rehash:  # a consistent but incompatible artifact: the schema check must catch it
        card["content_hash"] = content_hash(card, (folder / WEIGHTS_FILE).read_bytes())
    (folder / CARD_FILE).write_text(json.dumps(card))


def test_planner_enforces_the_decision_options_of_its_card(tmp_path, model_cache):
    """The plugin masks as training did: a policy biased to fuse puts several conv/matmul
    anchors in one group without a cap, and at most one under the card's max_mac_anchors: 1
    (before the card recorded it, the plugin planned uncapped whatever the training)."""
    graph = model_cache("resnet_tiny").graph
    capped = LearnedPlanner(_artifact(tmp_path / "capped", 5.0, DecisionOptions(max_mac_anchors=1)))
    free = LearnedPlanner(_artifact(tmp_path / "free", 5.0))
    assert capped.options == DecisionOptions(max_mac_anchors=1) and free.options == DecisionOptions()

    def most_anchors(plan) -> int:
        return max(sum(graph.nodes[n].is_mac_anchor for n in g) for g in plan.groups)

    capped_plan, free_plan = capped.plan(graph), free.plan(graph)
    assert most_anchors(free_plan) > 1
    assert most_anchors(capped_plan) == 1 and check_plan(graph, capped_plan).legal


def test_planner_prefuses_the_epilogues_when_its_card_says_so(tmp_path, model_cache):
    """A policy biased to keep every edge apart plans the unfused model, unless its card records
    prefuse_epilogues: then the plugin fuses the epilogue edges without asking it, which gives
    the tensorrt rule's plan."""
    model = model_cache("resnet_tiny")
    keep = LearnedPlanner(_artifact(tmp_path / "keep", -5.0, DecisionOptions(max_mac_anchors=1)))
    prefused = LearnedPlanner(_artifact(tmp_path / "prefused", -5.0,
                                        DecisionOptions(max_mac_anchors=1, prefuse_epilogues=True)))
    assert len(keep.plan(model.graph).groups) == len(model.graph)
    assert prefused.plan(model.graph).hash == make_plan("tensorrt", model.mod, model.graph).hash


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.pop("decisions"), "card.json has no 'decisions' field"),
        (lambda c: c["decisions"].update(max_mac_anchors=0), "'max_mac_anchors' must be an int >= 1 or null"),
        (lambda c: c["decisions"].update(fuse_all=True), "unknown decision option 'fuse_all'"),
        (lambda c: c.update(decisions={}), "'max_mac_anchors' is not recorded"),
    ],
)
def test_card_without_valid_decision_options_is_refused(tmp_path, policy_dir, capsys, edit, words):
    """A card that does not say which masks its policy was trained under is refused, in one
    line from the CLI, rather than run under a guess."""
    target = tmp_path / "p"
    shutil.copytree(policy_dir, target)
    _edit_card(target, edit, rehash=True)
    with pytest.raises(PolicyArtifactError, match=re.escape(words)):
        LearnedPlanner(target)
    one_line_error(*run_cli(capsys, "plan", "mlp_tiny", "--policy", str(target))[::2], words)


def test_cli_rejects_missing_policy_in_one_line(capsys, tmp_path):
    line = one_line_error(*run_cli(capsys, "plan", "mlp_tiny", "--policy", str(tmp_path / "nope"))[::2])
    assert line.startswith("error: policy folder not found")


def test_pass_is_registered_and_usable_by_name(policy_dir, model_cache):
    model = model_cache("resnet_tiny")
    make = tvm.get_global_func(PASS_NAME)
    fused = tvm.transform.Sequential([make(str(policy_dir), "host")])(model.mod)
    assert any(gv.name_hint.startswith("fused_") for gv in fused.get_global_vars())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_pass_never_changes_numerics(name, policy_dir, model_cache, target):
    model = model_cache(name)
    learned = LearnedFusion(str(policy_dir), "host")
    fused = learned(model.mod)
    plan = learned.last_plan
    assert check_plan(model.graph, plan).legal and plan.fused_groups  # it did fuse something
    ex = compile_module(fused, target, make_schedule("naive"))[0]
    assert verify_executable(ex, model, "learned").ok


def test_planner_is_deterministic_and_legal(policy_dir, model_cache):
    graph = model_cache("gpt_tiny").graph
    a = LearnedPlanner(policy_dir).plan(graph)
    b = LearnedPlanner(policy_dir).plan(graph)
    assert a == b and check_plan(graph, a).legal


def test_compile_then_run_matches_onnxruntime(policy_dir, model_cache, tmp_path, capsys):
    model = model_cache("cnn_plain")
    lib = tmp_path / "cnn.so"
    assert main(["compile", "cnn_plain", "--policy", str(policy_dir), "--schedule", "rules", "-o", str(lib)]) == 0
    np.save(tmp_path / "x.npy", model.inputs[0])
    assert main(["run", str(lib), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")]) == 0
    expected, _ = reference_outputs(model)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected[0], rtol=1e-4, atol=1e-5)
    sidecar = json.loads((tmp_path / "cnn.so.json").read_text())
    assert sidecar["inputs"][0]["shape"] == list(model.inputs[0].shape)


def test_export_run_from_an_sb3_model(tmp_path):
    """A MaskablePPO in a run dir -> artifact whose network gives the actor's logits."""
    import gymnasium as gym

    import fusion_rl.env  # noqa: F401  (registers the env)
    from fusion_rl.export.exporter import export_run
    from fusion_rl.policy.policy import make_model
    from fusion_rl.policy.run_dir import save_checkpoint

    env = gym.make("fusion_rl/Fusion-v0", spec="tiny", reward="e2e", store=str(tmp_path / "s.sqlite"))
    model = make_model(env, {"n_steps": 8, "batch_size": 8,
                             "features_extractor_kwargs": {"hidden": 8, "heads": 2, "num_layers": 1, "hw_hidden": 4}},
                       seed=0)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(model, run / "final_model.zip")  # the zip and its safetensors + JSON snapshot
    (run / "config.json").write_text(json.dumps({"env_spec": "tiny", "seed": 0}))
    out = export_run(run, tmp_path / "policy")
    net, card = load_network(out)
    assert card["training"]["models"] == ["mlp_tiny", "cnn_plain"]
    assert card["decisions"] == {"max_mac_anchors": None, "group_shapes": [],  # envs/tiny.yaml has no cap
                                 "prefuse_epilogues": False}
    # The snapshot records the options training decided under; the run's config names its spec
    # by path, and a spec that changed since (here: env_kwargs that training did not use) is
    # refused rather than written into the card.
    from fusion_rl.policy.snapshot import load_snapshot

    assert load_snapshot(run / "final_model.json").decisions == DecisionOptions()
    (run / "config.json").write_text(json.dumps(
        {"env_spec": "tiny", "seed": 0, "env_kwargs": {"max_mac_anchors": 1, "render_mode": None}}))
    with pytest.raises(ConfigError, match="trained under decision options .* but the run's env spec"):
        export_run(run, tmp_path / "changed")
    # The card records the options the run's env was really built with: spec plus env_kwargs.
    options = {"max_mac_anchors": 1, "prefuse_epilogues": True}
    capped_env = gym.make("fusion_rl/Fusion-v0", spec="tiny", reward="e2e", store=str(tmp_path / "s.sqlite"), **options)
    capped = make_model(capped_env, {"n_steps": 8, "batch_size": 8, "features_extractor_kwargs": {
        "hidden": 8, "heads": 2, "num_layers": 1, "hw_hidden": 4}}, seed=0)
    capped_run = tmp_path / "capped_run"
    capped_run.mkdir()
    save_checkpoint(capped, capped_run / "final_model.zip")
    (capped_run / "config.json").write_text(json.dumps(
        {"env_spec": "tiny", "seed": 0, "env_kwargs": {**options, "render_mode": None}}))
    assert load_network(export_run(capped_run, tmp_path / "capped"))[1]["decisions"] == {
        "max_mac_anchors": 1, "group_shapes": [], "prefuse_epilogues": True}
    # The run recorded absolute paths (training resolves them); the card names them from the
    # repository, so it carries no folder of the exporting machine.
    from fusion_rl.paths import REPO_ROOT

    demo = str(REPO_ROOT / "experiments" / "learn_bench" / "demos" / "bench_regnetx.json")
    (run / "config.json").write_text(json.dumps(
        {"env_spec": str(REPO_ROOT / "envs" / "tiny.yaml"), "seed": 0, "warm_start": {"plans": [demo]}}))
    config = load_network(export_run(run, tmp_path / "portable"))[1]["training"]["config"]
    assert config["env_spec"] == "envs/tiny.yaml"
    assert config["warm_start"]["plans"] == ["experiments/learn_bench/demos/bench_regnetx.json"]
    (run / "config.json").write_text(json.dumps({"env_spec": "no_such_spec", "seed": 0}))
    with pytest.raises(ConfigError, match="decision options it trained under"):
        export_run(run, tmp_path / "unknown")
    obs, _ = env.reset(seed=0)
    t_obs = {k: torch.as_tensor(v)[None] for k, v in obs.items()}
    with torch.no_grad():
        dist = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0])
        expected = dist.distribution.logits
        got = torch.log_softmax(net(t_obs), dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shipped_cards_name_no_folder_of_a_machine():
    """Every path a shipped policy card records is repository-relative: an absolute one
    (``/home/...``, ``/tmp/...``) names the machine that exported it."""
    from fusion_rl.paths import REPO_ROOT

    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    cards = sorted((REPO_ROOT / "policies").glob("*/card.json"))
    assert cards
    for card in cards:
        found = [s for s in strings(json.loads(card.read_text())) if re.search(r"(^|\s)/[\w.]", s)]
        assert not found, f"{card.relative_to(REPO_ROOT)} records absolute paths: {found}"
