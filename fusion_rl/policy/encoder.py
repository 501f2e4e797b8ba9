"""The GNN encoder of the fusion policy, as an SB3 features extractor.

:class:`GraphFeaturesExtractor` turns a batch of padded ``Dict`` observations (the contract of
:mod:`fusion_rl.env.spaces`) into one fixed-size vector per observation, whatever the graph's
size:

1. :func:`obs_to_batch` strips the padding (``node_mask``, ``edge_mask``) into one PyG
   :class:`~torch_geometric.data.Batch` of disjoint graphs;
2. :class:`GraphEncoder` runs ``num_layers`` rounds of :class:`~fusion_rl.policy.layers.GATv2Block`
   over it (edges in both directions);
3. a readout concatenates ``[h_src, h_dst, mean(src group), mean(dst group), mean(graph),
   MLP(hardware)]``, where src/dst are the two ends of the edge being decided (``decision``) and
   the groups are their current groups (``group``).

Only real nodes and edges reach the GNN, so the features do not depend on ``max_nodes`` /
``max_edges`` (``tests/test_policy.py`` checks this), and one trained network serves graphs of
any size and any target (the hardware vector conditions the readout).
"""

from __future__ import annotations

import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn
from torch_geometric.data import Batch
from torch_geometric.nn import global_mean_pool

from fusion_rl.policy.layers import MLP, GATv2Block, add_reverse_edges

__all__ = ["GraphEncoder", "GraphFeaturesExtractor", "obs_to_batch", "REQUIRED_KEYS"]

#: Observation keys the extractor reads (see :mod:`fusion_rl.env.spaces`).
REQUIRED_KEYS = (
    "node_features", "edge_index", "edge_features", "node_mask", "edge_mask", "group",
    "decision", "hardware",
)


def obs_to_batch(obs: dict[str, Tensor]) -> Batch:
    """Strip the padding of a batch of observations into one PyG ``Batch``.

    SB3 hands Box observations over as float tensors, so index tensors are cast back to
    ``long`` here (exact: indices stay far below 2**24). Node ids are renumbered from
    ``(observation, padded id)`` to positions in the batch; a padded (masked) node or edge never
    reaches the GNN.

    :param obs: Tensors with a leading batch dimension ``B``, keys as in
        :func:`fusion_rl.env.spaces.observation_space`.
    :returns: A ``Batch`` with ``x [n, NODE_DIM]``, ``edge_index [2, e]``, ``edge_attr [e,
        EDGE_DIM]``, ``batch [n]``, plus ``node_id [B, max_nodes]`` (batch position of each
        padded node id, -1 where padded) and ``num_graphs = B``.
    """
    node_mask = obs["node_mask"] > 0.5  # [B, N]
    edge_mask = obs["edge_mask"] > 0.5  # [B, E]
    num_graphs, max_nodes = node_mask.shape
    # Position in the batch of every real node; -1 marks padding.
    node_id = torch.cumsum(node_mask.reshape(-1).long(), 0).reshape(num_graphs, max_nodes) - 1
    node_id = torch.where(node_mask, node_id, torch.full_like(node_id, -1))

    edge_index = obs["edge_index"].long().clamp(0, max_nodes - 1)  # [B, 2, E]
    src = node_id.gather(1, edge_index[:, 0])[edge_mask]
    dst = node_id.gather(1, edge_index[:, 1])[edge_mask]
    if bool((src < 0).any() or (dst < 0).any()):
        raise ValueError("an unmasked edge points at a padded node; the observation is malformed")

    batch_index = torch.arange(num_graphs, device=node_mask.device)
    counts = node_mask.sum(1)
    batch = Batch(
        x=obs["node_features"][node_mask].float(),
        edge_index=torch.stack([src, dst]),
        edge_attr=obs["edge_features"][edge_mask].float(),
        batch=batch_index[:, None].expand(num_graphs, max_nodes)[node_mask],
        ptr=torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]),
    )
    batch.node_id = node_id
    return batch


class GraphEncoder(nn.Module):
    """Node embeddings of a batched graph: input projection, then rounds of GATv2.

    :param node_dim: Input node feature width.
    :param edge_dim: Input edge feature width.
    :param hidden: Width of node embeddings (X-RLflow: 32).
    :param heads: Attention heads per round (X-RLflow: 4).
    :param num_layers: Rounds of message passing (X-RLflow: 5).
    :param bidirectional: Also pass messages from consumers to producers (see
        :func:`~fusion_rl.policy.layers.add_reverse_edges`).
    :param dropout: Dropout on attention coefficients.
    """

    def __init__(
        self, node_dim: int, edge_dim: int, hidden: int = 32, heads: int = 4, num_layers: int = 5,
        bidirectional: bool = True, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.node_dim, self.edge_dim, self.hidden = node_dim, edge_dim, hidden
        self.bidirectional = bidirectional
        self.node_in = MLP((node_dim, hidden))
        conv_edge_dim = edge_dim + 1 if bidirectional else edge_dim
        self.layers = nn.ModuleList(
            GATv2Block(hidden, conv_edge_dim, heads=heads, dropout=dropout) for _ in range(num_layers)
        )

    def reset_parameters(self) -> None:
        self.node_in.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        if self.bidirectional:
            edge_index, edge_attr = add_reverse_edges(edge_index, edge_attr)
        h = self.node_in(x)
        for layer in self.layers:
            h = layer(h, edge_index, edge_attr)
        return h

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(node_dim={self.node_dim}, edge_dim={self.edge_dim}, "
            f"hidden={self.hidden}, layers={len(self.layers)}, bidirectional={self.bidirectional})"
        )


def _mean_by_graph(h: Tensor, weight: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Mean of ``h`` over the nodes with ``weight`` 1, per graph; zeros where none."""
    total = h.new_zeros(num_graphs, h.size(1)).index_add_(0, batch, h * weight[:, None])
    count = h.new_zeros(num_graphs).index_add_(0, batch, weight)
    return total / count.clamp(min=1.0)[:, None]


class GraphFeaturesExtractor(BaseFeaturesExtractor):
    """SB3 features extractor: padded graph observation -> fixed-size decision features.

    ``features_dim = 5 * hidden + hw_hidden``. Choose it through ``policy_kwargs`` as SB3 does::

        MaskablePPO("MultiInputPolicy", env, policy_kwargs=dict(
            features_extractor_class=GraphFeaturesExtractor,
            features_extractor_kwargs=dict(hidden=32, heads=4, num_layers=5)))

    :param observation_space: The env's ``Dict`` space (:func:`fusion_rl.env.spaces.observation_space`).
    :param hidden: Node embedding width.
    :param heads: Attention heads.
    :param num_layers: Rounds of message passing.
    :param hw_hidden: Width of the hardware embedding.
    :param bidirectional: Pass messages against the data flow too.
    :param dropout: Dropout on attention coefficients.
    """

    def __init__(
        self, observation_space: spaces.Dict, hidden: int = 32, heads: int = 4, num_layers: int = 5,
        hw_hidden: int = 16, bidirectional: bool = True, dropout: float = 0.0,
    ) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in getattr(observation_space, "spaces", {})]
        if missing:
            raise ValueError(
                f"GraphFeaturesExtractor needs a Dict observation space with keys {REQUIRED_KEYS}; "
                f"missing {missing}. Build it with fusion_rl.env.spaces.observation_space()."
            )
        super().__init__(observation_space, features_dim=5 * hidden + hw_hidden)
        node_dim = observation_space["node_features"].shape[-1]
        edge_dim = observation_space["edge_features"].shape[-1]
        hw_dim = observation_space["hardware"].shape[-1]
        self.encoder = GraphEncoder(
            node_dim, edge_dim, hidden=hidden, heads=heads, num_layers=num_layers,
            bidirectional=bidirectional, dropout=dropout,
        )
        self.hardware = MLP((hw_dim, hw_hidden))

    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        self.hardware.reset_parameters()

    def forward(self, observations: dict[str, Tensor]) -> Tensor:
        graph = obs_to_batch(observations)
        num_graphs = graph.num_graphs
        h = self.encoder(graph.x, graph.edge_index, graph.edge_attr)
        # A trailing zero row lets padded ids (-1 -> last row) gather zeros instead of failing,
        # e.g. for an all-padding observation.
        h_pad = torch.cat([h, h.new_zeros(1, h.size(1))])

        decision = observations["decision"].long()  # (edge, src, dst)
        max_nodes = graph.node_id.size(1)
        ends = decision[:, 1:3].clamp(0, max_nodes - 1)
        ends_id = graph.node_id.gather(1, ends)  # [B, 2], -1 if padded
        h_src, h_dst = h_pad[ends_id[:, 0]], h_pad[ends_id[:, 1]]

        # Group membership of the two ends, as weights over the real nodes of each graph.
        node_mask = observations["node_mask"] > 0.5
        group = observations["group"].long()
        end_groups = group.gather(1, ends)  # [B, 2]
        in_src = (group == end_groups[:, :1]) & node_mask
        in_dst = (group == end_groups[:, 1:]) & node_mask
        src_pool = _mean_by_graph(h, in_src[node_mask].float(), graph.batch, num_graphs)
        dst_pool = _mean_by_graph(h, in_dst[node_mask].float(), graph.batch, num_graphs)
        graph_pool = global_mean_pool(h, graph.batch, size=num_graphs)

        hw = self.hardware(observations["hardware"].float())
        return torch.cat([h_src, h_dst, src_pool, dst_pool, graph_pool, hw], dim=1)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(features_dim={self.features_dim}, encoder={self.encoder!r}, "
            f"hardware={self.hardware!r})"
        )
