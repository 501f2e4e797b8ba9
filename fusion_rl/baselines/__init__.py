"""Baselines a learned fusion policy is compared against, on identical measurements.

:mod:`.search`: random search, greedy merging, simulated annealing and an exhaustive oracle,
all moving through the plan space of :mod:`fusion_rl.fusion.plan_space`.
"""

from __future__ import annotations

from fusion_rl.baselines.search import (
    ALGORITHMS,
    SearchResult,
    annealing,
    exhaustive,
    greedy,
    random_search,
    run_search,
)

__all__ = [
    "ALGORITHMS",
    "SearchResult",
    "annealing",
    "exhaustive",
    "greedy",
    "random_search",
    "run_search",
]
