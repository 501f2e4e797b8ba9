"""CompilerGym's conveniences on FusionEnv: validate(), a dataset with versions, an IR view,
and action_masks() on the env that gym.make returns."""

from __future__ import annotations

import re

import gymnasium as gym
import pytest

import fusion_rl.env  # noqa: F401  registers the env
from fusion_rl.compiler.store import MeasurementRecord
from fusion_rl.env import ENV_ID
from fusion_rl.errors import UnknownModelError
from fusion_rl.fusion.apply import group_function_name
from fusion_rl.graph import zoo
from fusion_rl.graph.datasets import zoo_dataset


@pytest.fixture
def make(tmp_path):
    envs = []

    def factory(**kwargs):
        env = gym.make(ENV_ID, spec="tiny", store=str(tmp_path / "store.sqlite"), **kwargs)
        envs.append(env)
        return env

    yield factory
    for env in envs:
        env.close()


def replay(env, plan) -> dict:
    info = {}
    for action in env.actions_for_plan(plan):
        *_, info = env.step(action)
    return info


def test_action_masks_through_gym_make_wrappers(make):
    from sb3_contrib.common.maskable.utils import get_action_masks

    env = make()
    env.reset(seed=0, options={"model": "mlp_tiny"})
    assert isinstance(env, gym.Wrapper) and type(env.unwrapped).__name__ == "FusionEnv"
    masks = env.action_masks()  # on the made env itself, no .unwrapped
    assert masks.dtype == bool and masks.tolist() == env.unwrapped.action_masks().tolist()
    # Under further wrappers the documented way, and sb3-contrib's, still reach it.
    outer = gym.wrappers.RecordEpisodeStatistics(env)
    assert outer.get_wrapper_attr("action_masks")().tolist() == masks.tolist()
    assert get_action_masks(outer).tolist() == masks.tolist()
    assert env.current_plan().hash == env.unwrapped.current_plan().hash


def test_validate_reverifies_the_current_plan(make, monkeypatch):
    from fusion_rl.compiler.verify import reference_outputs

    env = make()
    env.reset(seed=0, options={"model": "mlp_tiny"})
    replay(env, env.tvm_plan())
    result = env.validate()
    assert result.okay() and result.legal and result.status == "ok", str(result)
    assert result.plan_hash == env.tvm_plan().hash and str(result).startswith("VALID")

    # A fresh build is compared with the reference, not served from the store: corrupt the
    # reference and the same plan no longer validates.
    model = env.unwrapped.model("mlp_tiny")
    outputs, name = reference_outputs(model)
    monkeypatch.setattr(model, "reference", ([o * 2.0 + 1.0 for o in outputs], name), raising=False)
    result = env.validate()
    assert not result.okay() and result.status == "wrong_output", str(result)


def test_validate_checks_the_stored_latency(make):
    from fusion_rl.env.validation import validate_plan

    env = make()
    env.reset(seed=0, options={"model": "mlp_tiny"})
    replay(env, env.tvm_plan())
    fusion = env.unwrapped
    model, plan = fusion.model("mlp_tiny"), fusion.current_plan()
    stored = fusion.measurer(fusion._target_name).cached(model, plan)
    assert stored is not None and stored.status == "ok"
    target = fusion._target_spec(fusion._target_name)
    # A latency a second off (a tampered or mis-keyed record) does not hold; the real one is
    # checked. Shifted, not scaled: the stored IQR stays as measured, and a fresh IQR under two
    # test workers (tens of ms at worst) cannot make a band that wide.
    tampered = MeasurementRecord.from_times(stored.key, [t + 1000.0 for t in stored.times_ms])
    bad = validate_plan(model, plan, target, fusion.config, stored=tampered, check_latency=True)
    assert bad.status == "ok" and bad.latency is not None and not bad.latency.holds
    assert not bad.okay() and "DOES NOT HOLD" in str(bad)
    checked = env.validate(check_latency=True)
    assert checked.latency is not None and checked.latency.old_ms == stored.median_ms


def test_render_ir_prints_the_fused_relax(make, capsys):
    with pytest.raises(Exception, match="render_mode"):
        make(render_mode="svg")
    env = make(render_mode="ir")
    env.reset(seed=0, options={"model": "cnn_plain"})
    unfused = env.render()
    info = replay(env, env.tvm_plan())
    fused = env.render()
    printed = capsys.readouterr().out
    assert fused in printed and unfused in printed
    assert "def main(" in fused and "R.call_tir" in fused
    graph = env.unwrapped.model("cnn_plain").graph
    groups = [g for g in info["plan"].groups if len(g) > 1]
    assert groups
    for g in groups:  # every fused group is a kernel of the printed module
        assert group_function_name([graph.nodes[i].op for i in g], min(g)) in fused
    calls = lambda text: len(re.findall(r"R\.call_tir\(", text.split("def main(")[1]))  # noqa: E731
    assert calls(fused) == len(info["plan"].groups) < calls(unfused)


def test_dataset_lists_every_zoo_model_with_a_version(make):
    env = make()
    ds = env.dataset
    registry = [e.name for e in zoo.list_models()]
    assert ds.names == registry and len(ds) == len(registry)  # bench models too, when registered
    for bench in ds:
        if bench.needs is None:
            assert re.fullmatch(r"[0-9a-f]{16}", bench.version), bench
        assert bench.uri == f"zoo://{bench.suite}/{bench.name}@{bench.version or 'unavailable'}"
    torch_model = next(b for b in ds if b.source == "torch")
    assert zoo_dataset()[torch_model.name].version == torch_model.version  # stable
    assert zoo_dataset(seed=1)[torch_model.name].version != torch_model.version
    assert set(ds.suites) == {getattr(e, "suite", "tiny") for e in zoo.list_models()}
    with pytest.raises(UnknownModelError, match="not in the zoo dataset"):
        ds["no_such_model"]
    assert ds.load("mlp_tiny").name == "mlp_tiny"
