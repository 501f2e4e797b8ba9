"""The epilogue edges (fusion_rl.fusion.epilogues) and the decision option that prefuses them."""

from __future__ import annotations

import pytest

from fusion_rl.decisions import DecisionOptions, DecisionProcess, actions_for_plan
from fusion_rl.errors import ConfigError, IllegalPlanError
from fusion_rl.fusion.epilogues import epilogue_edges
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.zoo import ZOO

PREFUSED = DecisionOptions(max_mac_anchors=1, prefuse_epilogues=True)


def play(graph, options: DecisionOptions, fuse: bool) -> tuple[FusionPlan, int]:
    """The plan of a policy that always keeps (``fuse`` False) or fuses wherever it may, and
    how many decisions it was asked."""
    process = DecisionProcess(graph, options)
    while not process.done:
        process.decide(fuse and process.can_fuse())
    return process.plan(), process.steps


def test_epilogue_edges_follow_the_rule(model_cache):
    """An elementwise/broadcast consumer joins at most one producer: a conv/matmul or
    elementwise op that it alone consumes and that is not a graph output."""
    graph = model_cache("resnet_tiny").graph
    edges = epilogue_edges(graph)
    assert edges, "resnet_tiny has conv epilogues"
    consumers = graph.successor_lists()
    joined: dict[int, int] = {}
    for k in edges:
        e = graph.edges[k]
        producer, consumer = graph.nodes[e.src], graph.nodes[e.dst]
        assert consumer.pattern in (0, 1)
        assert producer.pattern in (0, 1) or producer.is_mac_anchor
        assert consumers[e.src] == [e.dst] and e.src not in graph.outputs
        assert joined.setdefault(e.dst, e.src) == e.src  # one producer per consumer


@pytest.mark.parametrize("name", list(ZOO))
def test_prefused_process_keeps_the_rules_reachable(name, model_cache):
    """Under prefuse_epilogues, a policy that keeps every edge apart makes the tensorrt plan,
    one that fuses every edge still makes aggressive_1anchor (so collapse to either is
    recognised), and each epilogue edge is one decision fewer."""
    model = model_cache(name)
    graph = model.graph
    capped = DecisionOptions(max_mac_anchors=1)
    tensorrt = make_plan("tensorrt", model.mod, graph)
    keep, asked = play(graph, PREFUSED, fuse=False)
    assert keep.hash == tensorrt.hash
    assert actions_for_plan(graph, tensorrt, PREFUSED) == [0] * asked
    _, asked_without = play(graph, capped, fuse=False)
    assert asked_without - asked == len(epilogue_edges(graph))
    fuse, _ = play(graph, PREFUSED, fuse=True)
    assert fuse.hash == make_plan("aggressive_1anchor", model.mod, graph).hash
    assert play(graph, DecisionOptions(prefuse_epilogues=True), fuse=True)[0].hash == \
        make_plan("aggressive", model.mod, graph).hash


def test_a_plan_that_splits_an_epilogue_is_outside_the_prefused_space(model_cache):
    graph = model_cache("resnet_tiny").graph
    unfused = FusionPlan.singletons(len(graph), graph.fingerprint)
    assert set(actions_for_plan(graph, unfused, DecisionOptions(max_mac_anchors=1))) == {0}
    with pytest.raises(IllegalPlanError, match="keeps apart the epilogue edge .* prefuse_epilogues"):
        actions_for_plan(graph, unfused, PREFUSED)


def test_prefuse_option_is_strict_and_old_cards_decide_without_it():
    assert DecisionOptions.from_dict(PREFUSED.to_dict()) == PREFUSED
    assert DecisionOptions.from_dict({"max_mac_anchors": 1, "group_shapes": []}).prefuse_epilogues is False
    with pytest.raises(ConfigError, match="'prefuse_epilogues' must be true or false"):
        DecisionOptions.from_dict({"max_mac_anchors": 1, "prefuse_epilogues": "yes"})
