"""Group shapes: named multi-anchor groups that a schedule provider can schedule as one kernel.

Past one conv/matmul anchor per group, the rules schedule a kernel anchor by anchor (each anchor
its own loop nest, the intermediate through memory), so such a group's kernel is never faster
than its anchors apart; it saves only their launches. A few shapes are different: the provider
has a shared-tile schedule for them (``rules``: :mod:`fusion_rl.compiler.schedules.chain`). A
provider *declares* those shapes by name
(:attr:`fusion_rl.compiler.schedules.base.ScheduleProvider.group_shapes`); the decision mask
(``max_mac_anchors`` plus ``group_shapes``) then lets a group past the anchor cap exactly when it
is one of them, so the policy chooses among groups that really fuse.

A shape is a predicate on a group of an :class:`~fusion_rl.graph.opgraph.OpGraph`. This module
is the one home of the names and the predicates; the provider only names them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from fusion_rl.errors import ConfigError
from fusion_rl.graph.opgraph import OpGraph, OpNode

if TYPE_CHECKING:
    from fusion_rl.fusion.plan import FusionPlan

#: Pattern kinds an op between two anchors of a shape may have: elementwise, broadcast,
#: injective (every loop data-parallel, so it is computed inside the anchor's tile).
_INJECTIVE = (0, 1, 2)

GroupShape = Callable[[OpGraph, Sequence[int]], bool]


def is_pointwise_conv(node: OpNode) -> bool:
    """A 2-D NCHW convolution with a 1x1 kernel, one group and stride 1 (MobileNet's expand)."""
    if node.op != "conv2d" or len(node.arg_shapes) < 2 or len(node.shapes) != 1:
        return False
    data, weight = node.arg_shapes[0], node.arg_shapes[1]
    out = node.shapes[0]
    return (len(data) == len(weight) == len(out) == 4 and weight[2:] == (1, 1)
            and weight[1] == data[1] and out[2:] == data[2:])


def is_depthwise_conv(node: OpNode) -> bool:
    """A 2-D NCHW convolution in which output channel ``c`` reads input channel ``c`` only."""
    if node.op != "conv2d" or len(node.arg_shapes) < 2 or len(node.shapes) != 1:
        return False
    data, weight = node.arg_shapes[0], node.arg_shapes[1]
    out = node.shapes[0]
    return (len(data) == len(weight) == len(out) == 4 and weight[1] == 1
            and weight[0] == data[1] == out[1])


def is_grouped_conv(node: OpNode, width: int) -> bool:
    """A 2-D NCHW convolution of groups of ``width`` input and ``width`` output channels
    (RegNetX's 3x3 with a group width of 8); more than one group, so never a dense conv."""
    if node.op != "conv2d" or len(node.arg_shapes) < 2 or len(node.shapes) != 1:
        return False
    data, weight = node.arg_shapes[0], node.arg_shapes[1]
    out = node.shapes[0]
    return (len(data) == len(weight) == len(out) == 4 and weight[1] == width
            and data[1] == out[1] == weight[0] and data[1] % width == 0 and data[1] > width)


def pointwise_depthwise(graph: OpGraph, members: Sequence[int]) -> bool:
    """A pointwise convolution, its elementwise epilogue, the depthwise convolution it feeds, and
    that one's epilogue: nothing before the pointwise conv, no other anchor, and nothing of the
    pointwise side read outside the group (its result is consumed tile by tile)."""
    return _pointwise_into(graph, members, is_depthwise_conv)


#: Channels per group of the grouped convolutions :func:`pointwise_grouped` admits: one vector
#: of the shared tile's channel block (``rules``: 8 lanes, an AVX2 register or half an AVX-512 one).
GROUP_WIDTH = 8


def pointwise_grouped(graph: OpGraph, members: Sequence[int]) -> bool:
    """As :func:`pointwise_depthwise`, with a grouped convolution of :data:`GROUP_WIDTH`
    channels per group in place of the depthwise one (RegNetX's 1x1 -> grouped 3x3): a block
    of those output channels reads the same channels of the pointwise output and no other."""
    return _pointwise_into(graph, members, lambda node: is_grouped_conv(node, GROUP_WIDTH))


def _pointwise_into(graph: OpGraph, members: Sequence[int], is_consumer: Callable[[OpNode], bool]) -> bool:
    """A pointwise conv and its epilogue, then a conv that ``is_consumer`` accepts and its
    epilogue, and nothing else: the shared-tile pairs of :mod:`fusion_rl.compiler.schedules.chain`."""
    group = set(members)
    macs = [n for n in group if graph.nodes[n].is_mac_anchor]
    if len(macs) != 2:
        return False
    pw, dw = sorted(macs)  # program order: the producer first
    if not (is_pointwise_conv(graph.nodes[pw]) and is_consumer(graph.nodes[dw])):
        return False
    succ = graph.successor_lists()
    # The pointwise side: everything the pointwise conv reaches without passing the consumer.
    between, frontier = {pw}, [pw]
    while frontier:
        for nxt in succ[frontier.pop()]:
            if nxt not in group:
                return False  # a pointwise-side result leaves the group
            if nxt != dw and nxt not in between:
                between.add(nxt)
                frontier.append(nxt)
    if dw not in {c for n in between for c in succ[n]} or between & set(graph.outputs):
        return False
    # The consumer side: its epilogue, within the group.
    after, frontier = {dw}, [dw]
    while frontier:
        for nxt in succ[frontier.pop()]:
            if nxt in group and nxt not in after:
                after.add(nxt)
                frontier.append(nxt)
    if group != between | after:
        return False  # something before the pointwise conv, or beside the pair
    return all(graph.nodes[n].pattern in _INJECTIVE for n in group - {pw, dw})


#: Every shape by name: what a provider may declare and an env spec may list.
GROUP_SHAPES: dict[str, GroupShape] = {
    "pointwise_depthwise": pointwise_depthwise,
    "pointwise_grouped": pointwise_grouped,
}


def shape_instances(graph: OpGraph, name: str) -> list[tuple[int, ...]]:
    """The smallest groups of ``graph`` that are the shape ``name``, one per anchor pair.

    For each conv/matmul anchor, the group is the anchor, the injective ops it reaches without
    passing another anchor, and one anchor those feed. A pair whose intermediate also leaves
    that group (another consumer) is no instance: the shape's tile would not hold it.

    Raises
    ------
    ConfigError
        If ``name`` is not a known shape.
    """
    (name,) = check_shape_names([name])
    shape = GROUP_SHAPES[name]
    succ = graph.successor_lists()
    found = []
    for first, node in enumerate(graph.nodes):
        if not node.is_mac_anchor:
            continue
        reached, frontier, seconds = {first}, [first], set()
        while frontier:
            for nxt in succ[frontier.pop()]:
                if graph.nodes[nxt].is_mac_anchor:
                    seconds.add(nxt)
                elif graph.nodes[nxt].pattern in _INJECTIVE and nxt not in reached:
                    reached.add(nxt)
                    frontier.append(nxt)
        for second in sorted(seconds):
            group = tuple(sorted(reached | {second}))
            if shape(graph, group):
                found.append(group)
    return found


def formed_instances(plan: FusionPlan, instances: Sequence[Sequence[int]]) -> list[bool]:
    """For each instance (:func:`shape_instances`), whether ``plan`` holds its two anchors (its
    first and last node) in one group: the one decision that forms a shape."""
    group_of = plan.group_of()
    return [group_of[instance[0]] == group_of[instance[-1]] for instance in instances]


def check_shape_names(names: Collection[str], source: str = "group_shapes") -> tuple[str, ...]:
    """``names`` as a sorted tuple, each a known shape.

    Raises
    ------
    ConfigError
        naming the first unknown shape and the known ones.
    """
    for name in names:
        if name not in GROUP_SHAPES:
            raise ConfigError(f"{source}: unknown group shape {name!r}; known: {', '.join(GROUP_SHAPES)}")
    return tuple(sorted(set(names)))


def matches_shape(graph: OpGraph, members: Sequence[int], shapes: Collection[str]) -> bool:
    """Whether the group ``members`` is one of the named ``shapes``."""
    return any(GROUP_SHAPES[s](graph, members) for s in shapes)


def within_anchor_limit(graph: OpGraph, members: Sequence[int], max_mac_anchors: int | None,
                        shapes: Collection[str] = ()) -> bool:
    """Whether a group may exist under the mask: at most ``max_mac_anchors`` conv/matmul
    anchors, or one of ``shapes`` (``None``: no limit). Callers that keep anchor counts per
    group (the decision process, :func:`~fusion_rl.fusion.random_plans.grow_plan`) test the
    count themselves and call :func:`matches_shape` past it."""
    if max_mac_anchors is None:
        return True
    if sum(graph.nodes[n].is_mac_anchor for n in members) <= max_mac_anchors:
        return True
    return matches_shape(graph, members, shapes)
