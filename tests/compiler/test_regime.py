"""Tests of the host regime labels (pure; the probe itself runs in the worker, see
tests/compiler/test_measure.py and the ``measure`` CLI tests)."""

from __future__ import annotations

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
