"""The measurement service: store hits and misses, verification, per-kernel times. Worker faults
(crash, exit, exception, hang) have their own module: test_faults.py."""

from __future__ import annotations

import pytest

from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.store import MeasurementStore
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.compiler.verify import reference_outputs
from fusion_rl.errors import IllegalPlanError, PlanMismatchError
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.rules import make_plan

QUICK = TimingProtocol.quick()


@pytest.fixture()
def store(tmp_path):
    with MeasurementStore(tmp_path / "m.sqlite") as s:
        yield s


def test_store_miss_then_hit(model_cache, store):
    model = model_cache("cnn_plain")
    plan = make_plan("tvm", model.mod, model.graph)
    with Measurer("host", "naive", store=store, protocol=QUICK, isolate=False) as m:
        first = m.measure(model, plan)
        second = m.measure(model, plan)
        assert first.status == "ok" and first.median_ms > 0 and first.num_kernels <= plan.num_groups
        assert second.times_ms == first.times_ms  # the stored record, not a new timing
        assert m.stats.to_dict() == {"hits": 1, "misses": 1, "failures": 0}
        other = m.measure(model, make_plan("unfused", model.mod, model.graph))
        assert other.key.plan_hash != first.key.plan_hash and m.stats.misses == 2
    assert len(store) == 2


def test_each_key_field_separates_records(model_cache, store):
    model = model_cache("cnn_plain")
    plan = make_plan("tvm", model.mod, model.graph)
    a = Measurer("sapphirerapids-t1", "naive", store=store, protocol=QUICK, isolate=False)
    b = Measurer("haswell-t1", "naive", store=store, protocol=QUICK, isolate=False)
    c = Measurer("haswell-t1", "naive", store=store, protocol=TimingProtocol(repeat=2, min_repeat_ms=1), isolate=False)
    keys = {m.key(model, plan) for m in (a, b, c)}
    assert len(keys) == 3


def test_wrong_output_is_a_status_not_a_latency(model_cache, store, monkeypatch):
    model = model_cache("mlp_tiny")
    expected, ref = reference_outputs(model)
    monkeypatch.setattr(model, "reference", ([e + 1.0 for e in expected], ref), raising=False)
    with Measurer("host", "naive", store=store, protocol=QUICK, isolate=False) as m:
        record = m.measure(model, make_plan("tvm", model.mod, model.graph))
    assert record.status == "wrong_output" and record.median_ms is None
    assert "wrong output" in record.error
    assert store.get(record.key).status == "wrong_output"  # remembered, not retried


def test_illegal_plan_raises_before_measuring(model_cache, store):
    model = model_cache("cnn_plain")
    groups = [[0, 2]] + [[i] for i in range(len(model.graph)) if i not in (0, 2)]
    with Measurer("host", "naive", store=store, protocol=QUICK, isolate=False) as m:
        with pytest.raises(IllegalPlanError):
            m.measure(model, FusionPlan.from_groups(groups, len(model.graph), model.fingerprint))
        assert m.stats.misses == 0 and len(store) == 0


def test_per_kernel_times_cover_every_kernel(model_cache):
    model = model_cache("cnn_plain")
    plan = make_plan("tvm", model.mod, model.graph)
    with Measurer("host", "naive", protocol=QUICK, isolate=False) as m:
        record = m.measure(model, plan, per_kernel=True)
    # Every launched kernel is timed; the reshape group became a view, not a kernel.
    assert len(record.kernel_times_ms) == record.num_kernels == plan.num_groups - 1
    assert all(t > 0 for t in record.kernel_times_ms.values())


def test_group_kernel_times_cover_the_plan(model_cache):
    from fusion_rl.compiler.kernels import group_kernel_times

    model = model_cache("cnn_plain")
    plan = make_plan("tvm", model.mod, model.graph)
    with Measurer("host", "naive", protocol=QUICK, isolate=False) as m:
        record = m.measure(model, plan, per_kernel=True)
    per_group = group_kernel_times(model.graph, plan, record.kernel_times_ms)
    assert set(per_group) == set(plan.groups)
    fused = [g for g in plan.groups if len(g) > 1]
    assert all(per_group[g] > 0 for g in fused)  # every fused kernel was found by name
    assert abs(sum(per_group.values()) - sum(record.kernel_times_ms.values())) < 1e-9


def test_identical_fused_kernels_share_their_time(model_cache):
    from fusion_rl.compiler.kernels import group_kernel_times

    model = model_cache("mlp_tiny")  # two identical matmul+add+relu layers
    plan = make_plan("tvm", model.mod, model.graph)
    with Measurer("host", "naive", protocol=QUICK, isolate=False) as m:
        record = m.measure(model, plan, per_kernel=True)
    per_group = group_kernel_times(model.graph, plan, record.kernel_times_ms)
    fused = [g for g in plan.groups if len(g) > 1]
    assert all(per_group[g] > 0 for g in fused)
    assert abs(sum(per_group.values()) - sum(record.kernel_times_ms.values())) < 1e-9


def test_group_times_split_deduplicated_fused_kernels(model_cache):
    from fusion_rl.compiler.kernels import group_kernel_times

    model = model_cache("mlp_tiny")
    plan = make_plan("tvm", model.mod, model.graph)  # (3,4,5) and (6,7,8) are identical
    times = group_kernel_times(model.graph, plan, {
        "fused_matmul_add_relu_n0": 1.0, "fused_matmul_add_relu_n3": 4.0, "fused_matmul_add_n9": 0.5,
    })
    assert times == {(0, 1, 2): 1.0, (3, 4, 5): 2.0, (6, 7, 8): 2.0, (9, 10): 0.5}


@pytest.mark.slow
def test_worker_dies_with_its_parent(tmp_path):
    """A killed caller leaves no orphan worker still tuning or timing."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent(
        """
        import sys, time
        from fusion_rl.compiler.worker import Worker
        w = Worker(1)
        print(w._proc.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail("the worker outlived its parent")


@pytest.mark.parametrize("isolate", [False, True])
def test_time_together_times_plans_repeat_by_repeat(model_cache, isolate):
    from fusion_rl.compiler.paired import head_to_head

    model = model_cache("mlp_tiny")
    plans = {r: make_plan(r, model.mod, model.graph) for r in ("unfused", "tvm")}
    with Measurer("host", "rules", store=None, protocol=QUICK, isolate=isolate) as m:
        result = m.time_together(model, list(plans.values()))
        assert result["status"] == "ok" and [len(t) for t in result["times_ms"]] == [QUICK.repeat] * 2
        assert all(t > 0 for times in result["times_ms"] for t in times)
        cmp = head_to_head(m, model, plans, rounds=2)
        assert not cmp.failures and len(cmp.pooled_ms["tvm"]) == 2 * QUICK.repeat
        # Every repeat carries the host's fork-join probe, aligned with the pooled repeats.
        assert len(result["fork_join_us"]) == QUICK.repeat and len(cmp.fork_join_us) == 2 * QUICK.repeat
        split = cmp.regime_speedups("unfused", "tvm")
        assert sum(v["repeats"] for v in split.values()) == 2 * QUICK.repeat
        assert m.stats.misses == 3
        other = model_cache("cnn_plain")
        with pytest.raises(PlanMismatchError):  # a plan of another model is refused up front
            m.time_together(model, [make_plan("tvm", other.mod, other.graph)])


def test_retry_remeasures_a_remembered_crash(model_cache, store):
    from fusion_rl.compiler.store import MeasurementRecord
    from fusion_rl.errors import ConfigError

    model = model_cache("mlp_tiny")
    plan = make_plan("tvm", model.mod, model.graph)
    with Measurer("host", "naive", store=store, protocol=QUICK, isolate=False) as m:
        # Failures live under the key plus the timeout (issue 12): a record there is remembered.
        store.put(MeasurementRecord(key=m.failure_key(m.key(model, plan)), status="crashed", error="worker died"))
        assert m.measure(model, plan).status == "crashed" and m.stats.misses == 0  # remembered
    with Measurer("host", "naive", store=store, protocol=QUICK, isolate=False, retry=("crashed",)) as m:
        assert m.measure(model, plan).status == "ok" and m.stats.misses == 1
        assert store.get(m.key(model, plan)).status == "ok"  # replaced
        assert m.measure(model, plan).status == "ok" and m.stats.hits == 1  # ok records are served
    with pytest.raises(ConfigError, match="retry"):
        Measurer("host", "naive", retry=("ok",))
