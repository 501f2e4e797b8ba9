"""Baselines a learned fusion policy is compared against, on identical measurements.

:mod:`.search`: random search, greedy merging, simulated annealing and an exhaustive oracle.
"""

from __future__ import annotations

from fusion_rl.baselines.search import (
    ALGORITHMS,
    SearchResult,
    annealing,
    exhaustive,
    greedy,
    iter_connected_partitions,
    legal_plans,
    merge_candidates,
    peel_node,
    random_search,
    run_search,
)

__all__ = [
    "ALGORITHMS",
    "SearchResult",
    "annealing",
    "exhaustive",
    "greedy",
    "iter_connected_partitions",
    "legal_plans",
    "merge_candidates",
    "peel_node",
    "random_search",
    "run_search",
]
