"""Tests of the host regime labels (pure; the probe itself runs in the worker, see
tests/compiler/test_measure.py and the ``measure`` CLI tests)."""

from __future__ import annotations

import pytest

from fusion_rl.compiler.regime import FAR_FACTOR, regime_labels


def test_regime_labels_split_at_the_far_factor() -> None:
    assert regime_labels([0.6, 0.7, 1.5, 0.65]) == ["near", "near", "far", "near"]
    assert regime_labels([1.5, 1.6]) == ["near", "near"]  # relative: nothing lower was seen
    assert regime_labels([1.5, 1.6], reference_us=0.6) == ["far", "far"]  # a run's lowest probe
    assert regime_labels([0.6 * FAR_FACTOR, 0.6]) == ["near", "near"] and regime_labels([]) == []



def test_a_single_thread_pool_has_no_far_regime() -> None:
    # One thread: the probe is a plain call of a few ns, and its jitter is no regime.
    assert regime_labels([0.004, 0.009, 0.004]) == ["near"] * 3


def test_probes_are_grouped_by_regime() -> None:
    from fusion_rl.compiler.regime import probes_by_regime

    assert probes_by_regime([0.6, 1.5, 0.7]) == {"near": [0.6, 0.7], "far": [1.5]}
    assert probes_by_regime([1.5], reference_us=0.6) == {"near": [], "far": [1.5]}


def test_the_near_floor_is_the_lowest_recent_probe_and_forgets_old_ones(tmp_path) -> None:
    from fusion_rl.compiler.regime import FLOOR_DAYS, NearFloor

    floor = NearFloor(tmp_path / "floor.json")
    assert floor.reference_us() is None  # no file: no floor
    day = 86400.0
    floor.record([1.9, 1.7], now=0.0)  # a comparison spent wholly far
    floor.record([0.62, 1.8], now=day)
    floor.record([0.004], now=day)  # a pool of one thread: no regime, not recorded
    assert floor.reference_us(now=2 * day) == 0.62
    # A week later the near comparison is forgotten, then the far one too.
    assert floor.reference_us(now=(FLOOR_DAYS + 0.5) * day) == 0.62
    assert floor.reference_us(now=(FLOOR_DAYS + 1.5) * day) is None
    floor.record([0.7], now=(FLOOR_DAYS + 1.5) * day)
    assert [p for _, p in floor._entries((FLOOR_DAYS + 1.5) * day)] == [0.7]  # old entries dropped on write


@pytest.mark.parametrize("text", ["", "{", "[]", '{"probes": 3}', '{"probes": [["x", 1]]}', '{"other": 1}'])
def test_a_malformed_floor_file_is_no_floor(tmp_path, text: str) -> None:
    from fusion_rl.compiler.regime import NearFloor

    path = tmp_path / "floor.json"
    path.write_text(text)
    floor = NearFloor(path)
    assert floor.reference_us() is None
    floor.record([0.6])  # and the next comparison writes a good one over it
    assert floor.reference_us() == 0.6


def test_floors_are_kept_per_thread_count_and_only_for_local_cpu_targets(tmp_path) -> None:
    from fusion_rl.compiler.regime import NearFloor
    from fusion_rl.compiler.target import TargetSpec, parse_target

    assert NearFloor.for_threads(1, tmp_path).path != NearFloor.for_threads(2, tmp_path).path
    assert NearFloor.for_threads(2, tmp_path).path.parent == tmp_path
    assert NearFloor.for_target(parse_target("haswell-t2")).path.name.startswith("fork-join-t2-")
    assert NearFloor.for_target(parse_target("rpc://127.0.0.1:9190/k:haswell-t2")) is None  # another host
    assert NearFloor.for_target(TargetSpec(name="g", kind="cuda", arch="sm_90")) is None
