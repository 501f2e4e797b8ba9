from __future__ import annotations

import torch

from fusion_rl.graph.features import NUM_EDGE_FEATURES, NUM_NODE_FEATURES, OP_VOCAB
from fusion_rl.graph.model import model_from_torch

from _tiny import ConvBlock, conv_block


def test_nodes_are_call_tir_ops_in_program_order():
    model = model_from_torch(*conv_block(), name="block")
    ops = [n.op for n in model.graph.nodes]
    assert ops == ["conv2d", "add", "relu", "conv2d", "add", "add", "split", "relu", "multiply"]
    conv = model.graph.nodes[0]
    assert conv.is_anchor and conv.is_mac_anchor and conv.pattern == 4
    assert conv.shapes == ((1, 8, 8, 8),) and conv.dtype == "float32"
    assert conv.flops == 2 * 8 * 8 * 8 * 3 * 3 * 3  # 2 x MACs of a 3x3x3 -> 8 conv on 8x8
    assert conv.weight_bytes == 8 * 3 * 3 * 3 * 4
    assert model.graph.nodes[6].shapes == ((1, 4, 8, 8), (1, 4, 8, 8))  # split: two outputs


def test_edges_follow_data_including_tuple_getitem():
    g = model_from_torch(*conv_block(), name="block").graph
    pairs = {(e.src, e.dst, e.index) for e in g.edges}
    assert (2, 5, 0) in pairs  # the residual: relu feeds the second add
    assert (6, 7, 0) in pairs and (6, 8, 1) in pairs  # split's two halves, through getitems
    assert g.outputs == [8]
    assert g.producers(5) == [2, 4] and g.consumers(2) == [3, 5]


def test_fingerprint_depends_on_structure_not_weights():
    a = model_from_torch(*conv_block(), name="a").graph
    module, inputs = conv_block()
    with torch.no_grad():
        module.c1.weight.mul_(3.0)
    b = model_from_torch(module, inputs, name="b").graph
    assert a.fingerprint == b.fingerprint

    class Wider(ConvBlock):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 5, padding=2)

    c = model_from_torch(Wider().eval(), inputs, name="c").graph
    assert c.fingerprint != a.fingerprint


def test_to_pyg_shapes_and_ranges():
    g = model_from_torch(*conv_block(), name="block").graph
    data = g.to_pyg()
    assert data.x.shape == (9, NUM_NODE_FEATURES)
    assert data.edge_index.shape == (2, len(g.edges))
    assert data.edge_attr.shape == (len(g.edges), NUM_EDGE_FEATURES)
    assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0
    assert data.x[:, : len(OP_VOCAB)].sum(dim=1).eq(1).all()  # exactly one op-type slot per node
