"""Tests of interleaved, paired plan comparison (no TVM: a scripted measurer)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fusion_rl.compiler.paired import compare_interleaved
from fusion_rl.errors import ConfigError


@dataclass
class _Record:
    status: str
    median_ms: float | None
    times_ms: list[float]
    error: str | None = None


class _ScriptedMeasurer:
    """Latency = plan's base x the machine's regime of the moment (slow every other call pair)."""

    store = None

    def __init__(self, base: dict[str, float], regimes: list[float], fail: str | None = None) -> None:
        self.base, self.regimes, self.fail = base, regimes, fail
        self.calls: list[str] = []

    def measure(self, model, plan):
        self.calls.append(plan)
        if plan == self.fail:
            return _Record("crashed", None, [], "worker died")
        regime = self.regimes[(len(self.calls) - 1) // 2 % len(self.regimes)]
        t = self.base[plan] * regime
        return _Record("ok", t, [t * 0.99, t, t * 1.01])


def test_rounds_interleave_and_flip_order() -> None:
    m = _ScriptedMeasurer({"a": 1.0, "b": 2.0}, [1.0])
    cmp = compare_interleaved(m, None, {"a": "a", "b": "b"}, rounds=3)
    assert m.calls == ["a", "b", "b", "a", "a", "b"]
    assert cmp.round_medians == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}
    assert len(cmp.pooled_ms["a"]) == 9


def test_paired_reading_cancels_a_shared_regime_unpaired_does_not() -> None:
    # Rounds alternate between a fast and a 1.7x slow machine; the plan effect is 10 %.
    m = _ScriptedMeasurer({"unfused": 1.1, "fused": 1.0}, [1.0, 1.7])
    cmp = compare_interleaved(m, None, {"unfused": "unfused", "fused": "fused"}, rounds=6)
    v = cmp.verdict("unfused", "fused")
    assert v["rounds_won"] == 6 and v["speedup"] > 1.0
    assert not v["unpaired"]  # the regime's spread swamps the 10 % gap
    assert v["paired"] and v["paired_speedup"] == pytest.approx(1.1) and v["paired_spread"] == pytest.approx(0.0)
    assert cmp.speedups("unfused", "fused") == pytest.approx([1.1] * 6)


def test_a_real_effect_passes_both_and_no_effect_passes_neither() -> None:
    big = compare_interleaved(_ScriptedMeasurer({"u": 3.0, "f": 1.0}, [1.0]), None, {"u": "u", "f": "f"}, 4)
    assert big.verdict("u", "f")["unpaired"] and big.verdict("u", "f")["paired"]
    same = compare_interleaved(_ScriptedMeasurer({"u": 1.0, "f": 1.0}, [1.0, 1.3]), None, {"u": "u", "f": "f"}, 4)
    assert not same.verdict("u", "f")["unpaired"] and not same.verdict("u", "f")["paired"]


def test_failures_are_reported_not_retried() -> None:
    m = _ScriptedMeasurer({"a": 1.0, "b": 1.0}, [1.0], fail="b")
    cmp = compare_interleaved(m, None, {"a": "a", "b": "b"}, rounds=3)
    assert m.calls.count("b") == 1 and "crashed" in cmp.failures["b"]
    assert cmp.round_medians["a"] == [1.0, 1.0, 1.0]


def test_bad_arguments() -> None:
    m = _ScriptedMeasurer({"a": 1.0}, [1.0])
    with pytest.raises(ConfigError, match="rounds"):
        compare_interleaved(m, None, {"a": "a"}, rounds=1)
    m.store = object()
    with pytest.raises(ConfigError, match="without a store"):
        compare_interleaved(m, None, {"a": "a"}, rounds=3)
