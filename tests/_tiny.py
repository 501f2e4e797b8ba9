"""Tiny hand-made models and graphs for unit tests (a few ops each)."""

from __future__ import annotations

import torch
from torch import nn

from fusion_rl.graph.opgraph import OpEdge, OpGraph, OpNode


class ConvBlock(nn.Module):
    """conv -> add(bias) -> relu -> conv -> add -> add(residual) -> split -> relu * other half."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        z = self.c2(y) + y
        a, b = torch.split(z, 4, dim=1)
        return torch.relu(a) * b


def conv_block():
    torch.manual_seed(0)
    return ConvBlock().eval(), (torch.randn(1, 3, 8, 8),)


def diamond() -> OpGraph:
    """0 -> 1 -> 3 and 0 -> 2 -> 3: {0, 3} is not convex; {0, 1, 2, 3} is."""
    def node(i: int, op: str = "add", pattern: int = 0) -> OpNode:
        return OpNode(i, f"v{i}", op, op, pattern, ((1, 4),), "float32", 4.0, 32, 16, 0)

    nodes = [node(0, "conv2d", 4), node(1), node(2, "matmul", 4), node(3)]
    edges = [OpEdge(0, 1, 0, 16), OpEdge(0, 2, 0, 16), OpEdge(1, 3, 0, 16), OpEdge(2, 3, 0, 16)]
    return OpGraph(nodes, edges, outputs=[3], name="diamond")


def crossed_groups() -> OpGraph:
    """x -> v, x -> y, w -> y, w -> u, u -> v. {x, v} and {w, y, u} are each convex, but
    x -> y puts the first before the second and u -> v the second before the first."""
    nodes = [OpNode(i, f"v{i}", "add", "add", 0, ((1, 4),), "float32", 4.0, 32, 16, 0) for i in range(5)]
    x, w, y, u, v = range(5)
    edges = [OpEdge(x, v, 0, 16), OpEdge(x, y, 0, 16), OpEdge(w, y, 0, 16), OpEdge(w, u, 0, 16), OpEdge(u, v, 0, 16)]
    return OpGraph(nodes, edges, outputs=[y, v], name="crossed")


def mbconv_with_pooling() -> tuple[OpGraph, "FusionPlan"]:
    """An MBConv block as EfficientNet exports it, and the one-anchor plan of it: 0 conv ->
    1 pointwise -> 2 swish -> 3 zero pad -> 4 depthwise -> 5 swish -> 6 pooling (the
    squeeze-excite's mean) -> 7 projecting conv, grouped {0}, {1, 2, 3}, {4, 5, 6}, {7}. The
    pointwise -> depthwise pair is a declared shape, but no one-edge merge forms it: the
    depthwise conv's group holds the pooling, which the shape excludes."""
    from fusion_rl.fusion.plan import FusionPlan

    small, big, padded = (1, 16, 8, 8), (1, 64, 8, 8), (1, 64, 10, 10)

    def node(i, op, pattern, out, args=()):
        return OpNode(i, f"v{i}", f"{op}{i}", op, pattern, (out,), "float32", 1e3, 64, 64, 0, args)

    nodes = [
        node(0, "conv2d", 4, small, (small, (16, 16, 3, 3))),
        node(1, "conv2d", 4, big, (small, (64, 16, 1, 1))),
        node(2, "multiply", 0, big, (big,)),
        node(3, "pad", 2, padded, (big,)),
        node(4, "conv2d", 4, big, (padded, (64, 1, 3, 3))),
        node(5, "multiply", 0, big, (big,)),
        node(6, "mean", 3, (1, 64, 1, 1), (big,)),
        node(7, "conv2d", 4, small, ((1, 64, 1, 1), (16, 64, 1, 1))),
    ]
    graph = OpGraph(nodes, [OpEdge(i, i + 1, 0, 64) for i in range(7)], outputs=[7], name="mbconv")
    plan = FusionPlan.from_groups([(0,), (1, 2, 3), (4, 5, 6), (7,)], len(nodes), graph.fingerprint)
    return graph, plan
