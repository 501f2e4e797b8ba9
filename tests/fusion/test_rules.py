"""The fixed rule sets that expose a collapsed policy: `aggressive` and `aggressive_1anchor`."""

from __future__ import annotations

import pytest

from fusion_rl.cli import main
from fusion_rl.decisions import DecisionOptions, DecisionProcess
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.rules import RULE_SETS, make_plan
from fusion_rl.graph.zoo import ZOO


def most_anchors(graph, plan: FusionPlan) -> int:
    return max(sum(graph.nodes[n].is_mac_anchor for n in g) for g in plan.groups)


def always_fuse(graph, options: DecisionOptions) -> FusionPlan:
    """The plan of a policy that answers "fuse" on every decision it may fuse."""
    process = DecisionProcess(graph, options)
    while not process.done:
        process.decide(process.can_fuse())
    return process.plan()


def test_aggressive_1anchor_is_a_rule_set_of_the_cli(tmp_path):
    assert "aggressive_1anchor" in RULE_SETS and "aggressive" in RULE_SETS
    out = tmp_path / "plan.json"
    assert main(["plan", "mlp_tiny", "--rules", "aggressive_1anchor", "-o", str(out)]) == 0
    assert FusionPlan.load(out).name == "aggressive_1anchor"


@pytest.mark.parametrize("name", list(ZOO))
def test_aggressive_1anchor_on_every_zoo_model(name, model_cache):
    """Legal, at most one conv/matmul per group, and exactly the plan of "fuse every legal edge"
    under max_mac_anchors: 1 (so a policy collapsed to that bias is recognised). `aggressive`
    is the same without the cap, and the two differ exactly where aggressive fuses anchors."""
    model = model_cache(name)
    graph = model.graph
    capped = make_plan("aggressive_1anchor", model.mod, graph)
    assert check_plan(graph, capped).legal
    assert most_anchors(graph, capped) <= 1
    assert capped.hash == always_fuse(graph, DecisionOptions(max_mac_anchors=1)).hash
    free = make_plan("aggressive", model.mod, graph)
    assert free.hash == always_fuse(graph, DecisionOptions()).hash
    assert (capped.hash != free.hash) == (most_anchors(graph, free) > 1)


def test_aggressive_1anchor_differs_from_aggressive_on_multi_anchor_chains(model_cache):
    """On models whose anchors form chains (mlp, cnn, residual), the uncapped rule puts several
    anchors in one kernel and the capped one never does."""
    for name in ("mlp_tiny", "cnn_plain", "resnet_tiny"):
        model = model_cache(name)
        free = make_plan("aggressive", model.mod, model.graph)
        capped = make_plan("aggressive_1anchor", model.mod, model.graph)
        assert most_anchors(model.graph, free) > 1 and most_anchors(model.graph, capped) == 1, name
        assert free.hash != capped.hash
