"""Tests of fusion_rl.fusion.plan_space: enumeration against brute force, and neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fusion_rl.errors import ConfigError
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.plan_space import (
    is_connected,
    is_legal,
    iter_connected_partitions,
    legal_plans,
    merge_candidates,
    peel_node,
    shape_candidates,
)
from fusion_rl.graph.model import model_from_torch

from _tiny import diamond, mbconv_with_pooling


@pytest.fixture(scope="module")
def mlp2():
    """matmul -> add -> relu -> matmul -> add: 16 legal plans."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return model_from_torch(module, (torch.randn(1, 16),), name="mlp2")


# ---- enumeration ----------------------------------------------------------------------------


def _brute_force_legal(graph) -> set[str]:
    """Every legal partition with weakly connected groups, by enumerating all set partitions."""

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            yield [[first]] + part
            for i in range(len(part)):
                yield part[:i] + [[first] + part[i]] + part[i + 1:]

    out = set()
    for part in partitions(list(range(len(graph)))):
        if all(is_connected(set(g), graph) for g in part):  # tested on its own below
            plan = FusionPlan.from_groups(part, len(graph), graph.fingerprint)
            if check_plan(graph, plan).legal:
                out.add(plan.hash)
    return out


def test_enumeration_matches_brute_force_on_the_diamond():
    graph = diamond()
    plans = list(iter_connected_partitions(graph))
    assert len(plans) == len({p.hash for p in plans}) == 12  # each partition exactly once
    legal = legal_plans(graph)
    assert {p.hash for p in legal} == _brute_force_legal(graph)
    assert len(legal) == 10  # {0,1,3} and {0,2,3} re-enter the group


def test_enumeration_matches_brute_force_on_a_real_graph(model_cache):
    graph = model_cache("mlp_tiny").graph
    # Truncate to the first 7 nodes (Bell(7) = 877 partitions) to keep the brute force fast.
    from fusion_rl.graph.opgraph import OpGraph

    small = OpGraph(graph.nodes[:7], [e for e in graph.edges if e.dst < 7], outputs=[6], name="head")
    assert {p.hash for p in legal_plans(small)} == _brute_force_legal(small)


def test_legal_plan_counts(model_cache):
    # Both are chains: every subset of edges to contract is a distinct, convex plan (2^edges).
    assert len(legal_plans(model_cache("mlp_tiny").graph)) == 1024
    assert len(legal_plans(model_cache("cnn_plain").graph)) == 4096


def test_enumeration_stops_at_the_limit(model_cache):
    with pytest.raises(ConfigError, match="more than 100 connected partitions"):
        legal_plans(model_cache("cnn_plain").graph, limit=100)


def test_is_connected_follows_edges_inside_the_group():
    graph = diamond()  # 0 -> {1, 2} -> 3
    assert is_connected({0, 1, 3}, graph) and is_connected({1}, graph)
    assert not is_connected({1, 2}, graph)  # siblings: joined only through 0 or 3


# ---- neighbours -------------------------------------------------------------------------------


def test_neighbourhoods_stay_legal_and_connected(mlp2):
    graph = mlp2.graph
    rng = np.random.default_rng(0)
    space = {p.hash for p in legal_plans(graph)}
    plan = FusionPlan.singletons(len(graph), graph.fingerprint)
    assert len(merge_candidates(graph, plan)) == len(graph.edges)
    for _ in range(50):
        merges = merge_candidates(graph, plan)
        if rng.uniform() < 0.5 or not merges:
            plan = peel_node(graph, plan, rng)
        else:
            plan = merges[int(rng.integers(len(merges)))]
        assert plan.hash in space


def test_shape_candidates_form_the_pair_that_no_merge_reaches():
    """The depthwise conv leaves its group for the pair, with its swish (the shape's epilogue)
    but not the pooling, which stays a group of its own; every candidate is legal."""
    from fusion_rl.baselines.search import within_anchor_cap

    graph, plan = mbconv_with_pooling()
    shapes = ("pointwise_depthwise",)
    assert not [c for c in merge_candidates(graph, plan) if within_anchor_cap(graph, c, 1, shapes)
                and any(len([n for n in g if graph.nodes[n].is_mac_anchor]) == 2 for g in c.groups)]
    (cand,) = shape_candidates(graph, plan, shapes)
    assert sorted(cand.groups) == [(0,), (1, 2, 3, 4, 5), (6,), (7,)]
    assert is_legal(graph, cand) and within_anchor_cap(graph, cand, 1, shapes)
    # A plan that holds the pair already, or no declared shape: nothing to form.
    assert shape_candidates(graph, cand, shapes) == [] and shape_candidates(graph, plan, ()) == []
