"""The decision network without the RL stack: torch and PyTorch Geometric only.

:class:`DecisionFeatures` is the graph encoder plus readout that the SB3 features extractor
(:class:`fusion_rl.policy.encoder.GraphFeaturesExtractor`) wraps for training, and
:class:`PolicyNetwork` adds the actor head: padded observation -> action logits. An exported
policy (:mod:`fusion_rl.export`) is a :class:`PolicyNetwork` rebuilt from its card and weights,
so compiler users need neither SB3 nor gymnasium.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch
from torch_geometric.nn import global_mean_pool

from fusion_rl.errors import ConfigError
from fusion_rl.policy.layers import MLP, GATv2Block, add_reverse_edges

__all__ = ["DecisionFeatures", "GraphEncoder", "PolicyNetwork", "node_chunks", "obs_to_batch"]

#: Constructor arguments of :class:`DecisionFeatures` a saved network may give:
#: name -> (type, smallest, largest, required). The bounds are far above any trained policy and
#: keep a crafted file from asking for a network of terabytes before a weight is read.
_FEATURE_ARGS: dict[str, tuple[type, float, float, bool]] = {
    "node_dim": (int, 1, 4096, True),
    "edge_dim": (int, 1, 4096, True),
    "hw_dim": (int, 1, 4096, True),
    "hidden": (int, 1, 1024, False),
    "heads": (int, 1, 32, False),
    "num_layers": (int, 1, 32, False),
    "hw_hidden": (int, 1, 1024, False),
    "bidirectional": (bool, 0, 1, False),
    "dropout": (float, 0.0, 0.99, False),
}
#: Most hidden layers, and widest layer, of the actor MLP.
_MAX_PI_LAYERS, _MAX_PI_WIDTH = 8, 4096


def _check_arg(value: Any, kind: type, low: float, high: float, where: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ConfigError(f"{where} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{where} must be in {low}..{high}, got {value!r}")
    return kind(value)


def obs_to_batch(obs: dict[str, Tensor]) -> Batch:
    """Strip the padding of a batch of observations into one PyG ``Batch``.

    SB3 hands Box observations over as float tensors, so index tensors are cast back to
    ``long`` here (exact: indices stay far below 2**24). Node ids are renumbered from
    ``(observation, padded id)`` to positions in the batch; a padded (masked) node or edge never
    reaches the GNN.

    Parameters
    ----------
    obs
        Tensors with a leading batch dimension ``B``, keys as in
        :mod:`fusion_rl.decisions.layout`.

    Returns
    -------
    Batch
        A ``Batch`` with ``x [n, NODE_DIM]``, ``edge_index [2, e]``, ``edge_attr [e,
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


def node_chunks(node_mask: Tensor, max_nodes: int) -> list[slice]:
    """Consecutive slices of a batch of observations, each with at most ``max_nodes`` real
    nodes in all (a single graph larger than that is a slice of its own).

    Parameters
    ----------
    node_mask
        ``[B, N]``, positive where a node is real.
    max_nodes
        Node budget of a slice.
    """
    counts = (node_mask > 0.5).sum(1).tolist()
    slices, start, total = [], 0, 0
    for i, count in enumerate(counts):
        if i > start and total + count > max_nodes:
            slices.append(slice(start, i))
            start, total = i, 0
        total += count
    slices.append(slice(start, len(counts)))
    return slices


class GraphEncoder(nn.Module):
    """Node embeddings of a batched graph: input projection, then rounds of GATv2.

    Parameters
    ----------
    node_dim
        Input node feature width.
    edge_dim
        Input edge feature width.
    hidden
        Width of node embeddings (X-RLflow: 32).
    heads
        Attention heads per round (X-RLflow: 4).
    num_layers
        Rounds of message passing (X-RLflow: 5).
    bidirectional
        Also pass messages from consumers to producers (see
        :func:`~fusion_rl.policy.layers.add_reverse_edges`).
    dropout
        Dropout on attention coefficients.
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


class DecisionFeatures(nn.Module):
    """Padded graph observation -> ``[h_src, h_dst, mean(src group), mean(dst group),
    mean(graph), MLP(hardware)]`` (width ``5 * hidden + hw_hidden``)."""

    #: Most real nodes encoded at once (see :meth:`forward`); a larger graph is encoded alone.
    CHUNK_NODES = 4096

    def __init__(
        self, node_dim: int, edge_dim: int, hw_dim: int, hidden: int = 32, heads: int = 4,
        num_layers: int = 5, hw_hidden: int = 16, bidirectional: bool = True, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.features_dim = 5 * hidden + hw_hidden
        self.encoder = GraphEncoder(
            node_dim, edge_dim, hidden=hidden, heads=heads, num_layers=num_layers,
            bidirectional=bidirectional, dropout=dropout,
        )
        self.hardware = MLP((hw_dim, hw_hidden))

    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        self.hardware.reset_parameters()

    def forward(self, observations: dict[str, Tensor]) -> Tensor:
        # Graphs are independent, so encoding them in slices of at most ``CHUNK_NODES`` real
        # nodes gives the same features. It keeps every per-edge tensor of a PPO minibatch of
        # 400-op graphs (tens of MB at once) small enough for the allocator's heap: above glibc's
        # mmap threshold each one was a fresh mapping, zeroed page by page, and the update spent
        # most of its time faulting pages in (docs/design.md, section 9).
        chunks = node_chunks(observations["node_mask"], self.CHUNK_NODES)
        if len(chunks) == 1:
            return self._forward(observations)
        return torch.cat([self._forward({k: v[s] for k, v in observations.items()}) for s in chunks])

    def _forward(self, observations: dict[str, Tensor]) -> Tensor:
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



class PolicyNetwork(nn.Module):
    """The actor of a trained policy: features, SB3's policy MLP (tanh), and the action head.

    ``forward(obs)`` returns unmasked logits ``[B, 2]`` (keep, fuse); the caller masks them.
    """

    def __init__(self, features: dict, pi_arch: list[int], num_actions: int = 2) -> None:
        super().__init__()
        self.config = {"features": dict(features), "pi_arch": list(pi_arch), "num_actions": num_actions}
        self.features = DecisionFeatures(**features)
        layers: list[nn.Module] = []
        width = self.features.features_dim
        for size in pi_arch:
            layers += [nn.Linear(width, size), nn.Tanh()]
            width = size
        self.pi = nn.Sequential(*layers)
        self.action = nn.Linear(width, num_actions)

    def forward(self, observations: dict[str, Tensor]) -> Tensor:
        return self.action(self.pi(self.features(observations)))

    @classmethod
    def check_config(cls, config: Any, where: str = "PolicyNetwork") -> dict[str, Any]:
        """Validate a saved :attr:`config` (from a policy card or a run's policy file) against
        the constructor's schema: known keys only, types and ranges, 2 actions (keep, fuse).

        Returns
        -------
        dict[str, Any]
            The keyword arguments of the constructor, as plain values.

        Raises
        ------
        ConfigError
            naming the first bad key.
        """
        if not isinstance(config, dict) or set(config) != {"features", "pi_arch", "num_actions"}:
            raise ConfigError(f"{where} must be an object with exactly features, pi_arch and num_actions")
        features = config["features"]
        if not isinstance(features, dict):
            raise ConfigError(f"{where}.features must be an object")
        unknown = sorted(set(features) - set(_FEATURE_ARGS))
        if unknown:
            raise ConfigError(f"{where}.features has unknown key(s) {unknown}")
        checked = {}
        for name, (kind, low, high, required) in _FEATURE_ARGS.items():
            if name in features:
                checked[name] = _check_arg(features[name], kind, low, high, f"{where}.features.{name}")
            elif required:
                raise ConfigError(f"{where}.features.{name} is missing")
        pi_arch = config["pi_arch"]
        if not isinstance(pi_arch, list) or len(pi_arch) > _MAX_PI_LAYERS:
            raise ConfigError(f"{where}.pi_arch must be a list of at most {_MAX_PI_LAYERS} layer widths")
        widths = [_check_arg(w, int, 1, _MAX_PI_WIDTH, f"{where}.pi_arch[{i}]") for i, w in enumerate(pi_arch)]
        if config["num_actions"] != 2 or isinstance(config["num_actions"], bool):
            raise ConfigError(f"{where}.num_actions must be 2 (keep, fuse), got {config['num_actions']!r}")
        return {"features": checked, "pi_arch": widths, "num_actions": 2}

    @classmethod
    def from_sb3(cls, model) -> "PolicyNetwork":
        """Copy the actor of a trained ``MaskablePPO`` (shared features extractor)."""
        policy = model.policy
        extractor = policy.features_extractor
        pi_arch = [m.out_features for m in policy.mlp_extractor.policy_net if isinstance(m, nn.Linear)]
        if any(not isinstance(m, (nn.Linear, nn.Tanh)) for m in policy.mlp_extractor.policy_net):
            raise ValueError("only tanh policy MLPs can be exported")
        net = cls(extractor.core_kwargs, pi_arch, policy.action_net.out_features)
        net.features.load_state_dict(extractor.core.state_dict())
        net.pi.load_state_dict(policy.mlp_extractor.policy_net.state_dict())
        net.action.load_state_dict(policy.action_net.state_dict())
        return net.eval()
