"""Compare plans within one run: interleaved repeats and paired ratios.

Why: on this 2-vCPU machine the latency of the *same* kernel sequence drifts between regimes
that last seconds (seen: resnet_tiny unfused under ``rules`` ran 0.387 ms for ten repeats, then
0.224 ms for the next five, within one measurement). Records taken minutes apart in the store
then differ by regime as much as by plan. Here the plans of a model are built once per round
and timed repeat by repeat (:meth:`Measurer.time_together`: repeat ``r`` of every plan before repeat
``r + 1`` of any, order flipping), and rounds are repeated. Each round rebuilds its plans (a few
seconds when the tuning database has their kernels; the executables are identical): the cost of
keeping every round one self-contained worker job, which a crash or timeout costs alone.

Two readings of "A beats B by more than k times the spread" are reported
(:meth:`HeadToHead.verdict`):

* *unpaired*: ``median(B) - median(A) > k * max(IQR(A), IQR(B))`` over all pooled repeats;
* *paired*: ``median(s) - 1 > k * IQR(s)`` where ``s`` are the per-repeat speedups B / A
  (repeats taken back to back). A regime slows both plans of a repeat by about the same factor,
  so it cancels in the ratio (not in a difference: the gap itself scales with the regime).

One regime does *not* cancel: the host's fork-join cost (:mod:`fusion_rl.compiler.regime`) slows
plans of many small parallel kernels more than plans of few. Each repeat carries that probe, and
:meth:`HeadToHead.regime_speedups` splits a paired speedup by regime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.regime import near_reference_us, regime_labels, settle_reference
from fusion_rl.errors import ConfigError
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.model import Model


def _iqr(values: list[float]) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 - q1)


def split_by_regime(slower_ms: list[float], faster_ms: list[float], probes_us: list[float],
                    reference_us: float | None = None) -> dict[str, dict[str, float | int]]:
    """The paired speedup ``slower / faster`` within each host regime of the repeats.

    ``probes_us`` holds the fork-join probe before each repeat, aligned with both series;
    ``reference_us`` is as in :func:`~fusion_rl.compiler.regime.regime_labels`. Returns
    ``{regime: {"paired_speedup", "paired_spread", "repeats"}}`` for each regime present, or
    ``{}`` when the repeats carry no probes.
    """
    if not probes_us or len(probes_us) != len(slower_ms) or len(slower_ms) != len(faster_ms):
        return {}
    out: dict[str, dict[str, float | int]] = {}
    labels = regime_labels(probes_us, reference_us)
    for regime in ("near", "far"):
        ratios = [s / f for s, f, r in zip(slower_ms, faster_ms, labels) if r == regime]
        if ratios:
            out[regime] = {"paired_speedup": float(np.median(ratios)), "paired_spread": _iqr(ratios),
                           "repeats": len(ratios)}
    return out


@dataclass
class HeadToHead:
    """Timings of several plans of one model, taken in interleaved rounds."""

    rounds: int  #: rounds that ran (a failed round is not counted)
    round_medians: dict[str, list[float]] = field(default_factory=dict)  #: label -> one per round
    pooled_ms: dict[str, list[float]] = field(default_factory=dict)  #: label -> every repeat
    failures: dict[str, str] = field(default_factory=dict)  #: label -> status of a failed round
    num_kernels: dict[str, int] = field(default_factory=dict)  #: label -> kernels its build launches
    #: label -> the label whose plan it repeats (same plan hash): built and timed once, its
    #: series shared, so their paired speedup is exactly 1
    same_as: dict[str, str] = field(default_factory=dict)
    #: the host's fork-join probe (us) before each pooled repeat, shared by every label
    fork_join_us: list[float] = field(default_factory=list)
    #: the near probe the repeats were judged by (:func:`head_to_head`), ``None`` without probes
    reference_us: float | None = None

    def median_ms(self, label: str) -> float:
        return float(np.median(self.pooled_ms[label]))

    def iqr_ms(self, label: str) -> float:
        return _iqr(self.pooled_ms[label])

    def speedups(self, slower: str, faster: str) -> list[float]:
        """Per-repeat ``slower / faster`` (repeat ``i`` of both was taken back to back)."""
        return [s / f for s, f in zip(self.pooled_ms[slower], self.pooled_ms[faster])]

    def regime_speedups(self, slower: str, faster: str,
                        reference_us: float | None = None) -> dict[str, dict[str, float | int]]:
        """:func:`split_by_regime` of ``slower / faster``: the paired speedup within each regime,
        judged against ``reference_us`` (default :attr:`reference_us`)."""
        ref = self.reference_us if reference_us is None else reference_us
        return split_by_regime(self.pooled_ms[slower], self.pooled_ms[faster], self.fork_join_us, ref)

    def verdict(self, slower: str, faster: str, factor: float = 5.0) -> dict[str, float | bool]:
        """Whether ``faster`` beats ``slower`` by more than ``factor`` spreads, both readings."""
        gap = self.median_ms(slower) - self.median_ms(faster)
        spread = max(self.iqr_ms(slower), self.iqr_ms(faster))
        ratios = self.speedups(slower, faster)
        s_med, s_iqr = float(np.median(ratios)), _iqr(ratios)
        by_round = zip(self.round_medians[slower], self.round_medians[faster])
        return {
            "gap_ms": gap, "spread_ms": spread, "unpaired": gap > factor * spread,
            "paired_speedup": s_med, "paired_spread": s_iqr, "paired": s_med - 1.0 > factor * s_iqr,
            "repeats_won": sum(r > 1.0 for r in ratios), "repeats": len(ratios),
            "rounds_won": sum(s > f for s, f in by_round),
            "speedup": self.median_ms(slower) / self.median_ms(faster),
        }


def check_rounds(rounds: object, min_near: object = 0, max_rounds: object = None,
                 names: tuple[str, str, str] = ("rounds", "min_near", "max_rounds")) -> int:
    """Check a head-to-head protocol (:func:`head_to_head`'s ``rounds``, ``min_near`` and
    ``max_rounds``) and return ``max_rounds`` resolved (default twice ``rounds``). ``names``:
    what the caller calls the three (config keys, command-line flags) in the error.

    Raises
    ------
    ConfigError
        naming the first value that is not an int of at least 2, 0 and ``rounds``.
    """
    if max_rounds is None and _is_count(rounds, 2):
        max_rounds = 2 * rounds
    for name, value, least in zip(names, (rounds, min_near, max_rounds), (2, 0, rounds)):
        if not _is_count(value, least):
            raise ConfigError(f"{name}: expected an int >= {least}, got {value!r}")
    return max_rounds


def _is_count(value: object, least: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and isinstance(least, int) and value >= least


def _near(probes_us: list[float], reference_us: float | None) -> int:
    return regime_labels(probes_us, reference_us).count("near")


def head_to_head(measurer: Measurer, model: Model, plans: Mapping[str, FusionPlan],
                 rounds: int,
                 progress: Callable[[int, int | None, str], None] | None = None, *,
                 min_near: int = 0, max_rounds: int | None = None,
                 reference_us: float | None = None) -> HeadToHead:
    """``rounds`` x :meth:`Measurer.time_together` of ``plans`` (fresh builds each round, plan order
    flipping between rounds); never served from a store. Labels with the same plan are built and
    timed once (:attr:`HeadToHead.same_as`). ``progress(done, rounds, label)``, if given, is
    called after each round.

    With ``min_near``, rounds are added, up to ``max_rounds`` in all (default twice ``rounds``),
    until at least ``min_near`` repeats ran in the near fork-join regime, so that a comparison
    the host spent partly in its far regime still has a near reading of that size
    (:meth:`HeadToHead.regime_speedups`). :attr:`HeadToHead.rounds` is the number of rounds run.

    Repeats are judged (:func:`~fusion_rl.compiler.regime.regime_labels`) against the lowest of
    the probes so far, ``reference_us`` (e.g. a run's lowest probe) and the host's floor
    (``measurer.near_floor``, a :class:`~fusion_rl.compiler.regime.NearFloor`; a local
    :class:`Measurer` has one), so a comparison spent wholly in the far regime is told far
    from its first repeat on; the comparison's probes are then added to that floor.
    :attr:`HeadToHead.reference_us` is the reference used.

    Raises
    ------
    ConfigError
        if ``measurer`` has a store (comparisons must be fresh timings; it is
        also a sign the caller meant :meth:`Measurer.measure`), ``rounds`` < 2, ``min_near`` < 0
        or ``max_rounds`` < ``rounds``.
    """
    if measurer.store is not None:
        raise ConfigError("head_to_head needs a Measurer without a store (store=None)")
    max_rounds = check_rounds(rounds, min_near, max_rounds)
    first: dict[str, str] = {}
    same_as = {k: first.setdefault(plan.hash, k) for k, plan in plans.items()}
    distinct = [k for k in plans if same_as[k] == k]
    out = HeadToHead(0, {k: [] for k in distinct}, {k: [] for k in distinct},
                     same_as={k: a for k, a in same_as.items() if a != k})
    floor = getattr(measurer, "near_floor", None)
    floor_us = floor.reference_us() if floor is not None else None
    r = 0
    # Without probes (a measurer that takes none) no round can be told near: none is added.
    while r < rounds or (min_near and out.fork_join_us and r < max_rounds
                         and _near(out.fork_join_us, near_reference_us(out.fork_join_us, reference_us, floor_us))
                         < min_near):
        labels = distinct if r % 2 == 0 else distinct[::-1]
        result = measurer.time_together(model, [plans[k] for k in labels])
        if result["status"] != "ok":
            out.failures = {k: f"{result['status']}: {result.get('error') or ''}".strip() for k in plans}
            return out
        for label, times in zip(labels, result["times_ms"]):
            out.round_medians[label].append(float(np.median(times)))
            out.pooled_ms[label].extend(times)
        out.fork_join_us.extend(result.get("fork_join_us") or [])
        out.num_kernels.update(zip(labels, result.get("num_kernels", [])))
        r += 1
        out.rounds = r
        if progress is not None:
            progress(r, max(rounds, r), f"round {r}")
    if out.fork_join_us:
        out.reference_us = settle_reference(out.fork_join_us, floor, reference_us)
    for label, a in out.same_as.items():
        out.round_medians[label], out.pooled_ms[label] = out.round_medians[a], out.pooled_ms[a]
        if a in out.num_kernels:
            out.num_kernels[label] = out.num_kernels[a]
    return out


__all__ = ["HeadToHead", "check_rounds", "head_to_head", "split_by_regime"]
