"""Fault injection: the measurement service survives crashes, hangs, kills and store failures,
and never loses a committed measurement.

Each worker fault costs exactly one measurement (recorded with status ``crashed``, ``timeout``
or ``failed``; injected faults are never stored); the next request runs in a fresh worker. A
store that cannot be written raises :class:`~fusion_rl.errors.StoreError` with a one-line
message, and every record committed before stays readable.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from fusion_rl.compiler import store as store_mod
from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.store import MeasurementStore
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.errors import StoreError
from fusion_rl.fusion.random_plans import random_plan
from fusion_rl.fusion.rules import make_plan

from conftest import one_line_error, run_cli

QUICK = TimingProtocol(repeat=2, min_repeat_ms=1, warmup=0)
#: Generous: the first job of a fresh worker pays for importing TVM and torch, which takes
#: tens of seconds on a loaded 2-core machine.
START_TIMEOUT_S = 180.0
HANG_TIMEOUT_S = 6.0


class _Plans:
    """Distinct legal plans of one model, so every "is the worker alive?" probe is a miss."""

    def __init__(self, model) -> None:
        self.model = model
        self.rng = np.random.default_rng(0)
        self.seen: set[str] = set()

    def fresh(self):
        for _ in range(200):
            plan = random_plan(self.model.graph, self.rng)
            if plan.hash not in self.seen:
                self.seen.add(plan.hash)
                return plan
        raise RuntimeError("ran out of distinct plans")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_cache):
    """One isolated Measurer, its store holding one committed record, for the whole module."""
    model = model_cache("mlp_tiny")
    path = tmp_path_factory.mktemp("faults") / "m.sqlite"
    store = MeasurementStore(path)
    m = Measurer("host", "naive", store=store, protocol=QUICK, isolate=True, timeout_s=START_TIMEOUT_S)
    plans = _Plans(model)
    baseline = m.measure(model, make_plan("tvm", model.mod, model.graph))
    assert baseline.status == "ok"
    yield m, model, store, plans, baseline
    m.close()
    store.close()


def _snapshot(store: MeasurementStore) -> dict:
    return {(r.key.plan_hash, r.key.provider): (r.status, r.times_ms) for r in store.records()}


def _survives(m: Measurer, model, plans: _Plans, store: MeasurementStore, before: dict) -> None:
    """Nothing committed was lost, and the next measurement runs (in a fresh worker if needed)."""
    assert {k: v for k, v in _snapshot(store).items() if k in before} == before
    m.timeout_s = START_TIMEOUT_S
    plan = plans.fresh()
    after = m.measure(model, plan)
    assert after.status == "ok", after.error
    assert store.get(after.key).times_ms == after.times_ms


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, status, words, kills_worker",
    [
        ("segfault", "crashed", ["SIGSEGV"], True),  # a build that segfaults
        ("exit", "crashed", ["exit code 3"], True),  # the worker exits mid-build
        ("raise", "failed", ["injected fault"], False),  # a Python exception inside TVM's call
        ("hang_build", "timeout", [f"no result within {HANG_TIMEOUT_S:.0f} s"], True),
        ("hang_run", "timeout", [f"no result within {HANG_TIMEOUT_S:.0f} s"], True),
    ],
)
def test_worker_fault_costs_one_measurement(setup, fault, status, words, kills_worker):
    m, model, store, plans, baseline = setup
    before = _snapshot(store)
    _survives(m, model, plans, store, _snapshot(store))  # warm worker: the hang timer is the fault's
    before = _snapshot(store)
    pid = m._worker._proc.pid
    plan = plans.fresh()
    if fault.startswith("hang"):
        m.timeout_s = HANG_TIMEOUT_S
    record = m.measure(model, plan, fault=fault)
    assert record.status == status and record.median_ms is None
    for w in words:
        assert w in (record.error or ""), record.error
    if kills_worker:
        assert m._worker is None  # killed and dropped; the next job starts a fresh one
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    else:
        assert m._worker is not None and m._worker._proc.pid == pid
    assert store.get(record.key) is None  # injected faults are never stored
    assert store.get(baseline.key).times_ms == baseline.times_ms
    _survives(m, model, plans, store, before)


@pytest.mark.slow
def test_worker_killed_mid_measurement(setup, tmp_path, monkeypatch):
    """SIGKILL from outside while the worker is timing (a hanging run stands in for a slow one)."""
    m, model, store, plans, baseline = setup
    marker = tmp_path / "hanging"
    monkeypatch.setenv("FUSION_RL_FAULT_MARKER", str(marker))
    m.close()  # the next worker starts with the marker variable in its environment
    _survives(m, model, plans, store, _snapshot(store))
    before = _snapshot(store)
    m.timeout_s = 120.0
    pid = m._worker._proc.pid
    result: dict = {}

    def job() -> None:
        result["record"] = m.measure(model, plans.fresh(), fault="hang_run")

    thread = threading.Thread(target=job)
    thread.start()
    # Wait for the worker to say it is inside the run (not for a guessed time).
    while not marker.exists():
        assert thread.is_alive(), result
        thread.join(timeout=0.05)
    assert marker.read_text() == "run"
    os.kill(pid, signal.SIGKILL)
    thread.join()
    record = result["record"]
    # "crashed" (not "timeout"): the kill was noticed at once, not after the 120 s timeout.
    assert record.status == "crashed" and "SIGKILL" in record.error
    _survives(m, model, plans, store, before)


@pytest.mark.slow
def test_store_write_failure_is_a_clear_error_and_keeps_records(setup):
    """Disk full on write: the measurement is lost (and said so), committed records are not."""
    m, model, store, plans, baseline = setup
    before = _snapshot(store)
    real = store._conn

    class FullDisk:
        """SQLite's own SQLITE_FULL error on every INSERT; reads pass through."""

        def execute(self, sql, *args):
            if sql.lstrip().upper().startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

        def executemany(self, sql, *args):
            raise sqlite3.OperationalError("database or disk is full")

        def __getattr__(self, name):
            return getattr(real, name)

    store._conn = FullDisk()  # type: ignore[assignment]
    try:
        plan = plans.fresh()
        with pytest.raises(StoreError, match="disk is full.*committed records are intact") as info:
            m.measure(model, plan)
        assert "\n" not in str(info.value)
    finally:
        store._conn = real
    assert _snapshot(store) == before and store.get(m.key(model, plan)) is None
    # Space is back: the same request is measured again (it was never stored) and committed.
    again = m.measure(model, plan)
    assert again.status == "ok" and store.get(again.key) is not None


def test_read_only_store_rejects_writes_keeps_records(tmp_path, model_cache):
    """A store whose file became read-only (SQLite's real readonly error) under a Measurer."""
    model = model_cache("mlp_tiny")
    plan = make_plan("tvm", model.mod, model.graph)
    with MeasurementStore(tmp_path / "m.sqlite") as store:
        with Measurer("host", "naive", store=store, protocol=QUICK, isolate=False) as m:
            first = m.measure(model, plan)
            store._conn.execute("PRAGMA query_only = 1")
            with pytest.raises(StoreError, match="permissions"):
                m.measure(model, make_plan("unfused", model.mod, model.graph))
            assert store.get(first.key).times_ms == first.times_ms and len(store) == 1
    with MeasurementStore(tmp_path / "m.sqlite") as reopened:
        assert reopened.get(first.key).times_ms == first.times_ms


def test_store_in_read_only_folder(tmp_path, monkeypatch):
    # Tests run as root here, where chmod does not stop writes: simulate the permission check.
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(store_mod.os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    with pytest.raises(StoreError, match="not writable"):
        MeasurementStore(ro / "m.sqlite")
    assert list(ro.iterdir()) == []


def test_cli_unwritable_store_is_one_line(capsys):
    # /proc refuses new folders even for root: a real OS error, not a simulation.
    argv = ["measure", "mlp_tiny", "--rules", "tvm", "--store", "/proc/fusion_rl/m.sqlite"]
    one_line_error(*run_cli(capsys, *argv)[::2], "measurement store")
