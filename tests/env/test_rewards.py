"""The rewards (:mod:`fusion_rl.env.rewards`) on their own, with a scripted measurer: no TVM
build, so every number below is exact (``tests/env/test_env.py`` checks them inside FusionEnv)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from fusion_rl.compiler.store import MeasurementKey, MeasurementRecord, MeasurementStore
from fusion_rl.env.plan_index import PlanIndex
from fusion_rl.env.rewards import (
    FAILURE_PENALTY,
    E2EReward,
    KernelReward,
    ModelReward,
    RewardContext,
    TableReward,
    make_reward,
)
from fusion_rl.errors import ConfigError, MeasurementError
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.opgraph import OpEdge, OpGraph, OpNode


def chain() -> OpGraph:
    """0 -> 1 -> 2, each node its own PrimFunc (``k0``, ``k1``, ``k2``)."""
    nodes = [OpNode(i, f"v{i}", f"k{i}", "add", 0, ((1, 4),), "float32", 4.0, 32, 16, 0) for i in range(3)]
    return OpGraph(nodes, [OpEdge(0, 1, 0, 16), OpEdge(1, 2, 0, 16)], outputs=[2], name="chain")


TVM = FusionPlan.singletons(3, name="tvm")
PAIR = FusionPlan.from_groups([[0, 1], [2]], 3)  # kernel ``fused_..._n0`` runs group (0, 1)
ALL = FusionPlan.from_groups([[0, 1, 2]], 3)


class ScriptedMeasurer:
    """What the rewards use of :class:`~fusion_rl.compiler.measure.Measurer`: ``key``,
    ``measure``, ``schedule``, ``store``; each plan's outcome is given by its hash."""

    schedule = "naive"

    def __init__(self, outcomes: dict[str, dict], store=None) -> None:
        self.outcomes = outcomes
        self.store = store
        self.measured: list[str] = []

    def key(self, model, plan: FusionPlan) -> MeasurementKey:
        return MeasurementKey(model.fingerprint, plan.hash, "cpu-t2", "naive", 0, "v1", "n1r3")

    def measure(self, model, plan: FusionPlan, per_kernel: bool = False) -> MeasurementRecord:
        self.measured.append(plan.hash)
        fields = dict(self.outcomes[plan.hash])
        if not per_kernel:
            fields.pop("kernel_times_ms", None)
        return MeasurementRecord(key=self.key(model, plan), **fields)


def ok(ms: float, **kernels: float) -> dict:
    return {"status": "ok", "median_ms": ms, "times_ms": [ms], "repeats": 1, "kernel_times_ms": kernels or None}


def context(measurer=None, fingerprint: str = "fp") -> RewardContext:
    model = SimpleNamespace(name="chain", fingerprint=fingerprint, graph=chain())
    return RewardContext(model=model, target=SimpleNamespace(name="cpu", key="cpu-t2"), tvm_plan=TVM,
                         measurer=measurer)


OUTCOMES = {
    TVM.hash: ok(10.0, k0=1.0, k1=2.0, k2=3.0),
    PAIR.hash: ok(8.0, fused_add_add_n0=2.5, k2=3.0),
    ALL.hash: {"status": "wrong_output", "error": "max abs diff 3.0"},
}


# ---- e2e --------------------------------------------------------------------------------------


def test_e2e_is_minus_log_of_the_latency_ratio_and_measures_the_reference_once():
    m = ScriptedMeasurer(OUTCOMES)
    reward, ctx = E2EReward(), context(m)
    reward.start(ctx)
    first, info = reward.terminal(ctx, PAIR, shaped_return=0.0)
    assert first == pytest.approx(-math.log(8.0 / 10.0), abs=1e-12)
    assert info["speedup_vs_tvm"] == pytest.approx(10.0 / 8.0) and info["e2e_reward"] == first
    assert info["latency_ms"] == 8.0 and info["reference_latency_ms"] == 10.0
    again, _ = reward.terminal(ctx, PAIR, shaped_return=0.25)
    assert again == pytest.approx(first - 0.25)  # the shaping already paid is taken back
    assert m.measured == [TVM.hash, PAIR.hash, PAIR.hash]  # the reference once, however often asked


def test_e2e_reference_is_per_context():
    m = ScriptedMeasurer(OUTCOMES)
    reward = E2EReward()
    reward.start(context(m, "fp-a"))
    reward.start(context(m, "fp-b"))
    reward.start(context(m, "fp-a"))
    assert m.measured == [TVM.hash, TVM.hash]


def test_e2e_failed_plan_gets_the_penalty_and_its_error():
    reward, ctx = E2EReward(failure_penalty=-3.0), context(ScriptedMeasurer(OUTCOMES))
    value, info = reward.terminal(ctx, ALL, shaped_return=0.5)
    assert value == -3.0 - 0.5 and info["e2e_reward"] == -3.0
    assert info["measurement_status"] == "wrong_output" and info["measurement_error"] == "max abs diff 3.0"
    assert info["speedup_vs_tvm"] is None
    assert E2EReward().failure_penalty == FAILURE_PENALTY


def test_e2e_reference_failure_is_an_environment_error():
    m = ScriptedMeasurer({TVM.hash: {"status": "crashed", "error": "segfault"}})
    with pytest.raises(MeasurementError, match="reference plan .*'chain'.*crashed: segfault"):
        E2EReward().start(context(m))


# ---- kernel -----------------------------------------------------------------------------------


def test_kernel_shaping_is_the_time_saved_by_a_merge():
    m = ScriptedMeasurer(OUTCOMES)
    reward, ctx = KernelReward(), context(m)
    reward.start(ctx)  # learns the singletons' times from the reference's kernels
    assert [reward.group_latency(ctx, (i,)) for i in range(3)] == [1.0, 2.0, 3.0]
    assert reward.on_merge(ctx, (0,), (1,)) == 0.0  # (0, 1) not measured yet
    value, info = reward.terminal(ctx, PAIR, shaped_return=0.0)
    assert reward.group_latency(ctx, (1, 0)) == 2.5
    assert reward.on_merge(ctx, (0,), (1,)) == pytest.approx((1.0 + 2.0 - 2.5) / 10.0)
    assert reward.on_merge(ctx, (0, 1), (2,)) == 0.0  # (0, 1, 2) failed: never learned
    # The shaped rewards plus the terminal one add up to the e2e reward.
    shaped = reward.on_merge(ctx, (0,), (1,))
    value, info = reward.terminal(ctx, PAIR, shaped_return=shaped)
    assert shaped + value == pytest.approx(info["e2e_reward"]) == pytest.approx(-math.log(0.8))


def test_kernel_table_fills_from_the_store_through_the_plan_index(tmp_path):
    """A later process knows a group's time from the store, without measuring its plan again."""
    # An earlier process: its plans go into the index (the reward does that), its records into
    # the store (the measurer does that; done by hand here).
    store = MeasurementStore(tmp_path / "m.sqlite")
    first = KernelReward(plan_index=PlanIndex(tmp_path / "m.plans.sqlite"))
    first.start(context(ScriptedMeasurer(OUTCOMES, store)))
    first.terminal(context(ScriptedMeasurer(OUTCOMES, store)), PAIR, shaped_return=0.0)
    m = ScriptedMeasurer(OUTCOMES)
    for plan in (TVM, PAIR):
        store.put(m.measure(context().model, plan, per_kernel=True))

    later = ScriptedMeasurer(OUTCOMES, store)
    reward, ctx = KernelReward(plan_index=PlanIndex(tmp_path / "m.plans.sqlite")), context(later)
    reward.start(ctx)
    assert reward.group_latency(ctx, (0, 1)) == 2.5
    assert later.measured == [TVM.hash]  # the reference only
    # Another model's records are not this model's group times.
    other = context(ScriptedMeasurer(OUTCOMES, store), fingerprint="other")
    reward.start(other)
    assert reward.group_latency(other, (0, 1)) is None


# ---- model ------------------------------------------------------------------------------------


class ScriptedCostModel:
    def __init__(self, predictions: dict[str, float]) -> None:
        self.predictions = predictions
        self.calls: list[str] = []

    def predict(self, graph, plan: FusionPlan) -> float:
        self.calls.append(plan.hash)
        return self.predictions[plan.hash]


def test_model_reward_uses_predictions_and_never_measures():
    cost = ScriptedCostModel({TVM.hash: 4.0, PAIR.hash: 2.0, ALL.hash: -1.0})
    reward, ctx = ModelReward(cost), context(measurer=None)
    reward.start(ctx)
    value, info = reward.terminal(ctx, PAIR, shaped_return=0.0)
    assert value == pytest.approx(math.log(2.0)) and info["speedup_vs_tvm"] == 2.0
    assert info["measurement_status"] == "predicted"
    value, info = reward.terminal(ctx, ALL, shaped_return=0.0)
    assert value == FAILURE_PENALTY and "-1.0" in info["measurement_error"]
    assert cost.calls == [TVM.hash, PAIR.hash, ALL.hash]  # the reference predicted once


@pytest.mark.parametrize("bad", [0.0, -2.0, math.nan, math.inf])
def test_model_reward_refuses_a_bad_reference_prediction(bad):
    with pytest.raises(MeasurementError, match="reference plan of 'chain'"):
        ModelReward(ScriptedCostModel({TVM.hash: bad})).start(context())


# ---- make_reward ------------------------------------------------------------------------------


def test_make_reward_by_mode(tmp_path):
    index = PlanIndex(tmp_path / "i.sqlite")
    assert type(make_reward("e2e", failure_penalty=-2.0)) is E2EReward
    kernel = make_reward("kernel", plan_index=index)
    assert type(kernel) is KernelReward and kernel.plan_index is index
    cost = ScriptedCostModel({})
    model = make_reward("model", cost_model=cost)
    assert type(model) is ModelReward and model.cost_model is cost and not model.needs_measurer
    with pytest.raises(ConfigError, match="needs a cost model"):
        make_reward("model")
    with pytest.raises(ConfigError, match="needs open_table"):
        make_reward("table")
    table = make_reward("table", open_table=lambda target: None)
    assert type(table) is TableReward and not table.needs_measurer and table.spent == 0
    with pytest.raises(ConfigError, match="unknown reward 'latency'; choose one of e2e, kernel, model, table"):
        make_reward("latency")


def test_table_reward_estimates_from_the_kernel_table_and_times_only_new_kernels(tmp_path, caplog):
    """reward: table on a real tiny model: the return is -log(est(plan) / est(tvm plan)) from
    the kernel table beside the store, a replay of a known plan times nothing, and what was
    timed is what the episode reports as spent. The new table has no per-launch cost, and the
    reward says so once."""
    from fusion_rl.compiler.kernel_table import KernelTable
    from fusion_rl.env.fusion_env import FusionEnv
    from fusion_rl.fusion.rules import make_plan

    env = FusionEnv("tiny", store=str(tmp_path / "m.sqlite"), reward="table", models=["mlp_tiny"])
    try:
        def episode(plan):
            env.reset(options={"model": "mlp_tiny"})
            for action in env.actions_for_plan(plan):
                *_, reward, terminated, _, info = env.step(action)
            assert terminated
            return reward, info

        tvm_reward, tvm_info = episode(env.tvm_plan("mlp_tiny"))
        model = env._current().model
        assert tvm_reward == pytest.approx(0.0) and tvm_info["measurement_status"] == "estimated"
        unfused = make_plan("unfused", model.mod, model.graph)
        reward, info = episode(unfused)
        assert info["measurements"] == info["kernels_timed"] > 0  # the unfused kernels are new
        assert tvm_info["measurements"] > tvm_info["kernels_timed"] == 0  # the reference's, at reset
        assert env.measurements_spent == tvm_info["measurements"] + info["measurements"]
        again, info = episode(unfused)
        assert again == reward and info["kernels_timed"] == 0 == info["measurements"]
        assert [r.levelname for r in caplog.records if "no per-launch cost" in r.getMessage()] == ["WARNING"]
    finally:
        env.close()
    with KernelTable(tmp_path / "kernels.sqlite", "host", "naive") as table:
        expected = -math.log(table.estimate(model, unfused).latency_ms / table.estimate(model, env.tvm_plan("mlp_tiny")).latency_ms)
        assert table.timed == 0  # every kernel was kept on disk
    assert reward == pytest.approx(expected)


def test_table_reward_pays_each_shape_at_the_fuse_that_forms_it(tmp_path):
    """shape_credit on a real tiny model with pointwise -> depthwise pairs: replaying the plan
    that forms every pair pays, at the forming fuses and nowhere else, each instance's worth
    priced on the one-anchor plan by the kernel table, and the terminal reward takes it back,
    so the return is the plain table reward's."""
    from fusion_rl.compiler.kernel_table import KernelTable
    from fusion_rl.env.fusion_env import FusionEnv
    from fusion_rl.fusion.group_shapes import shape_instances
    from fusion_rl.fusion.plan_space import form_shape
    from fusion_rl.fusion.rules import make_plan

    spec = dict(store=str(tmp_path / "m.sqlite"), reward="table", models=["mobilenet_tiny"], max_nodes=256,
                max_edges=512, max_mac_anchors=1, group_shapes=["pointwise_depthwise"])

    def episode(env, plan):
        env.reset(options={"model": "mobilenet_tiny"})
        rewards = []
        for action in env.actions_for_plan(plan):
            *_, reward, terminated, _, info = env.step(action)
            rewards.append(reward)
        assert terminated
        return rewards, info

    credited, plain = FusionEnv("tiny", shape_credit=True, **spec), FusionEnv("tiny", **spec)
    try:
        credited.reset(options={"model": "mobilenet_tiny"})
        model = credited._current().model
        base = make_plan("aggressive_1anchor", model.mod, model.graph)
        instances = shape_instances(model.graph, "pointwise_depthwise")
        assert len(instances) >= 2
        every_pair = base
        for instance in instances:
            every_pair = form_shape(model.graph, every_pair, "pointwise_depthwise", instance) or every_pair
        rewards, info = episode(credited, every_pair)
        plain_rewards, plain_info = episode(plain, every_pair)
    finally:
        credited.close()
        plain.close()
    with KernelTable(tmp_path / "kernels.sqlite", "host", "naive") as table:
        base_ms = table.estimate(model, base).latency_ms
        worth = sorted(-math.log(table.estimate(model, form_shape(model.graph, base, "pointwise_depthwise", i))
                                 .latency_ms / base_ms) for i in instances)
        assert table.timed == 0  # the reward priced them on this table
    paid = sorted(r for r in rewards[:-1] if r != 0.0)
    assert paid == pytest.approx(worth)
    assert all(r == 0.0 for r in plain_rewards[:-1])
    assert sum(rewards) == pytest.approx(plain_rewards[-1]) == pytest.approx(info["e2e_reward"])
    assert info["e2e_reward"] == pytest.approx(plain_info["e2e_reward"])


def test_shape_credit_needs_the_table_reward_and_shapes():
    from fusion_rl.env.spec import EnvSpec

    with pytest.raises(ConfigError, match="'shape_credit' needs 'reward: table'"):
        EnvSpec(models=("mlp_tiny",), reward="e2e", max_mac_anchors=1, group_shapes=("pointwise_depthwise",),
                shape_credit=True)
    with pytest.raises(ConfigError, match="'shape_credit' needs 'reward: table'"):
        EnvSpec(models=("mlp_tiny",), reward="table", shape_credit=True)
    with pytest.raises(ConfigError, match="shape credit is priced from the kernel table"):
        make_reward("e2e", shape_credit=("pointwise_depthwise",))
