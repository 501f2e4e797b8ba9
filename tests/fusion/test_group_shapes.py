"""fusion_rl/fusion/group_shapes.py: named multi-anchor group shapes, and the anchor limit."""

from __future__ import annotations

import pytest

from fusion_rl.decisions import DecisionOptions
from fusion_rl.decisions.process import DecisionProcess, actions_for_plan
from fusion_rl.errors import ConfigError, IllegalPlanError
from fusion_rl.fusion.group_shapes import (
    check_shape_names,
    formed_instances,
    is_depthwise_conv,
    is_grouped_conv,
    is_pointwise_conv,
    pointwise_depthwise,
    pointwise_grouped,
    shape_instances,
    within_anchor_limit,
)
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.opgraph import OpEdge, OpGraph, OpNode

_MAP = (1, 16, 8, 8)


def _conv(i: int, data: tuple, weight: tuple, out: tuple) -> OpNode:
    return OpNode(i, f"v{i}", f"conv2d{i}", "conv2d", 4, (out,), "float32", 1e3, 64, 64, 64, (data, weight))


def _ewise(i: int, pattern: int = 0, op: str = "add") -> OpNode:
    return OpNode(i, f"v{i}", f"{op}{i}", op, pattern, (_MAP,), "float32", 64.0, 64, 64, 0, (_MAP,))


def _block(first: OpNode | None = None, side_exit: bool = False) -> OpGraph:
    """[0 first conv] -> 1 pointwise -> 2 relu -> 3 depthwise -> 4 relu -> 5 pointwise project;
    ``side_exit``: the relu after the pointwise conv is also a model output."""
    nodes = [
        first or _conv(0, (1, 16, 8, 8), (16, 16, 3, 3), _MAP),
        _conv(1, _MAP, (16, 16, 1, 1), _MAP),
        _ewise(2),
        _conv(3, _MAP, (16, 1, 3, 3), _MAP),
        _ewise(4),
        _conv(5, _MAP, (16, 16, 1, 1), _MAP),
    ]
    edges = [OpEdge(i, i + 1, 0, 64) for i in range(5)]
    return OpGraph(nodes, edges, outputs=[5, 2] if side_exit else [5], name="block")


def test_conv_kinds_come_from_the_argument_shapes():
    g = _block()
    assert [is_pointwise_conv(n) for n in g.nodes] == [False, True, False, False, False, True]
    assert [is_depthwise_conv(n) for n in g.nodes] == [False, False, False, True, False, False]
    # Stride 2 is not the pointwise shape; neither is a grouped conv with 8 channels per group.
    assert not is_pointwise_conv(_conv(0, (1, 16, 8, 8), (16, 16, 1, 1), (1, 16, 4, 4)))
    assert not is_depthwise_conv(_conv(0, (1, 16, 8, 8), (16, 8, 3, 3), _MAP))
    # A node built without argument shapes (an old graph) is neither.
    assert not is_pointwise_conv(OpNode(0, "v", "conv2d", "conv2d", 4, (_MAP,), "float32", 1.0, 1, 1, 1))


def test_pointwise_depthwise_is_the_pair_and_its_epilogues_only():
    g = _block()
    assert pointwise_depthwise(g, [1, 2, 3, 4])
    assert pointwise_depthwise(g, [1, 2, 3])
    assert not pointwise_depthwise(g, [0, 1, 2, 3, 4])    # an anchor before the pointwise conv
    assert not pointwise_depthwise(g, [3, 4, 5])          # depthwise -> pointwise: the other order
    assert not pointwise_depthwise(g, [1, 2, 3, 4, 5])    # three anchors
    assert not pointwise_depthwise(_block(side_exit=True), [1, 2, 3, 4])  # the intermediate escapes
    # A 3x3 producer is not pointwise.
    three = _block(first=_conv(0, (1, 16, 8, 8), (16, 16, 3, 3), _MAP))
    nodes = list(three.nodes)
    nodes[1] = _conv(1, _MAP, (16, 16, 3, 3), _MAP)
    assert not pointwise_depthwise(OpGraph(nodes, three.edges, three.outputs), [1, 2, 3, 4])
    # A reduction between the two is not elementwise.
    nodes = list(g.nodes)
    nodes[2] = _ewise(2, pattern=3, op="mean")
    assert not pointwise_depthwise(OpGraph(nodes, g.edges, g.outputs), [1, 2, 3, 4])


def _grouped_block(width: int = 8) -> OpGraph:
    """As :func:`_block`, with a grouped 3x3 conv of ``width`` channels per group at node 3."""
    g = _block()
    nodes = list(g.nodes)
    nodes[3] = _conv(3, _MAP, (16, width, 3, 3), _MAP)
    return OpGraph(nodes, g.edges, g.outputs, name="grouped")


def test_pointwise_grouped_needs_groups_of_eight_channels():
    assert is_grouped_conv(_conv(0, _MAP, (16, 8, 3, 3), _MAP), 8)
    assert not is_grouped_conv(_conv(0, _MAP, (16, 16, 3, 3), _MAP), 16)  # one group: a dense conv
    assert not is_grouped_conv(_conv(0, _MAP, (16, 1, 3, 3), _MAP), 8)    # depthwise
    assert not is_grouped_conv(_conv(0, (1, 16, 8, 8), (32, 8, 3, 3), (1, 32, 8, 8)), 8)  # 8 in, 16 out per group
    g = _grouped_block()
    assert pointwise_grouped(g, [1, 2, 3, 4]) and not pointwise_depthwise(g, [1, 2, 3, 4])
    assert not pointwise_grouped(g, [0, 1, 2, 3, 4])      # an anchor before the pointwise conv
    assert not pointwise_grouped(_grouped_block(width=4), [1, 2, 3, 4])  # groups of 4
    assert not pointwise_grouped(_block(), [1, 2, 3, 4])  # depthwise is the other shape
    assert within_anchor_limit(g, [1, 2, 3, 4], 1, ["pointwise_grouped"])
    assert not within_anchor_limit(g, [1, 2, 3, 4], 1, ["pointwise_depthwise"])


def test_the_anchor_limit_admits_declared_shapes_only_past_the_cap():
    g = _block()
    assert within_anchor_limit(g, [1, 2, 3, 4, 5], None)
    assert within_anchor_limit(g, [1, 2], 1)
    assert not within_anchor_limit(g, [1, 2, 3, 4], 1)
    assert within_anchor_limit(g, [1, 2, 3, 4], 1, ("pointwise_depthwise",))
    assert not within_anchor_limit(g, [0, 1, 2, 3, 4], 1, ("pointwise_depthwise",))
    with pytest.raises(ConfigError, match="unknown group shape 'attention'; known: pointwise_depthwise"):
        check_shape_names(["attention"])


def test_decision_options_carry_group_shapes_and_old_cards_have_none():
    opts = DecisionOptions(max_mac_anchors=1, group_shapes=("pointwise_depthwise",))
    assert DecisionOptions.from_dict(opts.to_dict()) == opts
    assert opts.to_dict() == {"max_mac_anchors": 1, "group_shapes": ["pointwise_depthwise"], "prefuse_epilogues": False}
    # A card written before the option existed planned without it.
    assert DecisionOptions.from_dict({"max_mac_anchors": 1}) == DecisionOptions(max_mac_anchors=1)
    with pytest.raises(ConfigError, match="unknown group shape"):
        DecisionOptions.from_dict({"max_mac_anchors": 1, "group_shapes": ["fused_attention"]})
    with pytest.raises(ConfigError, match="needs 'max_mac_anchors'"):
        DecisionOptions(group_shapes=("pointwise_depthwise",))
    with pytest.raises(ConfigError, match="list of shape names"):
        DecisionOptions(max_mac_anchors=1, group_shapes="pointwise_depthwise")


def test_the_decision_mask_opens_exactly_the_declared_pairs(model_cache):
    """Under a cap of one anchor, fusing on every decision gives ``aggressive_1anchor``; with the
    pair declared it gives ``aggressive_shapes`` (each pair one group), and that plan is
    unreachable without the declaration."""
    model = model_cache("mobilenet_tiny")
    graph = model.graph

    def always_fuse(options: DecisionOptions) -> str:
        process = DecisionProcess(graph, options)
        while not process.done:
            process.decide(process.can_fuse())
        return process.plan().hash

    shaped = make_plan("aggressive_shapes", model.mod, graph)
    capped = DecisionOptions(max_mac_anchors=1)
    declared = DecisionOptions(max_mac_anchors=1, group_shapes=("pointwise_depthwise",))
    assert always_fuse(capped) == make_plan("aggressive_1anchor", model.mod, graph).hash
    assert always_fuse(declared) == shaped.hash != always_fuse(capped)
    assert actions_for_plan(graph, shaped, declared)
    with pytest.raises(IllegalPlanError, match="no declared group shape"):
        actions_for_plan(graph, shaped, capped)


def test_efficientnet_mbconv_expansions_are_the_declared_pair(tmp_path):
    """EfficientNet-B0 is the training family that shows the policy ``pointwise_depthwise``:
    at tiny size, fusing every declared pair forms the pair in its MBConv blocks, including
    across the explicit zero pad of a strided depthwise conv (the pad is injective, so it is
    computed inside the shared tile)."""
    from fusion_rl.graph import zoo
    from fusion_rl.graph.model import load_onnx_model

    path = zoo.import_path("bench_efficientnet_b0", cache_dir=tmp_path, image_size=32,
                           width_percent=25, depth_percent=25)
    model = load_onnx_model(path)
    graph = model.graph
    pairs = [g for g in make_plan("aggressive_shapes", model.mod, graph).groups
             if sum(graph.nodes[n].is_mac_anchor for n in g) == 2]
    assert pairs and all(pointwise_depthwise(graph, g) for g in pairs)
    assert any("pad" in {graph.nodes[n].op for n in g} for g in pairs)
    assert not any(pointwise_grouped(graph, g) for g in pairs)


def test_shape_instances_are_the_pairs_of_fusing_every_declared_shape(model_cache):
    """On tiny MobileNet, the instances of ``pointwise_depthwise`` are the anchor pairs that
    ``aggressive_shapes`` fuses; a residual CNN has none; an escaping intermediate is none."""
    model = model_cache("mobilenet_tiny")
    graph = model.graph
    found = shape_instances(graph, "pointwise_depthwise")
    anchors = lambda group: tuple(n for n in group if graph.nodes[n].is_mac_anchor)  # noqa: E731
    fused = [anchors(g) for g in make_plan("aggressive_shapes", model.mod, graph).groups if len(anchors(g)) == 2]
    assert found and sorted(anchors(g) for g in found) == sorted(fused)
    assert all(pointwise_depthwise(graph, g) for g in found)
    assert shape_instances(graph, "pointwise_grouped") == []
    assert shape_instances(model_cache("resnet_tiny").graph, "pointwise_depthwise") == []
    assert shape_instances(_block(), "pointwise_depthwise") == [(1, 2, 3)]
    assert shape_instances(_block(side_exit=True), "pointwise_depthwise") == []
    with pytest.raises(ConfigError, match="unknown group shape 'attention'"):
        shape_instances(_block(), "attention")


def test_an_instance_is_formed_when_its_two_anchors_share_a_group(model_cache):
    """On tiny MobileNet, ``aggressive_shapes`` forms every instance and the one-anchor rule none;
    a plan that fuses only the first pair forms only the first."""
    from fusion_rl.fusion.plan_space import form_shape

    model = model_cache("mobilenet_tiny")
    graph = model.graph
    found = shape_instances(graph, "pointwise_depthwise")
    shapes = make_plan("aggressive_shapes", model.mod, graph)
    one_anchor = make_plan("aggressive_1anchor", model.mod, graph)
    first = form_shape(graph, one_anchor, "pointwise_depthwise", found[0])
    assert formed_instances(shapes, found) == [True] * len(found)
    assert formed_instances(one_anchor, found) == [False] * len(found)
    assert formed_instances(first, found) == [True] + [False] * (len(found) - 1)
