"""The kernel table: each distinct kernel timed once, plans estimated from it (no timed asserts)."""

from __future__ import annotations

import sqlite3

import pytest

from fusion_rl.compiler.build import num_kernels
from fusion_rl.compiler.kernel_table import KernelTable, plan_kernels, time_plan_kernels_hot_cold
from fusion_rl.compiler.store import MeasurementStore
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.errors import ConfigError, MeasurementError, StoreError
from fusion_rl.fusion.apply import apply_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.rules import make_plan

QUICK = TimingProtocol(repeat=2, min_repeat_ms=1, warmup=1)


def _table(path, schedule: str = "naive", isolate: bool = False) -> KernelTable:
    return KernelTable(path, target="host", schedule=schedule, protocol=QUICK, isolate=isolate)


def _distinct(model, plan) -> set[str]:
    return {s.kernel for s in plan_kernels(model, plan)}


def test_a_plan_that_shares_kernels_times_only_its_new_ones(model_cache, tmp_path):
    model = model_cache("mlp_tiny")
    unfused = make_plan("unfused", model.mod, model.graph)
    tvm_plan = make_plan("tvm", model.mod, model.graph)
    # The tvm plan's first fused group, every other op alone: one kernel the unfused plan lacks.
    first = tvm_plan.fused_groups[0]
    partial = FusionPlan.from_groups([first] + [(n,) for n in range(len(model.graph)) if n not in first],
                                     len(model.graph), model.fingerprint, "partial")
    assert len(_distinct(model, partial) - _distinct(model, unfused)) == 1
    with _table(tmp_path / "k.sqlite", isolate=True) as table:  # through the worker process
        assert table.ensure(model, unfused) == len(_distinct(model, unfused)) > 0
        assert table.ensure(model, unfused) == 0
        size = len(table)
        assert table.ensure(model, partial) == 1 and len(table) == size + 1
        assert table.timed == size + 1
        assert table.measurer.stats.misses == 2  # one worker job per plan with new kernels


def test_retime_keeps_each_kernels_faster_median_and_times_shared_kernels_once(model_cache, tmp_path):
    model = model_cache("mlp_tiny")
    unfused, tvm_plan = (make_plan(r, model.mod, model.graph) for r in ("unfused", "tvm"))
    with _table(tmp_path / "k.sqlite") as table:
        table.ensure(model, unfused)
        kernels = sorted(_distinct(model, unfused))
        # A first pass taken in a slow minute: every kernel 1000x slower than it runs.
        table._write("UPDATE kernels SET median_ms = median_ms * 1000", [()])
        slow = table.times(kernels)
        again: set[str] = set()
        assert table.retime(model, unfused, again) == len(kernels) and again == set(kernels)
        fast = table.times(kernels)
        assert all(fast[k] < slow[k] / 10 for k in kernels)
        # Kernels already re-timed in this pass are not timed again; the others are.
        assert table.retime(model, tvm_plan, again) == len(_distinct(model, tvm_plan) - set(kernels))
        # A pass slower than the kept one leaves the table as it was.
        table._write("UPDATE kernels SET median_ms = median_ms / 1000", [()])
        kept = table.times(kernels)
        table.retime(model, unfused)
        assert table.times(kernels) == kept


def test_estimate_is_kernel_sum_plus_calibrated_launch_cost(model_cache, tmp_path):
    model = model_cache("mlp_tiny")
    plans = [make_plan(r, model.mod, model.graph) for r in ("unfused", "tvm")]
    with _table(tmp_path / "k.sqlite") as table:
        before = [table.estimate(model, p) for p in plans]
        assert all(e.launch_ms == 0.0 and e.latency_ms == e.kernel_ms > 0 for e in before)
        assert not table.calibrated
        assert before[0].timed > 0 and before[0].launches == len(plan_kernels(model, plans[0]))
        times = table.times([s.kernel for s in plan_kernels(model, plans[1])])
        assert before[1].kernel_ms == pytest.approx(sum(times[s.kernel] for s in plan_kernels(model, plans[1])))
        # End-to-end times that are exactly kernels + 0.01 ms per launch calibrate to 0.01.
        samples = [(model, p, e.kernel_ms + 0.01 * e.launches) for p, e in zip(plans, before)]
        assert table.calibrate(samples) == pytest.approx(0.01)
        after = table.estimate(model, plans[1])
        assert after.timed == 0 and after.launch_ms == pytest.approx(0.01)
        assert after.latency_ms == pytest.approx(after.kernel_ms + 0.01 * after.launches)
        # A much slower sample with a large gap does not decide the cost (relative weighting).
        outlier = [(model, plans[0], before[0].kernel_ms + 0.01 * before[0].launches),
                   (model, plans[1], 1000.0)]
        assert table.calibrate(outlier) == pytest.approx(0.01, rel=1e-3)
        # Plans faster end to end than their kernels alone: no negative cost (it would make
        # the estimate of a plan of many small kernels negative); 0 is a calibration too.
        faster = [(model, p, 0.5 * e.kernel_ms) for p, e in zip(plans, before)]
        assert table.calibrate(faster) == 0.0 and table.calibrated
        table.calibrate(samples)
    with _table(tmp_path / "k.sqlite") as again:  # kept on disk: nothing to time, same calibration
        assert again.ensure(model, plans[0]) == 0 and again.launch_ms == pytest.approx(0.01)
    with _table(tmp_path / "k.sqlite", schedule="rules") as rules:  # another schedule, another key
        assert rules.launch_ms == 0.0 and not rules.calibrated
        assert rules.ensure(model, plans[1]) == len(_distinct(model, plans[1]))


def test_launches_are_the_kernels_a_build_runs(model_cache):
    model = model_cache("transformer_encoder")  # has reshapes, which become views
    for rules in ("unfused", "tvm"):
        plan = make_plan(rules, model.mod, model.graph)
        sites = plan_kernels(model, plan)
        assert len(sites) == num_kernels(apply_plan(model.mod, plan, model.graph))
        assert all(s.args and all(isinstance(d, str) for _, d in s.args) for s in sites)
    # The same kernel is the same hash in any plan: a shared PrimFunc, launched several times.
    unfused = plan_kernels(model, make_plan("unfused", model.mod, model.graph))
    assert len({s.kernel for s in unfused}) < len(unfused)


def test_a_plans_kernels_alone_hot_and_cold_cover_its_launches(model_cache):
    from fusion_rl.compiler.target import parse_target

    model = model_cache("transformer_encoder")
    plan = make_plan("unfused", model.mod, model.graph)  # shares kernels between launches
    sites = plan_kernels(model, plan)
    quick = TimingProtocol(repeat=2, min_repeat_ms=0, warmup=1)
    kernels = time_plan_kernels_hot_cold(model, plan, parse_target("host"), quick, rounds=1)
    assert sorted(k.name for k in kernels) == sorted({s.name for s in sites})
    assert sum(k.launches for k in kernels) == len(sites) and max(k.launches for k in kernels) > 1
    assert all(k.hot_ms > 0 and k.cold_ms > 0 for k in kernels)


def test_a_kernels_schedule_key_is_worked_out_once_per_kernel(model_cache):
    """A search lists the same kernels in hundreds of plans; the provider's kernel_key (a few
    ms of schedule analysis) runs once per distinct kernel, the rest read ``known_keys``."""
    from fusion_rl.compiler.schedules.rules import RulesSchedule

    model = model_cache("transformer_encoder")
    calls: list[str] = []

    def key(func):
        calls.append(func.script())
        return RulesSchedule().kernel_key(func)

    plans = [make_plan(r, model.mod, model.graph) for r in ("unfused", "tvm", "aggressive_1anchor", "tvm")]
    known: dict[str, str] = {}
    listed = [plan_kernels(model, plan, key, known) for plan in plans]
    distinct = {s.kernel for sites in listed for s in sites}
    assert len(calls) == len(distinct) == len(known) < sum(len(sites) for sites in listed)
    assert all(known[s.kernel] == s.schedule for sites in listed for s in sites)
    assert [s.schedule for s in plan_kernels(model, plans[2], RulesSchedule().kernel_key)] == \
        [s.schedule for s in listed[2]]


def test_bad_table_files_and_inputs(model_cache, tmp_path, monkeypatch):
    with MeasurementStore(tmp_path / "m.sqlite"):
        pass
    with pytest.raises(StoreError, match="not a fusion_rl kernel table"):
        _table(tmp_path / "m.sqlite")
    (tmp_path / "t.sqlite").write_text("not a database at all, " * 100)
    with pytest.raises(StoreError):
        _table(tmp_path / "t.sqlite")
    model = model_cache("mlp_tiny")
    with _table(tmp_path / "k.sqlite") as table:
        with pytest.raises(ConfigError):
            table.calibrate([])
        monkeypatch.setattr(table.measurer, "run_job", lambda job, m: {"status": "crashed", "error": "boom"})
        with pytest.raises(MeasurementError, match="crashed: boom"):
            table.ensure(model, make_plan("tvm", model.mod, model.graph))
        assert len(table) == 0
    assert sqlite3.connect(tmp_path / "k.sqlite").execute("PRAGMA application_id").fetchone()[0] != 0


@pytest.mark.parametrize("algo", ["random", "annealing"])
def test_search_over_the_table_spends_kernels_not_plans(model_cache, tmp_path, algo):
    """A search on the table evaluates plans by estimate; what it spends is kernels timed, and
    a second search over the same plans spends nothing."""
    from fusion_rl.baselines.search import run_search
    from fusion_rl.compiler.kernel_table import TableObjective

    model = model_cache("mlp_tiny")
    with _table(tmp_path / "k.sqlite") as table:
        objective = TableObjective(table)
        first = run_search(algo, model, objective, 12, seed=0)
        assert first.evaluations == objective.estimates == 12 and first.failures == 0
        assert first.measurements_spent == table.timed == len(table) > 0
        assert objective.cached(model, first.best_plan).median_ms == pytest.approx(first.best_ms)
        again = run_search(algo, model, TableObjective(table), 12, seed=0)
        assert again.measurements_spent == 0 and again.best_plan.hash == first.best_plan.hash
        assert again.best_ms == pytest.approx(first.best_ms)


def test_table_objective_reports_a_failed_kernel_as_a_failed_evaluation(model_cache, tmp_path, monkeypatch):
    from fusion_rl.compiler.kernel_table import TableObjective

    model = model_cache("mlp_tiny")
    plan = make_plan("tvm", model.mod, model.graph)
    with _table(tmp_path / "k.sqlite") as table:
        def broken(*args, **kwargs):
            raise MeasurementError("injected: kernel did not build")

        monkeypatch.setattr(table, "ensure", broken)
        objective = TableObjective(table)
        record = objective.measure(model, plan)
        assert record.status == "failed" and record.median_ms is None and "injected" in record.error
        assert objective.stats.failures == 1 and objective.cached(model, plan) is None


def test_each_kernel_is_kept_under_the_rules_version_that_last_changed_its_schedule(tmp_path):
    """``rules:v13`` rescheduled only pointwise -> grouped pairs (chain.py), and later versions
    other kernels: every other kernel here keeps its ``rules:v12`` row, so a table filled under
    v12 stays valid for them, while the pair keeps its v13 row."""
    import torch
    from torch import nn

    from fusion_rl.graph.model import load_model

    class ExpandGrouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand, self.grouped = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, 1, 1, groups=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.grouped(torch.relu(self.expand(x))))

    torch.manual_seed(0)
    path = tmp_path / "eg.onnx"
    # 16 x 16: no row under 16 wide, which v17 keys anew (test_pad_epilogue).
    torch.onnx.export(ExpandGrouped().eval(), (torch.randn(1, 8, 16, 16),), str(path), dynamo=False)
    model = load_model(str(path))
    pair, apart = (make_plan(r, model.mod, model.graph) for r in ("aggressive_shapes", "tvm"))
    with _table(tmp_path / "k.sqlite", schedule="rules") as table:
        assert table.key[1] == "rules:v20"
        # Apart, the 1x1 conv reads its input itself since v19; the grouped one keeps v12.
        assert sorted(s.schedule for s in table.kernels(model, apart)) == ["rules:v12", "rules:v19"]
        assert [s.schedule for s in table.kernels(model, pair)] == ["rules:v13"]
        timed = table.ensure(model, apart) + table.ensure(model, pair)
        assert timed == len(table) == len(_distinct(model, apart)) + 1
        assert table.ensure(model, apart) == table.ensure(model, pair) == 0
    rows = sqlite3.connect(tmp_path / "k.sqlite").execute(
        "SELECT provider, COUNT(*) FROM kernels GROUP BY provider ORDER BY provider").fetchall()
    assert rows == [("rules:v12", len(_distinct(model, apart)) - 1), ("rules:v13", 1), ("rules:v19", 1)]


def test_tables_of_one_process_share_a_plans_kernel_sites(model_cache, tmp_path, monkeypatch):
    """Each training seed opens tables of its own; the second lists a plan without lowering the
    model again, and reads the same rows, each under its kernel's own schedule key."""
    import fusion_rl.compiler.kernel_table as kernel_table

    model = model_cache("cnn_plain")
    plan = make_plan("aggressive_1anchor", model.mod, model.graph)
    with _table(tmp_path / "k.sqlite", schedule="rules") as first:
        first.ensure(model, plan)
        expected = first.estimate_known(model, plan)
        assert expected is not None
        listed = first.kernels(model, plan)

    def lowered_again(*args, **kwargs):
        raise AssertionError("the plan was lowered again")

    monkeypatch.setattr(kernel_table, "plan_kernels", lowered_again)
    with _table(tmp_path / "k.sqlite", schedule="rules") as second:
        assert second.kernels(model, plan) == listed
        assert second.estimate_known(model, plan) == expected
    with _table(tmp_path / "k.sqlite", schedule="naive") as other, pytest.raises(AssertionError):
        other.kernels(model, plan)  # another provider's kernels are listed anew
