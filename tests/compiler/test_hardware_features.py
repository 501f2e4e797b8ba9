"""Hardware features that can transfer (issue 11, item 3): robust measurement, normalisation
with the training targets' statistics stored in the card, the out-of-range warning, old cards,
and a multi-target env."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch

import fusion_rl.compiler.target as tgt
from fusion_rl.compiler.target import HardwareFeatures, hardware_features, parse_target
from fusion_rl.decisions import EDGE_DIM, NODE_DIM, DecisionOptions
from fusion_rl.env.fusion_env import FusionEnv
from fusion_rl.env.spec import EnvSpec
from fusion_rl.errors import ConfigError
from fusion_rl.export import LearnedPlanner, PolicyArtifactError
from fusion_rl.export.artifact import CARD_FILE, PolicyCard, content_hash, read_card, save_artifact
from fusion_rl.graph.features import feature_schema
from fusion_rl.io import read_yaml
from fusion_rl.paths import REPO_ROOT
from fusion_rl.policy.network import PolicyNetwork

TRAINING = ("x86-64-t1", "x86-64-t2", "haswell-t1")
FEATURES = dict(node_dim=NODE_DIM, edge_dim=EDGE_DIM, hw_dim=10, hidden=16, heads=2, num_layers=2, hw_hidden=8)


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """A deterministic micro-benchmark (rates grow with threads), an idle 2-core machine, and a
    fresh default cache (the env and the planner measure through it)."""
    calls: list[int] = []

    def fake(num_threads: int, seconds: float = 0.25) -> dict[str, float]:
        calls.append(num_threads)
        return {"peak_gflops": 150.0 * num_threads, "mem_bw_gbs": 12.0 + num_threads}

    monkeypatch.setattr(tgt.hardware, "run_microbenchmark", fake)
    monkeypatch.setattr(tgt.hardware, "host_num_threads", lambda: 2)
    monkeypatch.setattr(tgt.hardware.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.setenv("FUSION_RL_CACHE", str(tmp_path / "cache"))
    normalize = getattr(tgt, "normalize", None)
    if normalize is not None:
        monkeypatch.setattr(normalize, "_WARNED", set())  # each test sees its own warnings
    return calls


def _load(monkeypatch, value: float) -> None:
    monkeypatch.setattr(tgt.hardware.os, "getloadavg", lambda: (value, value, value))


def _raw(target: str) -> np.ndarray:
    return hardware_features(parse_target(target)).as_vector()


def _stats(targets=TRAINING):
    from fusion_rl.compiler.target import HardwareStats

    return HardwareStats.from_vectors({parse_target(t).key: _raw(t) for t in targets})


# ---- robust measurement -------------------------------------------------------------------


def test_measurement_under_load_is_repeated_and_never_cached(tmp_path, bench, monkeypatch):
    cache = tmp_path / "hw"
    _load(monkeypatch, 6.0)  # 6 runnable processes on 2 cores
    feats = hardware_features("x86-64-t2", cache_dir=cache)
    assert list(cache.glob("*.json")) == []  # neither the rates nor the target's features are cached
    assert len(bench) == 1 + tgt.hardware.LOADED_RETRIES  # measured again, best kept
    assert feats.measurement["loaded"] is True and feats.measurement["cached"] is False
    assert feats.measurement["load_1min"] == [6.0] * len(bench) and feats.measurement["cores"] == 2
    # The same process keeps its numbers (consistent observations) without measuring again.
    assert hardware_features("x86-64-t2", cache_dir=cache) == feats and len(bench) == 3
    # Once the machine is idle, a fresh measurement is taken and cached...
    _load(monkeypatch, 0.2)
    record = tgt.rates_record(2, cache, refresh=True)
    assert len(bench) == 4 and record["protocol"] == {**record["protocol"], "loaded": False, "cached": True, "attempts": 1}
    assert any(p.name.startswith("rates-t2") for p in cache.glob("*.json"))
    # ... and served from the cache afterwards.
    tgt.measured_rates(2, cache)
    assert len(bench) == 4


def test_a_measurement_under_load_is_shared_briefly_with_other_processes(tmp_path, bench, monkeypatch):
    """Processes of one run (xdist workers, CLI subprocesses) see the same load: the second gets
    the first one's numbers instead of paying the retries again, but only for LOADED_SHARE_S."""
    cache = tmp_path / "hw"
    _load(monkeypatch, 6.0)
    first = tgt.rates_record(2, cache)
    assert len(bench) == 3 and list(cache.glob("*.json")) == []
    monkeypatch.setattr(tgt.hardware, "_SESSION_RATES", {})  # what another process starts with
    assert tgt.rates_record(2, cache) == first and len(bench) == 3
    now = time.time()
    monkeypatch.setattr(tgt.hardware.time, "time", lambda: now + tgt.hardware.LOADED_SHARE_S + 1)
    monkeypatch.setattr(tgt.hardware, "_SESSION_RATES", {})
    tgt.rates_record(2, cache)
    assert len(bench) == 6  # too old to share: measured again
    # Once that share is old too, an idle machine's measurement is cached and replaces it.
    _load(monkeypatch, 0.2)
    monkeypatch.setattr(tgt.hardware.time, "time", lambda: now + 2 * (tgt.hardware.LOADED_SHARE_S + 1))
    monkeypatch.setattr(tgt.hardware, "_SESSION_RATES", {})
    assert tgt.rates_record(2, cache)["protocol"]["cached"] is True and len(bench) == 7
    assert not list(cache.glob("*.loaded"))


def test_loaded_means_the_benchmark_would_share_cores():
    assert not tgt.is_loaded(0.3, num_threads=2, cores=2)
    assert tgt.is_loaded(1.0, num_threads=2, cores=2)
    assert not tgt.is_loaded(1.0, num_threads=1, cores=2)  # one core left for the other work
    assert not tgt.is_loaded(None, num_threads=2, cores=2)  # unknown: nothing better is known


def test_cache_from_before_the_protocol_is_measured_again(tmp_path, bench):
    cache = tmp_path / "hw"
    hardware_features("x86-64-t1", cache_dir=cache)
    assert bench == [1]
    for path in cache.glob("*.json"):  # what the old code wrote: no protocol, a loaded rate
        data = json.loads(path.read_text())
        data.pop("cache_version"), data.pop("protocol", None), data.pop("measurement", None)
        path.write_text(json.dumps({**data, "peak_gflops": 77.0}))
    again = hardware_features("x86-64-t1", cache_dir=cache)
    assert bench == [1, 1] and again.measured_gflops == 150.0


# ---- normalisation, one implementation, through the card -----------------------------------


def _artifact(path, hardware=None, fuse_bias: float = 5.0):
    torch.manual_seed(0)
    net = PolicyNetwork(FEATURES, [16])
    with torch.no_grad():
        net.action.bias[1] += fuse_bias
    card = PolicyCard(
        architecture={"class": "fusion_rl.policy.network.PolicyNetwork", "kwargs": net.config},
        feature_schema=feature_schema(), observation={"max_nodes": 64, "max_edges": 128, "hw_dim": 10},
        decisions=DecisionOptions(max_mac_anchors=1).to_dict(), training={"models": ["test"]},
        hardware=hardware,
    )
    return save_artifact(path, net, card)


def _env_hardware(env: FusionEnv, target: str, stats=None) -> np.ndarray:
    seen = []
    env.decide(lambda obs, mask: seen.append(obs["hardware"].copy()) or 0, "mlp_tiny", target, hardware_stats=stats)
    return seen[0]


def test_normalisation_round_trips_through_the_card(tmp_path, bench):
    from fusion_rl.compiler.target.normalize import CLIP, MIN_SCALE
    from fusion_rl.export.artifact import hardware_stats

    stats = _stats()
    policy = _artifact(tmp_path / "p", stats.to_dict())
    card, _ = read_card(policy)
    assert card["format"] == 2 and card["hardware"]["targets"] == [parse_target(t).key for t in TRAINING]
    assert hardware_stats(card) == stats
    # The formula: z-score with a floor on the scale, clipped.
    raw = _raw("haswell-t1")
    want = np.clip((raw - np.asarray(stats.mean)) / np.maximum(np.asarray(stats.std), MIN_SCALE), -CLIP, CLIP)
    np.testing.assert_allclose(stats.normalize(raw), want, rtol=1e-5, atol=1e-6)
    # The plugin, the env deciding with the policy's statistics, and the env that computed them
    # at training time all feed the network the same vector.
    planner = LearnedPlanner(policy, "haswell-t1")
    np.testing.assert_array_equal(planner.hardware, stats.normalize(raw))
    training_env = FusionEnv("tiny", targets=list(TRAINING))
    assert training_env.hardware_stats == stats
    eval_env = FusionEnv("tiny")  # another spec: only the policy's statistics count
    for env, given in ((training_env, None), (eval_env, stats)):
        np.testing.assert_array_equal(_env_hardware(env, "haswell-t1", given), planner.hardware)
    # Over the training targets, every normalised feature has mean 0.
    normed = np.stack([stats.normalize(_raw(t)) for t in TRAINING])
    np.testing.assert_allclose(normed.mean(0), 0.0, atol=1e-5)


@pytest.mark.parametrize("edit, words", [
    (lambda h: h.update(method="minmax"), "method"),
    (lambda h: h.update(mean=h["mean"][:-1]), "mean must be a list of 10"),
    (lambda h: h.update(std=["1"] * 10), "std must be a list of 10 finite"),
    (lambda h: h["feature_names"].reverse(), "feature_names"),
    (lambda h: h.update(min=h["max"], max=h["min"]), "min <= max"),
])
def test_malformed_card_statistics_are_refused(tmp_path, bench, edit, words):
    hardware = _stats().to_dict()
    edit(hardware)
    policy = _artifact(tmp_path / "p", hardware)
    with pytest.raises(PolicyArtifactError, match=words):
        LearnedPlanner(policy, "x86-64-t1")


# ---- the out-of-range warning ---------------------------------------------------------------


def _hardware_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fusion_rl.hardware" and r.levelno == logging.WARNING]


def test_target_outside_the_training_range_warns_at_plan_time_and_in_evaluation(tmp_path, bench, caplog):
    stats = _stats(("x86-64-t1", "x86-64-t2"))  # SSE2 only
    policy = _artifact(tmp_path / "p", stats.to_dict())
    with caplog.at_level(logging.WARNING, logger="fusion_rl.hardware"):
        LearnedPlanner(policy, "x86-64-t2")
        assert _hardware_warnings(caplog) == []  # a training target is inside
        LearnedPlanner(policy, "haswell-t2")
        [message] = _hardware_warnings(caplog)
        assert "\n" not in message and message.startswith("warning: plan: target haswell-t2 is outside")
        assert "log_vector_lanes" in message and "llvm-x86-64-t1" in message
        caplog.clear()
        env = FusionEnv("tiny")
        _env_hardware(env, "haswell-t1", stats)
        [message] = _hardware_warnings(caplog)
        assert message.startswith("warning: evaluation: target haswell-t1 is outside")


def test_plan_with_policy_warns_once_for_an_outside_target(tmp_path, bench, caplog):
    from fusion_rl.cli import main

    policy = _artifact(tmp_path / "p", _stats(("x86-64-t1", "x86-64-t2")).to_dict())
    with caplog.at_level(logging.WARNING, logger="fusion_rl.hardware"):
        assert main(["plan", "mlp_tiny", "--policy", str(policy), "--target", "haswell-t2",
                     "-o", str(tmp_path / "plan.json")]) == 0
    [message] = _hardware_warnings(caplog)
    assert "haswell-t2" in message and "log_vector_lanes" in message


def test_evaluation_decides_with_the_policys_statistics(tmp_path, bench):
    from fusion_rl.compiler.target import HardwareStats
    from fusion_rl.evaluate import decide_plan

    class Recorder:  # SB3's predict, remembering what it was shown
        hardware_stats = _stats()
        seen: list[np.ndarray] = []

        def predict(self, obs, action_masks=None, deterministic=True):
            self.seen.append(obs["hardware"].copy())
            return np.array(0), None

    policy = Recorder()
    decide_plan(policy, FusionEnv("tiny"), "mlp_tiny", "x86-64-t2")
    np.testing.assert_array_equal(policy.seen[0], policy.hardware_stats.normalize(_raw("x86-64-t2")))
    assert not HardwareStats.identity().outside(np.full(10, 99.0))


# ---- old cards ------------------------------------------------------------------------------


def test_old_cards_load_with_raw_vectors(tmp_path, bench):
    from fusion_rl.export.artifact import hardware_stats

    # A card written without statistics (policies exported before them) is format 1; its
    # planner feeds the raw vector, which is what such a policy was trained on.
    old = _artifact(tmp_path / "old", hardware=None)
    card, _ = read_card(old)
    assert card["format"] == 1 and "hardware" not in card and hardware_stats(card).is_identity
    planner = LearnedPlanner(old, "x86-64-t1")
    assert planner.hardware_stats.is_identity
    np.testing.assert_array_equal(planner.hardware, _raw("x86-64-t1"))
    # A format-2 card must carry them.
    data = json.loads((old / CARD_FILE).read_text())
    data["format"] = 2
    data["content_hash"] = content_hash(data, (old / "weights.safetensors").read_bytes())
    (old / CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(PolicyArtifactError, match="no 'hardware' statistics"):
        LearnedPlanner(old, "x86-64-t1")


# ---- several training targets ---------------------------------------------------------------


def test_multi_target_env_draws_targets_and_sees_different_vectors(bench):
    spec = EnvSpec.resolve("tiny", targets=list(TRAINING), reward="model")
    env = FusionEnv(spec, cost_model=type("Flat", (), {"predict": lambda self, graph, plan: 1.0})())
    drawn = {env.reset(seed=seed)[1]["target"] for seed in range(30)}
    assert drawn == set(TRAINING)  # a target per episode, from the spec
    vectors = {t: env.reset(options={"model": "mlp_tiny", "target": t})[0]["hardware"] for t in TRAINING}
    for a in TRAINING:
        for b in TRAINING:
            assert a == b or not np.allclose(vectors[a], vectors[b]), (a, b)
    stats = env.hardware_stats
    assert stats.targets == tuple(parse_target(t).key for t in TRAINING)
    # Normalised: features constant over the targets (caches, cores) are 0, the rest centred.
    np.testing.assert_allclose(np.mean(list(vectors.values()), axis=0), 0.0, atol=1e-5)
    constant = [i for i, s in enumerate(stats.std) if s == 0]
    assert constant and all(v[i] == 0 for v in vectors.values() for i in constant)


def test_the_transfer_experiment_holds_out_an_unseen_combination():
    if REPO_ROOT is None:
        pytest.skip("needs the repository's envs/ and experiments/")
    spec = EnvSpec.from_yaml(REPO_ROOT / "envs" / "transfer_hw.yaml")
    config = read_yaml(REPO_ROOT / "experiments" / "transfer_hw" / "config.yaml", "experiment config")
    train = read_yaml(REPO_ROOT / config["train_config"], "train config")
    assert (REPO_ROOT / train["env_spec"]).resolve() == (REPO_ROOT / "envs" / "transfer_hw.yaml").resolve()
    specs = [parse_target(t) for t in spec.targets]
    assert len(specs) >= 3
    assert len({s.num_threads for s in specs}) >= 2 and len({s.vector_lanes for s in specs}) >= 2
    flags, _ = tgt.read_cpuinfo()
    for held in map(parse_target, config["heldout_targets"]):
        assert held.key not in {s.key for s in specs}
        # Each value was seen in training; the combination was not.
        assert held.num_threads in {s.num_threads for s in specs}
        assert held.vector_lanes in {s.vector_lanes for s in specs}
        assert (held.vector_lanes, held.num_threads) not in {(s.vector_lanes, s.num_threads) for s in specs}
    if flags:  # every target runs here (no SIGILL): the experiment can be measured on this machine
        assert all(tgt.runs_on(str(s.mcpu), flags) for s in [*specs, *map(parse_target, config["heldout_targets"])])


def test_snapshot_and_card_record_the_training_statistics(tmp_path, bench):
    """Smoke test of what training writes: the model's env computes the statistics over its
    targets, the snapshot stores them, evaluation reads them, export puts them in the card."""
    from fusion_rl.export.exporter import export_run
    from fusion_rl.policy.policy import PPOConfig, make_model
    from fusion_rl.policy.snapshot import load_snapshot, save_snapshot
    from fusion_rl.policy.training import TrainConfig, make_env

    spec_path = tmp_path / "multi.yaml"
    spec_path.write_text("models: [mlp_tiny, cnn_plain]\ntargets: [x86-64-t1, x86-64-t2, haswell-t1]\n"
                         "schedule: naive\nmax_nodes: 64\nmax_edges: 128\nisolate: false\n")
    config = TrainConfig.from_dict({"env_spec": str(spec_path), "seed": 0,
                                    "ppo": {"n_steps": 8, "batch_size": 8, "net_arch": [8],
                                            "features_extractor_kwargs": {"hidden": 8, "heads": 2,
                                                                          "num_layers": 1, "hw_hidden": 4}}})
    env = make_env(config)
    model = make_model(env, config.ppo, seed=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    _, description = save_snapshot(model, run / "final_model.zip")
    want = env.unwrapped.hardware_stats
    assert json.loads(description.read_text())["hardware_stats"] == want.to_dict()
    assert load_snapshot(description).hardware_stats == want
    card, _ = read_card(export_run(run, tmp_path / "policy"))
    assert card["format"] == 2 and card["hardware"] == want.to_dict()
    assert len(card["hardware"]["targets"]) == 3
    env.close()
    with pytest.raises(ConfigError, match="hardware_stats"):
        data = json.loads(description.read_text())
        data["hardware_stats"]["std"] = [-1.0] * 10
        description.write_text(json.dumps(data))
        load_snapshot(description)
