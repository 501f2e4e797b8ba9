"""Message-passing layers of the fusion policy's graph encoder.

Each layer is a small :class:`torch.nn.Module` in the PyTorch Geometric style: it takes node
features ``x [N, C]``, ``edge_index [2, E]`` and ``edge_attr [E, D]`` of an already batched
graph (padding stripped), has ``reset_parameters()`` and a one-line ``__repr__``.

:class:`GATv2Block` follows X-RLflow's encoder (GAT, 4 heads, hidden 32): attention over the
incoming edges of each node, conditioned on the edge features (tensor bytes, tuple index and the
env's dynamic edge flags), with a residual connection and a LayerNorm so that five or more rounds
stay trainable with PPO's small learning rates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import GATv2Conv

__all__ = ["GATv2Block", "MLP", "add_reverse_edges"]


def add_reverse_edges(edge_index: Tensor, edge_attr: Tensor) -> tuple[Tensor, Tensor]:
    """Append every edge reversed, with one extra feature: 0 on data-flow edges, 1 on reversed.

    Fusing a producer with a consumer depends on both sides (what the producer feeds, what the
    consumer reads), so information must travel against the data flow too; the flag lets the
    attention tell the two directions apart.

    Parameters
    ----------
    edge_index
        ``[2, E]`` (src, dst).
    edge_attr
        ``[E, D]``.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``edge_index [2, 2E]`` and ``edge_attr [2E, D + 1]``.
    """
    num_edges = edge_index.size(1)
    forward = torch.cat([edge_attr, edge_attr.new_zeros(num_edges, 1)], dim=1)
    backward = torch.cat([edge_attr, edge_attr.new_ones(num_edges, 1)], dim=1)
    return torch.cat([edge_index, edge_index.flip(0)], dim=1), torch.cat([forward, backward], dim=0)


class MLP(nn.Sequential):
    """``Linear -> act -> ... -> Linear [-> act]``: the small dense nets around the GNN.

    Parameters
    ----------
    sizes
        ``(in, hidden..., out)``.
    activation
        Activation class, instantiated between layers.
    activate_last
        Also apply the activation after the last layer.
    """

    def __init__(
        self, sizes: list[int] | tuple[int, ...], activation: type[nn.Module] = nn.ReLU,
        activate_last: bool = True,
    ) -> None:
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least (in, out) sizes, got {sizes}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if activate_last or i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)
        self.sizes = tuple(sizes)

    def reset_parameters(self) -> None:
        for m in self:
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({' -> '.join(map(str, self.sizes))})"


class GATv2Block(nn.Module):
    r"""One round of message passing: ``x' = LayerNorm(x + act(GATv2(x, edge_index, edge_attr)))``.

    The attention of GATv2 (Brody et al., 2022) scores each incoming edge ``j -> i`` from
    :math:`x_i`, :math:`x_j` and the edge features :math:`e_{ji}`; the ``heads`` outputs are
    averaged (``concat=False``) so the width stays ``channels`` through every round. Self-loops
    are added (with the mean of the incoming edge features), so isolated nodes keep their state.

    Parameters
    ----------
    channels
        Node feature width, in and out (the residual needs them equal).
    edge_dim
        Edge feature width.
    heads
        Attention heads.
    dropout
        Dropout on the attention coefficients.
    """

    def __init__(self, channels: int, edge_dim: int, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.channels = channels
        self.edge_dim = edge_dim
        self.heads = heads
        self.conv = GATv2Conv(
            channels, channels, heads=heads, concat=False, edge_dim=edge_dim, dropout=dropout,
            add_self_loops=True, fill_value="mean",
        )
        self.norm = nn.LayerNorm(channels)
        self.act = nn.ReLU()

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        return self.norm(x + self.act(self.conv(x, edge_index, edge_attr)))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.channels}, edge_dim={self.edge_dim}, "
            f"heads={self.heads})"
        )
