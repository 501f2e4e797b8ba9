"""The plan index (:mod:`fusion_rl.env.plan_index`): plan hash -> groups, beside the store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fusion_rl.env.plan_index import PlanIndex, plan_index_path
from fusion_rl.errors import StoreError
from fusion_rl.fusion.plan import FusionPlan


def _plan() -> FusionPlan:
    return FusionPlan.from_groups([[0, 1], [2], [3, 4]], 5, fingerprint="fp-five", name="ignored")


def test_sidecar_path_sits_beside_the_store():
    assert plan_index_path("runs/x/measurements.sqlite") == Path("runs/x/measurements.plans.sqlite")
    assert plan_index_path(Path("/a/b.db")) == Path("/a/b.plans.sqlite")


def test_a_plan_survives_a_new_connection(tmp_path):
    plan = _plan()
    index = PlanIndex(tmp_path / "sub" / "i.sqlite")  # creates the folder
    index.put(plan)
    index.put(plan)  # idempotent
    index.close()
    got = PlanIndex(tmp_path / "sub" / "i.sqlite").get_many([plan.hash])
    assert list(got) == [plan.hash]
    back = got[plan.hash]
    assert back.groups == plan.groups and back.num_nodes == 5 and back.fingerprint == "fp-five"
    assert back.hash == plan.hash
    rows = sqlite3.connect(tmp_path / "sub" / "i.sqlite").execute("SELECT COUNT(*) FROM plans").fetchone()
    assert rows == (1,)


def test_get_many_returns_only_known_plans_and_tolerates_repeats(tmp_path):
    index = PlanIndex(tmp_path / "i.sqlite")
    known = _plan()
    index.put(known)
    got = index.get_many([known.hash, "0123456789abcdef", known.hash])
    assert set(got) == {known.hash}
    assert index.get_many([]) == {}


def test_get_many_reads_past_the_parameter_chunk(tmp_path):
    """More hashes than one query's chunk (500): every known plan comes back."""
    index = PlanIndex(tmp_path / "i.sqlite")
    plans = [FusionPlan.singletons(n) for n in range(1, 1202)]
    for plan in plans:
        index.put(plan)
    got = index.get_many(p.hash for p in plans)
    assert len(got) == len(plans)
    assert all(got[p.hash].num_nodes == p.num_nodes for p in plans)


def test_close_then_use_reopens(tmp_path):
    index = PlanIndex(tmp_path / "i.sqlite")
    index.close()
    index.close()  # idempotent
    index.put(_plan())  # reopens
    assert _plan().hash in index.get_many([_plan().hash])


def test_unopenable_path_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="cannot open the plan index .*safe"):
        PlanIndex(blocker / "i.sqlite")


@pytest.mark.parametrize("groups", ["[[0, 1], [1, 2]]", "{not json"])
def test_a_damaged_row_names_the_index_and_the_way_out(tmp_path, groups):
    path = tmp_path / "i.sqlite"
    PlanIndex(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO plans VALUES ('h', 'fp', 3, ?)", (groups,))
    with pytest.raises(StoreError, match=f"plan index {path}") as exc:
        PlanIndex(path).get_many(["h"])
    assert "\n" not in str(exc.value)
