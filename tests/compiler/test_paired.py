"""Tests of interleaved, paired plan comparison (no TVM: a scripted measurer)."""

from __future__ import annotations

import pytest

from fusion_rl.compiler.paired import head_to_head, split_by_regime
from fusion_rl.errors import ConfigError


class _Plan(str):
    """A plan stand-in: its name is its hash (two labels with one name are one plan)."""

    @property
    def hash(self) -> str:
        return str(self)


def _plans(**labels: str) -> dict[str, _Plan]:
    return {k: _Plan(v) for k, v in labels.items()}


class _ScriptedMeasurer:
    """``time_together`` returns base latency x the machine's regime, which changes every repeat."""

    store = None

    def __init__(self, base: dict[str, float], regimes: list[float], repeats: int = 4,
                 fail: bool = False, far: dict[str, float] | None = None) -> None:
        self.base, self.regimes, self.repeats, self.fail = base, regimes, repeats, fail
        self.far = far  # plan -> its latency in the far fork-join regime (a regime factor > 1.5)
        self.calls: list[list[str]] = []

    def time_together(self, model, plans):
        self.calls.append(list(plans))
        if self.fail:
            return {"status": "wrong_output", "error": "plan x: mismatch", "times_ms": []}
        regimes = [self.regimes[i % len(self.regimes)] for i in range(self.repeats)]
        if self.far is None:
            return {"status": "ok", "times_ms": [[self.base[p] * g for g in regimes] for p in plans]}
        return {"status": "ok", "fork_join_us": [0.6 * g for g in regimes],
                "times_ms": [[self.far[p] if g > 1.5 else self.base[p] for g in regimes] for p in plans]}


def test_rounds_flip_the_plan_order_and_pool_repeats() -> None:
    m = _ScriptedMeasurer({"a": 1.0, "b": 2.0}, [1.0])
    cmp = head_to_head(m, None, _plans(a="a", b="b"), rounds=3)
    assert m.calls == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert cmp.round_medians == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert len(cmp.pooled_ms["a"]) == 12 and cmp.speedups("b", "a") == [2.0] * 12


def test_paired_reading_cancels_a_shared_regime_unpaired_does_not() -> None:
    # Repeats alternate between a fast machine and a 1.7x slower one; the plan effect is 10 %.
    m = _ScriptedMeasurer({"unfused": 1.1, "fused": 1.0}, [1.0, 1.7])
    v = head_to_head(m, None, _plans(unfused="unfused", fused="fused"), rounds=3).verdict("unfused", "fused")
    assert not v["unpaired"]  # the regime's spread swamps the 10 % gap
    assert v["paired"] and v["paired_speedup"] == pytest.approx(1.1) and v["paired_spread"] == pytest.approx(0.0)
    assert v["repeats_won"] == v["repeats"] == 12 and v["rounds_won"] == 3


def test_a_real_effect_passes_both_and_no_effect_passes_neither() -> None:
    big = head_to_head(_ScriptedMeasurer({"u": 3.0, "f": 1.0}, [1.0, 1.1]), None, _plans(u="u", f="f"), 2)
    assert big.verdict("u", "f")["unpaired"] and big.verdict("u", "f")["paired"]
    same = head_to_head(_ScriptedMeasurer({"u": 1.0, "f": 1.0}, [1.0, 1.3]), None, _plans(u="u", f="f"), 2)
    assert not same.verdict("u", "f")["unpaired"] and not same.verdict("u", "f")["paired"]


def test_labels_of_one_plan_are_timed_once_and_share_its_series() -> None:
    m = _ScriptedMeasurer({"a": 1.0, "b": 2.0}, [1.0, 1.5])
    cmp = head_to_head(m, None, _plans(tvm="a", tensorrt="a", other="b"), rounds=2)
    assert m.calls == [["a", "b"], ["b", "a"]]  # "a" built and timed once per round
    assert cmp.same_as == {"tensorrt": "tvm"} and cmp.pooled_ms["tensorrt"] == cmp.pooled_ms["tvm"]
    assert cmp.verdict("tvm", "tensorrt")["paired_speedup"] == 1.0
    assert cmp.verdict("other", "tensorrt")["paired_speedup"] == pytest.approx(2.0)


def test_a_failed_round_stops_and_is_reported() -> None:
    m = _ScriptedMeasurer({"a": 1.0, "b": 1.0}, [1.0], fail=True)
    cmp = head_to_head(m, None, _plans(a="a", b="b"), rounds=3)
    assert len(m.calls) == 1 and set(cmp.failures) == {"a", "b"} and "wrong_output" in cmp.failures["a"]
    assert cmp.rounds == 0


def test_bad_arguments() -> None:
    m = _ScriptedMeasurer({"a": 1.0}, [1.0])
    with pytest.raises(ConfigError, match="rounds"):
        head_to_head(m, None, _plans(a="a"), rounds=1)
    m.store = object()
    with pytest.raises(ConfigError, match="without a store"):
        head_to_head(m, None, _plans(a="a"), rounds=3)


def test_a_regime_that_hits_plans_unevenly_is_split_not_averaged() -> None:
    # Near: "many" (many small kernels) and "few" are equal. Far: "many" is 1.3x slower than
    # "few". Pooled, the paired median depends on how long each regime lasted; split, each holds.
    m = _ScriptedMeasurer({"many": 3.0, "few": 3.0}, [1.0, 1.0, 1.0, 2.5], far={"many": 5.2, "few": 4.0})
    cmp = head_to_head(m, None, _plans(many="many", few="few"), rounds=2)
    assert len(cmp.fork_join_us) == len(cmp.pooled_ms["many"]) == 8
    split = cmp.regime_speedups("many", "few")
    assert split["near"] == {"paired_speedup": 1.0, "paired_spread": 0.0, "repeats": 6}
    assert split["far"]["paired_speedup"] == pytest.approx(1.3) and split["far"]["repeats"] == 2
    assert cmp.verdict("many", "few")["paired_speedup"] == 1.0  # the pooled reading hides it


def test_split_by_regime_needs_aligned_probes() -> None:
    assert split_by_regime([1.0, 2.0], [1.0, 1.0], []) == {}
    assert split_by_regime([1.0, 2.0], [1.0, 1.0], [0.6]) == {}
    only_far = split_by_regime([2.0, 2.0], [1.0, 1.0], [1.5, 1.5], reference_us=0.6)
    assert set(only_far) == {"far"} and only_far["far"]["paired_speedup"] == 2.0


def test_rounds_are_added_until_enough_repeats_ran_near() -> None:
    # Each round's 4 repeats: the last one in the far regime (probe 2.5x the near one).
    m = _ScriptedMeasurer({"a": 1.0, "b": 1.2}, [1.0, 1.0, 1.0, 2.5], far={"a": 2.0, "b": 2.2})
    cmp = head_to_head(m, None, _plans(a="a", b="b"), rounds=2, min_near=9)
    assert cmp.rounds == len(m.calls) == 3  # 3 near a round: 6 after two rounds, 9 after three
    assert cmp.regime_speedups("b", "a")["near"]["repeats"] == 9
    # Capped: the far regime throughout (every probe 3x the reference) adds rounds up to max_rounds.
    stuck = _ScriptedMeasurer({"a": 1.0, "b": 1.2}, [2.5], far={"a": 2.0, "b": 2.2})
    cmp = head_to_head(stuck, None, _plans(a="a", b="b"), rounds=2, min_near=1, max_rounds=3, reference_us=0.5)
    assert cmp.rounds == len(stuck.calls) == 3 and "near" not in cmp.regime_speedups("b", "a", 0.5)
    # Enough near repeats in the first rounds, or no probes at all: exactly ``rounds``.
    calm = _ScriptedMeasurer({"a": 1.0, "b": 1.2}, [1.0], far={"a": 2.0, "b": 2.2})
    assert head_to_head(calm, None, _plans(a="a", b="b"), rounds=2, min_near=8).rounds == 2
    blind = _ScriptedMeasurer({"a": 1.0, "b": 1.2}, [1.0])
    assert head_to_head(blind, None, _plans(a="a", b="b"), rounds=2, min_near=100).rounds == 2


@pytest.mark.parametrize("kwargs", [{"min_near": -1}, {"min_near": True}, {"max_rounds": 2}])
def test_bad_round_limits(kwargs: dict) -> None:
    m = _ScriptedMeasurer({"a": 1.0}, [1.0])
    with pytest.raises(ConfigError, match="min_near|max_rounds"):
        head_to_head(m, None, _plans(a="a"), rounds=3, **kwargs)


class _Floor:
    """A host floor in memory (:class:`fusion_rl.compiler.regime.NearFloor`'s two methods)."""

    def __init__(self, reference_us: float | None) -> None:
        self.value, self.recorded = reference_us, []

    def reference_us(self) -> float | None:
        return self.value

    def record(self, probes_us) -> None:
        self.recorded.append(list(probes_us))


def test_a_comparison_spent_wholly_far_is_told_far_by_the_hosts_floor() -> None:
    # Every probe 1.5 us: without a floor they are judged against themselves, all near.
    alone = _ScriptedMeasurer({"a": 1.0, "b": 1.2}, [2.5], far={"a": 2.0, "b": 2.2})
    cmp = head_to_head(alone, None, _plans(a="a", b="b"), rounds=2, min_near=4, max_rounds=4)
    assert cmp.rounds == 2 and cmp.reference_us == 1.5 and "far" not in cmp.regime_speedups("b", "a")
    # With the host's floor at 0.6 us they are far from the first round: rounds up to the cap,
    # the floor is the comparison's reference, and its probes are recorded.
    floored = _ScriptedMeasurer({"a": 1.0, "b": 1.2}, [2.5], far={"a": 2.0, "b": 2.2})
    floored.near_floor = _Floor(0.6)
    cmp = head_to_head(floored, None, _plans(a="a", b="b"), rounds=2, min_near=4, max_rounds=4)
    assert cmp.rounds == 4 and cmp.reference_us == 0.6
    assert set(cmp.regime_speedups("b", "a")) == {"far"}
    assert floored.near_floor.recorded == [cmp.fork_join_us]
    # A floor above the comparison's own probes does not raise its reference.
    high = _ScriptedMeasurer({"a": 1.0, "b": 1.2}, [1.0], far={"a": 2.0, "b": 2.2})
    high.near_floor = _Floor(0.9)
    assert head_to_head(high, None, _plans(a="a", b="b"), rounds=2).reference_us == 0.6
