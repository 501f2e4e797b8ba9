"""The epilogue edges of an OpGraph: the fusion every rule set agrees on (on every bench model).

An elementwise or broadcast op joins the group of its first producer that is a conv/matmul
anchor or another elementwise op, when it is that producer's sole consumer and the producer is
not a graph output. These are the bias, normalisation, activation and residual epilogues of
conv/matmul and the chains of elementwise ops: what TensorRT-style engines fuse, and so no
intermediate escapes a kernel. The ``tensorrt`` rule set (:mod:`fusion_rl.fusion.rules`) is
exactly these edges; :class:`~fusion_rl.decisions.DecisionOptions` ``prefuse_epilogues`` fuses
them without asking the policy.
"""

from __future__ import annotations

from fusion_rl.graph.opgraph import OpGraph

_EWISE = (0, 1)  # TVM pattern kinds: elementwise, broadcast


def epilogue_edges(graph: OpGraph) -> list[int]:
    """Indices into ``graph.edges`` of the epilogue edges, in edge order.

    Every edge between a consumer and the one producer it joins is listed (an op may read the
    same tensor twice). Their groups each hold at most one conv/matmul anchor, and the plan that
    fuses exactly these edges is legal (:func:`fusion_rl.fusion.rules.tensorrt` checks it).
    """
    consumers = graph.successor_lists()
    producers = graph.predecessor_lists()
    joins: set[tuple[int, int]] = set()
    for node in graph.nodes:  # program order is topological
        if node.pattern not in _EWISE:
            continue
        for p in producers[node.id]:
            producer = graph.nodes[p]
            if len(consumers[p]) != 1 or p in graph.outputs:
                continue
            if producer.pattern in _EWISE or producer.is_mac_anchor:
                joins.add((p, node.id))
                break
    return [k for k, e in enumerate(graph.edges) if (e.src, e.dst) in joins]
